"""Regression tests for the hardening issue, one per item (numbers are the issue's).

Black box: only `procqueue`'s public API, real faults (os._exit, SIGKILL and
SIGSTOP by pid, segfaults, setrlimit in a child process), no mocks. Handlers
and hostile objects live in `hostile.py`. Every wait is bounded, so a hang
fails the test with a message instead of stalling the run; `_close` turns a
`shutdown()` that hangs or raises into a failure as well.

Scenarios that can wedge the test process itself run in a child Python under
a kill timer (items 4, 13, 15, 18, 19).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import hostile as x
import psutil
import pytest

import procqueue as pq

import handlers as h
from conftest import balanced, helper_pids

TESTS = os.path.dirname(os.path.abspath(__file__))


# --- helpers -----------------------------------------------------------------------------


def _close(pool: pq.Pool, timeout: float = 15.0) -> float:
    """`pool.shutdown(wait=True)` as a check: it must return, within `timeout`, without
    raising (a BaseException it raises is turned into an AssertionError, so a
    KeyboardInterrupt cannot end the session). Returns how long it took."""
    box: list[BaseException] = []

    def run() -> None:
        try:
            pool.shutdown(wait=True)
        except BaseException as exc:
            box.append(exc)

    started = time.monotonic()
    t = threading.Thread(target=run, name="test-shutdown", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"shutdown() did not return within {timeout} s")
    if box:
        raise AssertionError(f"shutdown() raised {type(box[0]).__name__}: {box[0]}") from box[0]
    return time.monotonic() - started


def _at_rest(pool: pq.Pool) -> pq.Stats:
    """The pool's books after shutdown: one outcome per accepted task."""
    s = pool.stats()
    assert s.balanced and balanced(s), f"books do not balance at rest: {s}"
    assert s.pending == 0 and s.retrying == 0 and s.in_flight == 0, s
    return s


def _process(pid: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid)
    return None


def _alive(proc: psutil.Process | None) -> bool:
    """Running and not a zombie (psutil checks the creation time, so a reused pid is not it)."""
    if proc is None:
        return False
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _end(procs: Iterable[psutil.Process | None]) -> None:
    """SIGKILL each process still alive, by pid (a stopped one too)."""
    for proc in procs:
        if proc is not None and _alive(proc):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _gone_within(proc: psutil.Process | None, timeout: float) -> float | None:
    """Seconds until `proc` is gone, or None if it is still alive after `timeout`."""
    started = time.monotonic()
    while _alive(proc):
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.02)
    return time.monotonic() - started


def _strays(root: psutil.Process | None = None) -> list[psutil.Process]:
    """Descendants of `root` (default: us) other than multiprocessing's own helpers."""
    root = root or psutil.Process()
    try:
        helpers = helper_pids(root)
        family = root.children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in family if p.pid not in helpers and _alive(p)]


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _run(args: list[str], *, timeout: float, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    """Run a child Python; past `timeout`, end it and everything under it, by pid, and fail."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = [*_strays(_process(proc.pid)), _process(proc.pid)]
        _end(family)
        out, err = proc.communicate()
        raise AssertionError(f"{args} did not end within {timeout} s\nstdout:\n{out}\nstderr:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _describe(results: list[Any]) -> dict[int, str]:
    """Index -> type name of every item of a map's results that is not its own index."""
    return {i: type(v).__name__ for i, v in enumerate(results) if type(v) is not int or v != i}


# --- item 5 ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item5_done_callbacks_never_run_on_the_manager_thread(tmp_path: Path) -> None:
    """Item 5: done-callbacks that submit into a full pool, raise SystemExit/KeyboardInterrupt or block cost nothing else."""
    threads: set[str] = set()

    # (a) the crawler: each finished task submits two more (the links it found) until 200 were
    # submitted, so the queue fills and the callbacks' submits wait for room (backpressure "block").
    total = 200
    pool = pq.Pool(workers=2, capacity=4)
    try:
        lock = threading.Lock()
        counts = {"submitted": 0, "finished": 0}
        all_done = threading.Event()

        def crawl(fut: Any) -> None:
            threads.add(threading.current_thread().name)
            with lock:
                counts["finished"] += 1
                if counts["finished"] == total:
                    all_done.set()
                more = min(2, total - counts["submitted"])
                counts["submitted"] += more
            for _ in range(more):
                pool.submit(h.square, fut.result() % 1000).add_done_callback(crawl)

        for i in range(4):  # as many as fit: the main thread itself never waits for room
            with lock:
                counts["submitted"] += 1
            pool.submit(h.square, i).add_done_callback(crawl)
        assert all_done.wait(15), f"the crawler stalled: {counts}, {pool.stats()}"
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert s.submitted == s.completed == total

    # (b) a callback that raises SystemExit or KeyboardInterrupt costs nothing but itself.
    gate = str(tmp_path / "gate-b")
    pool = pq.Pool(workers=2)
    try:
        futs = [pool.submit(x.wait_for_file, gate, i) for i in range(2)]

        def exits(fut: Any) -> None:
            threads.add(threading.current_thread().name)
            raise SystemExit(2)

        def interrupts(fut: Any) -> None:
            threads.add(threading.current_thread().name)
            raise KeyboardInterrupt

        futs[0].add_done_callback(exits)  # added before the gate opens: the task cannot be done yet
        futs[1].add_done_callback(interrupts)
        Path(gate).touch()
        assert [f.result(timeout=30) for f in futs] == [0, 1]
        assert pool.submit(h.square, 5).result(timeout=10) == 25
        assert list(pool.map(h.square, range(20))) == [i * i for i in range(20)]
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert s.completed == 23 and s.failed == 0

    # (c) a callback that blocks does not delay the results of other futures.
    gate = str(tmp_path / "gate-c")
    pool = pq.Pool(workers=2)
    release = threading.Event()
    try:
        first = pool.submit(x.wait_for_file, gate, "first")
        started = threading.Event()

        def blocks(fut: Any) -> None:
            threads.add(threading.current_thread().name)
            started.set()
            release.wait(3)

        first.add_done_callback(blocks)
        Path(gate).touch()
        assert first.result(timeout=30) == "first"
        assert started.wait(10), "the blocking callback never ran"
        t0 = time.monotonic()
        later = pool.submit(h.square, 7)
        assert later.result(timeout=10) == 49
        took = time.monotonic() - t0
        assert took < 1.0, f"a blocking done-callback delayed another future's result by {took:.2f} s"
    finally:
        release.set()
        _close(pool)
    _at_rest(pool)

    # (d) none of them ran on the thread that moves the pool's messages.
    assert threads, "no callback ran"
    assert "procqueue-manager" not in threads, f"callbacks ran on {sorted(threads)}"


# --- item 7 ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item7_unpickling_that_raises_system_exit_in_the_parent_fails_only_its_task() -> None:
    """Item 7: a result (or a worker's exception) whose unpickling in the parent raises SystemExit fails that task alone."""
    pool = pq.Pool(workers=2)
    try:
        before = [pool.submit(h.square, i) for i in range(5)]
        by_reduce = pool.submit(x.make_exits_on_load)
        by_setstate = pool.submit(x.make_setstate_exits)
        bad_error = pool.submit(x.raise_exiting_error)
        after = [pool.submit(h.square, i) for i in range(5, 10)]
        for fut in (by_reduce, by_setstate):
            err = fut.exception(timeout=30)
            assert isinstance(err, pq.SerializationError), f"{type(err).__name__}: {err}"
            assert err.stage == "result", err.stage
        err = bad_error.exception(timeout=30)
        assert isinstance(err, pq.ProcQueueError) and not isinstance(err, pq.PoolBroken), f"{type(err).__name__}: {err}"
        assert [f.result(timeout=30) for f in before + after] == [i * i for i in range(10)]
        assert pool.submit(h.square, 11).result(timeout=30) == 121
        assert list(pool.map(h.square, range(20))) == [i * i for i in range(20)]
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert (s.failed, s.completed) == (3, 31), s


# --- item 8 ------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_item8_an_argument_that_kills_its_worker_while_unpickling_fails_alone() -> None:
    """Item 8: arguments whose unpickling in the worker calls os._exit or segfaults: each fails with WorkerCrashed, never the pool."""
    pool = pq.Pool(workers=2)
    try:
        good: list[pq.Future] = []
        bad: list[pq.Future] = []
        for i in range(6):
            good.append(pool.submit(h.identity, i))
            bad.append(pool.submit(h.identity, x.ExitsWorkerOnLoad() if i % 2 == 0 else x.SegfaultsOnLoad()))
        good.append(pool.submit(h.identity, 6))
        for i, fut in enumerate(bad):
            err = fut.exception(timeout=60)
            assert isinstance(err, pq.WorkerCrashed), f"bad argument {i}: {type(err).__name__}: {err}"
        assert [f.result(timeout=60) for f in good] == list(range(7))
        assert pool.submit(h.square, 3).result(timeout=30) == 9
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert (s.failed, s.completed) == (6, 8), s


@pytest.mark.timeout(60)
def test_an_argument_that_exits_while_unpickling_in_the_worker_is_named_in_the_error() -> None:
    """An argument whose unpickling raises SystemExit(3) in the worker fails its task with a
    message that names the exception ("SystemExit: 3"), not a bare "3"."""
    pool = pq.Pool(workers=1)
    try:
        err = pool.submit(h.identity, x.ExitsOnLoad()).exception(timeout=30)
        assert isinstance(err, pq.SerializationError) and err.stage == "argument", f"{type(err).__name__}: {err}"
        assert "SystemExit: 3 (in worker pid" in str(err), str(err)
        assert pool.submit(h.square, 3).result(timeout=30) == 9
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert (s.failed, s.completed) == (1, 1), s


# --- item 9 ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item9_an_exception_whose_str_raises_is_not_a_crash() -> None:
    """Item 9: a handler's exception whose __str__ (and __repr__) raises, or whose __str__ raises SystemExit, is not WorkerCrashed."""
    cases = [
        (x.raise_str_raises, x.StrRaises),
        (x.raise_str_and_repr_raise, x.StrAndReprRaise),
        (x.raise_str_exits, x.StrExits),
    ]
    pool = pq.Pool(workers=2)
    try:
        futs = [(pool.submit(fn), kind) for fn, kind in cases]
        others = [pool.submit(h.square, i) for i in range(10)]
        for fut, kind in futs:
            err = fut.exception(timeout=30)
            # type names only: str() or repr() of these objects raises
            assert not isinstance(err, pq.WorkerCrashed), f"{kind.__name__}: got WorkerCrashed"
            assert isinstance(err, (kind, pq.TaskFailed)), f"{kind.__name__}: got {type(err).__name__}"
        assert [f.result(timeout=30) for f in others] == [i * i for i in range(10)]
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert (s.failed, s.completed, s.crashed) == (3, 10, 0), s


# --- item 10 -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item10_a_handler_that_failed_to_unpickle_once_is_sent_again(tmp_path: Path) -> None:
    """Item 10: after a handler failed to unpickle in a worker, later tasks with the same handler get it resent and run."""
    handler = x.FirstLoadFails(str(tmp_path))
    pool = pq.Pool(workers=1)
    try:
        err = pool.submit(handler, 1).exception(timeout=30)
        assert isinstance(err, pq.SerializationError), f"{type(err).__name__}: {err}"
        assert err.stage == "handler", err.stage
        second = pool.submit(handler, 2)
        err = second.exception(timeout=30)
        assert err is None, f"the second task with the same handler failed: {type(err).__name__}: {err}"
        assert second.result() == 4
        assert list(pool.map(handler, range(5))) == [0, 2, 4, 6, 8]
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert (s.failed, s.completed) == (1, 6), s


# --- item 11 -----------------------------------------------------------------------------


# Generous: the items the killed worker ran but had not reported yet (up to ~200 ms of
# work, 10**5 tiny items) run again, and today each goes alone in a batch of its own
# (`Run.single` sets chunksize=1), which takes 3 to 60 s depending on where the fault lands.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_item11_a_batch_of_more_than_2_to_the_20_items_keeps_timeouts_and_crashes_per_item(fault: str) -> None:
    """Item 11: in a batch of over 2**20 items, a hang past task_timeout is a TaskTimeout and a crash is charged to its item."""
    n = 2**20 + 10
    items = list(range(n))  # one batch of 2**20 + 5 items, the bad one at index 2**20 + 3 (+ 4)
    if fault == "hang":
        pool = pq.Pool(workers=2, task_timeout=1.0)
        fn, bad, error = x.hang_at_big, x.BIG_HANG, "TaskTimeout"
    else:
        pool = pq.Pool(workers=2, max_retries=0)
        fn, bad, error = x.exit_at_big, x.BIG_EXIT, "WorkerCrashed"
    try:
        out = list(pool.map(fn, items, chunksize=2**20 + 5, return_exceptions=True))
    finally:
        _close(pool, 30)
    assert len(out) == n
    assert _describe(out) == {bad: error}
    s = _at_rest(pool)
    assert (s.failed, s.timed_out, s.crashed, s.completed) == (1, int(fault == "hang"), int(fault == "crash"), n - 1), s


# --- item 12 -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item12_a_grandchild_holding_the_workers_descriptors_delays_nothing(start_method: str) -> None:
    """Item 12: a handler forks a long-lived child; a later crash is reported within 2 s and shutdown does not wait for it."""
    pool = pq.Pool(workers=1, start_method=start_method)
    grandchildren: list[psutil.Process | None] = []
    closed = False
    try:
        grandchildren.append(_process(pool.submit(x.fork_sleeper, 30).result(timeout=30)))
        t0 = time.monotonic()
        crash = pool.submit(x.die_later, 0, 1)
        try:
            err = crash.exception(timeout=5)
        except TimeoutError:
            pytest.fail(
                "the worker's os._exit was not reported within 5 s (its grandchild still holds its descriptors)"
            )
        took = time.monotonic() - t0
        assert isinstance(err, pq.WorkerCrashed), f"{type(err).__name__}: {err}"
        assert took < 2.0, f"the crash took {took:.2f} s to arrive"
        assert pool.submit(h.square, 3).result(timeout=10) == 9
        # the live worker leaves a grandchild too: shutdown must not wait for it
        grandchildren.append(_process(pool.submit(x.fork_sleeper, 30).result(timeout=30)))
        took = _close(pool, 10)
        closed = True
        assert took < 3.0, f"shutdown took {took:.2f} s"
    finally:
        _end(grandchildren)
        if not closed:
            _close(pool)
    s = _at_rest(pool)
    assert (s.failed, s.completed, s.crashed) == (1, 3, 1), s


# --- item 13 -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item13_a_worker_holding_the_gil_dies_soon_after_its_parent_is_killed(tmp_path: Path) -> None:
    """Item 13: parent SIGKILLed while its worker is in a GIL-holding C call: the worker is gone within 2 s."""
    pid_file = tmp_path / "pid"
    # sum(range(10**11)) runs entirely in C and never releases the GIL (checked by hand:
    # another thread of the same process does not run at all while it does).
    script = _script(
        tmp_path,
        "parent.py",
        f"""
        import sys, time
        sys.path.insert(0, {TESTS!r})
        import procqueue as pq
        import hostile

        if __name__ == "__main__":
            pool = pq.Pool(workers=1)
            pool.submit(hostile.gil_hog, {str(pid_file)!r})
            time.sleep(60)
        """,
    )
    parent = subprocess.Popen([sys.executable, str(script)])
    family: list[psutil.Process | None] = []
    worker: psutil.Process | None = None
    try:
        worker = _process(h.wait_for_pid(str(pid_file), timeout=30))
        time.sleep(0.5)  # it wrote its pid just before the call: now it is inside it
        family = list(_strays(_process(parent.pid)))
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        gone = _gone_within(worker, 5.0)
        assert gone is not None, "the worker was still alive 5 s after its parent was SIGKILLed"
        assert gone < 2.0, f"the worker outlived its SIGKILLed parent by {gone:.2f} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        _end([worker])
        for proc in family:  # the collector, the fork server, the resource tracker: they end on their own
            if _gone_within(proc, 5.0) is None:
                _end([proc])


# --- item 14 -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item14_a_worker_frozen_while_idle_does_not_keep_tasks_forever() -> None:
    """Item 14: a worker SIGSTOPped while idle: 20 short tasks still all complete within 10 s (task_timeout=2)."""
    pool = pq.Pool(workers=2, task_timeout=2.0)
    victim: psutil.Process | None = None
    try:
        assert [f.result(timeout=30) for f in [pool.submit(h.sleep_then, i, 0.05) for i in range(4)]] == [0, 1, 2, 3]
        pids = [w.pid for w in pool.stats().workers]
        assert len(pids) == 2 and all(p > 0 for p in pids), pids
        victim = _process(pids[0])
        assert victim is not None
        victim.suspend()  # SIGSTOP, by pid, while it waits for work
        futs = [pool.submit(h.sleep_then, i, 0.05) for i in range(20)]
        _done, not_done = wait(futs, timeout=10)
        assert not not_done, f"{len(not_done)} of 20 tasks still not done after 10 s with a frozen worker"
        assert sorted(f.result() for f in futs) == list(range(20))
    finally:
        _end([victim])
        _close(pool)
    s = _at_rest(pool)
    assert s.failed == 0 and s.completed == 24, s


# --- item 15 -----------------------------------------------------------------------------

_FD_SCRIPT = """
import gc, json, os, resource, sys, time
sys.path.insert(0, {tests!r})
import psutil
import procqueue as pq
import handlers as h


def fds():
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def strays():
    from multiprocessing import forkserver, resource_tracker

    me = psutil.Process()
    # multiprocessing's helpers: forked from this process (same command line) or exec'd.
    helpers = set([forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid])
    for child in me.children():
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd:
            helpers.add(child.pid)
    left = []
    for p in me.children(recursive=True):
        try:
            if p.pid not in helpers and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except psutil.Error:
            pass
    return left


def say(**fields):
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if sys.argv[1] == "respawn":
        pool = pq.Pool(workers=1)
        try:
            say(warm=pool.submit(h.square, 2).result(timeout=30))
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(fds()) + 2, hard))  # no room for a new worker's pipes
            try:
                err = pool.submit(h.die, 7).exception(timeout=30)
                time.sleep(0.5)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            say(crash=type(err).__name__)
            say(after=pool.submit(h.square, 3).result(timeout=30))
        finally:
            pool.shutdown()
        say(balanced=pool.stats().balanced)
    else:
        with pq.Pool(workers=2) as pool:  # starts the fork server and resource tracker: multiprocessing's to keep
            pool.submit(h.square, 2).result(timeout=30)
        for extra in range(40):  # every point where start-up can run out of descriptors
            before = fds()
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(before) + extra, hard))
            try:
                pool = pq.Pool(workers=2)
            except BaseException as exc:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                error, ours = type(exc).__module__ + "." + type(exc).__name__, isinstance(exc, pq.ProcQueueError)
                del exc
                gc.collect()
                time.sleep(0.1)
                say(extra=extra, error=error, ours=ours, leaked=sorted(set(fds()) - set(before)), strays=strays())
                continue
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            try:
                say(extra=extra, started=pool.submit(h.square, 4).result(timeout=30))
            finally:
                pool.shutdown()
            break
"""


@pytest.mark.timeout(90)
def test_item15_running_out_of_descriptors_neither_breaks_the_pool_nor_leaks(tmp_path: Path) -> None:
    """Item 15: out of fds at respawn, the pool recovers; a Pool() that cannot start raises a procqueue error and leaks nothing."""
    script = _script(tmp_path, "fds.py", _FD_SCRIPT.format(tests=TESTS))

    run = _run([str(script), "respawn"], timeout=60)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines == [
        {"warm": 4},
        {"crash": "WorkerCrashed"},
        {"after": 9},
        {"balanced": True},
    ], f"exit {run.returncode}, {lines}\nstderr:\n{run.stderr[-3000:]}"

    run = _run([str(script), "start"], timeout=60)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines and "started" in lines[-1], (
        f"exit {run.returncode}, {lines}\nstderr:\n{run.stderr[-3000:]}"
    )
    failures = [line for line in lines if "error" in line]
    assert failures, "Pool() never failed to start: the limits tried were too generous"
    wrong = [f for f in failures if not f["ours"] or f["leaked"] or f["strays"]]
    assert not wrong, "a Pool() that could not start:\n" + "\n".join(map(str, wrong))


# --- item 17 -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_item17_duration_ms_of_a_slow_task_among_tiny_ones_is_its_own() -> None:
    """Item 17: the duration_ms of a 0.2 s task submitted among 2000 tiny ones is its own (about 200 ms), not a batch average."""
    with pq.Pool(workers=2) as pool:
        assert list(pool.map(h.spin, [0] * 3000)) == [0] * 3000  # measured as tiny: runs in unmarked batches
        for _ in range(3):
            blockers = [pool.submit(h.sleep_then, None, 0.3) for _ in range(2)]  # so the rest queue up and merge
            tiny = [pool.submit(h.spin, 0) for _ in range(1000)]
            slow = pool.submit(h.spin, 200)
            tiny += [pool.submit(h.spin, 0) for _ in range(1000)]
            assert slow.result(timeout=30) == 200
            assert [f.result(timeout=30) for f in tiny] == [0] * 2000
            assert [b.result(timeout=30) for b in blockers] == [None, None]
            assert slow.duration_ms is not None and slow.duration_ms >= 150, (
                f"a 200 ms task reported duration_ms={slow.duration_ms}"
            )
    s = _at_rest(pool)
    assert s.completed == 3000 + 3 * 2003, s


# --- item 18 -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_item18_a_function_redefined_under_main_runs_its_new_definition(tmp_path: Path, method: str) -> None:
    """Item 18: a module-level function redefined under `if __name__ == "__main__":` runs its new definition when submitted again."""
    script = _script(
        tmp_path,
        "redefine.py",
        """
        import sys
        import procqueue as pq


        def work(x):
            return "old"


        if __name__ == "__main__":
            with pq.Pool(workers=1, start_method=sys.argv[1]) as pool:
                print(pool.submit(work, 1).result(timeout=30), flush=True)

                def work(x):
                    return "new"

                print(pool.submit(work, 1).result(timeout=30), flush=True)
            print("balanced", pool.stats().balanced, flush=True)
        """,
    )
    run = _run([str(script), method], timeout=45)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["old", "new", "balanced", "True"], run.stdout


# --- item 19 -----------------------------------------------------------------------------

_GUARD = re.compile(r"""if __name__ == (["'])__main__\1""")
# What multiprocessing itself prints (from the fork server) when a script without the
# guard starts a process while being imported: not procqueue's message.
_STDLIB_BOOTSTRAP = re.compile(
    r"An attempt has been made to start a new process before the.*?Safe importing of main module.*?\n", re.S
)


@pytest.mark.timeout(90)
def test_item19_scripts_fed_on_stdin_work_and_a_missing_main_guard_is_named(tmp_path: Path) -> None:
    """Item 19: a script fed on stdin runs. One without `if __name__ == "__main__":` runs while its
    process is single-threaded as the first pool starts (the fork server is forked from it, so the
    workers do not run the script again, as under fork); started from a threaded process (the fork
    server exec'd) it fails with a message that names the guard."""
    job = _script(
        tmp_path,
        "job.py",
        """
        import procqueue as pq


        def square(x):
            return x * x


        if __name__ == "__main__":
            with pq.Pool(workers=2) as pool:
                print(sum(pool.map(square, range(100))), flush=True)
        """,
    )
    with open(job) as stdin:
        run = _run(["-"], stdin=stdin, timeout=45)
    assert run.returncode == 0, f"`python - < job.py` failed:\n{run.stderr[-3000:]}"
    assert run.stdout.split() == [str(sum(i * i for i in range(100)))], run.stdout

    unguarded = _script(
        tmp_path,
        "unguarded.py",
        """
        import sys
        import threading
        import procqueue as pq

        if sys.argv[1:] == ["threaded"]:
            threading.Thread(target=threading.Event().wait, daemon=True).start()


        def square(x):
            return x * x


        with pq.Pool(workers=2) as pool:
            print(sum(pool.map(square, range(100))), flush=True)
        """,
    )
    run = _run([str(unguarded), "single"], timeout=45)
    assert run.returncode == 0, f"an unguarded script failed with its fork server forked:\n{run.stderr[-3000:]}"
    assert run.stdout.split() == [str(sum(i * i for i in range(100)))], run.stdout

    run = _run([str(unguarded), "threaded"], timeout=45)
    assert run.returncode != 0, "a script without the __main__ guard succeeded with an exec'd fork server?"
    ours = _STDLIB_BOOTSTRAP.sub("", run.stderr)
    assert _GUARD.search(ours), f"procqueue's error does not name the missing guard:\n{ours[-3000:]}"


# --- item 4 ------------------------------------------------------------------------------

_ABANDON_SCRIPT = """
import contextlib, faulthandler, gc, json, sys
sys.path.insert(0, {tests!r})
import procqueue as pq
import handlers as h


class Stop(Exception):
    pass


def by_break(it):
    for r in it:
        if r > 100:
            break


def by_raise(it):
    with contextlib.suppress(Stop):
        for r in it:
            if r > 100:
                raise Stop


def after_next(it):
    next(it)


def in_zip(it):
    assert len(list(zip(it, range(3)))) == 3


def say(**fields):
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    faulthandler.dump_traceback_later({dump_after}, exit=True)  # a deadlock shows its stacks, then ends
    # The cyclic GC runs every few allocations, on whichever thread makes them: the
    # manager thread too, at any point, while it holds the pool's lock.
    gc.set_threshold(25, 5, 5)
    for how, abandon in [("break", by_break), ("raise", by_raise), ("next", after_next), ("zip", in_zip)]:
        for kind in ("list", "generator"):
            say(how=how, kind=kind, start=True)
            pool = pq.Pool(workers=2)
            for i in range(100 if how == "break" else 40):
                source = list(range(1000)) if kind == "list" else (v for v in range(1000))
                abandon(pool.map(h.square, source))
                if i % 10 == 0:
                    gc.collect()
                try:
                    ok = pool.submit(h.square, 3).result(timeout=5) == 9
                except TimeoutError:
                    ok = False
                if not ok:
                    say(how=how, kind=kind, round=i, stuck=True)
                    raise SystemExit(1)
            pool.shutdown()
            s = pool.stats()
            say(how=how, kind=kind, balanced=s.balanced, failed=s.failed, cancelled=s.cancelled, stats=str(s))
    say(done=True)
"""


@pytest.mark.timeout(60)
def test_item4_an_abandoned_map_releases_the_pool(tmp_path: Path) -> None:
    """Item 4: leaving a map early (break, an exception, next() then dropping it, zip) keeps the pool usable and its books balanced."""
    # In a child process: if the manager thread deadlocks on its own lock, the map's
    # generator and any later garbage collection of the same pool's maps block on that
    # lock for good, in whatever thread runs them (pytest-timeout cannot end that).
    script = _script(tmp_path, "abandon.py", _ABANDON_SCRIPT.format(tests=TESTS, dump_after=25))
    run = _run([str(script)], timeout=35)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    where = lines[-1] if lines else None
    assert run.returncode == 0 and lines and lines[-1] == {"done": True}, (
        f"exit {run.returncode}; last: {where}\nstderr:\n{run.stderr[-4000:]}"
    )
    books = [line for line in lines if "balanced" in line]
    assert len(books) == 8
    for line in books:
        assert line["balanced"] and line["failed"] == 0, line


# --- item 16 -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("when", ["idle", "busy"])
def test_item16_a_killed_collector_is_replaced_and_nothing_is_lost_or_counted_twice(when: str) -> None:
    """Item 16: SIGKILL the collector (idle, or with work in flight): the pool starts another,
    every task ends exactly once with its right value, and the books count each once."""
    pool = pq.Pool(workers=2)
    try:
        assert pool.submit(h.square, 2).result(timeout=30) == 4
        first = pool.stats().collector
        assert first is not None
        futs = [pool.submit(h.sleep_then, i, 0.02) for i in range(60)] if when == "busy" else []
        os.kill(first.pid, signal.SIGKILL)
        futs += [pool.submit(h.square, i) for i in range(60, 100)]
        got = [f.result(timeout=60) for f in futs]
        want = list(range(60)) + [i * i for i in range(60, 100)] if when == "busy" else [i * i for i in range(60, 100)]
        assert got == want
        assert list(pool.map(h.square, range(500))) == [i * i for i in range(500)]
        deadline = time.monotonic() + 5
        second = pool.stats().collector
        while (second is None or second.pid == first.pid) and time.monotonic() < deadline:
            time.sleep(0.2)  # a new pid shows once the monitor has sampled it
            second = pool.stats().collector
        assert second is not None and second.pid != first.pid and psutil.pid_exists(second.pid)
    finally:
        _close(pool)
    s = _at_rest(pool)
    total = 1 + len(futs) + 500
    assert s.submitted == s.completed == total and s.failed == 0
    assert s.crashed == 0 and s.timed_out == 0  # the collector's death is charged to no task


@pytest.mark.timeout(60)
def test_item5_arguments_are_pickled_in_the_callers_thread_not_under_the_pools_lock() -> None:
    """Item 5: an argument whose pickling takes a lock the submitting thread holds (while it
    waits for room in a full pool) must not deadlock the pool; one whose pickling raises
    SystemExit fails its own task with SerializationError (stage argument)."""
    lock = threading.RLock()
    with pq.Pool(workers=1, capacity=2) as pool:
        with lock:
            futs = [pool.submit(h.identity, x.NeedsLock(lock)) for _ in range(12)]
        assert [f.result(timeout=30) for f in futs] == [7] * 12
        bad = pool.submit(h.identity, x.ExitsWhenPickled())
        with pytest.raises(pq.SerializationError, match="argument 1") as info:
            bad.result(timeout=30)
        assert info.value.stage == "argument"
        assert pool.submit(h.square, 6).result(timeout=30) == 36
    s = _at_rest(pool)
    assert s.submitted == 14 and s.completed == 13 and s.failed == 1


@pytest.mark.timeout(60)
def test_item5_a_blocked_callback_holds_up_other_callbacks_half_a_second_at_most(tmp_path: Path) -> None:
    """Item 5 (found in review): a done-callback that blocks must not keep the callbacks of
    other futures waiting; nor, in TaskQueue.results(), must a result whose unpickling blocks
    in the parent keep the other results from coming out."""
    release = threading.Event()
    with pq.Pool(workers=2) as pool:
        a = pool.submit(h.square, 1)
        a.add_done_callback(lambda _: release.wait(30))
        a.result(timeout=30)
        ran = threading.Event()
        b = pool.submit(h.square, 2)
        b.add_done_callback(lambda _: ran.set())
        assert b.result(timeout=30) == 4
        assert ran.wait(5), "another future's callback waited for a blocked one"
        release.set()

    gate = str(tmp_path / "gate")
    got: list[Any] = []
    handler = functools.partial(x.blocks_in_parent, parent_pid=os.getpid(), gate=gate)
    with pq.TaskQueue(handler, workers=2) as q:
        for i in range(30):
            q.submit(pq.Task(i, i))
        done = threading.Event()

        def consume() -> None:
            for r in q.results():
                got.append(r.task_id)
                if len(got) == 29:
                    done.set()

        threading.Thread(target=consume, name="consumer", daemon=True).start()
        ok = done.wait(15)
        Path(gate).touch()
        assert ok, f"only {len(got)} of the 29 healthy results came out while one blocked"


@pytest.mark.timeout(60)
def test_item5_a_map_item_or_handler_whose_pickling_raises_system_exit_fails_alone() -> None:
    """Item 5 / invariant 8 (found in review): map items and handlers are pickled by the pool's
    thread; a `__reduce__` raising SystemExit there fails its own tasks, never the pool."""
    with pq.Pool(workers=2) as pool:
        out = list(pool.map(h.identity, [1, x.ExitsWhenPickled(), 3], return_exceptions=True))
        assert out[0] == 1 and out[2] == 3 and isinstance(out[1], pq.SerializationError)
        err = pool.submit(x.HandlerThatExitsWhenPickled(), 1).exception(timeout=30)
        assert isinstance(err, pq.SerializationError) and err.stage == "handler"
        out = list(pool.map(x.HandlerThatExitsWhenPickled(), [1, 2], return_exceptions=True))
        assert all(isinstance(e, pq.SerializationError) and e.stage == "handler" for e in out)
        assert pool.submit(h.square, 5).result(timeout=30) == 25
    s = _at_rest(pool)
    assert s.failed == 4 and s.completed == 3


@pytest.mark.timeout(90)
def test_item16_a_collector_frozen_with_sigstop_is_replaced() -> None:
    """Item 16 (found in review): a collector stopped from outside forwards nothing and never
    dies; the pool notices it is stopped, kills it, restarts it, and every task completes."""
    pool = pq.Pool(workers=2, task_timeout=5.0)
    try:
        futs = [pool.submit(h.sleep_then, i, 0.02) for i in range(100)]
        time.sleep(0.3)
        first = pool.stats().collector
        assert first is not None
        os.kill(first.pid, signal.SIGSTOP)
        try:
            assert [f.result(timeout=60) for f in futs] == list(range(100))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first.pid, signal.SIGCONT)
    finally:
        _close(pool)
    s = _at_rest(pool)
    assert s.completed == 100 and s.failed == 0 and s.timed_out == 0
