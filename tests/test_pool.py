"""Pool behaviour with real processes: what travels (closures, what does not pickle), argument
checks, defaults, initializers, batching, TaskQueue.

The behaviour every backend shares (results, errors, retries, timeouts, priorities,
backpressure, shutdown, stats) is in test_conformance.py.
"""

from __future__ import annotations

import os

import pytest

import procqueue as pq

import handlers as h
from conftest import balanced


@pytest.fixture
def pool() -> pq.Pool:
    p = pq.Pool(workers=2)
    yield p
    p.shutdown(wait=True)
    assert balanced(p.stats())


def test_lambdas_and_closures_travel(pool: pq.Pool) -> None:
    k = 3
    assert pool.submit(lambda x: x * k, 5).result(timeout=30) == 15
    assert list(pool.map(lambda x: x + k, range(5))) == [3, 4, 5, 6, 7]


def test_exceptions_that_do_not_pickle_or_unpickle(pool: pq.Pool) -> None:
    with pytest.raises(pq.TaskFailed, match=r"Unpicklable: cannot cross.*could not be sent back"):
        pool.submit(h.raise_unpicklable).result(timeout=30)
    with pytest.raises(pq.TaskFailed, match="NeedsTwoArgs: first") as info:
        pool.submit(h.raise_needs_two).result(timeout=30)
    assert info.value.exception is None and "raise_needs_two" in info.value.remote_traceback
    assert pool.submit(h.square, 4).result(timeout=30) == 16


def test_unpicklable_argument_is_named_and_loses_nothing_else(pool: pq.Pool) -> None:
    import threading

    good = [pool.submit(h.identity, i) for i in range(20)]
    bad = pool.submit(h.add, 1, b=threading.Lock())
    with pytest.raises(
        pq.SerializationError, match=r"keyword argument 'b' \(a _thread.lock\) could not be pickled"
    ) as info:
        bad.result(timeout=30)
    assert info.value.stage == "argument"
    assert [f.result(timeout=30) for f in good] == list(range(20))


def test_unpicklable_result_and_handler(pool: pq.Pool) -> None:
    import threading

    with pytest.raises(pq.SerializationError, match=r"the result \(a _thread.lock\) could not be pickled") as info:
        pool.submit(h.unpicklable_result).result(timeout=30)
    assert info.value.stage == "result"
    lock = threading.Lock()
    with pytest.raises(pq.SerializationError, match=r"handler .* could not be pickled") as info:
        pool.submit(lambda: lock).result(timeout=30)
    assert info.value.stage == "handler"
    assert pool.submit(h.square, 3).result(timeout=30) == 9


def test_a_tiny_map_over_a_list_keeps_every_worker_busy() -> None:
    with pq.Pool(workers=2) as pool:
        list(pool.map(h.square, range(1000)))  # measure the handler
        before = [w.tasks_done for w in pool.stats().workers]
        assert list(pool.map(h.square, list(range(200_000)))) == [x * x for x in range(200_000)]
        done = [w.tasks_done - b for w, b in zip(pool.stats().workers, before)]
    assert sum(done) == 200_000 and min(done) >= 40_000, done


def test_bad_arguments_are_rejected_clearly() -> None:
    with pytest.raises(ValueError, match="'sideways'"):
        pq.Pool(backpressure="sideways")
    with pytest.raises(ValueError, match="workers"):
        pq.Pool(workers=0)
    with pq.Pool(workers=1) as pool, pytest.raises(ValueError, match="chunksize"):
        pool.map(h.square, range(3), chunksize=0)


def test_default_workers_follow_affinity() -> None:
    with pq.Pool() as pool:
        assert pool.workers == len(os.sched_getaffinity(0))
        assert pool._cfg.start_method != "fork"


def test_initializer_runs_in_each_worker() -> None:
    with pq.Pool(workers=2, initializer=h.set_global, initargs=(42,)) as pool:
        assert set(pool.map(h.read_global, range(50))) == {42}


def test_taskqueue_results_and_drain() -> None:
    with pq.TaskQueue(h.fail_if, workers=2, max_retries=1) as q:
        for i in range(20):
            q.submit(pq.Task(f"t{i}", i, priority=i % 3))
        results = q.drain()
    assert [r.task_id for r in results] == [f"t{i}" for i in range(20)]
    assert all(r.ok and r.value == i and r.attempts == 1 and r.worker_pid for i, r in enumerate(results))
    assert all(r.duration_ms is not None and r.duration_ms >= 0 for r in results)

    q = pq.TaskQueue(h.boom, workers=1, max_retries=1)
    q.submit(pq.Task("a", 1))
    q.submit(pq.Task("b", 2, retries=0))
    got = {r.task_id: r for r in q.results()}
    q.close()
    assert isinstance(got["a"].error, h.Boom) and got["a"].attempts == 2 and got["a"].value is None
    assert got["b"].attempts == 1
