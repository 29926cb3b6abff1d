"""A worker ended: whom to charge, whether to start another, when to give up.

Part of the `Scheduler` (`scheduler.py`). The backend reports the death with
what the worker's marker said it was running; its leftovers are settled later
(`Settlement.worker_gone`), once the backend has read what it sent before dying.
"""

from __future__ import annotations

import sys
from pathlib import PurePath

from procqueue._errors import PoolBroken, describe_exitcode
from procqueue._protocol import layout
from procqueue._scheduler.books import Death, Lost
from procqueue._scheduler.instructions import Break, KillReason, Start
from procqueue._scheduler.tables import Tables

MAX_BARREN_DEATHS = 5  # workers in a row that die before any outcome: the pool is broken
SIGKILL = 9  # a death by SIGKILL is someone else's doing (a user, the OOM killer)
NOT_ITS_FAULT = (KillReason.STALLED, KillReason.COLLECTOR, KillReason.SHUTDOWN)

UNGUARDED = (
    "with the spawn start method, and with forkserver when its server is a fresh interpreter (the process had "
    "threads, or was large, when its first pool started), every process of the pool imports the main script "
    "again (as __mp_main__), so its module-level code runs in each of them. Put the code that creates and uses "
    'the Pool under `if __name__ == "__main__":` (or in a function called from there)'
)


def worker_died(t: Tables, death: Death, accepting: bool) -> None:
    """Book a dead worker's batches as lost (settled by `worker_gone`) and decide
    whether its seat gets a new worker or the pool gives up."""
    seat = t.seats[death.seat]
    running = death.running
    at: tuple[int, int] | None = None
    if running is not None and running[1] != layout.UNMARKED:
        batch = t.batches.get(running[0])
        if batch is not None and batch.seat == seat.index:
            at = running
    # Killed for being stalled, or for its collector's death, or orphaned (exit 4): not its task's fault.
    charge = death.reason not in NOT_ITS_FAULT and death.exitcode != layout.EXIT_ORPHANED
    unmarked = running is not None and running[1] == layout.UNMARKED
    t.lost[death.pid] = Lost(
        seat.index, list(seat.batches.values()), at, death.exitcode, death.fault_text, unmarked, charge,
        death.reason is KillReason.TIMEOUT,
    )  # fmt: skip
    seat.batches = {}
    seat.open = False
    # Counted even when nothing is charged (an unmarked batch runs again): a worker the
    # OOM killer took must show somewhere. Not when the pool asked (timeout, stall,
    # shutdown) or the worker left because its collector had gone.
    if death.reason is None and not seat.retiring and death.exitcode != layout.EXIT_ORPHANED:
        seat.deaths += 1
    init_failed = death.exitcode == layout.EXIT_INIT_FAILED and seat.tasks_sent == 0
    # Dying outside any task, before any outcome, is the worker's own fault (imports,
    # start-up); a task that kills its worker is charged to the task instead.
    barren = death.exitcode not in (0, -SIGKILL) and running is None
    barren = barren and not seat.productive and not seat.retiring and death.reason is None
    t.barren = t.barren + 1 if barren else 0
    unguarded = death.exitcode == layout.EXIT_UNGUARDED_MAIN and not seat.productive
    if unguarded:
        t.out.append(Break(PoolBroken(f"a worker process re-ran the main script and reached Pool(): {UNGUARDED}")))
    elif t.barren >= MAX_BARREN_DEATHS:
        t.out.append(
            Break(
                PoolBroken(
                    f"{t.barren} workers in a row died before finishing any task (the last, pid {death.pid}, "
                    f"with {describe_exitcode(death.exitcode)}); the pool stopped respawning them. "
                    f"{start_hint()}{fault_note(death.fault_text)}"
                )
            )
        )
    elif accepting and not init_failed:
        t.out.append(Start(seat.index))


def start_hint() -> str:
    """What to check when workers die as they start."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hint = "Check the worker's imports and initializer."
    if path:
        hint += (
            f" If {PurePath(path).name} creates the pool at module level, put that code under "
            '`if __name__ == "__main__":` (each worker imports the script again).'
        )
    return hint


def fault_note(text: str) -> str:
    return f"\n\nfaulthandler in the worker wrote:\n{text.strip()}" if text.strip() else ""
