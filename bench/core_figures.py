"""The core figures: tiny-task map throughput against ProcessPoolExecutor, and
CPU-bound speedup over a serial loop. Medians of repeated runs, ratios within one run.

    python -m bench.core_figures [--repeats 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

import procqueue as pq

N_TINY = 200_000
N_CPU = 4_000


def tiny(x: int) -> int:
    return x + 1


def burn(loops: int) -> int:
    acc = 0
    for i in range(loops):
        acc += i * i % 7
    return acc


def calibrate(ms: float = 1.0) -> int:
    loops = 1000
    while True:
        t = time.perf_counter()
        burn(loops)
        took = time.perf_counter() - t
        if took > 0.05:
            return int(loops * ms / 1000 / took)
        loops *= 2


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_rate(n: int, runs: list[float]) -> float:
    return n / statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    workers = 2
    data = list(range(N_TINY))
    results: dict[str, list[float]] = {}

    def record(name: str, fn: Callable[[], object]) -> None:
        results.setdefault(name, []).append(timed(fn))

    with (
        pq.Pool(workers=workers) as pool,
        cf.ProcessPoolExecutor(workers) as ppe,
        mp.get_context("forkserver").Pool(workers) as mpp,
    ):
        list(pool.map(tiny, range(1000)))
        list(ppe.map(tiny, range(100)))
        mpp.map(tiny, range(100))
        for _ in range(args.repeats):  # interleaved, so noise hits every contender alike
            record("procqueue map (defaults)", lambda: list(pool.map(tiny, data)))
            record("ProcessPoolExecutor chunksize=1", lambda: list(ppe.map(tiny, data)))
            for cs in (1000, 10_000, 25_000):
                record(f"ProcessPoolExecutor chunksize={cs}", lambda cs=cs: list(ppe.map(tiny, data, chunksize=cs)))
            record("multiprocessing.Pool.map (default chunksize)", lambda: mpp.map(tiny, data))
    print(f"tiny: ordered map of {N_TINY:,} trivial tasks, {workers} workers, median of {args.repeats}")
    base = median_rate(N_TINY, results["procqueue map (defaults)"])
    for name, runs in results.items():
        rate = median_rate(N_TINY, runs)
        print(f"  {name:48s} {rate:12,.0f} tasks/s   procqueue/this = {base / rate:6.2f}x")

    loops = calibrate()
    items = [loops] * N_CPU
    serial, par, peer = [], [], []
    with pq.Pool(workers=workers) as pool, mp.get_context("forkserver").Pool(workers) as mpp:
        list(pool.map(burn, items[:100]))
        mpp.map(burn, items[:100])
        for _ in range(args.repeats):
            serial.append(timed(lambda: [burn(x) for x in items]))
            par.append(timed(lambda: list(pool.map(burn, items))))
            peer.append(timed(lambda: mpp.map(burn, items)))
    s, p, q = statistics.median(serial), statistics.median(par), statistics.median(peer)
    print(
        f"cpu: {N_CPU:,} tasks of ~1 ms on {workers} workers: serial {s:.2f} s; "
        f"procqueue {p:.2f} s (speedup {s / p:.2f}x); multiprocessing.Pool.map {q:.2f} s (speedup {s / q:.2f}x)"
    )


if __name__ == "__main__":
    main()
