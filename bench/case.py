"""One bench case (a workload, a peer, a setting) in a fresh process:

    python -m bench.case '{"workload": "tiny", "peer": "procqueue", ...}' [result.json]

writes one JSON line with the raw figures (to the file, or to stdout). The suite runs each case under a
hard time limit and records a case that overruns it as a hang.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from . import workloads as w
from .peers import Chain, Peer, by_name

Spec = dict[str, Any]


def fitted(n: int, budget: float, probe: Callable[[int], float]) -> int:
    """`n`, or fewer items when a probe of n/50 says one run would take over `budget` seconds."""
    k = max(1, n // 50)
    took = probe(k)
    projected = took * n / k
    return n if projected <= budget else max(k, int(n * budget / projected))


def timed_runs(
    peer: Peer, fn: Callable[[Any], Any], items: list[Any], spec: Spec, probe: bool = False
) -> dict[str, Any]:
    """Time `repeats` maps of `items`. With `probe`, each run is preceded by a
    serial run of every fourth item, so serial time is judged at the machine's
    speed of that moment (a shared machine drifts by tens of percent over minutes)."""
    cs = spec.get("chunksize")
    peer.map(fn, items[: max(1, min(len(items), 200))], cs)  # warm: workers up, handler known
    n = fitted(len(items), spec["budget"], lambda k: _time(lambda: peer.map(fn, items[:k], cs)))
    items = items[:n]
    times: list[float] = []
    per_loop = []
    for _ in repeats(spec, times):
        if probe:
            sample = items[::4]
            t = time.perf_counter()
            for x in sample:
                fn(x)
            per_loop.append((time.perf_counter() - t) / sum(sample))
        t = time.perf_counter()
        out = peer.map(fn, items, cs)
        times.append(time.perf_counter() - t)
        assert len(out) == n, f"{peer.name} returned {len(out)} results for {n} tasks"
    return {"n": n, "times": times, "per_loop": per_loop}


FILL_MAX = 25  # most timed runs a case makes to fill its `fill` seconds


def repeats(spec: Spec, times: list[float]) -> Iterator[int]:
    """Count the timed runs of a case: `repeats` of them, then more while they add up to
    under `fill` seconds (at most FILL_MAX). A map of tiny tasks takes ~30 ms, so three
    runs are a weak median on a noisy machine; a second of them is a steady one."""
    k = 0
    while k < spec["repeats"] or (k < FILL_MAX and sum(times) < spec.get("fill", 0.0)):
        yield k
        k += 1


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def tiny(peer: Peer, spec: Spec) -> dict[str, Any]:
    return timed_runs(peer, w.tiny, list(range(spec["n"])), spec)


def cpu(peer: Peer, spec: Spec) -> dict[str, Any]:
    out = timed_runs(peer, w.burn, [spec["loops_per_ms"]] * spec["n"], spec, probe=True)
    out["loops"] = [out["n"] * spec["loops_per_ms"]] * 2
    return out


def skewed(peer: Peer, spec: Spec) -> dict[str, Any]:
    loops = w.skewed_loops(spec["n"], spec["loops_per_ms"])
    out = timed_runs(peer, w.burn, loops, spec, probe=True)
    out["loops"] = [sum(loops[: out["n"]]), max(loops[: out["n"]])]  # all of them, the longest
    return out


def payload_in(peer: Peer, spec: Spec) -> dict[str, Any]:
    """Each task is given an 8 MB array and reads all of it (its sum comes back)."""
    arrays = [w.make_array(spec["mb"], i) for i in range(spec["n"])]
    with peak_rss() as growth:
        out = timed_runs(peer, w.total, arrays, spec)
    return {**out, "mb": spec["mb"], "rss_growth": growth}


def payload_out(peer: Peer, spec: Spec) -> dict[str, Any]:
    """Each task returns a fresh 8 MB array, which the parent reads whole and lets go, as
    a stream of results is used: the parent's RSS should grow by about one array."""
    items = [spec["mb"] * 1024 + i for i in range(spec["n"])]
    cs = spec.get("chunksize")
    peer.map(w.fresh_array, items[:4], cs)  # warm: workers up, handler known
    times: list[float] = []
    with peak_rss() as growth:
        for _ in repeats(spec, times):
            t = time.perf_counter()
            got = sum(1 for a in peer.imap(w.fresh_array, items, cs) if a.sum() >= 0)
            times.append(time.perf_counter() - t)
            assert got == len(items), f"{peer.name} yielded {got} of {len(items)} results"
    return {"n": len(items), "times": times, "mb": spec["mb"], "rss_growth": growth}


@contextlib.contextmanager
def peak_rss() -> Iterator[list[int]]:
    """The parent's peak RSS growth over the block (sampled every 10 ms), in bytes."""
    me = psutil.Process()
    base = me.memory_info().rss
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], me.memory_info().rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    growth: list[int] = []
    try:
        yield growth
    finally:
        done.set()
        watcher.join()
        growth.append(max(peak[0], me.memory_info().rss) - base)


def stream(peer: Peer, spec: Spec) -> dict[str, Any]:
    cs = spec.get("chunksize")
    for _ in peer.imap(w.tiny, w.numbers(1000), cs):  # warm
        pass
    n = fitted(spec["n"], spec["budget"], lambda k: _time(lambda: sum(1 for _ in peer.imap(w.tiny, w.numbers(k), cs))))
    times: list[float] = []
    growth: list[int] = []
    for _ in repeats(spec, times):
        with peak_rss() as grew:
            t = time.perf_counter()
            count = sum(1 for _ in peer.imap(w.tiny, w.numbers(n), cs))
            times.append(time.perf_counter() - t)
        growth += grew
        assert count == n, f"{peer.name} yielded {count} of {n} results"
    return {"n": n, "times": times, "rss_growth": growth}


def startup(peer: Peer, spec: Spec) -> dict[str, Any]:
    """Each repeat: a pool to its first result, then its shutdown. This is a fresh
    process: the peer's import is timed apart, and the first repeat (the cold pool:
    a fork server to start, modules to load) is also reported on its own."""
    import_s = None
    if peer.package is not None and peer.package not in sys.modules:
        t = time.perf_counter()
        importlib.import_module(peer.package)
        import_s = time.perf_counter() - t
    first, down = [], []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        peer.start(spec["workers"], **spec.get("options", {}))
        assert list(peer.imap(w.tiny, [1], None)) == [2]
        t1 = time.perf_counter()
        peer.stop()
        first.append(t1 - t0)
        down.append(time.perf_counter() - t1)
    return {"times": first, "shutdown": down, "cold": first[:1], "import": [] if import_s is None else [import_s]}


def faults(peer: Peer, spec: Spec) -> dict[str, Any]:
    """One task exits its worker, one segfaults it (each on its first attempt only)."""
    n, kill_at, segv_at = spec["n"], spec["n"] // 3, 2 * spec["n"] // 3
    with tempfile.TemporaryDirectory() as markers:
        t = time.perf_counter()
        ok, errors = 0, []
        futures = [peer.submit(w.crash_once, x, markers, kill_at, segv_at) for x in range(n)]
        if futures[0] is None:  # no submit API: its map, which stops at the first error
            try:
                ok = sum(1 for _ in peer.imap(_crash_partial(markers, kill_at, segv_at), range(n), None))
            except Exception as exc:
                errors.append(type(exc).__name__)
        else:
            for fut in futures:
                try:
                    fut.result()
                    ok += 1
                except Exception as exc:
                    errors.append(type(exc).__name__)
        took = time.perf_counter() - t
    kinds = sorted(set(errors))
    outcome = "completed" if ok == n else f"{ok}/{n} done, {len(errors) or n - ok} failed ({', '.join(kinds)})"
    return {"times": [took], "outcome": outcome, "ok": ok, "n": n}


class _crash_partial:  # a picklable partial of crash_once, for maps of one argument
    def __init__(self, markers: str, kill_at: int, segv_at: int) -> None:
        self.args = (markers, kill_at, segv_at)

    def __call__(self, x: int) -> int:
        return w.crash_once(x, *self.args)


def priority(peer: Peer, spec: Spec) -> dict[str, Any]:
    """How long an urgent task, submitted behind `n` queued ones of ~1 ms, takes to complete."""
    lpm = spec["loops_per_ms"]
    peer.map(w.stamp, [lpm] * 20, None)  # warm
    waits, behind = [], []
    for _ in range(spec["repeats"]):
        low = [peer.submit(w.stamp, lpm) for _ in range(spec["n"])]
        t = time.monotonic()
        high = peer.submit(w.stamp, lpm, priority=9)
        done_at = high.result()
        waits.append(done_at - t)
        lows = [f.result() for f in low]
        behind.append(sum(1 for x in lows if x > done_at))  # queued before it, finished after it
    return {"times": waits, "overtaken": behind, "n": spec["n"]}


def durations(peer: Peer, spec: Spec) -> dict[str, Any]:
    """Throughput against task duration; peers get 20 ms batches unless they size their own."""
    lpm, rows = spec["loops_per_ms"], []
    for ms in spec["durations_ms"]:
        n = int(min(100_000, max(200, spec["seconds"] * spec["workers"] * 1000 / ms)))
        cs = None if peer.name == "procqueue" else max(1, int(20 / ms))
        sub = dict(spec, chunksize=cs, repeats=spec["repeats"])
        out = timed_runs(peer, w.burn, [max(1, int(ms * lpm))] * n, sub)
        rows.append({"ms": ms, "n": out["n"], "times": out["times"], "chunksize": cs})
    return {"rows": rows, "times": []}


def dask(peer: Peer, spec: Spec) -> dict[str, Any]:
    """The Dask workload: tiny tasks, then tasks of ~`ms` ms, each mapped by a warm
    peer. A Dask peer starts its cluster first (`cluster_start`); a pool, on it or
    local, is then timed from its creation to its first result (`pool_start`). Only
    the maps are in `times` (tiny) and `ms_times`; `task_s` is a ~1 ms task's own
    time, a serial probe in this process before each repeat's maps."""
    workers, ms_loops = spec["workers"], max(1, int(spec["ms"] * spec["loops_per_ms"]))
    for module in filter(None, ("procqueue", peer.package)):
        importlib.import_module(module)  # imports (distributed's take ~0.3 s) are no part of a start
    t = time.perf_counter()
    peer.start(workers, **spec.get("options", {}))
    try:
        assert peer.map(w.tiny, [1], None) == [2]
        ready = time.perf_counter() - t
        cluster = getattr(peer, "cluster_start", None)
        out: dict[str, Any] = {"cluster_start": [] if cluster is None else [cluster], "pool_start": []}
        if hasattr(peer, "pool"):  # a pool: procqueue's, local or on the cluster
            out["pool_start"].append(ready - (cluster or 0.0))
        n = spec["per_task_n"] if peer.per_item else spec["n"]
        items, heavy = list(range(n)), [ms_loops] * spec["ms_n"]
        peer.map(w.tiny, items[:200], None)  # warm: the handler known, its batch size measured
        peer.map(w.burn, heavy[: 10 * workers], None)
        out.update(n=n, times=[], ms=spec["ms"], ms_n=len(heavy), ms_times=[], task_s=[])
        for _ in range(spec["repeats"]):
            time.sleep(0.2)  # a Dask scheduler (in this process) done with the last map's tasks
            probe = heavy[:100]
            t = time.perf_counter()
            for x in probe:
                w.burn(x)
            out["task_s"].append((time.perf_counter() - t) / len(probe))
            t = time.perf_counter()
            got = peer.map(w.tiny, items, None)
            out["times"].append(time.perf_counter() - t)
            assert len(got) == n and got[-1] == n, f"{peer.name}: {len(got)} results of {n} tiny tasks"
            t = time.perf_counter()
            got = peer.map(w.burn, heavy, None)
            out["ms_times"].append(time.perf_counter() - t)
            assert len(got) == len(heavy), f"{peer.name}: {len(got)} results of {len(heavy)} tasks"
    finally:
        peer.stop()
    return out


def async_calls(peer: Peer, spec: Spec) -> dict[str, Any]:
    """`n` awaited calls of a ~0.1 ms function from `concurrency` coroutines, and the
    longest gap a 5 ms heartbeat on the same loop saw meanwhile."""
    import asyncio

    return asyncio.run(_async_calls(peer, spec))


async def _async_calls(peer: Peer, spec: Spec) -> dict[str, Any]:
    import asyncio

    conc = spec["concurrency"]
    per = max(1, spec["n"] // conc)
    work = max(1, spec["loops_per_ms"] // 10)  # ~0.1 ms
    await peer.astart(spec["workers"])
    try:
        await asyncio.gather(*(peer.acall(w.burn, work) for _ in range(conc)))  # warm
        times, gaps = [], []
        for _ in range(spec["repeats"]):
            gap, stop = [0.0], asyncio.Event()

            async def beat(gap: list[float] = gap, stop: asyncio.Event = stop) -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    gap[0] = max(gap[0], now - last)
                    last = now

            async def caller() -> None:
                for _ in range(per):
                    await peer.acall(w.burn, work)

            heart = asyncio.get_running_loop().create_task(beat())
            t = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(conc)))
            times.append(time.perf_counter() - t)
            stop.set()
            await heart
            gaps.append(gap[0])
    finally:
        await peer.astop()
    return {"n": per * conc, "times": times, "max_gap": gaps}


def pipeline(peer: Peer, spec: Spec) -> dict[str, Any]:
    """Three stages, `per_stage` workers each, over a generator: tiny ones (`part` "tiny":
    x + 1, 2x, -x over `n` items) or ~1 ms ones (`part` "ms": `relay` over `ms_n` items).
    Before each timed "ms" run, the machine's ceiling: the three stages' work on every
    eighth item split over bare forked processes, one a usable CPU (`ceiling_s`, per item). The parent's peak RSS growth over each run
    (`rss_growth`), and its peak after the first fifth of the results were read over
    its RSS then (`rss_late`: a parent that holds items as it goes grows there)."""
    assert isinstance(peer, Chain), f"{peer.name} is not a chain of stages"
    cs, loops, tiny_part = spec.get("chunksize"), spec["loops_per_ms"], spec["part"] == "tiny"
    fns: list[Callable[[Any], Any]] = [w.tiny, w.double, w.negate] if tiny_part else [w.relay] * 3
    n, warm = (spec["n"], 20_000) if tiny_part else (spec["ms_n"], 20 * spec["per_stage"])

    def items(k: int) -> Iterator[int]:
        return w.numbers(k) if tiny_part else w.repeated(loops, k)

    def last_of(k: int) -> int:  # the last result of a run over items(k)
        return -2 * k if tiny_part else loops

    me = psutil.Process()
    out: dict[str, Any] = {"part": spec["part"], "n": n, "per_stage": spec["per_stage"],
                           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                           "times": [], "ceiling_s": [], "rss_growth": [], "rss_late": []}  # fmt: skip
    peer.open(fns, spec["per_stage"])
    try:
        got = list(peer.run(items(min(n, warm)), cs))  # warm: workers up, handlers known, batch sizes measured
        assert got[-1] == last_of(min(n, warm)), f"{peer.name}: {got[-1]!r} last of the warm-up"
        for _ in range(spec["repeats"]):
            if not tiny_part:
                out["ceiling_s"].append(
                    _bare_fork_probe(fns, loops, max(1, n // 8), min(out["cpus"], 3 * spec["per_stage"]))
                )
            count, last, fifth, at_fifth = 0, None, max(1, n // 5), 0  # (last: the last result)
            with peak_rss() as grew:
                base = me.memory_info().rss
                t = time.perf_counter()
                for y in peer.run(items(n), cs):
                    count += 1
                    last = y
                    if count == fifth:
                        at_fifth = me.memory_info().rss
                out["times"].append(time.perf_counter() - t)
            out["rss_growth"] += grew
            out["rss_late"].append(max(0, base + grew[0] - at_fifth))
            assert count == n and last == last_of(n), f"{peer.name}: {count} results of {n}, the last {last!r}"
    finally:
        peer.close()
    return out


def _bare_fork_probe(fns: list[Callable[[Any], Any]], loops: int, k: int, procs: int) -> float:
    """Seconds per item when `k` items' three stages run in `procs` forked processes
    that split them, as fast as this machine runs that work right now."""
    t = time.perf_counter()
    pids = []
    for p in range(procs):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                for x in w.repeated(loops, len(range(p, k, procs))):
                    fns[2](fns[1](fns[0](x)))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return (time.perf_counter() - t) / k


WORKLOADS: dict[str, Callable[[Peer, Spec], dict[str, Any]]] = {
    "tiny": tiny, "cpu": cpu, "skewed": skewed, "payload-in": payload_in, "payload-out": payload_out, "stream": stream,
    "startup": startup, "faults": faults, "priority": priority, "durations": durations, "dask": dask,
    "async": async_calls, "pipeline": pipeline,
}  # fmt: skip
STARTS_ITS_OWN = {"startup", "dask", "async", "pipeline"}


def main() -> None:
    spec: Spec = json.loads(sys.argv[1])
    peer = by_name(spec["peer"])
    started = False
    try:
        if spec["workload"] not in STARTS_ITS_OWN:
            peer.start(spec["workers"], **spec.get("options", {}))
            started = True
        result = WORKLOADS[spec["workload"]](peer, spec)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
    finally:
        if started:
            try:
                peer.stop()
            except Exception as exc:
                result = {"error": f"shutdown failed: {type(exc).__name__}: {exc}"}
    line = json.dumps(result) + "\n"
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as out:
            out.write(line)
    else:
        sys.stdout.write(line)
        sys.stdout.flush()
    os._exit(0)  # a peer's leftover threads must not keep a finished case alive


if __name__ == "__main__":
    main()
