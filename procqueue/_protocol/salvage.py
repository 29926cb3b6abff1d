"""Salvaging a batch whose values would not all unpickle in the parent.

A batch's values travel as one pickle. When loading it fails (a `__reduce__`
or `__setstate__` that raises, `SystemExit` included; a class the parent cannot
import), loading it again with the pure-Python unpickler, whose object-making
opcodes each put a `Broken` marker in place of the object that failed, tells
which values are at fault: only those fail, not their whole batch. This runs
only after the fast load failed, and runs the same code the fast load ran.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
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
        try:
            load(self)
        except BaseException as exc:  # KeyboardInterrupt too: off the main thread, only a value raises it  # the point: any failure becomes a marker
            if operands >= 0:  # its operands (popped or not) go, the marker takes their place
                del self.stack[max(depth - operands, 0) :]
            self.stack.append(Broken(exc))  # (-1: it ends a mark, which put the stack back already)

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


def salvage(data: Any, buffers: Sequence[Any] = ()) -> tuple[list[Any], dict[int, BaseException]] | None:
    """The batch's values with the failed ones found: `(values, {index: error})`, or
    None when the failure cannot be pinned on single values."""
    try:
        values = _Tolerant(io.BytesIO(bytes(data)), buffers=list(buffers)).load()
    except BaseException:  # broken past a single object: the whole batch fails
        return None
    if not isinstance(values, list):
        return None
    bad: dict[int, BaseException] = {}
    for i, value in enumerate(values):
        marker = _find(value, MAX_DEPTH, set())
        if marker is not None:
            bad[i] = marker.error
    return (values, bad) if bad else None


def _find(obj: Any, depth: int, seen: set[int]) -> Broken | None:
    """The first marker inside `obj` (containers and instance dicts), if any."""
    if type(obj) is Broken:
        return obj
    if depth <= 0 or id(obj) in seen:
        return None
    seen.add(id(obj))
    kind = type(obj)
    if kind in (list, tuple, set, frozenset):
        items: Any = obj
    elif kind is dict:
        items = [*obj.keys(), *obj.values()]
    else:
        state = getattr(obj, "__dict__", None)
        if type(state) is not dict:
            return None
        items = state.values()
    for item in items:
        found = _find(item, depth - 1, seen)
        if found is not None:
            return found
    return None
