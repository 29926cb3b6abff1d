"""Where outcomes land in the parent: futures for `submit`, chunks for `map`.

The manager thread settles these while holding the pool's lock, but never
runs user code there: values and exceptions stay pickled until the thread
that asks for them (`Future.result()`, the map's consumer) unpickles them, so
an object whose unpickling blocks or raises `SystemExit` costs its own task;
a future's done-callbacks go to the pool's callback `Runner`; what is left
to do after the lock is released goes in the `later` list each call receives.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from procqueue._callbacks import Runner, on_internal_thread
from procqueue._errors import (
    ProcQueueError,
    SerializationError,
)
from procqueue._protocol.pickling import loads_body, salvage_body
from procqueue._protocol.relay import Body, Forwarded, joined

Later = list[Callable[[], Any]]
MakeError = Callable[[], BaseException]


def run_all(later: Later) -> None:
    """Run what was deferred while the lock was held."""
    for fn in later:
        fn()


class Values:
    """A batch's pickled values, unpickled once by the first thread that asks:
    never the manager's."""

    __slots__ = ("_body", "_error", "_lock", "_shared", "_values", "bad", "count", "nbytes", "recount")

    def __init__(
        self,
        body: memoryview,
        recount: Callable[[int], None] | None = None,
        shared: list[Any] | BaseException = [],  # noqa: B006 (never changed)
        count: int = 0,
    ) -> None:
        self.recount = recount  # moves n tasks from completed to failed in the books
        self.count = count  # how many values the body holds (0: not known)
        self._body: memoryview | None = body
        self.nbytes = len(body) + sum(getattr(seg, "nbytes", 0) for seg in (shared if isinstance(shared, list) else ()))
        self._values: list[Any] | None = None
        self._error: BaseException | None = None
        self.bad: dict[int, BaseException] = {}  # values that would not unpickle, by index: why
        self._shared: list[Any] = []  # mapped shared memory its large buffers are in (`procqueue/_local/shm.py`)
        if isinstance(shared, BaseException):
            self._error = shared
        else:
            self._shared = shared
        self._lock = threading.Lock()

    def pickled(self) -> memoryview | None:
        """The values' body, to forward still pickled (`procqueue/_protocol/relay.py`); None
        once they were unpickled, or when they would not be whole without their shared memory."""
        with self._lock:
            if self._values is not None or self._error is not None or self._shared:
                return None
            return self._body

    def get(self) -> list[Any]:
        """The values; raises `Unloadable` when they would not unpickle."""
        if self._values is None and self._error is None:
            with self._lock:
                if self._values is None and self._error is None:
                    try:
                        self._values = loads_body(self._body, self._shared)  # type: ignore[arg-type]
                    except BaseException as exc:  # SystemExit from a __setstate__ too: this task's problem
                        # Only the values at fault fail, when they can be told apart; else the batch.
                        saved = salvage_body(self._body, self._shared)  # type: ignore[arg-type]
                        if saved is None:
                            self._error = exc
                        else:
                            self._values, self.bad = saved
                    self._body = None
                    self._shared = []
        if self._error is not None:
            raise Unloadable(self._error)
        assert self._values is not None
        return self._values


class Unloadable(Exception):
    """Values that did not unpickle in the parent (`cause` is why)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


def unloadable_error(cause: BaseException, task_id: int) -> SerializationError:
    try:
        text = f"{type(cause).__name__}: {cause}"
    except BaseException:
        text = type(cause).__name__
    err = SerializationError(
        f"task {task_id}: its result could not be unpickled in the parent: {text}; "
        "make sure the parent can import what the result refers to",
        stage="result",
        what=type(cause).__name__,
        task_id=task_id,
    )
    err.__cause__ = cause
    return err


_PENDING = ProcQueueError("procqueue: this error is unpickled when it is first asked for")


class Future(concurrent.futures.Future):  # type: ignore[type-arg]
    """A `concurrent.futures.Future` that also tells how the task went.

    Beyond the standard API: `task_id`; once done, `attempts` (how many times
    the task ran), `worker_pid` (of the last attempt) and `duration_ms` (of the
    last attempt's handler call). The value (or error) is unpickled in the
    first thread that asks for it; done-callbacks run on a thread of the
    pool's callback runner, never on the thread that moves its messages.
    """

    def __init__(self, task_id: int = -1, runner: Runner | None = None) -> None:
        super().__init__()
        self.task_id = task_id
        self.attempts = 0
        self.worker_pid: int | None = None
        self.duration_ms: float | None = None
        self._claimed = False
        self._lazy: Callable[[], tuple[bool, Any]] | None = None
        self._runner = runner

    def _resolve(self) -> None:
        lazy = self._lazy
        if lazy is None:
            return
        ok, value = lazy()  # never raises; no lock held: it runs user code. Two racing threads
        if self._lazy is lazy:  # would both compute it, and either result is the same
            if ok:
                self._result = value
            else:
                self._exception = value
            self._lazy = None

    def result(self, timeout: float | None = None) -> Any:
        """The task's value, as `concurrent.futures.Future.result`."""
        try:
            value = super().result(timeout)  # waits; CancelledError or TimeoutError as the standard one
            if self._lazy is None and self._exception is None:
                return value
        except ProcQueueError as exc:
            if exc is not _PENDING:
                raise
        self._resolve()
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's error, or None, as `concurrent.futures.Future.exception`."""
        super().exception(timeout)
        self._resolve()
        return self._exception

    def _invoke_callbacks(self) -> None:
        invoke = super()._invoke_callbacks  # type: ignore[misc]
        if not self._done_callbacks:  # type: ignore[attr-defined]
            return
        if self._runner is not None and on_internal_thread():
            self._runner.post(invoke)
        else:
            invoke()


def value_of(values: Values, index: int, task_id: int) -> tuple[bool, Any]:
    try:
        got = values.get()
        cause = values.bad.get(index)
        if cause is None:
            return True, got[index]
    except Unloadable as exc:
        cause = exc.cause
    if values.recount is not None:
        values.recount(1)
    return False, unloadable_error(cause, task_id)


def error_of(make: BaseException | MakeError) -> tuple[bool, Any]:
    return False, make if isinstance(make, BaseException) else make()


class FutureReceiver:
    """The one task of a `submit` (a `Receiver`, `procqueue/_scheduler/tasks.py`)."""

    __slots__ = ("future",)
    partial = False  # cancelled whole or not at all
    timed_each = True  # the future reports its own task's duration

    def __init__(self, future: Future) -> None:
        self.future = future

    def claim(self) -> bool:
        """Called as the task is dispatched; False if it was cancelled meanwhile."""
        fut = self.future
        if fut._claimed:
            return True
        fut._claimed = True
        return fut.set_running_or_notify_cancel()

    def cancel(self) -> bool:
        """Cancel a task that never ran; False if it is past that."""
        return self.future.cancel() if not self.future._claimed else False

    def still_read(self) -> bool:
        return True

    def ok(
        self, index: int, values: Values | None, lo: int, hi: int, meta: tuple[int, int, Any, int], later: Later
    ) -> None:
        fut = self.future
        fut.attempts, fut.worker_pid, durations, offset = meta
        fut.duration_ms = durations[offset] / 1e6 if durations else None
        if values is not None:
            fut._lazy = partial(value_of, values, lo, fut.task_id)
        later.append(partial(fut.set_result, None))

    def fail(self, index: int, make: BaseException | MakeError, attempts: int, pid: int | None, later: Later) -> None:
        fut = self.future
        fut.attempts, fut.worker_pid = attempts, pid
        if not fut._claimed:  # failed before it ever ran (did not pickle)
            fut._claimed = True
            fut.set_running_or_notify_cancel()
        fut._lazy = partial(error_of, make)
        later.append(partial(fut.set_exception, _PENDING))


class Stream:
    """The state of one `map` / `imap_unordered` call, shared by its chunks."""

    __slots__ = ("cancelled", "finished", "ordered", "outstanding")

    def __init__(self, ordered: bool = True) -> None:
        self.ordered = ordered
        self.finished: deque[Chunk] = deque()  # completed chunks, for unordered maps
        self.cancelled = False
        self.outstanding = 0  # tasks fed and not yet handed to the consumer


class Chunk:
    """Consecutive items of a map (a `Receiver`). Outcomes land by index, still
    pickled; the map's consumer turns them into values and errors (`materialize`)."""

    __slots__ = ("done", "errors", "first_id", "pieces", "remaining", "size", "start", "stream", "values")
    partial = True  # its tasks may be cancelled one by one
    timed_each = False

    def __init__(self, stream: Stream, size: int, first_id: int = 0) -> None:
        self.stream = stream
        self.size = size
        self.first_id = first_id
        self.start = 0  # its first item's place in the map's input
        self.values: list[Any] = []
        self.pieces: list[tuple[int, Values, int, int]] = []  # (index, values, lo, hi)
        self.errors: dict[int, Any] | None = None  # index -> an error, or a maker of one until materialized
        self.remaining = size
        self.done = False

    def claim(self) -> bool:
        return not self.stream.cancelled

    def cancel(self) -> bool:
        return True

    def still_read(self) -> bool:
        return not self.stream.cancelled

    def _settled(self, n: int) -> None:
        self.remaining -= n
        if self.remaining == 0:
            self.done = True
            if not self.stream.ordered:
                self.stream.finished.append(self)

    def ok(
        self, index: int, values: Values | None, lo: int, hi: int, meta: tuple[int, int, Any, int], later: Later
    ) -> None:
        if values is not None:  # None: a FileOutput took them, nothing comes back
            self.pieces.append((index, values, lo, hi))
        self._settled(hi - lo)

    def fail(self, index: int, make: BaseException | MakeError, attempts: int, pid: int | None, later: Later) -> None:
        if self.errors is None:
            self.errors = {}
        self.errors[index] = make
        self._settled(1)

    def body_bytes(self) -> int:
        """Pickled bytes its values take (all of each batch they came in, once), before `materialize`."""
        return sum({id(values): values.nbytes for _, values, _, _ in self.pieces}.values())

    def materialize(self) -> None:
        """Unpickle the values and build the errors (in the consumer's thread)."""
        pieces, self.pieces = self.pieces, []
        if len(pieces) == 1 and pieces[0][0] == 0 and pieces[0][3] - pieces[0][2] == self.size:
            _, values, lo, hi = pieces[0]
            try:
                got = values.get()
                self.values = got if lo == 0 and hi == len(got) else got[lo:hi]  # one batch, no copy
                if values.bad:
                    self._bad_values(values, 0, lo, hi)
            except Unloadable as exc:
                self._unloadable(values, 0, self.size, exc.cause)
                self.values = [None] * self.size
        elif pieces:
            out: list[Any] = [None] * self.size
            for index, values, lo, hi in pieces:
                try:
                    out[index : index + hi - lo] = values.get()[lo:hi]
                    if values.bad:
                        self._bad_values(values, index, lo, hi)
                except Unloadable as exc:  # noqa: PERF203 - rare
                    self._unloadable(values, index, hi - lo, exc.cause)
            self.values = out
        elif not self.values:
            self.values = [None] * self.size
        self._build_errors()

    def forward(self) -> list[tuple[list[range], Forwarded]] | None:
        """For the next stage of a pipeline, instead of `materialize`: the values still
        pickled, a `Forwarded` per batch they came in, each with the ranges of places
        in this chunk its values take (in order); the errors are built. None (and
        nothing done) when some values cannot go on as they are: `materialize` then."""
        pieces = self.pieces
        bodies = [values.pickled() for _, values, _, _ in pieces]
        if any(body is None for body in bodies):
            return None
        self.pieces = []
        # Pieces of one batch (split where an item failed) go on as one Forwarded.
        groups: list[tuple[Values, memoryview, list[range], list[range]]] = []  # values, body, places, picks
        for (index, values, lo, hi), data in sorted(zip(pieces, bodies, strict=True), key=lambda p: p[0][0]):
            assert data is not None
            if not groups or groups[-1][0] is not values:
                groups.append((values, data, [], []))
            groups[-1][2].append(range(index, index + hi - lo))
            groups[-1][3].append(range(lo, hi))
        out = [
            (places, joined(Body(_own(data), values.count or picks[-1].stop), picks))
            for values, data, places, picks in groups
        ]
        self._build_errors()
        return out

    def _build_errors(self) -> None:
        if self.errors:
            for i, err in list(self.errors.items()):
                if not isinstance(err, BaseException):
                    self.errors[i] = err()

    def _bad_values(self, values: Values, index: int, lo: int, hi: int) -> None:
        """The values of a batch that would not unpickle, each its own task's error."""
        bad = [j for j in values.bad if lo <= j < hi]
        if values.recount is not None and bad:
            values.recount(len(bad))
        if self.errors is None:
            self.errors = {}
        for j in bad:
            self.errors[index + j - lo] = unloadable_error(values.bad[j], self.first_id + index + j - lo)

    def _unloadable(self, values: Values, index: int, n: int, cause: BaseException) -> None:
        if values.recount is not None:
            values.recount(n)
        if self.errors is None:
            self.errors = {}
        for i in range(index, index + n):
            self.errors[i] = unloadable_error(cause, self.first_id + i)


Receiver = FutureReceiver | Chunk


def _own(view: memoryview) -> memoryview:
    """A body to keep a while: a copy when it is a small part of a larger read, which
    keeping the view would keep whole (a read from the collector takes up to ~1 MB)."""
    base = view.obj
    if isinstance(base, bytes | bytearray) and len(base) > 2 * view.nbytes + 65536:
        return memoryview(bytes(view))
    return view
