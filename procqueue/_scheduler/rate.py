"""Rate limits: `Pool(rate="100/s")`, `options(rate="20/m")`. A token bucket per
rate, spent at dispatch: a task held back by its rate stays in the queue (it
holds no worker and keeps its place in line), and what may run still goes by
priority. No I/O and no clock of its own: the scheduler passes `now`."""

from __future__ import annotations

import math
import re

_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_EPS = 1e-9  # tokens: 0.9999999999999998 of one after float refills is one
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*([smh])\s*$")


def parse_rate(rate: str | float | None) -> float | None:
    """Tasks per second from `"100/s"`, `"20/m"`, `"500/h"` or a number (per second);
    None for no limit. A malformed rate raises a `ValueError` that names it."""
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, str | int | float):
        raise ValueError(f"rate {rate!r} is not a rate: give a number per second, or a string like '100/s', '20/m'")
    if isinstance(rate, str):
        match = _RATE.match(rate)
        if match is None:
            raise ValueError(f"rate {rate!r} is not a rate: write it as N/s, N/m or N/h (e.g. '100/s', '20/m')")
        per_s = float(match.group(1)) / _PER[match.group(2)]
    else:
        per_s = float(rate)
    if not per_s > 0 or math.isinf(per_s):  # NaN too
        raise ValueError(f"rate {rate!r} must be a positive, finite number of tasks per unit of time")
    return per_s


class Bucket:
    """A token bucket: `per_s` tokens a second, holding at most `burst` (a second's
    worth, at least one): after a pause that many tasks may start at once, then
    they start evenly spaced."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self.burst = max(1.0, per_s)
        self.tokens = self.burst
        self.at: float | None = None  # when `tokens` was last brought up to date

    def available(self, now: float) -> int:
        """Whole tokens there now."""
        if self.at is not None and now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now if self.at is None or now > self.at else self.at
        return int(self.tokens + _EPS)

    def spend(self, n: int) -> None:
        self.tokens -= n

    def due(self, now: float) -> float:
        """When the next whole token will be there (`now` if it is)."""
        self.available(now)
        return now if self.tokens + _EPS >= 1 else now + (1 - self.tokens) / self.per_s
