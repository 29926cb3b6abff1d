"""Values one pool's workers made, handed to another pool's workers still pickled.

Between two stages of a pipeline (`procqueue/_pipeline/flow.py`) the parent
does not unpickle what stage k's workers sent, nor pickle it again for stage
k + 1: the body of a finished batch (the pickled list of its values) goes to
stage k + 1's workers as the body of a `RunBatch`, with `pick` saying which
of its values are that batch's items. The parent runs no user code for them,
and spends nothing per item but the bookkeeping.

A worker (`Loader`) unpickles a body once, however many batches it is cut
into, as long as those batches reach it in a row and none takes an item twice
(a retry gets a fresh copy); the manager sends such a body's bytes only the
first time (`Slot.held_body`), then its key. A value in it that does not unpickle fails only
its own task, final at once: sending the same bytes again would fail the same
way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from procqueue._errors import SerializationError
from procqueue._protocol.pickling import _text, loads_body, salvage_body

Pick = range | tuple[int, ...]  # which values of a body are a batch's items, in order
Wire = tuple[tuple[int, int, Pick], ...]  # RunBatch.pick: (body key, body bytes, picks) per body

_keys = itertools.count(1)


class Body:
    """One batch's values, still pickled, with a number unique in this process."""

    __slots__ = ("count", "data", "key")

    def __init__(self, data: memoryview, count: int) -> None:
        self.key = next(_keys)
        self.data = data
        self.count = count  # values in it (a worker unpickles them all)


class Forwarded:
    """Items that are values still pickled in other batches' bodies: per body, the values at its picks.

    It stands where a run's list of items would (`procqueue/_scheduler/tasks.py`):
    it has a length and slices, and nothing else, so nothing in the parent can
    unpickle it by mistake."""

    __slots__ = ("n", "parts")

    def __init__(self, parts: tuple[tuple[Body, Pick], ...]) -> None:
        self.parts = parts
        self.n = sum(len(p) for _, p in parts)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> Forwarded:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("forwarded items are taken in slices, never one by one in the parent")
        lo, hi, _ = key.indices(self.n)
        out: list[tuple[Body, Pick]] = []
        at = 0
        for body, picks in self.parts:
            a, b = max(lo - at, 0), min(hi - at, len(picks))
            if a < b:
                out.append((body, picks[a:b]))
            at += len(picks)
        return Forwarded(tuple(out))

    def __add__(self, other: Forwarded) -> Forwarded:
        return Forwarded(self.parts + other.parts)

    def _skips(self, held: int) -> bool:
        """Its first body goes as its key alone: the worker holds it (see `wire`)."""
        return bool(self.parts) and self.parts[0][0].key == held

    def loads(self, held: int = 0) -> int:
        """How many values its worker unpickles: every value of each body sent (not `held`)."""
        return sum(b.count for b, _ in self.parts[self._skips(held) :])

    def spans(self) -> list[int]:
        """How many of its items each body holds, in order."""
        return [len(p) for _, p in self.parts]

    def wire(self, held: int = 0) -> tuple[list[memoryview], Wire]:
        """The bodies, as the buffers of a frame body, and the `RunBatch.pick` that reads
        them. The first body goes as its key alone (0 bytes) when it is `held`: the body
        the worker loaded last, which it still holds (`Loader`)."""
        parts = self.parts
        skip = self._skips(held)
        data = [b.data for b, _ in parts[skip:]]
        return data, tuple((b.key, 0 if i == 0 and skip else b.data.nbytes, p) for i, (b, p) in enumerate(parts))

    @property
    def last_key(self) -> int:
        """The key of the body a worker holds after loading these (0: none)."""
        return self.parts[-1][0].key if self.parts else 0

    def __repr__(self) -> str:
        return f"<{self.n} values forwarded still pickled, from {len(self.parts)} bodies>"


def joined(body: Body, picks: list[range]) -> Forwarded:
    """One `Forwarded` for several runs of values of the same body."""
    if len(picks) == 1:
        return Forwarded(((body, picks[0]),))
    return Forwarded(((body, tuple(i for r in picks for i in r)),))


def forwarded(segments: Sequence[tuple[Any, int, int]]) -> Forwarded | None:
    """The items of a batch of forwarded items (a run of them is never batched with
    another run), or None for a batch of ordinary items."""
    run, start, count = segments[0]
    items = run.items
    if type(items) is not Forwarded:
        return None
    if len(segments) != 1:
        raise ValueError("a batch of forwarded items was merged with another run; forwarded runs go alone")
    return items[start : start + count]


def unforwardable(exc: BaseException) -> SerializationError:
    """In the worker: the error of a forwarded value that did not unpickle, reported
    as such (`failures.fault_of`); final, as the same bytes would fail the same way again."""
    err = SerializationError(
        f"a value the stage before made could not be unpickled in this stage's worker: "
        f"{type(exc).__name__}: {_text(exc)}",
        stage="argument",
        what=type(exc).__name__,
        task_id=None,
    )
    err.unforwardable = True  # type: ignore[attr-defined]
    return err


class Unloaded:
    """In the worker: where a forwarded value that did not unpickle would be."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Guarded:
    """In the worker: the handler, for a batch holding an `Unloaded` item, which fails it."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, item: Any) -> Any:
        if type(item) is Unloaded:
            raise item.error
        return self.fn(item)


class Loader:
    """In a worker: a batch's forwarded items from the bodies it was sent. The last
    body stays unpickled until all its values were handed out, so a body cut into
    several batches in a row unpickles once; a batch that asks for a value handed
    out before (a retry) gets a fresh copy."""

    def __init__(self) -> None:
        self.key = 0
        self.values: list[Any] | None = None
        self.error: BaseException | None = None
        self.used = bytearray()
        self.left = 0  # values of the loaded body not handed out yet
        self.bad = False  # some of them are `Unloaded`

    def items(self, body: memoryview, wire: Wire) -> tuple[list[Any], bool]:
        """The items, and whether one of them is `Unloaded`. Raises a `SerializationError`
        when the only body fails to unpickle and its values cannot be told apart (of several
        bodies, the items of one that fails so are each `Unloaded`)."""
        if len(wire) == 1:  # one body: it fails whole, as the batch
            return self._pick(wire[0][0], body[: wire[0][1]], wire[0][2])
        out: list[Any] = []
        bad = False
        pos = 0
        for key, size, picks in wire:
            data = body[pos : pos + size]
            pos += size
            try:
                got, some_bad = self._pick(key, data, picks)
            except SerializationError as exc:  # that body's items fail, not the other bodies'
                got, some_bad = [Unloaded(exc)] * len(picks), True
            out.extend(got)
            bad = bad or some_bad
        return out, bad

    def _pick(self, key: int, data: memoryview, picks: Pick) -> tuple[list[Any], bool]:
        if key != self.key or (self.error is None and self._taken(picks)):
            if not data:  # sent as held: the parent's record of what we hold is wrong
                raise RuntimeError(
                    f"procqueue: a batch names a body (key {key}) this worker no longer holds; "
                    "this is a bug in procqueue, please report it"
                )
            self._load(key, data)
        if self.error is not None:
            raise self.error
        values = self.values
        assert values is not None
        if type(picks) is range and picks.step == 1:
            got = values[picks.start : picks.stop]
            self.used[picks.start : picks.stop] = b"\x01" * len(picks)
        else:
            got = [values[i] for i in picks]
            for i in picks:
                self.used[i] = 1
        self.left -= len(picks)
        bad = self.bad and any(type(v) is Unloaded for v in got)
        if self.left <= 0:  # every value handed out: let them go with their batches
            self.key, self.values = 0, None
        return got, bad

    def _taken(self, picks: Pick) -> bool:
        used = self.used
        if type(picks) is range and picks.step == 1:
            return used.find(1, picks.start, picks.stop) >= 0
        return any(used[i] for i in picks)

    def _load(self, key: int, data: memoryview) -> None:
        self.key, self.values, self.error, self.bad = key, None, None, False
        try:
            values = loads_body(data)
        except BaseException as exc:  # SystemExit from a __setstate__ too: these values' problem
            saved = salvage_body(data)  # which values failed, if that can be told
            if saved is None:
                self.error = unforwardable(exc)
                return
            values, failed = saved
            for i, cause in failed.items():
                values[i] = Unloaded(unforwardable(cause))
            self.bad = bool(failed)
        self.values = values
        self.used = bytearray(len(values))
        self.left = len(values)
