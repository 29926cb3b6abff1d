"""Pool behaviour, written once for every backend.

Each test takes `make_pool` (tests/conftest.py), which builds `pq.Pool(backend=..., **kwargs)`
for each backend in `conftest.BACKENDS` (test ids end in `[local]`), and at teardown shuts
down every pool it made, checks that the books balance and that no process is left.
Handlers come from tests/handlers.py (module level, so they pickle by reference).
What only one backend has (start methods, pidfds, the collector, markers, descriptors)
is tested in test_pool.py, test_faults.py, test_lifecycle.py and test_hardening.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import itertools
import json
import math
import os
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import procqueue as pq

import handlers as h
from conftest import balanced

MakePool = Callable[..., pq.Pool]


@pytest.fixture
def pool(make_pool: MakePool) -> pq.Pool:
    return make_pool(workers=2)


# --- results: submit, map (ordered, lazy over a generator), imap_unordered ------------


def test_submit_map_and_unordered(pool: pq.Pool) -> None:
    fut = pool.submit(h.add, 2, b=3)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=30) == 5
    assert fut.attempts == 1 and fut.worker_pid in {w.pid for w in pool.stats().workers}
    assert list(pool.map(h.square, range(2000))) == [x * x for x in range(2000)]
    assert list(pool.map(h.add, range(10), range(10, 20))) == [a + b for a, b in zip(range(10), range(10, 20))]
    assert sorted(pool.imap_unordered(h.square, range(500))) == sorted(x * x for x in range(500))
    assert list(pool.map(h.square, [], chunksize=3)) == []
    s = pool.stats()
    assert s.submitted == 1 + 2000 + 10 + 500 and s.completed == s.submitted and s.failed == 0


@pytest.mark.parametrize("capacity", [1, 64])
def test_map_over_a_generator_with_uneven_tasks_and_a_small_capacity_finishes(
    make_pool: MakePool, capacity: int
) -> None:
    # A consumer that frees the window must wake the manager even when the
    # buffer it refills is already full (a lost wake-up once hung this).
    with make_pool(workers=2, capacity=capacity) as pool:
        got = list(pool.map(h.uneven, (i for i in range(6000))))
    assert got == list(range(6000))


def test_map_over_3_million_item_generator_keeps_parent_memory_flat(make_pool: MakePool) -> None:
    me = psutil.Process()
    n = 3_000_000
    with make_pool(workers=2) as pool:
        total = 0
        peak = 0
        base = None
        for i, y in enumerate(pool.map(h.square, (x for x in range(n)))):
            total += y
            if i % 200_000 == 0:
                rss = me.memory_info().rss
                # From 600,000 on, once the windows are full (a Dask seat holds two batches
                # of up to 65,536 items): what comes after must not grow with the input.
                if i == 600_000:
                    base = rss
                peak = max(peak, rss)
        assert total == sum(x * x for x in range(n))
        s = pool.stats()
        assert s.completed == n and balanced(s)
    assert base is not None
    assert peak - base < 50 * 1024 * 1024, f"parent RSS grew {(peak - base) / 2**20:.1f} MiB"


def test_map_results_read_after_the_with_block(make_pool: MakePool) -> None:
    """As with ProcessPoolExecutor: a map over a list runs to the end at shutdown."""
    with make_pool(workers=2) as pool:
        results = pool.map(h.square, list(range(5000)))
    assert list(results) == [x * x for x in range(5000)]
    with make_pool(workers=2) as pool:
        gen_results = pool.map(h.square, (x for x in range(5000)))
    got = []
    with pytest.raises(pq.PoolClosed, match="before this map's input was read"):
        for y in gen_results:
            got.append(y)
    assert got == [x * x for x in range(len(got))]
    assert len(got) >= 1024  # what was fed before shutdown still comes out


# --- errors keep their type, with a TaskFailed cause ----------------------------------


def test_handler_exception_keeps_its_type_with_remote_traceback(pool: pq.Pool) -> None:
    fut = pool.submit(h.boom, 1)
    with pytest.raises(h.Boom, match="boom 1") as info:
        fut.result(timeout=30)
    cause = info.value.__cause__
    assert isinstance(cause, pq.TaskFailed)
    assert cause.attempts == 1 and cause.exception is info.value
    assert "in boom" in cause.remote_traceback
    printed = "".join(traceback.format_exception(info.value))
    assert "Remote traceback" in printed and 'raise Boom(f"boom {x}")' in printed


def test_map_raises_at_the_failed_item_and_others_complete(pool: pq.Pool) -> None:
    out = []
    with pytest.raises(h.Boom, match="bad item 5"):
        for y in pool.map(h.fail_if, range(10), [frozenset({5})] * 10):
            out.append(y)
    assert out == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("ordered", [True, False])
def test_map_return_exceptions_puts_errors_in_place_and_goes_on(pool: pq.Pool, ordered: bool) -> None:
    bad = frozenset({5, 700, 2999})
    got = list(pool.map(h.fail_if, range(3000), [bad] * 3000, ordered=ordered, return_exceptions=True))
    errors = [e for e in got if isinstance(e, h.Boom)]
    assert sorted(str(e) for e in errors) == sorted(f"bad item {x}" for x in bad)
    assert isinstance(errors[0].__cause__, pq.TaskFailed)
    if ordered:
        assert [i for i, v in enumerate(got) if isinstance(v, h.Boom)] == sorted(bad)
        assert all(got[i] == i for i in range(3000) if i not in bad)
    else:
        assert sorted(v for v in got if not isinstance(v, h.Boom)) == [i for i in range(3000) if i not in bad]


# --- retries, crashes and timeouts: each costs one attempt, never the pool ------------


def test_retries_with_backoff_spacing(make_pool: MakePool, tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "attempts")
    with make_pool(workers=1, max_retries=3, backoff=0.2) as pool:
        t0 = time.monotonic()
        fut = pool.submit(h.flaky, path, 3)
        assert fut.result(timeout=30) == 4
        elapsed = time.monotonic() - t0
        assert fut.attempts == 4
        # 0.2 + 0.4 + 0.8 nominal, +-25 % each
        assert 1.4 * 0.75 <= elapsed <= 1.4 * 1.25 + 1.0
        s = pool.stats()
        assert s.retried == 3 and s.completed == 1 and s.failed == 0


def test_retry_budget_spent_reports_attempts(pool: pq.Pool) -> None:
    fut = pool.options(retries=2).submit(h.boom, "x")
    with pytest.raises(h.Boom) as info:
        fut.result(timeout=30)
    assert info.value.__cause__.attempts == 3 and fut.attempts == 3  # type: ignore[union-attr]
    s = pool.stats()
    assert s.retried == 2 and s.failed == 1


@pytest.mark.parametrize("ordered", [True, False])
def test_a_crash_in_a_map_over_a_generator_loses_nothing_else(make_pool: MakePool, ordered: bool) -> None:
    """A worker's `os._exit` costs its task one attempt; the other 19,999 complete."""
    # The crashed batch's other items go back to the heap at the map's own place in
    # line; they must run before the map cuts more, or its full window waits forever.
    with make_pool(workers=2) as pool:
        lines = (json.dumps({"x": i, "id": f"r{i}"}) for i in range(20_000))
        got = list(pool.map(h.json_exit_at_1000, lines, ordered=ordered, return_exceptions=True))
    crashed = [v for v in got if isinstance(v, pq.WorkerCrashed)]
    assert len(got) == 20_000 and len(crashed) == 1 and crashed[0].attempts == 1
    values = sorted(json.loads(v)["value"] for v in got if not isinstance(v, pq.WorkerCrashed))
    assert values == [i for i in range(20_000) if i != 1000]
    assert balanced(pool.stats())


def test_timeout_then_retry_succeeds_on_a_fresh_worker(make_pool: MakePool, tmp_path: Path) -> None:
    path = str(tmp_path / "attempts")
    with make_pool(workers=1, task_timeout=0.5, max_retries=2, backoff=0.01) as pool:
        # first attempt hangs (flaky raises only after the file has content, so use hang)
        fut = pool.options(timeout=0.5, retries=1).submit(h.hang, 5)
        with pytest.raises(pq.TaskTimeout) as info:
            fut.result(timeout=60)
        assert info.value.attempts == 2
        assert pool.submit(h.flaky, path, 1).result(timeout=60) == 2
    s = pool.stats()
    assert s.timed_out == 2 and balanced(s)


def test_timeout_inf_lifts_the_pool_timeout(make_pool: MakePool) -> None:
    with make_pool(workers=1, task_timeout=0.2) as pool:
        assert pool.options(timeout=math.inf).submit(h.sleep_then, 1, 0.5).result(timeout=30) == 1
        with pytest.raises(pq.TaskTimeout):
            pool.submit(h.sleep_then, 2, 0.5).result(timeout=30)


def test_polling_a_timed_out_task_ends(make_pool: MakePool) -> None:
    """`except TimeoutError: continue` around result(timeout=) must not spin forever."""
    with make_pool(workers=1) as pool:
        fut = pool.options(timeout=0.3).submit(h.hang, 30)
        deadline = time.monotonic() + 30
        with pytest.raises(pq.TaskTimeout):
            while time.monotonic() < deadline:
                try:
                    fut.result(timeout=0.1)
                except TimeoutError:
                    continue


def test_map_timeout(make_pool: MakePool) -> None:
    with make_pool(workers=1) as pool:
        it = pool.map(h.sleep_then, [1], [2.0], timeout=0.3)
        with pytest.raises(TimeoutError):
            next(it)


# --- priorities hold at dispatch ------------------------------------------------------


def test_priority_holds_at_dispatch(make_pool: MakePool) -> None:
    with make_pool(workers=1, capacity=5000) as pool:
        blocker = pool.submit(h.sleep_then, "blocker", 0.5)
        time.sleep(0.2)  # the worker is busy: everything below waits in the heap
        low = [pool.submit(h.stamp, i) for i in range(2000)]
        high = pool.options(priority=9).submit(h.stamp, "high")
        mid = pool.options(priority=5).submit(h.stamp, "mid")
        blocker.result(timeout=30)
        t_high, t_mid = high.result(timeout=30)[1], mid.result(timeout=30)[1]
        t_low = [f.result(timeout=30)[1] for f in low]
        assert t_high <= t_mid <= min(t_low)
        assert t_low == sorted(t_low)  # equal priority: submission order


def test_priority_holds_against_a_map_over_a_list(make_pool: MakePool) -> None:
    """A map over a list is cut straight from the list, never queued in the heap:
    an urgent submit still overtakes what it has not handed out, and an equal
    priority submit still waits its turn."""
    with make_pool(workers=1) as pool:
        results = pool.map(h.slow_stamp, list(range(600)))  # ~0.6 s of 1 ms tasks
        time.sleep(0.1)
        later = pool.submit(h.stamp, "later")  # equal priority: after the whole map
        urgent = pool.options(priority=9).submit(h.sleep_then, "urgent", 0.3)
        stamps = [t for _, t in results]
        urgent.result(timeout=30)
        t_later = later.result(timeout=30)[1]
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    assert gaps[-1] >= 0.25, "the urgent task did not run in the middle of the map"
    assert t_later >= max(stamps)


# --- backpressure: block, drop, error -------------------------------------------------


def test_backpressure_error_and_drop(make_pool: MakePool) -> None:
    with make_pool(workers=1, capacity=3, backpressure="error") as pool:
        busy = pool.submit(h.sleep_then, 0, 0.5)
        time.sleep(0.2)
        queued = [pool.submit(h.identity, i) for i in range(3)]
        with pytest.raises(pq.QueueFull, match="full"):
            pool.submit(h.identity, 99)
        assert [f.result(timeout=30) for f in queued] == [0, 1, 2]
        busy.result(timeout=30)
        s = pool.stats()
        assert s.submitted == 4 and balanced(s)
    with make_pool(workers=1, capacity=3, backpressure="drop") as pool:
        busy = pool.submit(h.sleep_then, 0, 0.5)
        time.sleep(0.2)
        futs = [pool.submit(h.identity, i) for i in range(6)]
        done = [f for f in futs if f.exception(timeout=30) is None]
        dropped = [f for f in futs if isinstance(f.exception(timeout=30), pq.Dropped)]
        assert len(done) == 3 and len(dropped) == 3
        busy.result(timeout=30)
        s = pool.stats()
        assert s.dropped == 3 and s.submitted == 7 and balanced(s)


def test_backpressure_block_waits_then_times_out(make_pool: MakePool) -> None:
    with make_pool(workers=1, capacity=2, block_timeout=0.3) as pool:
        busy = pool.submit(h.sleep_then, 0, 1.5)
        time.sleep(0.2)
        pool.submit(h.identity, 1)
        pool.submit(h.identity, 2)
        t0 = time.monotonic()
        with pytest.raises(pq.QueueFull, match="stayed full"):
            pool.submit(h.identity, 3)
        assert time.monotonic() - t0 >= 0.25
        assert pool.options(block_timeout=10).submit(h.identity, 4).result(timeout=30) == 4
        busy.result(timeout=30)


# --- abandoned maps, shutdown(cancel_futures=True), stats at rest ---------------------


@pytest.mark.timeout(90)
def test_a_parked_map_does_not_hold_up_the_next_one(make_pool: MakePool, backend: str) -> None:
    """A map nobody reads, holding input past its window (its handler turned slow, so
    the window shrank), must not hold up a later map of the same priority (found by
    bench/soak.py: the second map waited forever, the pool idle)."""
    recycled = {"max_tasks_per_worker": 5000} if backend == "local" else {}  # Dask has no task limit
    with make_pool(workers=2, **recycled) as pool:
        for _ in pool.map(h.spin_if_negative, range(300_000)):  # measured tiny: big batches, a big window
            pass
        slow = [pool.submit(h.spin_if_negative, -1) for _ in range(500)]  # 2 ms each, queued first
        parked = pool.map(h.spin_if_negative, (i for i in range(1_000_000)))  # pulls input for tiny tasks
        time.sleep(2)
        assert list(pool.map(h.spin_if_negative, (i for i in range(1000)))) == list(range(1000))
        assert all(f.result(timeout=60) == -1 for f in slow)
        parked.close()
    assert balanced(pool.stats())


@pytest.mark.timeout(60)
def test_a_dropped_map_is_released_without_close(make_pool: MakePool) -> None:
    """Invariant 9: a map over an endless input, read once and dropped (no close()), is
    finalized by reference counting: nothing of the pool keeps it alive."""
    with make_pool(workers=2) as pool:
        it = pool.map(h.square, itertools.count())
        assert next(it) == 0
        gen = weakref.ref(it.chunks)  # type: ignore[attr-defined]
        del it
        gc.collect()
        assert gen() is None, "the dropped map is still referenced"
        assert pool.submit(h.square, 3).result(timeout=30) == 9
    assert balanced(pool.stats())


def test_cancel_while_pending_and_shutdown_cancel_futures(make_pool: MakePool) -> None:
    pool = make_pool(workers=1)
    busy = pool.submit(h.sleep_then, 0, 0.5)
    time.sleep(0.2)
    waiting = [pool.submit(h.identity, i) for i in range(50)]
    assert waiting[10].cancel()
    pool.shutdown(wait=True, cancel_futures=True)
    assert busy.result() == 0
    assert all(f.cancelled() or f.done() for f in waiting)
    s = pool.stats()
    assert s.cancelled >= 1 and balanced(s)
    with pytest.raises(pq.PoolClosed, match="shut down"):
        pool.submit(h.square, 1)
    with pytest.raises(RuntimeError):
        pool.submit(h.square, 1)


def test_shutdown_cancel_futures_cancels_the_rest_of_a_map(make_pool: MakePool) -> None:
    pool = make_pool(workers=1)
    results = pool.map(h.sleep_then, range(2000), [0.001] * 2000)
    time.sleep(0.2)
    queued = [pool.submit(h.sleep_then, x, 0.001) for x in range(50)]
    pool.shutdown(wait=True, cancel_futures=True)
    got = []
    with pytest.raises(cf.CancelledError):
        for y in results:
            got.append(y)
    assert got == list(range(len(got))) and len(got) < 2000
    assert all(f.cancelled() for f in queued)
    s = pool.stats()
    assert balanced(s) and s.cancelled == 50


@pytest.mark.parametrize("source", ["list", "generator"])
def test_a_parked_map_of_a_terminated_pool_raises_instead_of_ending_short(make_pool: MakePool, source: str) -> None:
    # Its window full of finished results, the map cuts nothing more until they are
    # read; the pool ends meanwhile. The items never cut must not vanish in silence.
    pool = make_pool(workers=1)
    n = 100_000
    results = pool.map(h.square, list(range(n)) if source == "list" else iter(range(n)), chunksize=10)
    got = [next(results)]
    time.sleep(0.5)
    pool.terminate()
    with pytest.raises(pq.PoolClosed, match="terminated"):
        for y in results:
            got.append(y)
    assert got == [x * x for x in range(len(got))] and len(got) < n


def test_stats_snapshot_and_json(pool: pq.Pool) -> None:
    list(pool.map(h.square, range(100)))
    s = pool.stats()
    assert s.completed == 100 and s.pending == 0 and s.in_flight == 0
    assert len(s.workers) == 2 and all(w.rss > 0 and w.state == "idle" for w in s.workers)
    assert sum(w.tasks_done for w in s.workers) == 100
    assert json.loads(s.to_json())["completed"] == 100
