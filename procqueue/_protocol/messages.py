"""Every message that crosses a process boundary, and the life of a task.

The wiring of the processes is drawn in `_engine.py`; this module only says what
travels on each channel. A frame on any channel is the length prefix that
`multiprocessing.connection` uses, then a 4-byte header length, the pickled
header (one of the dataclasses below) and an optional body of raw bytes that
the collector forwards without unpickling.

    parent  -> worker     RunBatch, Stop                 (one pipe per worker)
    worker  -> collector  the pool's token (raw bytes), then
                          BatchDone+body, InitFailed, Bye (one socket pair per worker)
    parent  -> collector  each worker's end of its socket pair, as a descriptor
                          (`LINK` datagrams); WorkerLost, SinkRecords, Shutdown (control pipe)
    collector -> parent   BatchResult+body, WorkerGone, InitFailed, SinkFailed, CollectorDone

No process listens for connections: every channel is a pipe or a socket pair
made by the parent and handed down, so no other process can reach the pool.
Even so, the collector reads nothing from a worker's socket as a frame before
it has compared the pool's secret token (`TOKEN_SIZE` raw bytes, constant
time), and a `FrameReader` refuses a length prefix over its limit instead of
allocating it.

A task's states and the legal moves between them (`TRANSITIONS`):

    NEW ─► PENDING ─► DISPATCHED ─► RUNNING ─► DONE
     │        │  ▲         │           ├─────► FAILED
     ▼        ▼  │         ▼           ├─────► RETRYING ─► PENDING (after backoff)
  DROPPED CANCELLED ◄──── (requeued)   ├─────► CRASHED ──► RETRYING | FAILED
                                       └─────► TIMED_OUT ► RETRYING | FAILED

DONE, FAILED, CANCELLED and DROPPED are final: each accepted task reaches
exactly one of them. The parent does not see RUNNING as an event (a worker
only writes a shared marker), so every move out of RUNNING is legal out of
DISPATCHED too.
"""

from __future__ import annotations

import enum
import hmac
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

# --- failure kinds a worker reports for one task --------------------------------


class Fault(enum.IntEnum):
    """Why one attempt of a task did not produce a value."""

    RAISED = 1  # the handler raised
    RESULT_PICKLE = 2  # the value did not pickle in the worker
    ARGS_UNPICKLE = 3  # the batch's arguments did not unpickle in the worker
    HANDLER_UNPICKLE = 4  # the handler did not unpickle in the worker
    CRASHED = 5  # the worker died running it
    TIMED_OUT = 6  # the task ran past its timeout and the worker was killed
    REJECTED = 7  # the handler raised an error marked final (bad input): never retried


RETRYABLE = frozenset({Fault.RAISED, Fault.CRASHED, Fault.TIMED_OUT})


class Call(enum.IntEnum):
    """How a worker calls the handler with one item."""

    ONE = 0  # fn(item)
    STAR = 1  # fn(*item)
    FULL = 2  # fn(*item[0], **item[1])


# --- parent -> worker -------------------------------------------------------------


@dataclass(frozen=True)
class RunBatch:
    """Run the items in the frame's body (a pickled list) with handler `handler_id`.

    `handler` carries the cloudpickled handler the first time this worker sees
    it. `call` says how an item becomes a call (see `Call`). `attempt` and
    `retries` are echoed back for the collector. `careful` batches mark every
    item (for timeouts and crash attribution); the others, tiny tasks without
    a timeout, run in a tight loop and mark only the batch: if the worker dies
    in one, its items come back uncharged, as careful ones.
    """

    batch_id: int
    count: int
    handler_id: int
    handler: bytes | None
    call: Call
    attempt: int
    retries: int
    careful: bool
    by_value: bool = False  # the items were pickled by value (a retry after they would not unpickle)
    packed: bool = False  # each item is a pickle of its own (`_serialization.unpack_arguments`)
    timed: bool = False  # unmarked, but each item timed (its future reports its own duration)


@dataclass(frozen=True)
class Stop:
    """Finish what is queued, say Bye and exit."""


# --- worker -> collector ----------------------------------------------------------


@dataclass(frozen=True)
class BatchDone:
    """Outcomes of items `start .. start+count-1` of a batch.

    The body is the pickled list of values (None where an item failed),
    forwarded to the parent unread. `errors` has one `ErrorInfo` per failed
    item; `durations` is an `array('q')` of nanoseconds, one per item, or a
    single total for the whole range (a batch run unmarked, where items are
    not timed one by one).
    """

    batch_id: int
    start: int
    count: int
    attempt: int
    retries: int
    errors: tuple[ErrorInfo, ...]
    durations: bytes
    by_value: bool = False


@dataclass(frozen=True)
class ErrorInfo:
    """One failed item: where, why, and the exception as far as it pickles."""

    index: int
    fault: Fault
    blob: bytes | None  # the pickled exception, or None if it would not pickle
    type_name: str
    message: str
    traceback: str


@dataclass(frozen=True)
class InitFailed:
    """The worker initializer raised."""

    slot: int
    pid: int
    traceback: str


@dataclass(frozen=True)
class Bye:
    """The worker is leaving cleanly (Stop, or its task limit)."""

    slot: int
    pid: int


# --- parent -> collector ----------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """The item a worker was in when it died (read from its marker)."""

    batch_id: int
    index: int


@dataclass(frozen=True)
class WorkerLost:
    """A worker process ended: read what it left, then say whether the outcome of
    `running` arrived."""

    slot: int
    pid: int
    exitcode: int | None
    timed_out: bool
    running: Running | None


@dataclass(frozen=True)
class SinkRecords:
    """Records for the collector's output files (`_sink.py`): `(seq, target, line)`,
    target 0 the output, 1 the errors file."""

    records: list[tuple[int, int, bytes]]


@dataclass(frozen=True)
class Shutdown:
    """Every worker has ended: drain, answer CollectorDone and exit."""


# --- collector -> parent ----------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """A BatchDone as forwarded by the collector, with the worker's pid; the
    body (the pickled values) follows unread, or is empty when a sink took them."""

    batch_id: int
    start: int
    count: int
    pid: int
    attempt: int
    errors: tuple[ErrorInfo, ...]
    durations: bytes


@dataclass(frozen=True)
class WorkerGone:
    """Everything the dead worker sent has been forwarded. `reported`: the
    outcome of the item it was running (`WorkerLost.running`) was among it."""

    slot: int
    pid: int
    exitcode: int | None
    timed_out: bool
    reported: bool


@dataclass(frozen=True)
class SinkFailed:
    """The collector could not write its sink's file; `broken_pipe`: stdout was closed."""

    message: str
    broken_pipe: bool


@dataclass(frozen=True)
class CollectorDone:
    """The collector has forwarded everything and is exiting."""


WorkerMessage = RunBatch | Stop
CollectorInbound = BatchDone | InitFailed | Bye | WorkerLost | SinkRecords | Shutdown
ParentInbound = BatchResult | WorkerGone | InitFailed | SinkFailed | CollectorDone

# --- framing ------------------------------------------------------------------------

_HDR = struct.Struct("!I")
_LEN = struct.Struct("!i")
_LEN64 = struct.Struct("!Q")


def encode(header: object, body: bytes | memoryview = b"") -> bytes:
    """A frame's payload: header length, pickled header, body."""
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    return b"".join((_HDR.pack(len(head)), head, body))


Body = bytes | memoryview | list[bytes | memoryview]


def frame_parts(header: object, body: Body = b"") -> list[bytes | memoryview]:
    """A whole frame, length-prefixed as `Connection.send_bytes` writes it, as the
    buffers to write in turn: the body (one buffer or several) is never copied
    into a joined frame."""
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    parts = body if isinstance(body, list) else [body]
    size = _HDR.size + len(head) + sum(memoryview(p).nbytes for p in parts)
    prefix = _LEN.pack(size) if size < 0x7FFFFFFF else _LEN.pack(-1) + _LEN64.pack(size)
    first = b"".join((prefix, _HDR.pack(len(head)), head))
    return [first, *(p for p in parts if len(p))]


def framed(header: object, body: Body = b"") -> bytes:
    """A whole frame as one bytes object (small messages)."""
    return b"".join(frame_parts(header, body))


def write_frame(fd: int, header: object, body: Body = b"") -> None:
    """Write a whole frame to a blocking descriptor, with one gathered write when it fits."""
    parts = frame_parts(header, body)
    while parts:
        n = os.writev(fd, parts)
        parts = drop_written(parts, n)


def drop_written(parts: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """What is left of `parts` after `n` bytes of them were written."""
    while n and parts:
        first = parts[0]
        size = memoryview(first).nbytes
        if n >= size:
            n -= size
            parts = parts[1:]
        else:
            parts = [memoryview(first).cast("B")[n:], *parts[1:]]
            n = 0
    return parts


def read_frame(fd: int) -> bytearray:
    """Read one whole frame's payload from a blocking descriptor, into a buffer of its size."""
    (size,) = _LEN.unpack(_read_exactly(fd, 4))
    if size == -1:
        (size,) = _LEN64.unpack(_read_exactly(fd, 8))
    return _read_exactly(fd, size)


def _read_exactly(fd: int, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the writer closed the pipe")
        got += n
    return buf


def decode(payload: bytes | bytearray | memoryview) -> tuple[Any, memoryview]:
    """Split a frame's payload (without its length prefix) into header and body."""
    view = memoryview(payload)
    (hlen,) = _HDR.unpack_from(view)
    end = _HDR.size + hlen
    if end > len(view):
        raise ValueError(f"a frame's header claims {hlen} bytes of {len(view) - _HDR.size}")
    return pickle.loads(view[_HDR.size : end]), view[end:]


TOKEN_SIZE = 32  # bytes of the pool's secret a worker writes before its first frame


class FrameReader:
    """Reassembles frames from bytes read off a non-blocking descriptor.

    Whole frames inside one read come out as views of it (no copy); a frame
    split across reads is gathered once into a buffer of its exact size. A
    writer killed mid-frame leaves a torn tail here; it is simply never
    completed, so it cannot block the reader.

    It never raises on what it is fed. With `token`, the stream must start with
    those raw bytes: until they have arrived and compared equal (in constant
    time) nothing is parsed, and a mismatch ends the stream. A length prefix
    over `limit` (or a malformed one) ends the stream too, before anything is
    allocated for it. Once ended, `error` says why and every later feed
    returns nothing: the caller drops the channel.
    """

    __slots__ = ("_buf", "_head", "_need", "_prefix_len", "_token", "error", "limit")

    def __init__(self, limit: int = 1 << 62, token: bytes | None = None) -> None:
        self._head = bytearray()  # a length prefix (or the token) not yet whole
        self._buf: bytearray | None = None  # the frame being gathered
        self._need = 0  # bytes it still lacks
        self._prefix_len = 0  # of the frame being gathered
        self._token = token  # None once proven (or when none is asked for)
        self.limit = limit
        self.error: str | None = None

    @property
    def proven(self) -> bool:
        """The peer sent the token (or none was asked for)."""
        return self._token is None and self.error is None

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        if self.error is not None:
            return []
        view = memoryview(data).cast("B")
        if self._token is not None:
            need = len(self._token) - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < len(self._token):
                return []
            proven = hmac.compare_digest(bytes(self._head), self._token)
            self._head = bytearray()
            if not proven:
                self.error = "the peer did not present the pool's token"
                return []
            self._token = None
        frames: list[memoryview] = []
        if self._buf is not None:  # finish the frame in progress
            take = min(self._need, len(view))
            filled = len(self._buf) - self._need
            self._buf[filled : filled + take] = view[:take]
            self._need -= take
            if self._need:
                return frames
            frames.append(memoryview(self._buf))
            self._buf = None
            view = view[take:]
        if self._head:  # rare: a read ended inside a length prefix
            view = memoryview(bytes(self._head) + bytes(view))
            self._head = bytearray()
        pos, end = 0, len(view)
        while pos < end:
            size, start = _prefix(view, pos)
            if size is None:
                self._head = bytearray(view[pos:])
                break
            if size < 0 or size > self.limit:
                self.error = f"a frame announced {size} bytes (the limit is {self.limit})"
                break
            if end - start >= size:
                frames.append(view[start : start + size])
                pos = start + size
            else:  # gather the rest of this frame, once, into a buffer of its size
                self._buf = bytearray(size)
                self._buf[: end - start] = view[start:]
                self._need = size - (end - start)
                self._prefix_len = start - pos
                break
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        gathered = self._prefix_len + len(self._buf) - self._need if self._buf is not None else 0
        return len(self._head) + gathered


def _prefix(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int | None, int]:
    """`(frame size, where its payload starts)` from a length prefix at `pos`; None when incomplete."""
    if len(buf) - pos < 4:
        return None, pos
    (size,) = _LEN.unpack_from(buf, pos)
    if size != -1:
        return size, pos + 4
    if len(buf) - pos < 12:
        return None, pos
    (size,) = _LEN64.unpack_from(buf, pos + 4)
    return size, pos + 12


# --- the task state machine -------------------------------------------------------


class TaskState(enum.Enum):
    """Where one task is in its life (see the table in the module docstring)."""

    NEW = "new"
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    RETRYING = "retrying"
    CRASHED = "crashed"
    TIMED_OUT = "timed-out"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DROPPED = "dropped"


S = TaskState
_AFTER_RUN = frozenset({S.DONE, S.FAILED, S.RETRYING, S.CRASHED, S.TIMED_OUT, S.PENDING})
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    S.NEW: frozenset({S.PENDING, S.DROPPED}),
    # FAILED from PENDING: the handler or an argument did not pickle in the parent.
    S.PENDING: frozenset({S.DISPATCHED, S.CANCELLED, S.FAILED}),
    S.DISPATCHED: _AFTER_RUN | {S.RUNNING},
    S.RUNNING: _AFTER_RUN,
    S.RETRYING: frozenset({S.PENDING, S.CANCELLED, S.FAILED}),
    S.CRASHED: frozenset({S.RETRYING, S.FAILED}),
    S.TIMED_OUT: frozenset({S.RETRYING, S.FAILED}),
    S.DONE: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.DROPPED: frozenset(),
}
FINAL = frozenset({S.DONE, S.FAILED, S.CANCELLED, S.DROPPED})


class InvalidTransition(AssertionError):
    """A task was moved along an edge the state machine does not have."""


@dataclass
class Ledger:
    """Validate mode: follows every task through `TRANSITIONS` and checks the books.

    The pool keeps one when `PROCQUEUE_VALIDATE=1`; it costs a dict update per
    task per move, so it is off by default.
    """

    live: dict[int, list[TaskState]] = field(default_factory=dict)
    finals: dict[TaskState, int] = field(default_factory=lambda: dict.fromkeys(FINAL, 0))
    accepted: int = 0

    def move(self, task_id: int, to: TaskState) -> None:
        history = self.live.get(task_id)
        state = history[-1] if history else S.NEW
        if to not in TRANSITIONS[state]:
            trail = " -> ".join(s.value for s in [*(history or [S.NEW]), to])
            raise InvalidTransition(f"task {task_id}: illegal move {trail}")
        if state is S.NEW:
            self.accepted += 1
        if to in FINAL:
            self.live.pop(task_id, None)
            self.finals[to] += 1
        elif history is None:
            self.live[task_id] = [to]
        else:
            history.append(to)

    def check_books(self) -> None:
        """At rest: every accepted task has exactly one final state."""
        if self.live:
            some = dict(list(self.live.items())[:5])
            raise InvalidTransition(f"{len(self.live)} tasks never ended, e.g. {some}")
        total = sum(self.finals.values())
        if total != self.accepted:
            raise InvalidTransition(f"{self.accepted} accepted but {total} ended")
