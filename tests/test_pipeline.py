"""Pipelines (issue 15): values, order, errors per item, crashes, timeouts, bounded input,
per-stage stats, no process left behind; on real worker processes."""

from __future__ import annotations

import importlib.util
import io
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import CancelledError
from functools import partial
from pathlib import Path

import psutil
import pytest

import procqueue as pq
from procqueue._pipeline import flow
from tests import pipeline_handlers as h
from tests.conftest import balanced, leftover_children

pytestmark = pytest.mark.timeout(120)


def three(**second: object) -> pq.Pipeline:
    return pq.Pipeline(
        pq.Stage(h.inc, workers=1), pq.Stage(h.double_but_13, workers=2, **second), pq.Stage(h.neg, workers=1),  # type: ignore[arg-type]
        capacity=32,
    )  # fmt: skip


def expected(i: int) -> int:
    return -((i + 1) * 2)


def stage_of(exc: BaseException) -> pq.StageFailed:
    cause = exc.__cause__
    assert isinstance(cause, pq.StageFailed), f"{exc!r} has cause {cause!r}"
    return cause


def at_rest(pipe: pq.Pipeline) -> list[pq.Stats]:
    stats = pipe.stats()
    assert all(balanced(s) for s in stats), stats
    return stats


def test_values_and_order_through_three_stages() -> None:
    with pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.double, workers=2), pq.Stage(h.neg, workers=1)) as pipe:
        assert list(pipe.map(range(5000))) == [expected(i) for i in range(5000)]
        assert list(pipe.map(iter(range(300)))) == [expected(i) for i in range(300)]  # a generator too
        assert list(pipe.map([])) == []
    stats = at_rest(pipe)
    assert [s.submitted for s in stats] == [5300, 5300, 5300]
    assert [s.completed for s in stats] == [5300, 5300, 5300]
    assert not leftover_children()


def test_unordered_gives_the_same_multiset() -> None:
    with pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.slow, workers=2), pq.Stage(h.neg, workers=1)) as pipe:
        got = list(pipe.map(range(2000), ordered=False))
    assert Counter(got) == Counter(-(i + 1) for i in range(2000))


@pytest.mark.parametrize("ordered", [True, False])
def test_a_failure_at_stage_two_with_return_exceptions(ordered: bool) -> None:
    with three() as pipe:
        got = list(pipe.map(range(200), ordered=ordered, return_exceptions=True))
        stats = at_rest(pipe)
    assert len(got) == 200
    errors = [g for g in got if isinstance(g, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], h.Bad)
    where = stage_of(errors[0])
    assert (where.stage, where.function, where.item) == (1, "double_but_13", 12)
    assert "stage 1 (double_but_13)" in str(where)
    assert isinstance(where.__cause__, pq.TaskFailed)  # the remote traceback is still in the chain
    if ordered:
        assert got[12] is errors[0]
        assert [g for i, g in enumerate(got) if i != 12] == [expected(i) for i in range(200) if i != 12]
    else:
        assert Counter(g for g in got if g is not errors[0]) == Counter(expected(i) for i in range(200) if i != 12)
    # the failed item never reached stage 2; every other one did
    assert [(s.submitted, s.completed, s.failed) for s in stats] == [(200, 200, 0), (200, 199, 1), (199, 199, 0)]


def test_a_failure_at_stage_two_raises_at_its_place() -> None:
    with three() as pipe:
        seen: list[int] = []
        with pytest.raises(h.Bad) as info:
            for y in pipe.map(range(200)):
                seen.append(y)
        assert seen == [expected(i) for i in range(12)]  # everything before it, in order
        assert stage_of(info.value).item == 12
        assert list(pipe.map(range(12))) == [expected(i) for i in range(12)]  # the pipeline goes on
    at_rest(pipe)


def test_a_crash_at_stage_two_costs_one_attempt_there(tmp_path: Path) -> None:
    with pq.Pipeline(
        pq.Stage(h.inc, workers=1), pq.Stage(h.double_but_kill_13, workers=2), pq.Stage(h.neg, workers=1), capacity=16
    ) as pipe:
        got = list(pipe.map(range(100), return_exceptions=True))
        stats = at_rest(pipe)
    assert isinstance(got[12], pq.WorkerCrashed) and got[12].signal == 9
    assert stage_of(got[12]).stage == 1
    assert [g for i, g in enumerate(got) if i != 12] == [expected(i) for i in range(100) if i != 12]
    assert stats[1].crashed >= 1 and stats[1].failed == 1
    assert stats[0].crashed == 0 and stats[2].crashed == 0 and stats[2].submitted == 99

    # With a retry at that stage, the crash costs one attempt and the item goes through.
    with pq.Pipeline(
        pq.Stage(h.inc, workers=1),
        pq.Stage(partial(h.kill_once_at_13, str(tmp_path)), workers=2, retries=1),
        pq.Stage(h.neg, workers=1),
    ) as pipe:
        assert list(pipe.map(range(100))) == [expected(i) for i in range(100)]
        stats = at_rest(pipe)
    assert (tmp_path / "killed-13").exists()
    # (a batch whose worker died is run again uncharged, one item at a time, so the retry
    # may not even be needed: either way the item went through)
    assert stats[1].failed == 0 and stats[1].completed == 100
    assert stats[0].attempts == 100 and stats[2].attempts == 100  # the other stages ran each item once


def test_a_stage_timeout_ends_only_that_item() -> None:
    with pq.Pipeline(
        pq.Stage(h.inc, workers=1), pq.Stage(h.hang_at_13, workers=2, timeout=1.0), pq.Stage(h.neg, workers=1)
    ) as pipe:
        started = time.monotonic()
        got = list(pipe.map(range(40), return_exceptions=True))
        took = time.monotonic() - started
        stats = at_rest(pipe)
    assert isinstance(got[12], pq.TaskTimeout)
    assert stage_of(got[12]).stage == 1
    assert [g for i, g in enumerate(got) if i != 12] == [expected(i) for i in range(40) if i != 12]
    assert took < 30
    assert stats[1].timed_out == 1


def test_a_slow_last_stage_bounds_what_is_read_ahead() -> None:
    pulled = [0]

    def source() -> Iterator[int]:
        for i in range(100_000):
            pulled[0] += 1
            yield i

    caps = 50
    with pq.Pipeline(
        pq.Stage(h.inc, workers=1, chunksize=1), pq.Stage(h.double, workers=1, chunksize=1),
        pq.Stage(h.slow, workers=1, chunksize=1), capacity=caps,
    ) as pipe:  # fmt: skip
        it = pipe.map(source())
        ahead = []
        for n, _ in enumerate(itertools.islice(it, 300), 1):
            ahead.append(pulled[0] - n)
        # three stages' room and the outbox's (each `capacity` here: batches of one item),
        # plus at most one batch in the hands of each pump
        bound = 4 * caps + 3
        assert max(ahead) <= bound, (max(ahead), bound)
        assert pulled[0] < 1000
        it.close()  # leaving early: nothing more is read, what did not start is cancelled
        stop = pulled[0]
        time.sleep(0.3)
        assert pulled[0] == stop
        stats = at_rest(pipe)
    assert stats[0].submitted < 1000


def test_large_items_stay_near_capacity_with_default_batches() -> None:
    """200 kB items through quick stages with automatic batches, a slow one last: before a
    stage is timed its batches are unknown, so its room stays `capacity`; after, what the
    stages hold beyond their capacities stays under the pipeline's byte budget."""
    size, caps, pulled = 200_000, 4, [0]

    def source() -> Iterator[bytes]:
        for _ in range(1_000):
            pulled[0] += 1
            yield bytes(size)

    with pq.Pipeline(
        pq.Stage(h.same, workers=1), pq.Stage(h.same, workers=1), pq.Stage(h.slow, workers=1), capacity=caps
    ) as pipe:
        ahead = [pulled[0] - n for n, _ in enumerate(itertools.islice(pipe.map(source()), 400), 1)]
    # the capacities (three stages and the outbox), the byte budget, a batch in each pump's hands
    bound = 4 * caps + flow.BYTES // size + 3 * 8
    assert max(ahead) <= bound, (max(ahead), bound)


def test_a_stage_whose_every_item_fails_still_gets_wider_room() -> None:
    """Its chunks carry only errors (no value bytes): its pace and item size still count
    as measured, so its room grows past `capacity`, as any quick stage's does."""
    with pq.Pipeline(pq.Stage(h.refuse, workers=1), pq.Stage(h.same, workers=1), capacity=1) as pipe:
        it = pipe.map(range(5_000), return_exceptions=True)
        spans: list[int] = []
        for n, got in enumerate(it):
            assert isinstance(got, ValueError) and str(got) == f"refused {n}"
            if n == 2_000:
                spans = [flow.lanes[0].span for flow in list(pipe._flows)]
        assert n == 4_999
    assert spans and max(spans) > 1, spans


def test_leaving_early_releases_every_stage() -> None:
    with three() as pipe:
        for n, _ in enumerate(pipe.map(range(20, 100_000))):
            if n == 50:
                break
        assert list(pipe.map(range(10))) == [expected(i) for i in range(10)]  # usable after
        time.sleep(0.2)
        stats = at_rest(pipe)
    assert stats[0].submitted < 100_000


def test_a_dropped_iterator_is_released() -> None:
    with three() as pipe:
        it = pipe.map(range(20, 100_000))
        next(it)
        del it
        assert list(pipe.map(range(10))) == [expected(i) for i in range(10)]
    at_rest(pipe)


def test_an_input_that_raises_ends_after_what_came_before() -> None:
    def source() -> Iterator[int]:
        yield from range(20)
        raise KeyError("input broke")

    with pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.double, workers=1)) as pipe:
        got: list[object] = []
        with pytest.raises(KeyError, match="input broke"):
            for y in pipe.map(source()):
                got.append(y)
    assert got == [(i + 1) * 2 for i in range(20)]  # everything it gave first, then its error
    with three() as pipe:
        got = []
        with pytest.raises(KeyError, match="input broke"):
            for y in pipe.map(source(), return_exceptions=True):
                got.append(y)
    assert len(got) == 20 and isinstance(got[12], h.Bad)  # a failed item in its place, then the input's error


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"wrap a function as pq\.Stage"):
        pq.Pipeline(h.inc)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        pq.Pipeline()
    with pytest.raises(ValueError, match="capacity"):
        pq.Stage(h.inc, capacity=0)
    with pytest.raises(TypeError, match="callable"):
        pq.Stage(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers"):
        pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.inc, workers=0))
    assert not leftover_children()  # the first stage's pool was ended
    with pq.Pipeline(pq.Stage(h.inc, workers=1)) as pipe, pytest.raises(TypeError):
        pipe.map(3)  # type: ignore[arg-type]
    with pytest.raises(pq.PoolClosed, match="this pipeline was shut down; create a new Pipeline"):
        pipe.map(range(3))  # after the block


def test_an_image_like_job_and_its_live_view() -> None:
    out = io.StringIO()
    with pq.Pipeline(
        pq.Stage(h.pixels, workers=1), pq.Stage(h.blur, workers=2), pq.Stage(h.checksum, workers=1), capacity=8
    ) as pipe:
        with pipe.live(total=60, file=out, interval=0.05) as view:
            got = list(pipe.map(range(60)))
            rows = view.rows()
        stats = at_rest(pipe)
    assert got == [h.checksum(h.blur(h.pixels(i))) for i in range(60)]
    assert [r[1] for r in rows] == ["pixels", "blur", "checksum"]
    assert [s.completed for s in stats] == [60, 60, 60]
    text = out.getvalue()
    assert "stage 1 blur" in text and "pipeline 60/60" in text


def test_a_second_maps_live_view_counts_its_own_items_and_an_ended_map_holds_none() -> None:
    with pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.slow, workers=1), capacity=8) as pipe:
        assert list(pipe.map(range(30))) == [i + 1 for i in range(30)]
        out = io.StringIO()
        with pipe.live(total=20, file=out, interval=0.05):
            assert list(pipe.map(range(20))) == [i + 1 for i in range(20)]
        assert "pipeline 20/20 100%" in out.getvalue(), out.getvalue()[-300:]
        unread = pipe.map(range(10_000))
        assert next(iter(unread)) == 1
        assert sum(pipe.depths()) > 0
        pipe.shutdown()
        assert pipe.depths() == [0, 0]  # the ended map is still referenced, and holds nothing
        with pytest.raises(pq.PoolClosed):
            list(unread)


def test_two_maps_at_once_and_from_threads() -> None:
    with three() as pipe:
        a = pipe.map(range(1000, 1100), return_exceptions=True)
        b = pipe.map(range(100), return_exceptions=True)
        got_b = list(b)
        got_a = list(a)
        results: dict[int, list[object]] = {}

        def work(k: int) -> None:
            results[k] = list(pipe.map(range(k * 50, k * 50 + 50), return_exceptions=True))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        at_rest(pipe)
    assert got_a == [expected(i) for i in range(1000, 1100)]
    assert isinstance(got_b[12], h.Bad) and got_b[:12] == [expected(i) for i in range(12)]
    for k in range(4):
        assert len(results[k]) == 50


def test_no_process_is_left_after_the_block() -> None:
    with three() as pipe:
        pids = {w.pid for s in pipe.stats() for w in s.workers if w.pid > 0}
        list(pipe.map(range(100), return_exceptions=True))
        pids |= {w.pid for s in pipe.stats() for w in s.workers if w.pid > 0}
    assert pids
    assert not leftover_children()
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_leaving_the_block_with_an_unread_map_cancels_it() -> None:
    with three() as pipe:
        it = pipe.map(range(20, 100_000))
        next(it)
    stats = at_rest(pipe)
    assert stats[0].submitted < 100_000
    assert os.getpid() > 0


@pytest.mark.parametrize("via", ["map", "last stage", "forwarded"])
def test_a_value_that_exits_on_unpickling_fails_alone(via: str) -> None:
    """A batch of values travels as one pickle; one value's __reduce__ or __setstate__
    raising SystemExit fails that value's task only, not its batch: in the parent (a
    map's, or a pipeline's last stage's values), or in the next stage's worker (values
    forwarded there still pickled), where it fails that stage's task and no other."""
    if via == "map":
        with pq.Pool(1) as pool:
            got = list(pool.map(h.hostile_at, range(100), return_exceptions=True, chunksize=50))
            stats = [pool.stats()]
    else:
        chain = [pq.Stage(h.same, workers=1), pq.Stage(h.hostile_at, workers=1, chunksize=50)]
        if via == "forwarded":
            chain = [pq.Stage(h.hostile_at, workers=1, chunksize=50), pq.Stage(h.same, workers=1, chunksize=50)]
        with pq.Pipeline(*chain) as pipe:
            got = list(pipe.map(range(100), return_exceptions=True))
            stats = at_rest(pipe)
    bad = {i: g for i, g in enumerate(got) if isinstance(g, BaseException)}
    assert sorted(bad) == [7, 11]
    assert [g for i, g in enumerate(got) if i not in bad] == [i for i in range(100) if i not in bad]
    if via == "forwarded":
        assert all(isinstance(e, pq.SerializationError) and e.stage == "argument" for e in bad.values())
        assert all("the stage before made could not be unpickled" in str(e) for e in bad.values())
        assert all(stage_of(e).stage == 1 for e in bad.values())
        assert [(s.completed, s.failed) for s in stats] == [(100, 0), (98, 2)]
    else:
        assert all(isinstance(e, pq.SerializationError) and e.stage == "result" for e in bad.values())
        assert isinstance(bad[7].__cause__, (SystemExit, pq.StageFailed))
        assert (stats[-1].completed, stats[-1].failed) == (98, 2)


@pytest.mark.parametrize("crash", [False, True])
def test_values_go_on_to_the_next_stage_without_the_parent_unpickling_them(tmp_path: Path, crash: bool) -> None:
    """Stage 0's values are unpickled only in stage 1's workers, never in the parent (the
    unpickling leaves a marker of the process that ran it); a SIGKILLed worker of stage 1
    costs one attempt of its item, and its batch's other items still arrive whole."""
    marks = str(tmp_path)
    second = pq.Stage(partial(h.kill_once_at_13, marks), workers=2, retries=1, chunksize=20) if crash else None
    with pq.Pipeline(
        pq.Stage(partial(h.track, marks), workers=1, chunksize=20),
        second or pq.Stage(h.double, workers=2, chunksize=20),
        pq.Stage(h.neg, workers=1, chunksize=20),
    ) as pipe:
        pids = [{w.pid for w in s.workers} for s in pipe.stats()]
        got = list(pipe.map(range(1000)))
        stats = at_rest(pipe)
    assert got == [-2 * x for x in range(1000)]
    loaded = {int(p.name.split("-")[1]): p.read_text().split() for p in tmp_path.glob("loaded-*")}
    assert os.getpid() not in loaded
    assert set(loaded) <= pids[1] | {w.pid for w in stats[1].workers}, (loaded.keys(), pids)
    assert Counter(x for xs in loaded.values() for x in xs) >= Counter(str(x) for x in range(1000))
    assert [s.completed for s in stats] == [1000] * 3
    if crash:
        assert (tmp_path / "killed-13").exists() and stats[1].crashed == 1 and stats[1].retried == 1


def test_a_quick_stage_feeding_a_slow_one_sends_each_body_once_per_worker(tmp_path: Path) -> None:
    """Stage 0 sends batches of 200 values; stage 1 cuts them into batches of 4. Each of its
    2 workers unpickles a body once and then gets its key alone, so each value is unpickled
    at most twice (once in each worker), and never in the parent."""
    marks = str(tmp_path)
    with pq.Pipeline(
        pq.Stage(partial(h.track, marks), workers=1, chunksize=200),
        pq.Stage(h.same, workers=2, chunksize=4),
    ) as pipe:
        got = list(pipe.map(range(400)))
        stats = at_rest(pipe)
    assert got == list(range(400))
    loaded = {int(p.name.split("-")[1]): p.read_text().split() for p in tmp_path.glob("loaded-*")}
    assert os.getpid() not in loaded and len(loaded) <= 2
    per_value = Counter(x for xs in loaded.values() for x in xs)
    assert set(per_value) == {str(x) for x in range(400)} and max(per_value.values()) <= 2, per_value.most_common(3)
    assert stats[1].completed == 400


def test_a_forwarded_value_that_kills_its_loader_costs_a_death_per_attempt() -> None:
    """A value of stage 0 whose unpickling calls os._exit: stage 1's worker dies loading its
    batch. The values of one forwarded batch load together and cannot be told apart: the
    first death runs the batch again uncharged (it may have been a SIGKILL), each later one
    charges it, whole, one attempt (WorkerCrashed, naming why): a death per attempt, not
    per item; every other batch goes on, and no process is left."""
    with pq.Pipeline(
        pq.Stage(h.exits_when_loaded_at_13, workers=1, chunksize=50),
        pq.Stage(h.same, workers=1, chunksize=50, retries=1, backoff=0.01),
    ) as pipe:
        got = list(pipe.map(range(200), return_exceptions=True))
        stats = at_rest(pipe)
    bad = [i for i, g in enumerate(got) if isinstance(g, BaseException)]
    assert bad == list(range(50))  # the batch of 13
    assert all(isinstance(got[i], pq.WorkerCrashed) and stage_of(got[i]).stage == 1 for i in bad)
    assert "the values the stage before made" in str(got[13]) and got[13].exitcode == 7
    assert got[50:] == list(range(50, 200))
    assert (stats[1].completed, stats[1].failed, stats[1].retried, stats[1].crashed) == (150, 50, 50, 100)
    assert sum(w.deaths for w in stats[1].workers) == 3  # uncharged, attempt 1, attempt 2
    assert not leftover_children()


def test_a_worker_killed_while_loading_forwarded_values_costs_a_retry(tmp_path: Path) -> None:
    """SIGKILL from outside while stage 1's worker unpickles a forwarded batch (slowly, 20 ms
    a value), with no retry budget: the batch runs again uncharged; every item arrives."""
    marks = str(tmp_path)
    with pq.Pipeline(
        pq.Stage(partial(h.slow_to_load, marks), workers=1, chunksize=20),
        pq.Stage(h.same, workers=1, chunksize=20),
    ) as pipe:
        victim = pipe.stats()[1].workers[0].pid
        it = pipe.map(range(40))
        loading = tmp_path / f"loaded-{victim}"
        deadline = time.monotonic() + 30
        while not loading.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(victim, signal.SIGKILL)
        got = list(it)
        stats = at_rest(pipe)
    assert got == list(range(40))
    assert (stats[1].completed, stats[1].failed, stats[1].crashed, stats[1].retried) == (40, 0, 0, 0)
    assert sum(w.deaths for w in stats[1].workers) == 1


@pytest.mark.parametrize("fault", ["unloadable", "exits"])
def test_a_bad_body_costs_only_its_own_items_in_a_merged_batch(fault: str) -> None:
    """Stage 0 sends one body per item; stage 1 cuts batches of 10 across 10 bodies. Item 13's
    body fails to load whole (its bad value hides past where salvage looks), or kills the
    worker loading it: only item 13 fails, the other bodies' items of its batch go on."""
    first = h.deep_bad_at_13 if fault == "unloadable" else h.exits_when_loaded_at_13
    with pq.Pipeline(
        pq.Stage(first, workers=1, chunksize=1), pq.Stage(h.same, workers=1, chunksize=10), capacity=100
    ) as pipe:
        got = list(pipe.map(range(40), return_exceptions=True))
        stats = at_rest(pipe)
    bad = [i for i, g in enumerate(got) if isinstance(g, BaseException)]
    assert bad == [13]
    expected = pq.SerializationError if fault == "unloadable" else pq.WorkerCrashed
    assert isinstance(got[13], expected) and stage_of(got[13]).stage == 1
    assert [g for i, g in enumerate(got) if i != 13] == [i for i in range(40) if i != 13]
    assert (stats[1].completed, stats[1].failed) == (39, 1)


def test_values_slow_to_unpickle_get_their_timeout_each_while_loading(tmp_path: Path) -> None:
    """A stage's timeout is per task: a worker unpickling a forwarded body of 40 values,
    20 ms each (0.8 s in all), for a batch of 10 of them, is not past a timeout of 0.1 s."""
    with pq.Pipeline(
        pq.Stage(partial(h.slow_to_load, str(tmp_path)), workers=1, chunksize=40),
        pq.Stage(h.same, workers=1, chunksize=10, timeout=0.1),
    ) as pipe:
        got = list(pipe.map(range(80), return_exceptions=True))
        stats = at_rest(pipe)
    assert got == list(range(80))
    assert (stats[1].completed, stats[1].timed_out) == (80, 0)


@pytest.mark.skipif(importlib.util.find_spec("distributed") is None, reason="needs procqueue[dask]")
def test_a_pipeline_on_dask() -> None:
    with pq.Pipeline(
        pq.Stage(h.inc, workers=1), pq.Stage(h.double_but_13, workers=1), pq.Stage(h.neg, workers=1), backend="dask"
    ) as pipe:
        got = list(pipe.map(range(300), return_exceptions=True))
        stats = at_rest(pipe)
    assert isinstance(got[12], h.Bad) and stage_of(got[12]).stage == 1
    assert [g for i, g in enumerate(got) if i != 12] == [expected(i) for i in range(300) if i != 12]
    assert [s.completed for s in stats] == [300, 299, 299]


@pytest.mark.parametrize("return_exceptions", [True, False])
def test_ordered_errors_waiting_for_their_turn_do_not_stall_the_last_stage(return_exceptions: bool) -> None:
    """Errors of an early stage wait in the outbox for the items before them, which are
    still in a slow later stage: they must not take the room that stage needs."""
    with pq.Pipeline(
        pq.Stage(h.fail_every_fifth, workers=1), pq.Stage(h.slow, workers=1, chunksize=1), capacity=4
    ) as pipe:
        got: list[object] = []
        it = pipe.map(range(400), return_exceptions=return_exceptions)
        if return_exceptions:
            got = list(it)
            assert len(got) == 400
            assert [i for i, g in enumerate(got) if isinstance(g, h.Bad)] == list(range(4, 400, 5))
        else:
            with pytest.raises(h.Bad):
                got.extend(it)
            assert got == [0, 1, 2, 3]
    at_rest(pipe)


@pytest.mark.parametrize("how", ["cancel", "terminate", "shutdown"])
def test_ending_the_pipeline_under_a_reader_tells_the_reader(how: str) -> None:
    pipe = pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.slow, workers=1, chunksize=1))
    got: list[object] = []
    ended: list[BaseException] = []
    started = threading.Event()

    def read() -> None:
        try:
            for y in pipe.map(range(100_000)):
                got.append(y)
                started.set()
        except BaseException as exc:
            ended.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    if how == "cancel":
        pipe.shutdown(cancel_futures=True)
    elif how == "terminate":
        pipe.terminate()
    else:
        pipe.shutdown()  # returns, though the map was not read to its end
    reader.join(30)
    assert not reader.is_alive()
    expected_type = CancelledError if how == "cancel" else pq.PoolClosed
    assert len(ended) == 1 and isinstance(ended[0], expected_type), ended
    assert 0 < len(got) < 100_000
    if how != "terminate":
        at_rest(pipe)


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_map_closed_or_dropped_before_its_first_item_ends(how: str) -> None:
    """Its results generator never started, so no `finally` of it runs: the map must end anyway."""
    with pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.double, workers=1), capacity=64) as pipe:
        it = pipe.map(iter(range(1_000_000)))
        time.sleep(0.3)
        if how == "close":
            it.close()
        else:
            del it
        deadline = time.monotonic() + 20
        while not all(balanced(s) for s in pipe.stats()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(pipe.depths()) == 0
        stats = at_rest(pipe)
    assert stats[0].submitted < 1_000_000


def test_an_unread_map_does_not_hold_up_shutdown() -> None:
    pipe = pq.Pipeline(pq.Stage(h.inc, workers=1), pq.Stage(h.double, workers=1), capacity=8)
    it = pipe.map(iter(range(1_000_000)))
    assert next(it) == 2
    pipe.shutdown()
    with pytest.raises(pq.PoolClosed):
        list(it)
    at_rest(pipe)


def test_a_value_that_interrupts_on_unpickling_fails_alone() -> None:
    """Off the main thread only a value can raise KeyboardInterrupt: it is that value's failure."""
    with pq.Pipeline(pq.Stage(h.interrupts_at_5, workers=1), pq.Stage(h.inc, workers=1)) as pipe:
        got = list(pipe.map(range(10), return_exceptions=True))
        at_rest(pipe)
    assert isinstance(got[5], pq.SerializationError)
    assert [g for i, g in enumerate(got) if i != 5] == [i + 1 for i in range(10) if i != 5]


def test_an_item_that_will_not_pickle_fails_alone_in_a_batch() -> None:
    """The rest of its batch goes back to the queue, and is sent again (it once waited there)."""
    with pq.Pool(1) as pool:
        got = list(pool.map(h.inc, [1, 2, h.Unpicklable(), 4], chunksize=4, return_exceptions=True))
    assert got[:2] == [2, 3] and got[3] == 5 and isinstance(got[2], pq.SerializationError)
    with pq.Pipeline(pq.Stage(h.double, workers=1), pq.Stage(h.inc, workers=1)) as pipe:
        for _ in range(2):  # the second map's batches are larger
            got = list(pipe.map([1, 2, h.Unpicklable(), 4] * 50, return_exceptions=True))
            assert sum(isinstance(g, pq.SerializationError) for g in got) == 50
            assert [g for g in got if not isinstance(g, BaseException)] == [3, 5, 9] * 50
        at_rest(pipe)


def test_a_capacity_must_be_a_number() -> None:
    with pytest.raises(ValueError, match="capacity"):
        pq.Stage(h.inc, capacity=True)
    with pytest.raises(ValueError, match="capacity"):
        pq.Pipeline(pq.Stage(h.inc), capacity=True)
