"""The tolerant reload of a batch whose values would not all unpickle in the parent
(`procqueue/_protocol/salvage.py`): only the values at fault fail, and when a failure
could hide inside a value that would pass for good, the whole batch fails instead."""

from __future__ import annotations

import collections
import functools
import pickle
from collections.abc import Callable

import pytest

from procqueue._protocol.salvage import salvage
from tests import hostile


def test_salvage_finds_the_values_that_would_not_unpickle() -> None:

    values = [1, hostile.ExitsOnLoad(), (3, hostile.SetstateExits()), {"a": [hostile.ExitsOnLoad()]}, "x" * 10]
    data = pickle.dumps(values, protocol=5)
    with pytest.raises(SystemExit):
        pickle.loads(data)
    saved = salvage(data)
    assert saved is not None
    got, bad = saved
    assert sorted(bad) == [1, 2, 3]
    assert all(isinstance(e, SystemExit) for e in bad.values())
    assert got[0] == 1 and got[4] == "x" * 10
    assert salvage(b"not a pickle") is None
    assert salvage(pickle.dumps([1, 2])) is None  # nothing wrong: nothing to salvage


Pair = collections.namedtuple("Pair", "a b")


class Slotted:
    __slots__ = ("empty", "inner")

    def __init__(self, inner: object) -> None:
        self.inner = inner


ARMED = [False]  # set once the batch is pickled: from then on the lying readers raise


class Lies(dict):  # type: ignore[type-arg]
    """A dict whose own readers (and `__class__`) raise once armed: the search must read
    it with dict's own methods, calling nothing of its."""

    def _refuse(self, *args: object) -> object:
        if ARMED[0]:
            raise RuntimeError("the search called the value's own code")
        return None

    def __iter__(self):  # type: ignore[no-untyped-def]
        self._refuse()
        return super().__iter__()

    def items(self):  # type: ignore[no-untyped-def]
        self._refuse()
        return super().items()

    def keys(self):  # type: ignore[no-untyped-def]
        self._refuse()
        return super().keys()

    def values(self):  # type: ignore[no-untyped-def]
        self._refuse()
        return super().values()

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        self._refuse()
        return Lies


@pytest.mark.parametrize(
    "hide",
    [
        lambda bad: Pair(3, bad),
        lambda bad: collections.deque([bad]),
        lambda bad: collections.OrderedDict(k=bad),
        lambda bad: Slotted([bad]),
        lambda bad: Lies(k=bad),
    ],
    ids=["namedtuple", "deque", "OrderedDict", "slots", "lying-object"],
)
def test_salvage_finds_a_failure_hidden_in_any_container(hide: Callable[[object], object]) -> None:

    values = [0, hide(hostile.ExitsOnLoad()), 2, hostile.SetstateExits(), 4]
    data = pickle.dumps(values, protocol=5)
    ARMED[0] = True
    try:
        saved = salvage(data)
    finally:
        ARMED[0] = False
    assert saved is not None
    got, bad = saved
    assert sorted(bad) == [1, 3]
    assert [got[0], got[2], got[4]] == [0, 2, 4]


def test_salvage_fails_the_batch_when_a_failure_hides_where_it_cannot_look() -> None:
    """A marker inside C-level state (a partial's arguments) would pass the value off as
    good: the whole batch fails instead."""

    values = [0, functools.partial(print, hostile.ExitsOnLoad()), 2, hostile.SetstateExits()]
    assert salvage(pickle.dumps(values, protocol=5)) is None
