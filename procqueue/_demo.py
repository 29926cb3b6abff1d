"""The handler of `procqueue demo`: a real CPU-bound job (counting primes by trial
division over blocks of integers), with a few injected failures that succeed
when retried."""

from __future__ import annotations

import os


class FlakyError(RuntimeError):
    """An injected, transient failure: the retry succeeds."""


def count_primes(block: int, size: int = 10_000, flaky_every: int = 37) -> tuple[int, int]:
    """Count the primes in `[block*size, (block+1)*size)`; fail the first attempt of every `flaky_every`-th block."""
    if flaky_every and block % flaky_every == 7 and os.environ.get("PROCQUEUE_DEMO_RETRY") != str(block):
        os.environ["PROCQUEUE_DEMO_RETRY"] = str(block)  # this worker will not fail it twice
        raise FlakyError(f"injected failure in block {block}")
    lo, hi = block * size, (block + 1) * size
    found = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            found += n == 2
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            found += 1
    return block, found
