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
            for old in taken:
                if type(old) is Broken:
                    self.markers.pop(id(old), None)
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.markers: dict[int, Broken] = {}  # every marker that stands for a failure, by id


def salvage(data: Any, buffers: Sequence[Any] = ()) -> tuple[list[Any], dict[int, BaseException]] | None:
    """The batch's values with the failed ones found: `(values, {index: error})`, or
    None when the failure cannot be pinned on single values: every marker the load
    made must be found inside some value, else one may hide where the search does not
    look (an object's C-level state, past MAX_DEPTH) and pass for a good value."""
    unpickler = _Tolerant(io.BytesIO(bytes(data)), buffers=list(buffers))
    try:
        values = unpickler.load()
    except BaseException:  # broken past a single object: the whole batch fails
        return None
    if not isinstance(values, list) or not unpickler.markers:
        return None
    bad: dict[int, BaseException] = {}
    found: set[int] = set()
    for i, value in enumerate(values):
        markers = _markers(value)
        if markers:
            bad[i] = markers[0].error
            found.update(id(marker) for marker in markers)
    if found != set(unpickler.markers):
        return None
    return values, bad


def _markers(obj: Any) -> list[Broken]:
    """Every marker inside `obj`: containers (subclasses too, read with their base
    class's own methods, so no code of the value's runs), instance dicts and slots."""
    out: list[Broken] = []
    seen: set[int] = set()
    todo = [(obj, MAX_DEPTH)]
    while todo:
        item, depth = todo.pop()
        if type(item) is Broken:
            if id(item) not in seen:
                seen.add(id(item))
                out.append(item)
            continue
        if depth <= 0 or id(item) in seen:
            continue
        seen.add(id(item))
        todo.extend((inner, depth - 1) for inner in _inside(item))
    return out


def _inside(obj: Any) -> list[Any]:
    """What `obj` holds, read without calling anything it defines (no `__iter__`,
    `__class__` or `__dict__` of its own: only the base types' C-level readers)."""
    kind = type(obj)
    if kind in _ATOMS:
        return []
    inner: list[Any] = []
    for base, read in _READERS:
        if issubclass(kind, base):
            inner += read(obj)
            break
    for cls in kind.__mro__:
        found = cls.__dict__.get("__dict__")
        if type(found) is GetSetDescriptorType:  # the instance dict, not a property of that name
            state = found.__get__(obj, cls)
            if type(state) is dict:
                inner += dict.values(state)
            break
    for cls in kind.__mro__:
        for name in _slots(cls):
            slot = cls.__dict__.get(name)
            if type(slot) is MemberDescriptorType:
                with contextlib.suppress(AttributeError):  # an empty slot
                    inner.append(slot.__get__(obj, cls))
    return inner


_ATOMS = frozenset({str, bytes, bytearray, int, float, complex, bool, type(None)})
_READERS: tuple[tuple[type, Callable[[Any], list[Any]]], ...] = (
    (list, lambda obj: list(list.__iter__(obj))),
    (tuple, lambda obj: list(tuple.__iter__(obj))),
    (deque, lambda obj: list(deque.__iter__(obj))),
    (set, lambda obj: list(set.__iter__(obj))),
    (frozenset, lambda obj: list(frozenset.__iter__(obj))),
    (dict, lambda obj: [*dict.keys(obj), *dict.values(obj)]),
)


def _slots(cls: type) -> tuple[str, ...]:
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots) if isinstance(slots, (tuple, list)) else ()
