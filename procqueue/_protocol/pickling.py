"""Pickling for every process boundary: fast by default, cloudpickle when needed,
and precise about what failed when nothing works."""

from __future__ import annotations

import os
import pickle
import struct
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, cast

from procqueue._protocol.layout import IN_SHM, SHM_MIN

_MAIN = b"__main__"


def main_is_importable() -> bool:
    """A worker has our `__main__` when it is a file: fork inherits it, spawn and
    forkserver run it again as `__mp_main__`. Not so for `python -c`, a script fed
    on stdin (`python - < job.py`, whose `__file__` is '<stdin>') or a notebook."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True  # python -m module
    path = getattr(main, "__file__", None)
    if not path:
        return False
    key = (id(main), path)
    known = _importable.get(key)
    if known is None:  # a stat per pickle would cost more than the pickle: once per main module
        # Where multiprocessing's children start from (its ORIGINAL_DIR, once it is loaded).
        process = sys.modules.get("multiprocessing.process")
        known = os.path.isfile(os.path.join(getattr(process, "ORIGINAL_DIR", None) or "", path))
        _importable.clear()
        _importable[key] = known
    return known


_importable: dict[tuple[int, str], bool] = {}


def dumps(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None) -> bytes:
    """Plain pickle (fast C path, by reference), else cloudpickle (by value).

    By reference, a worker's handler, initializer and globals are the module's
    own, shared as with ProcessPoolExecutor. Things in a `__main__` the worker
    cannot import, lambdas and closures go by value.
    """
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback)
    except Exception:
        return by_value(obj, buffer_callback)
    if _MAIN in data and not main_is_importable():
        return by_value(obj, buffer_callback)
    return data


def by_value(obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None) -> bytes:
    """cloudpickle: functions and classes travel as code, not as names."""
    import cloudpickle  # here: loading it costs ~3 ms, which a pool of importable handlers does without

    return cast(bytes, cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback))


OUT_OF_BAND = 1 << 16  # buffers this big (numpy arrays, PickleBuffers) travel beside the pickle, uncopied
_COUNT = struct.Struct("<Q")


Post = Callable[[memoryview], "int | None"]  # a buffer to shared memory: its segment number, or None


def dumps_body(obj: Any, by_value_: bool = False, post: Post | None = None) -> list[bytes | memoryview]:
    """A batch's items or values as the buffers of a frame body: a table of the
    out-of-band buffers' sizes (and the numbers of those `post` sent as shared
    memory segments, `procqueue/_local/shm.py`), the pickle, then the
    other buffers themselves."""
    bufs: list[memoryview] = []

    def keep(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: in the pickle
            return True
        if raw.nbytes < OUT_OF_BAND:
            return True
        bufs.append(raw)
        return False

    try:
        stream = by_value(obj, keep) if by_value_ else dumps(obj, keep)
    except BaseException:
        bufs.clear()
        raise
    if post is not None and not by_value_ and len(stream) >= SHM_MIN:
        # Big in-band data: large bytes and bytearrays, which pickle never puts out of
        # band. Pickled again with them out of band, they can take shared memory too.
        first = bufs[:]
        bufs.clear()
        again = _big_bytes_out_of_band(obj, keep)
        if again is None:
            bufs[:] = first
        else:
            stream = again
    if not bufs:
        return [_NONE, stream]
    sizes: list[int] = []
    seqs: list[int] = []
    inline: list[bytes | memoryview] = []
    for b in bufs:
        seq = post(b) if post is not None and b.nbytes >= SHM_MIN else None
        if seq is None:
            sizes.append(b.nbytes)
            inline.append(b)
        else:
            sizes.append(b.nbytes | IN_SHM)
            seqs.append(seq)
    table = struct.pack(f"<Q{len(sizes)}Q{len(seqs)}Q", len(sizes), *sizes, *seqs)
    return [table, stream, *inline]


_NONE = _COUNT.pack(0)


class _Lifted:
    """A large `bytes` or `bytearray` that pickles out of band (pickle keeps them in
    band), rebuilt on the other side by one copy from the buffer."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


def _big_bytes_out_of_band(obj: Any, keep: Callable[[pickle.PickleBuffer], bool]) -> bytes | None:
    """A batch (a list) pickled again with its large bytes and bytearrays out of band:
    the values and items themselves, and those in a tuple of arguments. None when
    there is none, or the batch does not pickle so as it did before."""
    if type(obj) is not list or len(obj) > 1024:  # a batch of many small items: not worth a look at each
        return None
    lifted, found = [], False
    for x in obj:
        if type(x) is tuple:
            y = tuple(_lift(a) for a in x)
            if any(type(a) is _Lifted for a in y):
                x, found = y, True
        else:
            x = _lift(x)
            found = found or type(x) is _Lifted
        lifted.append(x)
    if not found:
        return None
    try:
        return dumps(lifted, keep)
    except Exception:
        return None


def _lift(x: Any) -> Any:
    return _Lifted(x) if (type(x) is bytes or type(x) is bytearray) and len(x) >= SHM_MIN else x


def shm_refs(body: memoryview | bytes | bytearray) -> list[tuple[int, int]]:
    """`(number, size)` of each shared memory segment a frame body refers to."""
    (k,) = _COUNT.unpack_from(body)
    if not k:
        return []
    sizes = struct.unpack_from(f"<{k}Q", body, _COUNT.size)
    big = [s & ~IN_SHM for s in sizes if s & IN_SHM]
    if not big:
        return []
    seqs = struct.unpack_from(f"<{len(big)}Q", body, _COUNT.size * (k + 1))
    return list(zip(seqs, big, strict=True))


class Pickled:
    """A call's arguments, pickled in the thread that submitted them (their
    `__reduce__`/`__getstate__` is user code: it must not run on the pool's own
    thread). Inside a batch it unpickles itself in the worker; buffers of
    `OUT_OF_BAND` bytes and up stay out of band, uncopied."""

    __slots__ = ("blob", "buffers", "spare")

    def __init__(self, blob: bytes, buffers: list[pickle.PickleBuffer], spare: bytes | None) -> None:
        self.blob = blob
        self.buffers = buffers
        self.spare = spare

    def __reduce__(self) -> tuple[Any, ...]:
        return (load_pickled, (self.blob, self.buffers, self.spare))


def pickle_arguments(obj: Any) -> bytes | Pickled:
    """`obj` pickled: plain bytes (the common case, which a batch carries at C
    speed), or a `Pickled` when it has large buffers or names `__main__` (then a
    by-value spare rides along, for a worker that cannot resolve the name).
    Raises what pickling raised."""
    buffers: list[pickle.PickleBuffer] = []
    try:  # the common case, at C speed: every PickleBuffer (numpy arrays, ...) out of band
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffers.append)
        plain = not (_MAIN in blob and not main_is_importable())
    except Exception:  # a lambda, a local class: only cloudpickle can
        plain = False
    if not plain:  # by value, as the worker could not resolve it by reference
        buffers.clear()
        blob, spare = by_value(obj, buffers.append), None
    else:
        spare = by_value(obj) if _MAIN in blob else None
    return blob if spare is None and not buffers else Pickled(blob, buffers, spare)


def unpack_arguments(items: list[Any]) -> list[Any]:
    """A packed batch's items, unpickled (a `Pickled` one already was, with the batch)."""
    return [pickle.loads(x) if type(x) is bytes else x for x in items]


def load_pickled(blob: bytes, buffers: list[Any], spare: bytes | None) -> Any:
    try:
        return pickle.loads(blob, buffers=buffers)
    except Exception:
        if spare is None:
            raise
        return pickle.loads(spare)


def loads_body(body: memoryview | bytes | bytearray, shared: Sequence[Any] = ()) -> Any:
    """The inverse of `dumps_body`, given the mapped shared memory segments (`shared`) its table names
    (in order). Buffers come back writable (numpy arrays built on them can be
    written to), copied only when the frame itself was read-only."""
    data, buffers = _split_body(body, shared)
    return pickle.loads(data, buffers=buffers)


def salvage_body(
    body: memoryview | bytes | bytearray, shared: Sequence[Any] = ()
) -> tuple[list[Any], dict[int, BaseException]] | None:
    """After `loads_body` failed on a batch: its values, and which of them failed
    (`procqueue/_protocol/salvage.py`); None when the failure is not one value's."""
    from procqueue._protocol.salvage import salvage

    try:
        data, buffers = _split_body(body, shared)
    except Exception:
        return None
    return salvage(data, buffers)


def _split_body(body: memoryview | bytes | bytearray, shared: Sequence[Any]) -> tuple[memoryview, list[Any]]:
    """A body's pickle and its out-of-band buffers."""
    view = memoryview(body)
    (k,) = _COUNT.unpack_from(view)
    if not k:
        return view[_COUNT.size :], []
    sizes = struct.unpack_from(f"<{k}Q", view, _COUNT.size)
    n_shared = sum(1 for s in sizes if s & IN_SHM)
    if n_shared != len(shared):
        raise ValueError(f"a frame names {n_shared} shared memory segments, {len(shared)} were mapped")
    end = len(view) - sum(s for s in sizes if not s & IN_SHM)
    buffers: list[Any] = []
    at = end
    mapped = iter(shared)
    for size in sizes:
        if size & IN_SHM:
            buffers.append(next(mapped))
            continue
        piece = view[at : at + size]
        buffers.append(bytearray(piece) if piece.readonly else piece)
        at += size
    return view[_COUNT.size * (k + 1 + n_shared) : end], buffers


def body_size(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def dumps_callable(obj: Any) -> bytes:
    """A handler or initializer, for `loads_callable`: by reference when that
    works, with a by-value copy for a worker that cannot resolve the
    reference (a function defined under `if __name__ == "__main__":`) or that
    would resolve it to another definition (a function redefined after the
    worker imported the script), told apart by a fingerprint of its code."""
    ref = dumps(obj)
    spare = by_value(obj) if _MAIN in ref else None
    return pickle.dumps((ref, spare, _fingerprint(obj) if spare else None), protocol=pickle.HIGHEST_PROTOCOL)


def _fingerprint(obj: Any) -> tuple[str, int, bytes, int] | None:
    code = getattr(obj, "__code__", None)
    if code is None:
        return None
    return code.co_name, code.co_firstlineno, code.co_code, len(code.co_consts)


def loads_callable(blob: bytes) -> Any:
    ref, spare, fingerprint = pickle.loads(blob)
    try:
        obj = pickle.loads(ref)
    except Exception:
        if spare is None:
            raise
        return pickle.loads(spare)
    if fingerprint is not None and _fingerprint(obj) != fingerprint:
        return pickle.loads(spare)  # our __main__ has an older definition under that name
    return obj


loads = pickle.loads


def _text(exc: BaseException) -> str:
    """`str(exc)`, or a note when even that raises."""
    try:
        return str(exc)
    except BaseException:
        return f"<str() of the {type(exc).__name__} failed>"


def safe_repr(obj: object) -> str:
    """A name for an object in a message: its `__qualname__`, else its repr, else its type's
    name (a hostile `__repr__` may raise anything)."""
    try:
        name = getattr(obj, "__qualname__", None)
        return name if isinstance(name, str) else repr(obj)
    except BaseException:
        return f"<a {type(obj).__qualname__}>"


def describe(obj: object) -> str:
    """`a _thread.lock` style name of an object's type."""
    kind = type(obj)
    return f"a {kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else f"a {kind.__qualname__}"


def _fails(obj: Any) -> BaseException | None:
    try:
        dumps(obj)
    except BaseException as exc:  # a __reduce__ may raise anything, SystemExit included
        return exc
    return None


def name_bad_argument(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, BaseException | None]:
    """Which argument of a call does not pickle: `("argument 2 (a _thread.lock)", exc)`."""
    for i, arg in enumerate(args):
        if (exc := _fails(arg)) is not None:
            return f"argument {i + 1} ({describe(arg)})", exc
    for key, arg in kwargs.items():
        if (exc := _fails(arg)) is not None:
            return f"keyword argument {key!r} ({describe(arg)})", exc
    return "the arguments", None


def dumps_values(values: list[Any], post: Post | None = None) -> tuple[list[bytes | memoryview], list[tuple[int, str]]]:
    """Pickle a batch of results (see `dumps_body`); a value that will not pickle
    is replaced by None and reported as `(index, message)`, so the others still travel."""
    try:
        return dumps_body(values, post=post), []
    except BaseException:
        pass
    bad: list[tuple[int, str]] = []
    for i, value in enumerate(values):
        if (exc := _fails(value)) is not None:
            bad.append((i, f"the result ({describe(value)}) could not be pickled: {type(exc).__name__}: {_text(exc)}"))
            values[i] = None
    return dumps_body(values, post=post), bad


def pack_exception(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """`(pickled exception or None, type name, message, traceback text)`.

    Never raises: an exception whose `__str__`, `__repr__` or `__reduce__`
    raises (even `SystemExit`) is still reported, with what could be read."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _ours(tb.tb_frame.f_globals):
        tb = tb.tb_next  # the remote traceback starts in the user's code, not in procqueue's loop
    try:
        message = str(exc)
    except BaseException as err:
        message = f"<str() of the {name} raised {type(err).__name__}>"
    try:
        text = "".join(traceback.format_exception(kind, exc, tb))
    except BaseException:
        text = f"{name}: {message}\n(its traceback could not be formatted)\n"
    try:
        blob: bytes | None = dumps(exc)
    except BaseException:
        blob = None
    return blob, name, message, text


def _ours(frame_globals: dict[str, Any]) -> bool:
    return str(frame_globals.get("__name__", "")).startswith("procqueue.")
