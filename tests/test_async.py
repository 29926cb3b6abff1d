"""The pool awaited (issue 14): `async with`, `arun`, `amap`, cancellation.

Each test runs its own event loop (`asyncio.run`) on real pools; a heartbeat
coroutine ticking every 10 ms records the longest gap the loop saw, which is
how "never blocks the event loop" is checked. Tests that touch the pool run on
both backends (`make_pool`)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import procqueue as pq

import handlers as h
from conftest import balanced

MakePool = Callable[..., pq.Pool]


class Heartbeat:
    """Ticks every 10 ms on the loop; `gap` is the longest time between two ticks."""

    def __init__(self) -> None:
        self.gap = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.get_running_loop().create_task(self._beat())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _beat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.gap = max(self.gap, now - last)
            last = now


def touch_then(path: str, seconds: float) -> str:
    """Mark that it started, sleep, mark that it ended."""
    Path(path + ".started").touch()
    time.sleep(seconds)
    Path(path + ".ended").touch()
    return path


def raise_value_error(x: int) -> int:
    raise ValueError(f"bad {x}")


def fail_at_7(x: int) -> int:
    if x == 7:
        raise ValueError(f"bad {x}")
    return x


def nap(x: int) -> int:
    time.sleep(0.02)
    return x


GAP = 0.25  # seconds: the longest pause of the loop a test accepts


# --- arun ---------------------------------------------------------------------------------


def test_arun_gathers_500_calls(make_pool: MakePool) -> None:
    async def main() -> list[int]:
        pool = make_pool(workers=2)
        async with Heartbeat() as beat:
            values = await asyncio.gather(*(pool.arun(h.square, i) for i in range(500)))
        assert beat.gap < GAP, f"the loop stalled {beat.gap:.3f} s"
        return list(values)

    assert asyncio.run(main()) == [i * i for i in range(500)]


def test_arun_raises_the_handlers_exception_type(make_pool: MakePool) -> None:
    async def main() -> None:
        pool = make_pool(workers=1)
        with pytest.raises(ValueError, match="bad 3"):
            await pool.arun(raise_value_error, 3)
        assert await pool.options(priority=5, retries=1).arun(h.add, 2, b=3) == 5

    asyncio.run(main())


def test_arun_waits_for_room_without_blocking_the_loop(make_pool: MakePool) -> None:
    """capacity 2, one worker busy: the calls queue up behind it, the loop runs on."""

    async def main() -> list[Any]:
        pool = make_pool(workers=1, capacity=2)
        async with Heartbeat() as beat:
            values = await asyncio.gather(*(pool.arun(h.sleep_then, i, 0.1) for i in range(8)))
        assert beat.gap < GAP, f"the loop stalled {beat.gap:.3f} s while arun waited for room"
        assert pool.stats().blocked > 0.1  # the coroutines' waits for room are counted
        return list(values)

    assert asyncio.run(main()) == list(range(8))


def test_arun_gives_up_waiting_for_room_after_block_timeout(make_pool: MakePool) -> None:
    """One worker busy for 0.8 s with what it holds, the queue (capacity 1) full and nothing
    leaving it before then: a call with block_timeout=0.2 raises QueueFull."""

    async def main() -> None:
        pool = make_pool(workers=1, capacity=1)
        behind = [asyncio.ensure_future(pool.arun(h.sleep_then, i, 0.8)) for i in range(10)]
        await asyncio.sleep(0.3)  # the worker holds what it can, the queue is full, the rest wait
        assert pool.stats().pending == 1
        started = time.monotonic()
        with pytest.raises(pq.QueueFull, match="stayed full"):
            await pool.options(block_timeout=0.2).arun(h.square, 3)
        assert time.monotonic() - started < 0.5 + 0.3  # gave up, did not sneak in once room came
        for fut in behind:
            fut.cancel()
        await asyncio.gather(*behind, return_exceptions=True)

    asyncio.run(main())


def test_cancelling_arun_cancels_a_task_that_has_not_started(make_pool: MakePool, tmp_path: Path) -> None:
    """One worker: a long task runs, 20 more wait. Cancelling every await: the waiting tasks that
    had not started never run (no marker, counted cancelled); the running one runs to its end
    (documented), its outcome dropped. Marker files prove which ran."""
    running = str(tmp_path / "running")
    waiting = [str(tmp_path / f"waiting{i}") for i in range(20)]

    async def main() -> pq.Pool:
        pool = make_pool(workers=1)
        first = asyncio.ensure_future(pool.arun(touch_then, running, 1.0))
        rest = [asyncio.ensure_future(pool.arun(touch_then, w, 0.0)) for w in waiting]
        deadline = time.monotonic() + 30
        while not os.path.exists(running + ".started") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for fut in (first, *rest):
            fut.cancel()
        for fut in (first, *rest):
            with pytest.raises(asyncio.CancelledError):
                await fut
        return pool

    pool = asyncio.run(main())
    pool.shutdown(wait=True)
    assert os.path.exists(running + ".ended"), "the running task was killed, not run to its end"
    ran = sum(os.path.exists(w + ".started") for w in waiting)
    s = pool.stats()
    assert s.cancelled >= 10, f"only {s.cancelled} of 20 waiting tasks were cancelled"
    assert s.completed == 1 + ran and s.cancelled == 20 - ran and balanced(s), (ran, s)


def test_shutdown_with_cancel_futures_cancels_the_awaits_of_tasks_not_started(
    make_pool: MakePool, tmp_path: Path
) -> None:
    """The pool cancels what has not started (shutdown with cancel_futures): their awaits
    raise CancelledError; the running task's await gets its value."""
    running = str(tmp_path / "running")

    async def main() -> tuple[object, list[object]]:
        pool = make_pool(workers=1)
        first = asyncio.ensure_future(pool.arun(touch_then, running, 0.5))
        rest = [asyncio.ensure_future(pool.arun(h.square, i)) for i in range(5)]
        deadline = time.monotonic() + 30
        while not os.path.exists(running + ".started") and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        pool.shutdown(wait=False, cancel_futures=True)
        return await first, await asyncio.gather(*rest, return_exceptions=True)

    value, outcomes = asyncio.run(main())
    assert value == running
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes


# --- amap ---------------------------------------------------------------------------------


def test_amap_over_a_list_in_order_and_unordered(make_pool: MakePool) -> None:
    async def main() -> tuple[list[int], list[int]]:
        pool = make_pool(workers=2)
        async with Heartbeat() as beat:
            ordered = [y async for y in pool.amap(h.square, range(20_000))]
            unordered = [y async for y in pool.amap(h.square, list(range(2000)), ordered=False)]
        assert beat.gap < GAP, f"the loop stalled {beat.gap:.3f} s during amap"
        return ordered, unordered

    ordered, unordered = asyncio.run(main())
    assert ordered == [i * i for i in range(20_000)]
    assert sorted(unordered) == [i * i for i in range(2000)]


def test_amap_over_an_async_generator_pulls_only_a_window_ahead(make_pool: MakePool) -> None:
    produced = 0

    async def numbers(n: int) -> AsyncIterator[int]:
        nonlocal produced
        for i in range(n):
            produced += 1
            yield i
            if i % 1000 == 0:
                await asyncio.sleep(0)  # a real await now and then, as an I/O source has

    async def main() -> tuple[int, int]:
        pool = make_pool(workers=2, capacity=64)
        total, ahead = 0, 0
        async for _ in pool.amap(h.square, numbers(100_000), chunksize=100):
            total += 1
            ahead = max(ahead, produced - total)
            if total % 10_000 == 0:
                await asyncio.sleep(0.01)  # a slow consumer now and then
        assert total == 100_000
        return ahead, total

    ahead, _ = asyncio.run(main())
    # As map's: its window (the larger of 4 x capacity and 2 batches per worker, 400 here), and
    # the chunks handed over to the loop and not yet consumed (up to 3).
    window = max(4 * 64, 2 * 2 * 100)
    assert ahead <= window + 3 * window, f"the async input was pulled {ahead} items ahead"


def test_amap_raises_a_failed_task_at_its_place_or_yields_it(make_pool: MakePool) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        pool = make_pool(workers=2)
        got: list[Any] = []
        with pytest.raises(ValueError, match="bad 7"):
            async for y in pool.amap(fail_at_7, range(20)):
                got.append(y)
        kept = [y async for y in pool.amap(fail_at_7, range(10), return_exceptions=True)]
        return got, kept

    got, kept = asyncio.run(main())
    assert got == list(range(7))
    assert isinstance(kept[7], ValueError) and [k for i, k in enumerate(kept) if i != 7] == [
        i for i in range(10) if i != 7
    ]


def test_breaking_out_of_amap_cancels_what_did_not_start(make_pool: MakePool) -> None:
    async def main() -> pq.Pool:
        pool = make_pool(workers=1, capacity=16)
        async for y in pool.amap(nap, range(400)):
            if y >= 3:
                break
        return pool

    pool = asyncio.run(main())
    pool.shutdown(wait=True)
    s = pool.stats()
    # What had been cut from the input and not started is cancelled; the rest never is.
    assert balanced(s) and s.submitted < 100 and s.completed + s.cancelled == s.submitted, s


# --- async with ---------------------------------------------------------------------------


def test_aexit_waits_for_the_work_without_blocking_the_loop(backend: str) -> None:
    async def main() -> tuple[float, pq.Pool, list[Any]]:
        pool = pq.Pool(workers=1, backend=backend)  # made before the beat: starting a cluster blocks
        async with Heartbeat() as beat:
            async with pool:
                futs = [pool.submit(h.sleep_then, i, 0.2) for i in range(3)]
            values = [f.result(timeout=0) for f in futs]  # done: __aexit__ waited for them
        return beat.gap, pool, values

    gap, pool, values = asyncio.run(main())
    assert values == [0, 1, 2]
    assert gap < GAP, f"the loop stalled {gap:.3f} s in __aexit__"
    assert balanced(pool.stats())


# --- the seed model, awaited ----------------------------------------------------------------


def test_async_taskqueue_results_and_drain() -> None:
    """As test_pool.py's sync test: asubmit, adrain in submission order, aresults as completed."""

    async def main() -> tuple[list[pq.Result], dict[Any, pq.Result], float]:
        async with Heartbeat() as beat:
            async with pq.TaskQueue(h.fail_if, workers=2, max_retries=1, capacity=4) as q:
                for i in range(20):  # capacity 4: most of these wait for room, suspended
                    await q.asubmit(pq.Task(f"t{i}", i, priority=i % 3))
                results = await q.adrain()
            async with pq.TaskQueue(h.boom, workers=1, max_retries=1) as q2:
                await q2.asubmit(pq.Task("a", 1))
                await q2.asubmit(pq.Task("b", 2, retries=0))
                got = {r.task_id: r async for r in q2.aresults()}
        return results, got, beat.gap

    results, got, gap = asyncio.run(main())
    assert [r.task_id for r in results] == [f"t{i}" for i in range(20)]
    assert all(r.ok and r.value == i and r.attempts == 1 and r.worker_pid for i, r in enumerate(results))
    assert isinstance(got["a"].error, h.Boom) and got["a"].attempts == 2 and got["a"].value is None
    assert got["b"].attempts == 1
    assert gap < GAP, f"the loop stalled {gap:.3f} s"


@pytest.mark.parametrize("mode", ["drop", "error"])
def test_async_taskqueue_honours_drop_and_error(mode: str) -> None:
    async def main() -> tuple[list[pq.Result], int]:
        async with pq.TaskQueue(h.spin, workers=1, capacity=1, backpressure=mode) as q:
            refused = 0
            for i in range(6):
                try:
                    await q.asubmit(pq.Task(i, 200.0))  # 200 ms each: the queue fills
                except pq.QueueFull:
                    refused += 1
            return await q.adrain(), refused

    results, refused = asyncio.run(main())
    if mode == "drop":
        assert refused == 0 and len(results) == 6 and any(isinstance(r.error, pq.Dropped) for r in results)
    else:
        assert refused > 0 and len(results) == 6 - refused
    assert all(r.ok for r in results if not isinstance(r.error, pq.Dropped))


# --- pressure signals -----------------------------------------------------------------------


def test_pressure_full_then_drained_in_order_off_the_managers_thread(make_pool: MakePool) -> None:
    import threading

    events: list[tuple[str, str]] = []
    pool = make_pool(workers=1, capacity=10, low_water=0.5, on_pressure=lambda s: events.append(
        (s, threading.current_thread().name)))  # fmt: skip
    futs = [pool.submit(h.sleep_then, i, 0.02) for i in range(40)]  # "block": waits for room
    assert [f.result(timeout=60) for f in futs] == list(range(40))
    deadline = time.monotonic() + 10
    while (not events or events[-1][0] != "drained") and time.monotonic() < deadline:
        time.sleep(0.01)
    kinds = [k for k, _ in events]
    assert kinds and kinds[0] == "full" and kinds[-1] == "drained", kinds
    assert all(a != b for a, b in itertools.pairwise(kinds)), f"not alternating: {kinds}"
    assert all(name.startswith("procqueue-callbacks") for _, name in events), events
    s = pool.stats()
    assert s.blocked > 0.1, f"submitters waited for room, yet Stats.blocked is {s.blocked}"


def test_no_pressure_no_signal_and_nothing_blocked(make_pool: MakePool) -> None:
    events: list[str] = []
    pool = make_pool(workers=2, capacity=100, on_pressure=events.append)
    assert list(pool.map(h.square, range(50))) == [i * i for i in range(50)]
    assert [pool.submit(h.square, i).result(timeout=30) for i in range(5)] == [0, 1, 4, 9, 16]
    assert events == [] and pool.stats().blocked == 0.0


def test_pressure_options_are_checked() -> None:
    with pytest.raises(ValueError, match="low_water"):
        pq.Pool(workers=1, low_water=0.0)
    with pytest.raises(TypeError, match="on_pressure"):
        pq.Pool(workers=1, on_pressure="full")  # type: ignore[arg-type]


# --- rate limits ----------------------------------------------------------------------------


def stamp_now(x: int) -> float:
    return time.time()


def test_a_pool_rate_spaces_the_starts(make_pool: MakePool) -> None:
    """60 tasks at 20/s: a second's worth (20) at once, the other 40 over about 2 s."""
    pool = make_pool(workers=2, rate="20/s")
    started = time.time()
    stamps = sorted(pool.map(stamp_now, range(60)))
    took = stamps[-1] - started
    assert 1.8 <= took <= 4.0, f"60 tasks at 20/s took {took:.2f} s"
    assert stamps[39] - started >= 0.8  # the 40th start waited for tokens
    assert pool.stats().throttled > 0


def test_a_per_call_rate_beside_an_unlimited_one(make_pool: MakePool) -> None:
    pool = make_pool(workers=2)
    limited = pool.options(rate="20/s", priority=5)
    started = time.time()
    slow = [limited.submit(stamp_now, i) for i in range(60)]  # queued first, and more urgent
    fast = list(pool.map(stamp_now, range(60)))
    fast_took = max(fast) - started
    slow_took = max(f.result(timeout=30) for f in slow) - started
    assert fast_took < 1.5, f"the unlimited tasks waited behind the limited ones: {fast_took:.2f} s"
    assert 1.8 <= slow_took <= 4.0, f"60 tasks at 20/s took {slow_took:.2f} s"


def test_async_calls_at_a_rate(make_pool: MakePool) -> None:
    async def main() -> list[float]:
        pool = make_pool(workers=2)
        return list(await asyncio.gather(*(pool.options(rate=10.0).arun(stamp_now, i) for i in range(20))))

    started = time.time()
    stamps = sorted(asyncio.run(main()))
    assert stamps[-1] - started >= 0.9, "20 calls at 10/s (calls at one rate share one bucket)"


@pytest.mark.parametrize("rate", ["100", "5/d", "fast", "0/s", -1, float("nan")])
def test_a_malformed_rate_is_a_value_error_naming_it(rate: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        pq.Pool(workers=1, rate=rate)  # type: ignore[arg-type]
    with pq.Pool(workers=1) as pool, pytest.raises(ValueError, match="rate"):
        pool.options(rate=rate)  # type: ignore[arg-type]


def test_amap_over_a_slow_async_source_yields_as_items_come(make_pool: MakePool) -> None:
    """A source that trickles (one item each 50 ms) is not held back: the first result comes
    long before the source ends; one fed by the consumer's own results (a feedback loop) runs."""

    async def trickle(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(0.05)

    async def main() -> tuple[float, float, list[int]]:
        pool = make_pool(workers=2)
        started = time.monotonic()
        first = None
        async for _ in pool.amap(h.square, trickle(20)):
            if first is None:
                first = time.monotonic() - started
        whole = time.monotonic() - started
        queue: asyncio.Queue[int | None] = asyncio.Queue()

        async def fed() -> AsyncIterator[int]:
            while (item := await queue.get()) is not None:
                yield item

        await queue.put(1)
        got: list[int] = []
        async for y in pool.amap(h.square, fed()):  # each result brings the next input
            got.append(y)
            await queue.put(len(got) + 1 if len(got) < 30 else None)
        assert first is not None
        return first, whole, got

    first, whole, got = asyncio.run(asyncio.wait_for(main(), 60))
    assert first < 0.5 and whole >= 0.9, (first, whole)
    assert got == [i * i for i in range(1, 31)]


def test_breaking_out_of_amap_over_an_idle_async_source_ends_its_thread(make_pool: MakePool) -> None:
    """The source goes quiet after 3 items; leaving the loop ends the map's thread and closes
    the source (no `procqueue-amap` thread is left: the fixture checks)."""
    closed = []

    async def quiet() -> AsyncIterator[int]:
        try:
            for i in range(3):
                yield i
            await asyncio.sleep(3600)
            yield 99
        finally:
            closed.append(True)

    async def main() -> list[int]:
        pool = make_pool(workers=1)
        got = []
        async for y in pool.amap(h.square, quiet()):
            got.append(y)
            if len(got) == 3:
                break
        await asyncio.sleep(0.2)
        return got

    assert asyncio.run(asyncio.wait_for(main(), 30)) == [0, 1, 4]
    assert closed == [True]
