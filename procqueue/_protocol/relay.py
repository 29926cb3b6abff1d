"""Values one pool's workers made, handed to another pool's workers still pickled.

Between two stages of a pipeline (`procqueue/_pipeline/flow.py`) the parent
does not unpickle what stage k's workers sent, nor pickle it again for stage
k + 1: the body of a finished batch (the pickled list of its values) goes to
stage k + 1's worker as the body of its `RunBatch`, with `pick` saying which
of those values are that batch's items. The parent runs no user code for
them, and spends nothing per item but the bookkeeping.

A worker loads the whole body and keeps the picked values; if one value in
it does not unpickle, the others are salvaged (`salvage.py`) and only a batch
that holds the bad one fails, so the scheduler runs its items again one by
one, and the bad value fails alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from procqueue._errors import SerializationError

Pick = range | tuple[int, ...]  # which values of a body are a batch's items, in order


class Forwarded:
    """Items that are values still pickled in another batch's body: the values at `picks`.

    It stands where a run's list of items would (`procqueue/_scheduler/tasks.py`):
    it has a length and slices, and nothing else, so nothing in the parent can
    unpickle it by mistake."""

    __slots__ = ("body", "picks")

    def __init__(self, body: memoryview, picks: Pick) -> None:
        self.body = body
        self.picks = picks

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, key: slice) -> Forwarded:
        if not isinstance(key, slice):
            raise TypeError("forwarded items are taken in slices, never one by one in the parent")
        return Forwarded(self.body, self.picks[key])

    def __repr__(self) -> str:
        return f"<{len(self.picks)} values forwarded still pickled, from a body of {len(self.body)} bytes>"


def joined(body: memoryview, picks: list[range]) -> Forwarded:
    """One `Forwarded` for several runs of values of the same body."""
    if len(picks) == 1:
        return Forwarded(body, picks[0])
    return Forwarded(body, tuple(i for r in picks for i in r))


def forwarded(segments: Sequence[tuple[Any, int, int]]) -> tuple[memoryview, Pick] | None:
    """The body and picks of a batch of forwarded items (a run of them is never
    batched with another run), or None for a batch of ordinary items."""
    run, start, count = segments[0]
    items = run.items
    if type(items) is not Forwarded:
        return None
    if len(segments) != 1:
        raise ValueError("a batch of forwarded items was merged with another run; forwarded runs go alone")
    return items.body, items.picks[start : start + count]


def unforwardable(exc: BaseException) -> SerializationError:
    """In the worker: the error of a batch whose forwarded values did not unpickle."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except BaseException:  # a __str__ that raises
        text = type(exc).__name__
    return SerializationError(
        f"a value the stage before made could not be unpickled in this stage's worker: {text}",
        stage="argument",
        what=type(exc).__name__,
        task_id=None,
    )


def pick(values: list[Any], picks: Pick) -> list[Any]:
    """In the worker: the batch's items among the body's values."""
    if type(picks) is range and picks.step == 1:
        return values[picks.start : picks.stop]
    return [values[i] for i in picks]
