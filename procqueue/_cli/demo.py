"""The handler of `procqueue demo`: a real CPU-bound job (counting primes by trial
division over blocks of integers), with a few injected failures that succeed
when retried."""

from __future__ import annotations

import os


class FlakyError(RuntimeError):
    """An injected, transient failure: the retry succeeds."""


def count_primes(
    block: int, flaky_dir: str | None = None, size: int = 10_000, flaky_every: int = 37
) -> tuple[int, int]:
    """Count the primes in `[block*size, (block+1)*size)`. With `flaky_dir`, the
    first attempt of every `flaky_every`-th block fails (a marker file there
    says the block failed once, whichever worker retries it)."""
    if flaky_dir is not None and block % flaky_every == 7:
        try:
            os.close(os.open(os.path.join(flaky_dir, str(block)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass  # this is the retry: succeed
        else:
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
