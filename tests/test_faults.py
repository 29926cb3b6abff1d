"""The crash matrix: every fault, under every start method, costs one attempt and never the pool."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import procqueue as pq

import handlers as h
from conftest import balanced

# fault -> (call, expected error, message pattern)
MATRIX: dict[str, tuple[Callable[[pq.Pool], pq.Future], type[BaseException], str]] = {
    "raise": (lambda p: p.submit(h.boom, 1), h.Boom, "boom 1"),
    "sys.exit": (lambda p: p.submit(h.exit_call, 3), SystemExit, "3"),
    "os._exit": (lambda p: p.submit(h.die, 7), pq.WorkerCrashed, r"died with exit code 7 while running task \d+"),
    "segfault": (lambda p: p.submit(h.segfault), pq.WorkerCrashed, r"SIGSEGV\(-11\)(.|\n)*Segmentation fault"),
    "hang": (lambda p: p.options(timeout=0.5).submit(h.hang, 60), pq.TaskTimeout, "ran past its timeout of 0.5 s"),
    "arg does not pickle": (
        lambda p: p.submit(h.identity, threading.Lock()),
        pq.SerializationError,
        r"argument 1 \(a _thread.lock\) could not be pickled",
    ),
    "arg does not unpickle in worker": (
        lambda p: p.submit(h.identity, h.FailsToUnpickle()),
        pq.SerializationError,
        "refuses to unpickle here",
    ),
    "result does not pickle": (
        lambda p: p.submit(h.unpicklable_result),
        pq.SerializationError,
        r"result \(a _thread.lock\) could not be pickled",
    ),
    "result does not unpickle in parent": (
        lambda p: p.submit(h.make_parent_cannot_load),
        pq.SerializationError,
        "could not be unpickled in the parent",
    ),
    "exception does not pickle": (lambda p: p.submit(h.raise_unpicklable), pq.TaskFailed, "could not be sent back"),
}


@pytest.mark.parametrize("fault", list(MATRIX))
def test_crash_matrix(fault: str, start_method: str) -> None:
    call, expected, pattern = MATRIX[fault]
    pool = pq.Pool(workers=2, start_method=start_method)
    try:
        bystanders = [pool.submit(h.sleep_then, i, 0.01) for i in range(6)]
        fut = call(pool)
        with pytest.raises(expected, match=pattern):
            fut.result(timeout=60)
        assert [b.result(timeout=60) for b in bystanders] == list(range(6))
        assert list(pool.map(h.square, range(50))) == [x * x for x in range(50)]
    finally:
        pool.shutdown(wait=True)
    s = pool.stats()
    assert balanced(s) and s.failed == 1 and s.completed == 56


def test_crash_details(start_method: str) -> None:
    with pq.Pool(workers=1, start_method=start_method) as pool:
        fut = pool.submit(h.segfault)
        err = fut.exception(timeout=60)
        assert isinstance(err, pq.WorkerCrashed)
        assert err.signal == signal.SIGSEGV and err.exitcode == -11 and err.attempts == 1
        assert "Fatal Python error: Segmentation fault" in err.fault_traceback
        assert "in segfault" in err.fault_traceback  # faulthandler names the frame
        assert pool.submit(h.square, 5).result(timeout=60) == 25
        s = pool.stats()
        assert s.crashed == 1


@pytest.mark.parametrize("retries", [0, 1])
def test_sigkill_from_outside(tmp_path: Any, retries: int) -> None:
    path = str(tmp_path / "pid")
    with pq.Pool(workers=2, max_retries=retries) as pool:
        others = [pool.submit(h.sleep_then, i, 0.05) for i in range(20)]
        fut = pool.submit(h.pid_then_sleep, path, 2.0)
        victim = h.wait_for_pid(path)
        os.remove(path)
        os.kill(victim, signal.SIGKILL)
        if retries:
            assert fut.result(timeout=60) != victim and fut.attempts == 2
        else:
            with pytest.raises(pq.WorkerCrashed, match=r"SIGKILL\(-9\)") as info:
                fut.result(timeout=60)
            assert info.value.signal == signal.SIGKILL and info.value.pid == victim
        assert [f.result(timeout=60) for f in others] == list(range(20))
        assert len({w.pid for w in pool.stats().workers} - {victim}) == 2  # replaced
    s = pool.stats()
    assert balanced(s) and s.crashed == 1 and s.retried == retries
    assert sum(w.deaths for w in s.workers) == 1


def test_a_worker_killed_inside_a_tiny_batch_costs_nothing_but_shows(tmp_path: Any) -> None:
    """SIGKILL (as the OOM killer sends) inside a batch of tiny tasks: nobody is charged
    (the batch runs again, marked one by one), every result is right, and the worker's
    death shows in its slot's `deaths`."""
    with pq.Pool(workers=2) as pool:
        killed: list[int] = []

        def kill_one() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                running = [  # inside a batch of tiny tasks: running, no task of its own marked
                    w.pid for w in pool.stats().workers if w.state == "running" and w.task_id is None and w.pid > 0
                ]
                if running:
                    killed.append(running[0])
                    os.kill(running[0], signal.SIGKILL)
                    return
                time.sleep(0.005)

        assert sum(pool.map(h.square, range(1000))) == sum(i * i for i in range(1000))  # timed: tiny now
        killer = threading.Thread(target=kill_one)
        killer.start()
        total = 0
        while killer.is_alive():
            total += sum(pool.map(h.square, range(200_000))) - sum(i * i for i in range(200_000))
        killer.join()
        assert total == 0 and killed
        s = pool.stats()
    assert balanced(s) and s.failed == 0 and s.crashed == 0
    assert sum(w.deaths for w in s.workers) == 1, [w.deaths for w in s.workers]


def test_raising_initializer_breaks_the_pool_clearly(start_method: str) -> None:
    pool = pq.Pool(workers=2, initializer=h.bad_init, start_method=start_method)
    with pytest.raises(pq.InitializerFailed, match="initializer is broken"):
        # submit itself raises if the workers already reported; else the future fails
        pool.submit(h.square, 2).result(timeout=60)
    with pytest.raises(pq.InitializerFailed):
        pool.submit(h.square, 3)
    pool.shutdown(wait=True)
    assert balanced(pool.stats())


def test_one_bad_argument_in_a_merged_batch_fails_alone() -> None:
    with pq.Pool(workers=1) as pool:
        blocker = pool.submit(h.sleep_then, None, 0.3)
        futs = [pool.submit(h.identity, i) for i in range(5)]
        bad = pool.submit(h.identity, h.FailsToUnpickle())
        futs += [pool.submit(h.identity, i) for i in range(5, 10)]
        blocker.result(timeout=60)
        assert [f.result(timeout=60) for f in futs] == list(range(10))
        with pytest.raises(pq.SerializationError, match="refuses to unpickle"):
            bad.result(timeout=60)
    assert balanced(pool.stats())


def test_crash_inside_a_tiny_task_batch_is_charged_to_the_right_task() -> None:
    """Tiny tasks run in unmarked batches; a crash there requeues the batch as marked
    items, so the second crash names the task that really did it."""
    with pq.Pool(workers=2) as pool:
        assert list(pool.map(h.exit_on, range(3000), [-1] * 3000)) == list(range(3000))  # warm: tiny
        out = []
        with pytest.raises(pq.WorkerCrashed, match=r"exit code 9 while running task (\d+)") as info:
            for y in pool.map(h.exit_on, range(4000), [2500] * 4000):
                out.append(y)
        assert out == list(range(2500))
        assert info.value.exitcode == 9 and info.value.attempts == 1
        assert pool.submit(h.square, 4).result(timeout=30) == 16
    s = pool.stats()
    assert balanced(s) and s.failed == 1 and s.crashed == 1


def test_worker_killed_mid_write_tears_only_its_own_stream() -> None:
    """Results of 40 MB take a while to write; killing a worker during that tears
    its own socket only: the collector drops the torn frame, the others go on."""
    import random

    rng = random.Random(3)
    with pq.Pool(workers=2, max_retries=5, backoff=0.01) as pool:
        futs = [pool.submit(h.big, 40) for _ in range(8)]
        killed = 0
        while not all(f.done() for f in futs) and killed < 4:
            time.sleep(rng.uniform(0.02, 0.15))
            pids = [w.pid for w in pool.stats().workers if w.pid > 0 and w.state == "running"]
            if pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    killed += 1
        assert all(len(f.result(timeout=120)) == 40 * 1024 * 1024 for f in futs)
    s = pool.stats()
    assert balanced(s) and s.completed == 8 and killed >= 1


def test_worker_dies_with_task_bytes_still_buffered_for_it(start_method: str) -> None:
    """The parent holds more queued bytes for a worker than its pipe takes; the worker
    dies: the stale write-readiness must not break the manager (found by stress testing)."""
    with pq.Pool(workers=1, start_method=start_method) as pool:
        list(pool.map(h.ok_or_die, ["ok"] * 2000))  # measured as tiny: batches queue up
        doomed = pool.submit(h.ok_or_die, "die")
        rest = [pool.submit(h.ok_or_die, "ok") for _ in range(1000)]  # > 64 KiB for one pipe
        assert isinstance(doomed.exception(timeout=60), pq.WorkerCrashed)
        assert all(f.result(timeout=60) == 2 for f in rest)
    assert balanced(pool.stats())


def test_a_stalled_collector_is_not_a_task_timeout() -> None:
    """Sending a finished task's result can block on a busy collector; that wait must
    not count against the task's timeout (found by stress testing)."""
    with pq.Pool(workers=2, task_timeout=0.5) as pool:
        collector = pool._core.backend.collector.pid
        assert pool.submit(h.square, 2).result(timeout=30) == 4
        os.kill(collector, signal.SIGSTOP)
        try:
            futs = [pool.submit(h.big, 4) for _ in range(3)]
            time.sleep(1.5)
        finally:
            os.kill(collector, signal.SIGCONT)
        assert all(len(f.result(timeout=60)) == 4 * 1024 * 1024 for f in futs)
    s = pool.stats()
    assert s.timed_out == 0
    assert balanced(s)


def test_fresh_workers_killed_from_outside_do_not_break_the_pool() -> None:
    """Only workers that fail on their own at start-up count toward giving up;
    SIGKILL from outside (a user, the OOM killer) never breaks the pool."""
    with pq.Pool(workers=1) as pool:
        seen: set[int] = set()
        for _ in range(7):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pids = {w.pid for w in pool.stats().workers if w.pid > 0} - seen
                if pids:
                    break
                time.sleep(0.01)
            (victim,) = pids
            seen.add(victim)
            os.kill(victim, signal.SIGKILL)
        assert pool.submit(h.square, 3).result(timeout=60) == 9
    assert balanced(pool.stats())
