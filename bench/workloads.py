"""The task functions every peer runs (module level, so every pool can pickle
them by reference), and the inputs of each workload."""

from __future__ import annotations

import ctypes
import os
import random
import time
from collections.abc import Iterator
from typing import Any


def tiny(x: int) -> int:
    return x + 1


def burn(loops: int) -> int:
    """Pure-Python CPU work: about `loops / loops_per_ms` milliseconds."""
    acc = 0
    for i in range(loops):
        acc += i * i % 7
    return acc


def calibrate(ms: float = 1.0) -> int:
    """Loops of `burn` that take about `ms` milliseconds here (best of several tries)."""
    loops, best = 20_000, float("inf")
    for _ in range(5):
        t = time.perf_counter()
        burn(loops)
        best = min(best, time.perf_counter() - t)
    return max(1, int(loops * ms / 1000 / best))


def skewed_loops(n: int, loops_per_ms: int, seed: int = 7) -> list[int]:
    """Heavy-tailed task sizes: Pareto (alpha 1.5) durations, mean about 2 ms, none over 200 ms."""
    rng = random.Random(seed)
    ms = [min(200.0, 0.7 * rng.paretovariate(1.5)) for _ in range(n)]
    return [max(1, int(m * loops_per_ms)) for m in ms]


def total(a: Any) -> float:
    """payload-in: an array in (read whole), a number out."""
    return float(a.sum())


def fresh_array(kb_and_seed: int) -> Any:
    """payload-out: a number in, a fresh array of `kb_and_seed // 1024` MB out."""
    import numpy as np

    return np.full(kb_and_seed // 1024 * 1024 * 1024 // 8, float(kb_and_seed % 1024))


def make_array(mb: int, seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random(mb * 1024 * 1024 // 8)


def numbers(n: int) -> Iterator[int]:
    """The stream workload's input: a generator, so nobody can take its length."""
    yield from range(n)


def double(x: int) -> int:
    """The pipeline workload's second tiny stage (`tiny` is its first, `negate` its third)."""
    return 2 * x


def negate(x: int) -> int:
    return -x


def relay(loops: int) -> int:
    """The pipeline workload's ~1 ms stage: `burn(loops)`, then `loops` on to the next stage."""
    burn(loops)
    return loops


def repeated(x: int, n: int) -> Iterator[int]:
    """`x`, `n` times, from a generator (the pipeline workload's ~1 ms input)."""
    for _ in range(n):
        yield x


def crash_once(x: int, marker_dir: str, kill_at: int, segv_at: int) -> int:
    """Faults workload: task `kill_at` exits its worker and task `segv_at` segfaults
    it, each on its first attempt only (a marker file remembers, across workers)."""
    if x in (kill_at, segv_at):
        path = os.path.join(marker_dir, str(x))
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return x
        if x == kill_at:
            os._exit(1)
        ctypes.string_at(0)  # SIGSEGV
    burn(200)
    return x


def stamp(loops: int) -> float:
    """Priority workload: do the work, then say when it finished (CLOCK_MONOTONIC is system-wide)."""
    burn(loops)
    return time.monotonic()


async def call_async(fn: Any, x: Any) -> Any:
    """aiomultiprocess runs coroutine functions only: a sync one, called from one."""
    return fn(x)
