"""The tolerant reload of a batch whose values would not all unpickle in the parent
(`procqueue/_protocol/salvage.py`): only the values at fault fail, and when a failure
could hide inside a value that would pass for good, the whole batch fails instead."""

from __future__ import annotations

import collections
import functools
import pickle
import sys
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


class Plain:
    pass


class BuildWith:
    """Reloads as `Plain` built with `state`: when the state is a marker, that build fails."""

    def __init__(self, state: object) -> None:
        self.state = state

    def __reduce__(self) -> tuple[object, ...]:
        return (Plain, (), self.state)


class MakeDefaultdict:
    def __init__(self, factory: object) -> None:
        self.factory = factory

    def __reduce__(self) -> tuple[object, ...]:
        return (collections.defaultdict, (self.factory,))


class Call:
    """Reloads as `fn(*args)`: builds classes (and metaclasses) inside the pickle."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __call__(self, *args: object) -> None:
        pass

    def __reduce__(self) -> tuple[object, ...]:
        return (self.fn, self.args)


class Mangled:
    __slots__ = ("__x",)

    def __init__(self, x: object) -> None:
        self.__x = x


def test_a_marker_the_memo_still_holds_counts_though_a_later_failure_took_it_in() -> None:
    """The failed object is pickled once and referenced twice: hidden in a defaultdict's
    factory (C-level state) and as the state of a build that then fails. The second
    failure's marker is found, the first must still be required: the batch fails."""
    fails = hostile.ExitsOnLoad()
    values = [MakeDefaultdict(fails), BuildWith(fails), "ok"]
    assert salvage(pickle.dumps(values, protocol=5)) is None


def test_the_search_runs_no_code_of_a_hostile_metaclass() -> None:
    """Classes made inside the pickle, whose metaclass's __getattribute__ or __hash__ is
    sys.exit: the search reads them through type's own descriptors and goes on."""
    for attr in ("__getattribute__", "__hash__"):
        meta = Call(type, "Meta", (type,), {attr: sys.exit})
        values = [Call(Call(meta, "X", (), {})), hostile.ExitsOnLoad(), "ok"]
        saved = salvage(pickle.dumps(values, protocol=5))
        assert saved is not None, attr
        assert sorted(saved[1]) == [1], attr


def test_private_slots_and_shallow_paths_are_searched() -> None:
    saved = salvage(pickle.dumps([Mangled(hostile.ExitsOnLoad()), "ok"], protocol=5))
    assert saved is not None and sorted(saved[1]) == [0]
    inner: list[object] = [[hostile.ExitsOnLoad()]]
    chain: list[object] = inner
    for _ in range(62):  # reached first through a chain too deep to look into it from there
        chain = [chain]
    saved = salvage(pickle.dumps([[inner, chain], "ok"], protocol=5))
    assert saved is not None and sorted(saved[1]) == [0]


def test_values_sharing_a_large_object_end_the_search_within_its_budget() -> None:
    """400 values share one 20,000-item list: searched value by value, that would visit
    8 million objects. The search stops at its budget and fails the batch instead."""
    shared = list(range(20_000))
    values: list[object] = [[shared] for _ in range(400)] + [hostile.ExitsOnLoad()]
    assert salvage(pickle.dumps(values, protocol=5)) is None
