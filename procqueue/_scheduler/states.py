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
    """A task was moved along an edge the state machine does not have, or the
    books did not balance at rest. Carries the task, the move and its history."""

    def __init__(
        self, task_id: int | None, state: TaskState | None, to: TaskState | None,
        history: tuple[TaskState, ...] = (), detail: str = "",
    ) -> None:  # fmt: skip
        self.task_id = task_id
        self.state = state  # where it was
        self.to = to  # where it was moved
        self.history = history  # every state it was in, NEW first (validation keeps it)
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.task_id is None:
            return f"the books do not balance: {self.detail}"
        trail = " -> ".join(s.value for s in (*self.history, self.to) if s is not None)
        if self.to is None:
            return f"task {self.task_id} never ended (its states: {trail}){self.detail}"
        return f"task {self.task_id}: illegal move {self.state.value if self.state else '?'} -> " + (
            f"{self.to.value if self.to else '?'} (its states: {trail}){self.detail}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (InvalidTransition, (self.task_id, self.state, self.to, self.history, self.detail))


_CODES = {s: i for i, s in enumerate(TaskState)}
_STATES = list(TaskState)


@dataclass
class Ledger:
    """Validate mode: follows every task through `TRANSITIONS` and checks the books.

    The pool keeps one when `PROCQUEUE_VALIDATE=1` (every test runs so). A live
    task's whole history is kept; an ended one's final state costs one byte, so
    a second outcome of a finished task is caught, and named, too.
    """

    live: dict[int, list[TaskState]] = field(default_factory=dict)
    finals: dict[TaskState, int] = field(default_factory=lambda: dict.fromkeys(FINAL, 0))
    ended: bytearray = field(default_factory=bytearray)  # by task id: 0, or 1 + the code of its final state
    accepted: int = 0

    def state_of(self, task_id: int) -> TaskState:
        history = self.live.get(task_id)
        if history:
            return history[-1]
        if task_id < len(self.ended) and self.ended[task_id]:
            return _STATES[self.ended[task_id] - 1]
        return S.NEW

    def history_of(self, task_id: int) -> tuple[TaskState, ...]:
        history = self.live.get(task_id)
        if history:
            return (S.NEW, *history)
        state = self.state_of(task_id)
        return (S.NEW,) if state is S.NEW else (S.NEW, state)

    def move(self, task_id: int, to: TaskState) -> None:
        history = self.live.get(task_id)
        state = history[-1] if history else self.state_of(task_id)
        if to not in TRANSITIONS[state]:
            raise InvalidTransition(task_id, state, to, self.history_of(task_id))
        if state is S.NEW:
            self.accepted += 1
        if to in FINAL:
            self.live.pop(task_id, None)
            self.finals[to] += 1
            if task_id >= len(self.ended):
                self.ended.extend(bytes(max(task_id + 1 - len(self.ended), len(self.ended))))
            self.ended[task_id] = 1 + _CODES[to]
        elif history is None:
            self.live[task_id] = [to]
        else:
            history.append(to)

    def check_books(self) -> None:
        """At rest: every accepted task has exactly one final state."""
        if self.live:
            task_id, history = next(iter(self.live.items()))
            raise InvalidTransition(
                task_id, history[-1], None, (S.NEW, *history),
                f", nor did {len(self.live) - 1} other tasks",
            )  # fmt: skip
        total = sum(self.finals.values())
        if total != self.accepted:
            raise InvalidTransition(None, None, None, (), f"{self.accepted} tasks accepted but {total} ended")
