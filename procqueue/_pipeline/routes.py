"""Where each item of a pipeline is, as plain bookkeeping (no threads, no I/O).

Every item gets an index as it is read from the input. A stage's map sees
only values, in the order they were pushed to it; `Positions` turns a finished
chunk's place in that order back into the items' indices, a slice of a range
while no item has failed. `Outbox` is the end of the line: the last stage's
values and every stage's errors, handed to the reader in input order (or as
they come), in pieces, so the common case moves whole lists at C speed.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from typing import Any

Indices = Sequence[int]  # a range until an item drops out before it


class Positions:
    """A stage's input positions (0, 1, 2, ... in push order) to item indices."""

    __slots__ = ("_head", "_left", "_segs", "_starts", "end")

    def __init__(self) -> None:
        self._starts: list[int] = []  # first position of each pushed segment
        self._segs: list[Indices | None] = []  # its items' indices (None once all were taken)
        self._left: list[int] = []  # its positions not taken yet
        self._head = 0  # segments before this were all taken
        self.end = 0  # the next position

    def add(self, indices: Indices) -> None:
        """Items pushed to the stage, in order."""
        if not indices:
            return
        self._starts.append(self.end)
        self._segs.append(indices)
        self._left.append(len(indices))
        self.end += len(indices)

    def take(self, start: int, n: int) -> Indices:
        """The indices at positions `start .. start + n - 1` (each taken once)."""
        if n <= 0:
            return range(0)
        if start < 0 or start + n > self.end:
            raise ValueError(f"positions {start}..{start + n - 1} were never pushed (end {self.end})")
        k = bisect_right(self._starts, start, self._head) - 1
        out: list[int] | None = None
        taken: Indices = range(0)
        pos, want = start, n
        while want:
            seg = self._segs[k]
            if seg is None or k < self._head or self._left[k] < min(want, len(seg) - (pos - self._starts[k])):
                raise ValueError(f"position {pos} was taken twice")
            off = pos - self._starts[k]
            m = min(want, len(seg) - off)
            part = seg[off : off + m]
            if out is None and m == n:
                taken = part  # one segment: a range stays a range
            else:
                out = out if out is not None else []
                out.extend(part)
            self._left[k] -= m
            pos, want = pos + m, want - m
            k += 1
        self._trim()
        return taken if out is None else out

    def _trim(self) -> None:
        segs, left = self._segs, self._left
        while self._head < len(segs) and left[self._head] == 0:
            segs[self._head] = None
            self._head += 1
        if self._head > 64 and 2 * self._head > len(segs):  # drop taken segments now and then
            del self._starts[: self._head], segs[: self._head], left[: self._head]
            self._head = 0

    @property
    def pending(self) -> int:
        """Positions pushed and not taken."""
        return sum(self._left[self._head :])


class Outbox:
    """What the pipeline's reader gets next: values of the last stage and errors of
    any stage, in input order (`ordered`) or in the order they arrived."""

    __slots__ = ("_errors", "_pieces", "held", "next", "ordered")

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self._pieces: deque[tuple[Indices, list[Any], dict[int, BaseException] | None]] = deque()
        self._errors: dict[int, BaseException] = {}  # ordered: by index, until their turn
        self.held = 0  # items in here
        self.next = 0  # ordered: the index handed out next

    def put(self, indices: Indices, values: list[Any]) -> None:
        """Values that left the last stage (indices increasing when ordered)."""
        if indices:
            self._pieces.append((indices, values, None))
            self.held += len(indices)

    @property
    def ready(self) -> int:
        """Items in here the reader can take now: not counting errors that wait for
        their turn (they wait for items still in the stages, which need this room)."""
        return self.held - len(self._errors)

    def fail(self, index: int, error: BaseException) -> None:
        """An item that ended with an error at some stage."""
        if self.ordered:
            self._errors[index] = error
        else:
            self._pieces.append(((index,), [error], {0: error}))
        self.held += 1

    def take(self) -> tuple[list[Any], dict[int, BaseException] | None] | None:
        """The next run of results (errors by their place in it), or None if it is
        not here yet."""
        got = self._take_ordered() if self.ordered else self._take_any()
        if got is not None:
            self.held -= len(got[0])
        return got

    def _take_any(self) -> tuple[list[Any], dict[int, BaseException] | None] | None:
        if not self._pieces:
            return None
        _, values, errors = self._pieces.popleft()
        return values, errors

    def _take_ordered(self) -> tuple[list[Any], dict[int, BaseException] | None] | None:
        i = self.next
        errors = self._errors
        if i in errors:
            run = [errors.pop(i)]
            while i + len(run) in errors:
                run.append(errors.pop(i + len(run)))
            self.next += len(run)
            return run, dict(enumerate(run))
        if not self._pieces:
            return None
        indices, values, _ = self._pieces[0]
        if indices[0] != i:
            return None  # not its turn: an earlier item is still on its way
        n = len(indices)
        if indices[-1] - i + 1 == n:  # no gap: the whole piece
            self._pieces.popleft()
            self.next += n
            return values, None
        r = 1
        while indices[r] == i + r:  # up to the first gap (an item that failed earlier)
            r += 1
        self._pieces[0] = (indices[r:], values[r:], None)
        self.next += r
        return values[:r], None
