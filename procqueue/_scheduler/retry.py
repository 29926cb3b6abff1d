"""Retry policy: whether a failed attempt is retried, and after how long."""

from __future__ import annotations

import random
from dataclasses import dataclass

from procqueue._protocol.messages import Fault

JITTER = 0.25
RETRYABLE = frozenset({Fault.RAISED, Fault.CRASHED, Fault.TIMED_OUT})  # the others are final at once


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


@dataclass(frozen=True)
class Retry:
    """Run the task again after `delay` seconds (it holds no worker meanwhile)."""

    delay: float


@dataclass(frozen=True)
class Final:
    """The task has failed for good."""


@dataclass(frozen=True)
class Requeue:
    """Run it again, uncharged: alone (so it cannot fail its neighbours), then by value."""


Decision = Retry | Final | Requeue


def decide(
    fault: Fault, attempt: int, retries: int, count: int, by_value: bool, base: float, cap: float, rng: random.Random
) -> Decision:
    """What to do after attempt `attempt` of a task (of a batch of `count`) failed with `fault`."""
    if fault == Fault.ARGS_UNPICKLE and (count > 1 or not by_value):
        return Requeue()
    if fault in RETRYABLE and should_retry(attempt, retries):
        return Retry(backoff_delay(attempt, base, cap, rng))
    return Final()
