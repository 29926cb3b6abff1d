"""Every message that crosses a process boundary, and the life of a task.

The wiring of the processes is drawn in `procqueue/_local/__init__.py`; this
module only says what travels on each channel (framing: `framing.py`). A frame on any channel is the length prefix that
`multiprocessing.connection` uses, then a 4-byte header length, the pickled
header (one of the records below) and an optional body of raw bytes that
the collector forwards without unpickling.

    parent  -> worker     RunBatch, Stop                 (one pipe per worker)
    worker  -> collector  the pool's token (raw bytes), then
                          BatchDone+body, InitFailed, Bye (one socket pair per worker)
    parent  -> collector  each worker's end of its socket pair, as a descriptor
                          (`LINK` datagrams); WorkerLost, OutputRecords, Shutdown (control pipe)
    collector -> parent   BatchResult+body, WorkerGone, InitFailed, OutputFailed, CollectorDone

No process listens for connections: every channel is a pipe or a socket pair
made by the parent and handed down, so no other process can reach the pool.
Even so, the collector reads nothing from a worker's socket as a frame before
it has compared the pool's secret token (`TOKEN_SIZE` raw bytes, constant
time), and a `FrameReader` refuses a length prefix over its limit instead of
allocating it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

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


class Call(enum.IntEnum):
    """How a worker calls the handler with one item."""

    ONE = 0  # fn(item)
    STAR = 1  # fn(*item)
    FULL = 2  # fn(*item[0], **item[1])


# --- parent -> worker -------------------------------------------------------------


class RunBatch(NamedTuple):
    """Run the items in the frame's body (a pickled list) with handler `handler_id`.

    `handler` carries the cloudpickled handler the first time this worker sees
    it. `call` says how an item becomes a call (see `Call`). `attempt` and
    `retries` are echoed back for the collector. `careful` batches mark every
    item (for timeouts and crash attribution); the others, tiny tasks without
    a timeout, run in a tight loop and mark only the batch: if the worker dies
    in one, its items come back uncharged, as careful ones.
    """

    batch_id: int
    count: int  # type: ignore[assignment]  # a field named as a tuple method: the field wins
    handler_id: int
    handler: bytes | None
    call: Call
    attempt: int
    retries: int
    careful: bool
    by_value: bool = False  # the items were pickled by value (a retry after they would not unpickle)
    packed: bool = False  # each item is a pickle of its own (`procqueue/_protocol/pickling.py`)
    timed: bool = False  # unmarked, but each item timed (its future reports its own duration)
    # The body is other batches' values (relay.py): (key, bytes, picks) per body; the picked are the items.
    pick: tuple[tuple[int, int, range | tuple[int, ...]], ...] | None = None


class Stop:
    """Finish what is queued, say Bye and exit."""

    __slots__ = ()


# --- worker -> collector ----------------------------------------------------------


class BatchDone(NamedTuple):
    """Outcomes of items `start .. start+count-1` of a batch.

    The body is the pickled list of values (None where an item failed),
    forwarded to the parent unread. `errors` has one `ErrorInfo` per failed
    item; `durations` is an `array('q')` of nanoseconds, one per item, or a
    single total for the whole range (a batch run unmarked, where items are
    not timed one by one).
    """

    batch_id: int
    start: int
    count: int  # type: ignore[assignment]  # a field named as a tuple method: the field wins
    attempt: int
    retries: int
    errors: tuple[ErrorInfo, ...]
    durations: bytes
    by_value: bool = False


class ErrorInfo(NamedTuple):
    """One failed item: where, why, and the exception as far as it pickles."""

    index: int  # type: ignore[assignment]  # a field named as a tuple method: the field wins
    fault: Fault
    blob: bytes | None  # the pickled exception, or None if it would not pickle
    type_name: str
    message: str
    traceback: str


class InitFailed(NamedTuple):
    """The worker initializer raised."""

    slot: int
    pid: int
    traceback: str


class Bye(NamedTuple):
    """The worker is leaving cleanly (Stop, or its task limit)."""

    slot: int
    pid: int


# --- parent -> collector ----------------------------------------------------------


class Running(NamedTuple):
    """The item a worker was in when it died (read from its marker)."""

    batch_id: int
    index: int  # type: ignore[assignment]  # a field named as a tuple method: the field wins


class WorkerLost(NamedTuple):
    """A worker process ended: read what it left, then say whether the outcome of
    `running` arrived."""

    slot: int
    pid: int
    exitcode: int | None
    timed_out: bool
    running: Running | None


class OutputRecords(NamedTuple):
    """Records for the collector's output files (`procqueue/_file_writer.py`): `(seq, target, line)`,
    target 0 the output, 1 the errors file."""

    records: list[tuple[int, int, bytes]]


class Shutdown:
    """Every worker has ended: drain, answer CollectorDone and exit."""

    __slots__ = ()


# --- collector -> parent ----------------------------------------------------------


class BatchResult(NamedTuple):
    """A BatchDone as forwarded by the collector, with the worker's pid; the
    body (the pickled values) follows unread, or is empty when a FileOutput took them."""

    batch_id: int
    start: int
    count: int  # type: ignore[assignment]  # a field named as a tuple method: the field wins
    pid: int
    attempt: int
    errors: tuple[ErrorInfo, ...]
    durations: bytes


class WorkerGone(NamedTuple):
    """Everything the dead worker sent has been forwarded. `reported`: the
    outcome of the item it was running (`WorkerLost.running`) was among it."""

    slot: int
    pid: int
    exitcode: int | None
    timed_out: bool
    reported: bool


class OutputFailed(NamedTuple):
    """The collector could not write a FileOutput file; `broken_pipe`: stdout was closed."""

    message: str
    broken_pipe: bool


class CollectorDone:
    """The collector has forwarded everything and is exiting."""

    __slots__ = ()


WorkerMessage = RunBatch | Stop
CollectorInbound = BatchDone | InitFailed | Bye | WorkerLost | OutputRecords | Shutdown
ParentInbound = BatchResult | WorkerGone | InitFailed | OutputFailed | CollectorDone
