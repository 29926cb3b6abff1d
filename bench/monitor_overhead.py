"""What the monitor costs: tiny-task map throughput with the monitor at its default
interval (1 s) against the monitor off. Runs alternate on/off in one process;
each run maps over enough items to span several samples. Medians of repeats.

    python -m bench.monitor_overhead [--repeats 9] [--items 6000000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import procqueue as pq

from .workloads import tiny


def one_run(monitor: bool, items: int) -> float:
    """Tasks per second of one ordered map over `range(items)`, on a warm pool."""
    with pq.Pool(workers=2, monitor=monitor) as pool:
        for _ in pool.map(tiny, range(20_000)):  # warm: handler cached, batch size measured
            pass
        t = time.perf_counter()
        for _ in pool.map(tiny, range(items)):
            pass
        took = time.perf_counter() - t
        samples = pool.stats()
    assert samples.balanced
    return items / took


def sample_cost(n: int = 300) -> float:
    """Seconds the parent spends on one sample (2 workers busy with a tiny map)."""
    with pq.Pool(workers=2, monitor=False, max_worker_memory=1 << 40) as pool:  # a sampler with no sinks
        it = pool.map(tiny, range(50_000_000))
        next(it)
        sampler = pool._core.sampler
        t = time.perf_counter()
        for _ in range(n):
            sampler._sample()
        took = (time.perf_counter() - t) / n
        pool.shutdown(cancel_futures=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--items", type=int, default=6_000_000)
    args = ap.parse_args()
    on: list[float] = []
    off: list[float] = []
    ratios: list[float] = []
    for i in range(args.repeats):
        pair = {}
        for monitor in (True, False) if i % 2 == 0 else (False, True):
            pair[monitor] = one_run(monitor, args.items)
        on.append(pair[True])
        off.append(pair[False])
        ratios.append(pair[True] / pair[False])
        print(f"run {i + 1}: on {pair[True] / 1e6:.2f}M/s  off {pair[False] / 1e6:.2f}M/s  ratio {ratios[-1]:.3f}")
    cost = sample_cost()
    print(f"one sample costs the parent {cost * 1e6:.0f} us: {100 * cost:.3f}% of a core at the default 1 s interval")
    print(
        f"median: on {statistics.median(on) / 1e6:.2f}M/s, off {statistics.median(off) / 1e6:.2f}M/s; "
        f"ratio of medians {statistics.median(on) / statistics.median(off):.3f}, "
        f"median of paired ratios {statistics.median(ratios):.3f} (goal >= 0.97)"
    )


if __name__ == "__main__":
    main()
