"""Salvaging a batch whose values would not all unpickle in the parent.

A batch's values travel as one pickle. When loading it fails (a `__reduce__`
or `__setstate__` that raises, `SystemExit` included; a class the parent cannot
import), loading it again with the pure-Python unpickler, whose object-making
opcodes each put a `Broken` marker in place of the object that failed, tells
which values are at fault: only those fail, not their whole batch. This runs
only after the fast load failed, and runs the same code the fast load ran.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections import deque
from collections.abc import Callable, Sequence
from types import GetSetDescriptorType, MemberDescriptorType
from typing import Any, ClassVar

MAX_DEPTH = 64  # how deep into a value to look for a marker


class Broken:
    """What stands for an object that would not unpickle (`error` says why). It
    absorbs what the rest of the pickle does to it (calls, state), so that the
    objects around it still load."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, *args: Any, **kwargs: Any) -> Broken:
        return self

    def __setstate__(self, state: Any) -> None:
        pass


def _guarded(load: Callable[[Any], None], operands: int) -> Callable[[Any], None]:
    """`load`, with a failure turned into a marker in place of the object it would make."""

    def guarded(self: Any) -> None:
        depth = len(self.stack)
        # What the opcode consumes: a marker among it is replaced by the new one (-1: the
        # items since the mark, which are the stack's whole current frame).
        taken = list(self.stack) if operands < 0 else self.stack[max(depth - operands, 0) :]
        try:
            load(self)
        except BaseException as exc:  # any failure becomes a marker, KeyboardInterrupt too (a value may raise it)
            if operands >= 0:  # its operands (popped or not) go, the marker takes their place
                del self.stack[max(depth - operands, 0) :]
            marker = Broken(exc)
            self.stack.append(marker)  # (-1: it ends a mark, which put the stack back already)
            self.consumed.update(id(old) for old in taken if type(old) is Broken)
            self.markers[id(marker)] = marker

    return guarded


# The opcodes that make objects, and how many stack items each consumes (-1: up to a mark).
_OPERANDS = {
    "load_reduce": 2, "load_build": 2, "load_newobj": 2, "load_newobj_ex": 3, "load_global": 0,
    "load_stack_global": 2, "load_ext1": 0, "load_ext2": 0, "load_ext4": 0, "load_inst": -1, "load_obj": -1,
}  # fmt: skip


_DISPATCH = {
    code: _guarded(load, _OPERANDS[load.__name__]) if load.__name__ in _OPERANDS else load
    for code, load in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
}


class _Tolerant(pickle._Unpickler):  # type: ignore[name-defined,misc]
    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = _DISPATCH
    memo: dict[int, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.markers: dict[int, Broken] = {}  # every marker made, by id
        self.consumed: set[int] = set()  # markers a later failure took in (its marker stands for them)

    def required(self) -> set[int]:
        """The markers that must be found in the values: all but those a later failure
        consumed, unless the memo still holds one (a later reference may place it anywhere)."""
        held = {id(obj) for obj in self.memo.values() if type(obj) is Broken}
        return {key for key in self.markers if key not in self.consumed or key in held}


def salvage(data: Any, buffers: Sequence[Any] = ()) -> tuple[list[Any], dict[int, BaseException]] | None:
    """The batch's values with the failed ones found: `(values, {index: error})`, or
    None when the failure cannot be pinned on single values: every marker the load
    made (but those a later failure consumed) must be found inside some value, else one
    may hide where the search does not look (an object's C-level state, past MAX_DEPTH)
    and pass for a good value. The search is bounded (VISITS) and runs no code of the
    values' own; anything unexpected in it fails the whole batch."""
    unpickler = _Tolerant(io.BytesIO(bytes(data)), buffers=list(buffers))
    try:
        values = unpickler.load()
    except BaseException:  # broken past a single object: the whole batch fails
        return None
    if type(values) is not list or not unpickler.markers:
        return None
    try:
        budget = [VISITS_PER_BYTE * len(data) + VISITS_MIN]
        bad: dict[int, BaseException] = {}
        found: set[int] = set()
        for i, value in enumerate(values):
            markers = _markers(value, budget)
            if markers:
                bad[i] = markers[0].error
                found.update(id(marker) for marker in markers)
        if found != unpickler.required():
            return None
    except BaseException:  # the search itself failed (out of budget, a class that will not be read)
        return None
    return values, bad


VISITS_PER_BYTE = 4  # objects the search may visit, over all values, per byte of the batch
VISITS_MIN = 10_000


class _OutOfBudget(Exception):
    pass


def _markers(obj: Any, budget: list[int]) -> list[Broken]:
    """Every marker inside `obj`: containers (subclasses too, read with their base
    class's own methods), instance dicts and slots, down to MAX_DEPTH. An object seen
    again is looked into again only from nearer the top (it may hide a marker that the
    deeper visit could not reach)."""
    out: list[Broken] = []
    seen: dict[int, int] = {}  # id -> the most depth left it was visited with
    todo = [(obj, MAX_DEPTH)]
    while todo:
        item, depth = todo.pop()
        kind = type(item)
        if kind is Broken:
            if id(item) not in seen:
                seen[id(item)] = depth
                out.append(item)
            continue
        if depth <= 0 or seen.get(id(item), -1) >= depth:
            continue
        seen[id(item)] = depth
        budget[0] -= 1
        if budget[0] < 0:
            raise _OutOfBudget
        todo.extend((inner, depth - 1) for inner in _inside(item, kind))
    return out


_MRO = type.__dict__["__mro__"]  # read through type's own descriptors: a metaclass runs no code
_DICT = type.__dict__["__dict__"]
_NAME = type.__dict__["__name__"]


def _inside(obj: Any, kind: type) -> list[Any]:
    """What `obj` holds, read without calling anything it or its class defines (no
    `__iter__`, `__class__`, `__dict__` of its own, no metaclass): only the base types'
    C-level readers."""
    for atom in _ATOMS:
        if kind is atom:
            return []
    inner: list[Any] = []
    mro = _MRO.__get__(kind)
    for base, read in _READERS:
        if any(cls is base for cls in mro):  # by identity: a metaclass's __eq__ never runs
            inner += read(obj)
            break
    for cls in mro:
        found = _DICT.__get__(cls).get("__dict__")
        if type(found) is GetSetDescriptorType:  # the instance dict, not a property of that name
            state = found.__get__(obj, cls)
            if type(state) is dict:
                inner += dict.values(state)
            break
    for cls in mro:
        names = _DICT.__get__(cls)
        for name in _slots(cls, names):
            slot = names.get(name)
            if type(slot) is MemberDescriptorType:
                with contextlib.suppress(AttributeError):  # an empty slot
                    inner.append(slot.__get__(obj, cls))
    return inner


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None))
_READERS: tuple[tuple[type, Callable[[Any], list[Any]]], ...] = (
    (list, lambda obj: list(list.__iter__(obj))),
    (tuple, lambda obj: list(tuple.__iter__(obj))),
    (deque, lambda obj: list(deque.__iter__(obj))),
    (set, lambda obj: list(set.__iter__(obj))),
    (frozenset, lambda obj: list(frozenset.__iter__(obj))),
    (dict, lambda obj: [*dict.keys(obj), *dict.values(obj)]),
)


def _slots(cls: type, names: Any) -> list[str]:
    """The names of `cls`'s slot descriptors (private ones mangled, as Python stores them)."""
    slots = names.get("__slots__", ())
    if type(slots) is str:
        slots = (slots,)
    elif type(slots) is dict:
        slots = list(dict.keys(slots))
    elif type(slots) not in (tuple, list):
        return []
    owner = _NAME.__get__(cls).lstrip("_")
    out = []
    for name in slots:
        if type(name) is not str:
            continue
        out.append(f"_{owner}{name}" if name.startswith("__") and not name.endswith("__") and owner else name)
    return out
