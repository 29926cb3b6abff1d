"""No orphans, bounded memory, recycling, and a chaos run with balanced books."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import procqueue as pq

import handlers as h
from conftest import balanced, leftover_threads


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pids: list[int], timeout: float) -> list[int]:
    """Wait for the processes to end; the ones still running after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize(
    ("how", "sig"),
    [
        ("sigterm", signal.SIGTERM),
        ("sigkill", signal.SIGKILL),
        ("ctrl-c", signal.SIGINT),
        ("ctrl-c-group", signal.SIGINT),  # as a terminal sends it: to every process of the group
    ],
)
def test_no_orphans_when_the_parent_goes(how: str, sig: int, start_method: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", h.parent_script(start_method, how)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a group signal spares pytest
    ) as child:
        try:
            assert child.stdout is not None
            pids = [int(p) for p in child.stdout.readline().split()]
            assert len(pids) == 3
            if how == "ctrl-c-group":
                os.killpg(child.pid, sig)
            else:
                child.send_signal(sig)
            child.wait(timeout=30)
            if how.startswith("ctrl-c"):
                assert "interrupted" in child.stdout.read()
                assert "KeyboardInterrupt" not in child.stderr.read()  # workers ignore SIGINT
            left = _gone(pids, timeout=5.0)
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            assert not left, f"{how}: {left} outlived the parent"
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def test_shutdown_leaves_nothing_and_is_idempotent() -> None:
    pool = pq.Pool(workers=2)
    pids = [w.pid for w in pool.stats().workers] + [pool._core.backend.collector.pid]
    assert list(pool.map(h.square, range(10))) == [x * x for x in range(10)]
    pool.shutdown()
    pool.shutdown()
    assert not _gone(pids, timeout=2.0)
    assert not [t for t in threading.enumerate() if t.name == "procqueue-manager"]


def _use_and_drop_a_pool() -> list[int]:
    pool = pq.Pool(workers=1)
    pids = [w.pid for w in pool.stats().workers] + [pool._core.backend.collector.pid]
    result = pool.submit(h.square, 3).result(timeout=30)
    if result != 9:
        raise AssertionError(result)
    return pids  # the pool goes out of scope here, never shut down


def test_dropping_the_pool_without_shutdown_ends_its_processes() -> None:
    import gc

    pids = _use_and_drop_a_pool()
    gc.collect()
    assert not _gone(pids, timeout=5.0)
    # The manager ends a moment after the processes it reaped (it stops the monitor last).
    assert "procqueue-manager" not in leftover_threads()


def test_max_tasks_per_worker_recycles() -> None:
    with pq.Pool(workers=2, max_tasks_per_worker=10) as pool:
        pids = pool.map(h.pid, range(100), chunksize=3)
        seen = set(pids)
        s = pool.stats()
    assert len(seen) >= 10
    assert sum(w.recycled for w in s.workers) >= 8
    assert sum(w.deaths for w in s.workers) == 0  # retired when asked: not deaths
    assert s.completed == 100 and s.failed == 0 and balanced(s)


def test_max_worker_memory_recycles() -> None:
    with pq.Pool(workers=1, max_worker_memory=150 * 1024 * 1024) as pool:
        first = pool.submit(h.allocate, 200, 1.5).result(timeout=60)
        time.sleep(1.0)
        second = pool.submit(h.pid).result(timeout=60)
        s = pool.stats()
    assert first != second
    assert s.workers[0].recycled == 1 and s.failed == 0 and balanced(s)


def test_chaos_every_task_ends_once_books_balance_memory_flat() -> None:
    """100,000 tasks, random handler errors, a worker SIGKILLed every half second,
    the odd hang past the timeout: exactly one outcome each."""
    n = 100_000
    me = psutil.Process()
    stop = threading.Event()
    kills = []

    def killer(pool: pq.Pool) -> None:
        rng = random.Random(7)
        while not stop.wait(0.5):
            pids = [w.pid for w in pool.stats().workers if w.pid > 0]
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass

    outcomes = {"ok": 0, "raised": 0, "crashed": 0, "timeout": 0}

    def settle(fut: pq.Future) -> None:
        exc = fut.exception()
        key = {None: "ok", h.Boom: "raised", pq.WorkerCrashed: "crashed", pq.TaskTimeout: "timeout"}[
            None if exc is None else type(exc)
        ]
        outcomes[key] += 1

    with pq.Pool(workers=2, max_retries=3, backoff=0.01, task_timeout=0.3) as pool:
        thread = threading.Thread(target=killer, args=(pool,), daemon=True)
        thread.start()
        window: collections.deque[pq.Future] = collections.deque()
        rss0 = me.memory_info().rss
        for x in range(n):
            window.append(pool.submit(h.chaos, x))
            if len(window) > 4000:
                settle(window.popleft())
        while window:
            settle(window.popleft())
        rss1 = me.memory_info().rss
        stop.set()
        thread.join()
    s = pool.stats()
    assert sum(outcomes.values()) == n
    assert len(kills) >= 5
    assert s.submitted == n and s.completed == outcomes["ok"]
    assert s.failed == outcomes["raised"] + outcomes["crashed"] + outcomes["timeout"]
    assert outcomes["raised"] > 0 and s.crashed >= 1 and s.timed_out >= 1 and s.retried > 0
    assert balanced(s), s
    assert rss1 - rss0 < 50 * 1024 * 1024


MAIN_SCRIPT = """
import sys, procqueue as pq
STATE = {}
def init(v): STATE["v"] = v
def getv(_): return STATE.get("v")
if __name__ == "__main__":
    def local(x): return x * 3          # not importable by a spawned worker
    class Box:
        def __init__(self, x): self.x = x
    with pq.Pool(1, start_method=sys.argv[1], initializer=init, initargs=(42,)) as pool:
        print(pool.submit(getv, 0).result(), pool.submit(local, 2).result(), pool.submit(lambda b: b.x, Box(7)).result())
"""


def test_functions_in_main_share_globals_and_unimportable_ones_still_travel(
    tmp_path: object, start_method: str
) -> None:
    script = os.path.join(str(tmp_path), "main_script.py")
    with open(script, "w") as fh:
        fh.write(MAIN_SCRIPT)
    out = subprocess.run([sys.executable, script, start_method], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "6", "7"]
