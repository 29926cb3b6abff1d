"""Flow control around the pending queue's room: coroutines waiting for it
(`arun`, `asubmit`), the pressure signal (`Pool(on_pressure=...)`) and the time
submitters spent blocked (`Stats.blocked`). Touched under the pool's lock."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

from procqueue._callbacks import Runner
from procqueue._results import Later


class Flow:
    """What waits on the queue's room, and what is told when it fills and drains."""

    def __init__(self, on_pressure: Callable[[str], Any] | None, low_water: float, capacity: int, runner: Runner):
        self.on_pressure = on_pressure
        self.low = low_water * capacity
        self.capacity = capacity
        self.runner = runner
        self.waiters: set[Callable[[], None]] = set()  # coroutines waiting for room
        self.blocked = 0.0  # seconds submitters spent waiting for room
        self.full = False  # "full" was told, "drained" not yet

    def wake(self, later: Later) -> None:
        """Coroutines waiting for room look again, woken outside the lock (`later`)."""
        if self.waiters:
            later.extend(_quietly(w) for w in self.waiters)
            self.waiters.clear()

    def check(self, pending: int) -> None:
        """Tell `on_pressure` "full" when the queue reaches capacity, "drained" when it falls
        back under `low_water` of it: on the callback runner, never the caller's thread."""
        fn = self.on_pressure
        if fn is None:
            return
        if not self.full and pending >= self.capacity:
            self.full = True
            self.runner.post(partial(fn, "full"))
        elif self.full and pending < self.low:
            self.full = False
            self.runner.post(partial(fn, "drained"))


def _quietly(fn: Callable[[], None]) -> Callable[[], None]:
    """`fn`, whose failure (its event loop closed meanwhile) is nobody's business here."""

    def call() -> None:
        with contextlib.suppress(Exception):
            fn()

    return call
