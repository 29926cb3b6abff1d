"""The life of a task: its states, the one table of legal moves, and the
ledger that follows every task through it where validation is on.

A task's states and the legal moves between them (`TRANSITIONS`):

    NEW ─► PENDING ─► DISPATCHED ─► RUNNING ─► DONE
     │        │  ▲         │           ├─────► FAILED
     ▼        ▼  │         ▼           ├─────► RETRYING ─► PENDING (after backoff)
  DROPPED CANCELLED ◄──── (requeued)   ├─────► CRASHED ──► RETRYING | FAILED
                                       └─────► TIMED_OUT ► RETRYING | FAILED

DONE, FAILED, CANCELLED and DROPPED are final: each accepted task reaches
exactly one of them. The parent does not see RUNNING as an event (a worker
only writes a shared marker), so every move out of RUNNING is legal out of
DISPATCHED too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class TaskState(enum.Enum):
    """Where one task is in its life (see the table in the module docstring)."""

    NEW = "new"
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    RETRYING = "retrying"
    CRASHED = "crashed"
    TIMED_OUT = "timed-out"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DROPPED = "dropped"


S = TaskState
_AFTER_RUN = frozenset({S.DONE, S.FAILED, S.RETRYING, S.CRASHED, S.TIMED_OUT, S.PENDING})
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    S.NEW: frozenset({S.PENDING, S.DROPPED}),
    # FAILED from PENDING: the handler or an argument did not pickle in the parent.
    S.PENDING: frozenset({S.DISPATCHED, S.CANCELLED, S.FAILED}),
    S.DISPATCHED: _AFTER_RUN | {S.RUNNING},
    S.RUNNING: _AFTER_RUN,
    S.RETRYING: frozenset({S.PENDING, S.CANCELLED, S.FAILED}),
    S.CRASHED: frozenset({S.RETRYING, S.FAILED}),
    S.TIMED_OUT: frozenset({S.RETRYING, S.FAILED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.DROPPED: frozenset(),
}
FINAL = frozenset({S.DONE, S.FAILED, S.CANCELLED, S.DROPPED})


class InvalidTransition(AssertionError):
    """A task was moved along an edge the state machine does not have."""


@dataclass
class Ledger:
    """Validate mode: follows every task through `TRANSITIONS` and checks the books.

    The pool keeps one when `PROCQUEUE_VALIDATE=1`; it costs a dict update per
    task per move, so it is off by default.
    """

    live: dict[int, list[TaskState]] = field(default_factory=dict)
    finals: dict[TaskState, int] = field(default_factory=lambda: dict.fromkeys(FINAL, 0))
    accepted: int = 0

    def move(self, task_id: int, to: TaskState) -> None:
        history = self.live.get(task_id)
        state = history[-1] if history else S.NEW
        if to not in TRANSITIONS[state]:
            trail = " -> ".join(s.value for s in [*(history or [S.NEW]), to])
            raise InvalidTransition(f"task {task_id}: illegal move {trail}")
        if state is S.NEW:
            self.accepted += 1
        if to in FINAL:
            self.live.pop(task_id, None)
            self.finals[to] += 1
        elif history is None:
            self.live[task_id] = [to]
        else:
            history.append(to)

    def check_books(self) -> None:
        """At rest: every accepted task has exactly one final state."""
        if self.live:
            some = dict(list(self.live.items())[:5])
            raise InvalidTransition(f"{len(self.live)} tasks never ended, e.g. {some}")
        total = sum(self.finals.values())
        if total != self.accepted:
            raise InvalidTransition(f"{self.accepted} accepted but {total} ended")
