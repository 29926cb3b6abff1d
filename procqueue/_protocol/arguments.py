"""A batch's items as bytes: pickled in one go, and when that fails, item by
item, so an argument that does not pickle fails its own task, named."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from procqueue._errors import ProcQueueError, SerializationError
from procqueue._protocol import messages as m
from procqueue._protocol.pickling import Post, _text, dumps, dumps_body, name_bad_argument
from procqueue._protocol.relay import Forwarded


class Items(Protocol):
    """A run of tasks as far as encoding goes (`procqueue._scheduler.tasks.Run`)."""

    items: list[Any]
    first_id: int
    call: m.Call
    by_value: bool


Segments = list[tuple[Any, int, int]]  # (run, first item, how many)


def encode_items(
    segments: Segments, reject: Callable[[Any, int, BaseException], None], post: Post | None = None
) -> tuple[list[bytes | memoryview], Segments]:
    """Pickle a batch's items in one go; on failure find each item that does not
    pickle, fail it alone (naming the argument) and send the rest. Large buffers
    go to `post` (shared memory) where it takes them."""
    if len(segments) == 1 and segments[0][1] == 0 and segments[0][2] == len(segments[0][0].items):
        items = segments[0][0].items  # a whole run: no copy
    else:
        items = []
        for run, start, count in segments:
            items.extend(run.items[start : start + count])
    try:
        return dumps_body(items, segments[0][0].by_value, post), segments
    except BaseException:  # a __reduce__ may raise anything: find the items that do not pickle
        pass
    kept: Segments = []
    good: list[Any] = []
    for run, start, count in segments:
        run_start = None
        for j in range(start, start + count):
            item = run.items[j]
            try:
                dumps(item)
            except BaseException:
                reject(run, j, argument_error(run.first_id + j, run.call, item))
                if run_start is not None:
                    kept.append((run, run_start, j - run_start))
                    run_start = None
                continue
            good.append(item)
            if run_start is None:
                run_start = j
        if run_start is not None:
            kept.append((run, run_start, start + count - run_start))
    return (dumps_body(good, post=post) if good else []), kept


def argument_error(task_id: int, call: m.Call, item: Any) -> SerializationError:
    """The error of a task whose arguments do not pickle, naming the one that does not."""
    args, kwargs = _call_args(call, item)
    what, exc = name_bad_argument(args, kwargs)
    err = SerializationError(
        f"task {task_id}: {what} could not be pickled"
        + (f": {type(exc).__name__}: {_text(exc)}" if exc else "")
        + "; pass something picklable (or build it inside the handler)",
        stage="argument",
        what=what,
        task_id=task_id,
    )
    err.__cause__ = exc
    return err


def _call_args(call: m.Call, item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if call is m.Call.ONE:
        return (item,), {}
    if call is m.Call.STAR:
        return tuple(item), {}
    return tuple(item[0]), dict(item[1])


def encode_batch(
    wire: Callable[[], bytes], segments: Segments, post: Post | None = None
) -> tuple[bytes, list[bytes | memoryview], list[tuple[Any, int, BaseException]]]:
    """A batch as bytes: the handler's (`wire()`), the items' frames, and the items
    that would not pickle, each with its error (all of them when the handler would
    not). Runs user code (`__reduce__`): call it without the pool's lock. Forwarded
    items (`relay.py`) go as the body they came in; the batch's `pick` names them."""
    rejected: list[tuple[Any, int, BaseException]] = []
    try:
        blob = wire()
        if type(segments[0][0].items) is Forwarded:  # other pools' values, still pickled: the
            return blob, [], rejected  # backend sends them as they came (`relay.Forwarded.wire`)
        parts, _ = encode_items(segments, lambda run, j, exc: rejected.append((run, j, exc)), post)
    except BaseException as exc:  # a handler that will not pickle (or a bug): its tasks fail, not the pool
        err = exc if isinstance(exc, ProcQueueError) else _batch_failure(exc)
        return b"", [], [(run, j, err) for run, start, n in segments for j in range(start, start + n)]
    return blob, parts, rejected


def _batch_failure(exc: BaseException) -> SerializationError:
    err = SerializationError(
        f"a batch could not be pickled: {type(exc).__name__}; pass picklable arguments",
        stage="argument",
        what=type(exc).__name__,
        task_id=None,
    )
    err.__cause__ = exc
    return err
