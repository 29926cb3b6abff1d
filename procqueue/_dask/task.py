"""What runs on a Dask worker: one batch of a procqueue pool.

The batch comes as bytes (the cloudpickled handler, the pickled items) and
goes back as a `BatchResult` and the pickled values, exactly what a local
worker reports through its collector: the pool's scheduler judges both the
same way. It never raises (a handler's exception, even `SystemExit`, is its
item's outcome), so Dask's own failure handling only ever sees a worker that
died.
"""

from __future__ import annotations

import os
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from procqueue._protocol import messages as m
from procqueue._protocol.failures import call_item
from procqueue._protocol.pickling import dumps_values, loads_body, loads_callable, pack_exception, unpack_arguments

HANDLERS = 64  # handlers a worker process keeps unpickled, newest used

_handlers: OrderedDict[bytes, Callable[..., Any] | BaseException] = OrderedDict()


def run_batch(
    batch_id: int, count: int, handler: bytes, body: bytes, call: int, attempt: int, packed: bool, *after: Any
) -> tuple[m.BatchResult, bytes]:
    """Run a batch's items; its outcomes, as a local worker would report them. `after`:
    the result of the batch its worker ran before (a Dask dependency, not used: it only
    orders the two, see `procqueue/_dask/__init__.py`)."""
    pid = os.getpid()
    try:
        fn = _handler(handler)
    except BaseException as exc:
        return _all_failed(batch_id, count, attempt, pid, m.Fault.HANDLER_UNPICKLE, exc)
    try:
        items = loads_body(body)
        if packed:
            items = unpack_arguments(items)
    except BaseException as exc:
        return _all_failed(batch_id, count, attempt, pid, m.Fault.ARGS_UNPICKLE, exc)
    how = m.Call(call)
    values: list[Any] = []
    durations = array("q")
    errors: list[m.ErrorInfo] = []
    clock = time.perf_counter_ns
    t0 = clock()
    for i, item in enumerate(items):
        value = call_item(fn, how, item, i, errors)
        t1 = clock()
        values.append(value)
        durations.append(t1 - t0)
        t0 = t1
    parts, bad = dumps_values(values)
    for i, text in bad:
        errors.append(m.ErrorInfo(i, m.Fault.RESULT_PICKLE, None, "SerializationError", text, ""))
    result = m.BatchResult(batch_id, 0, len(values), pid, attempt, tuple(errors), durations.tobytes())
    return result, b"".join(parts)


def _handler(blob: bytes) -> Callable[..., Any]:
    fn = _handlers.get(blob)
    if fn is None:
        try:
            fn = loads_callable(blob)
        except BaseException as exc:  # kept, so the next batch of it fails the same way at once
            fn = exc
        _handlers[blob] = fn
        if len(_handlers) > HANDLERS:
            _handlers.popitem(last=False)
    else:
        _handlers.move_to_end(blob)
    if isinstance(fn, BaseException):
        raise fn
    return fn


def _all_failed(
    batch_id: int, count: int, attempt: int, pid: int, fault: m.Fault, exc: BaseException
) -> tuple[m.BatchResult, bytes]:
    info = pack_exception(exc)
    errors = tuple(m.ErrorInfo(i, fault, *info) for i in range(count))
    parts, _ = dumps_values([None] * count)
    return m.BatchResult(batch_id, 0, count, pid, attempt, errors, bytes(8 * count)), b"".join(parts)
