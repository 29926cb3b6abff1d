"""Retry policy: whether a failed attempt is retried, and after how long."""

from __future__ import annotations

import random

JITTER = 0.25


def should_retry(attempt: int, retries: int) -> bool:
    """Attempt `attempt` (1-based) failed; a task may make `retries` more after the first."""
    return attempt <= retries


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `retry` (1-based).

    `base * 2**(retry-1)`, at most +-25 % jitter, capped by `cap`: jitter keeps a
    burst of failures from retrying in lockstep.
    """
    if retry < 1:
        raise ValueError(f"retry must be >= 1, got {retry}")
    delay = base * 2.0 ** min(retry - 1, 60)
    jitter = (rng or random).uniform(-JITTER, JITTER)
    return max(0.0, min(cap, delay * (1.0 + jitter)))
