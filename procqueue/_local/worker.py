"""The worker process: take a batch, run the handler per item, report outcomes.

Wiring and channels are drawn in `procqueue/_local/__init__.py`. What a worker owns:
- reads `RunBatch`/`Stop` from its own task pipe (nobody else reads it);
- writes outcomes to its own socket to the collector (nobody else writes it),
  so a worker killed mid-write tears only its own stream;
- large buffers (its arguments', its results') cross as shared memory
  segments on its side socket to the parent (`procqueue/_local/shm.py`):
  a result's bytes skip the collector, which forwards only the accounting;
- before each item it writes `(batch, index, start time)` into its slot of a
  shared array, so the parent knows which item a crash or a timeout belongs to
  without any message (the acknowledgement costs a few stores). While it
  unpickles a batch (handler and arguments) the index reads `layout.LOADING`, so a
  poison argument that kills the worker is charged to its batch, not taken
  for a worker that cannot start.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import os
import signal
import socket
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing import connection, parent_process
from typing import Any

from procqueue._local.shm import Side
from procqueue._protocol import framing, layout
from procqueue._protocol import messages as m
from procqueue._protocol.failures import call_item, fault_of
from procqueue._protocol.pickling import (
    Post,
    dumps_values,
    loads_body,
    loads_callable,
    pack_exception,
    shm_refs,
    unpack_arguments,
)
from procqueue._protocol.relay import Guarded, Loader

# A batch reports what it has so far at least this often, so a crash late in a
# long batch re-runs little, and the collector's counters stay fresh.
FLUSH_NS = 200_000_000
FLUSH_GRACE_NS = 60_000_000_000
SOCKET_BUFFER = 4 << 20
PR_SET_PDEATHSIG = 1


def _let_fork_server_go() -> None:
    """A fork server child inherits the server's own "alive" pipe, and the server
    exits only when every copy is closed: ours would keep it (and, through
    PDEATHSIG, us) alive after the pool's process died. We never use it."""
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None and parent_process() is not None:
        server._forkserver_alive_fd = None
        with contextlib.suppress(OSError):
            os.close(fd)


def die_with_parent() -> None:
    """Linux: the kernel kills this process the moment its parent dies, even inside
    a C call that holds the GIL (the watch thread cannot run then). The caller
    starts us from a thread that lives as long as the pool (see `Supervisor`)."""
    if not sys.platform.startswith("linux"):
        return
    _let_fork_server_go()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # it died before the call took effect
            os._exit(layout.EXIT_ORPHANED)
    except (OSError, AttributeError):  # no libc to ask: the watch thread still covers it
        pass


def _watch_parent() -> None:
    """Exit when the parent dies, even in the middle of a long task (no orphans)."""
    parent = parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        connection.wait([sentinel])
        os._exit(layout.EXIT_ORPHANED)

    threading.Thread(target=watch, name="procqueue-parent-watch", daemon=True).start()


class _Worker:
    def __init__(
        self,
        slot: int,
        task_conn: connection.Connection,
        out: connection.Connection,
        markers: Any,
        side: Side | None = None,
        post_results: bool = False,
    ) -> None:
        self.slot = slot
        self.side = side
        self.post: Post | None = side.post if side is not None and post_results else None
        self.relayed = Loader()  # forwarded values: the last body stays unpickled while it is being cut
        self.pid = os.getpid()
        self.task_conn = task_conn
        self.out = out
        view = memoryview(markers).cast("B").cast("q")
        self.marks = view
        self.mark = layout.MARK_WORDS * slot
        # A handler that failed to unpickle is kept as its error, so a later batch
        # sent without the bytes fails with that reason, not a missing key.
        self.handlers: OrderedDict[int, Callable[..., Any] | BaseException] = OrderedDict()

    def send(self, header: object, body: framing.Body = b"") -> None:
        framing.write_frame(self.out.fileno(), header, body)

    def serve(self) -> None:
        fd = self.task_conn.fileno()
        while True:
            try:
                payload = framing.read_frame(fd)
            except (EOFError, OSError):
                return  # the parent closed our pipe: nothing more will come
            msg, body = framing.decode(payload)
            match msg:
                case m.RunBatch():
                    self.run(msg, body)
                case m.Stop():
                    self.send(m.Bye(self.slot, self.pid))
                    return
                case _:
                    raise TypeError(f"worker got an unknown message {msg!r}")

    def handler(self, msg: m.RunBatch) -> Callable[..., Any]:
        cache = self.handlers
        if msg.handler is not None:
            # The parent sends the bytes whenever its mirror of this LRU says
            # we lack them (or last heard they failed); a failure is reported
            # for every item of the batch.
            try:
                fn: Callable[..., Any] | BaseException = loads_callable(msg.handler)
            except BaseException as exc:
                fn = exc
            cache[msg.handler_id] = fn
            if len(cache) > layout.HANDLER_CACHE:
                cache.popitem(last=False)
        else:
            fn = cache.get(msg.handler_id) or LookupError(
                f"handler {msg.handler_id} was not sent to this worker (pid {self.pid})"
            )
            cache.move_to_end(msg.handler_id) if msg.handler_id in cache else None
        if isinstance(fn, BaseException):
            raise fn
        return fn

    def fail_all(self, msg: m.RunBatch, fault: m.Fault, exc: BaseException) -> None:
        blob, name, text, tb = pack_exception(exc)
        errors = tuple(m.ErrorInfo(i, fault, blob, name, text, tb) for i in range(msg.count))
        durations = array("q", bytes(8 * msg.count)).tobytes()
        values = [None] * msg.count
        body, _ = dumps_values(values)  # all None
        self.send(
            m.BatchDone(msg.batch_id, 0, msg.count, msg.attempt, msg.retries, errors, durations, msg.by_value), body
        )

    def run(self, msg: m.RunBatch, body: memoryview) -> None:
        marks, mark = self.marks, self.mark
        marks[mark + 2] = time.perf_counter_ns()
        marks[mark + 1] = layout.LOADING  # a crash from here on is charged to this batch
        marks[mark] = msg.batch_id + 1
        relayed: tuple[list[Any], bool] | BaseException | None = None
        if msg.pick is not None:  # values of another pool's batches (a pipeline's stage before),
            try:  # loaded first, whatever the handler does: the parent counts on our holding them now
                relayed = self.relayed.items(body, msg.pick)
            except BaseException as exc:
                relayed = exc
        try:
            fn = self.handler(msg)
        except BaseException as exc:
            marks[mark] = 0
            self.fail_all(msg, m.Fault.HANDLER_UNPICKLE, exc)
            return
        try:
            if isinstance(relayed, BaseException):
                raise relayed
            if relayed is not None:
                items, bad = relayed
                if bad:  # some did not unpickle: those fail alone
                    fn = Guarded(fn)
            else:
                items = self.load_items(body)
            if msg.packed:
                items = unpack_arguments(items)
        except BaseException as exc:
            marks[mark] = 0
            self.fail_all(msg, m.Fault.ARGS_UNPICKLE, exc)
            return
        if not msg.careful and not msg.timed:
            self.run_fast(msg, fn, items)
            return
        # Careful: each item marked (timeouts, crash attribution) and timed. Timed only (tiny
        # tasks of submits): the batch is marked as a whole, each item timed for its future.
        marking = msg.careful
        if not marking:
            marks[mark + 1] = layout.UNMARKED
        call = msg.call
        tag = msg.batch_id + 1
        clock = time.perf_counter_ns
        values: list[Any] = []
        durations = array("q")
        errors: list[m.ErrorInfo] = []
        start = 0
        t0 = clock()
        flush_at = t0 + FLUSH_NS
        for i, item in enumerate(items):
            if marking:
                marks[mark + 2] = t0
                marks[mark + 1] = i
                marks[mark] = tag  # again after each flush, which leaves it idle
            value = call_item(fn, call, item, i, errors)
            t1 = clock()
            values.append(value)
            durations.append(t1 - t0)
            t0 = t1
            if t1 >= flush_at:
                self.flush(msg, start, values, durations, errors)
                if not marking:
                    marks[mark + 1], marks[mark] = layout.UNMARKED, tag
                start = i + 1
                values, durations, errors = [], array("q"), []
                t0 = clock()
                flush_at = t0 + FLUSH_NS
        marks[mark] = 0
        if values or start == 0:
            self.flush(msg, start, values, durations, errors)

    def load_items(self, body: memoryview) -> Any:
        """The batch's items; its large buffers mapped from their segments, private:
        the handler's own copy (copy on write)."""
        refs = shm_refs(body)
        if not refs:
            return loads_body(body)
        if self.side is None:
            raise RuntimeError("a batch names shared memory segments, but this worker has no side socket")
        return loads_body(body, [self.side.take(seq, size, private=True) for seq, size in refs])

    def run_fast(self, msg: m.RunBatch, fn: Callable[..., Any], items: list[Any]) -> None:
        """Tiny tasks: a tight loop, one mark for the whole batch (index layout.UNMARKED)."""
        marks, mark, call = self.marks, self.mark, msg.call
        clock = time.perf_counter_ns
        t0 = clock()
        marks[mark + 2] = t0
        marks[mark + 1] = layout.UNMARKED
        values: list[Any] = []
        append = values.append
        errors: list[m.ErrorInfo] = []
        n = len(items)
        while len(values) < n:
            rest = itertools.islice(items, len(values), None)
            try:  # extend() keeps what it appended before a call raised: the loop runs at C speed
                if call is m.Call.ONE:
                    values.extend(map(fn, rest))
                elif call is m.Call.STAR:
                    values.extend(itertools.starmap(fn, rest))
                else:
                    for item in rest:
                        append(fn(*item[0], **item[1]))
            except BaseException as exc:  # the item at len(values) raised; go on after it
                blob, name, text, tb = pack_exception(exc)
                errors.append(m.ErrorInfo(len(values), fault_of(exc), blob, name, text, tb))
                append(None)
        marks[mark] = 0
        self.flush(msg, 0, values, array("q", [clock() - t0]), errors)  # one total: see BatchDone

    def flush(
        self, msg: m.RunBatch, start: int, values: list[Any], durations: array[int], errors: list[m.ErrorInfo]
    ) -> None:
        # A crash while pickling (a __reduce__ that segfaults) is charged to the
        # first unreported item, so it cannot requeue the batch forever. The mark's
        # start lies ahead, so a send stalled by a busy collector is not a task timeout.
        marks, mark = self.marks, self.mark
        marks[mark + 2] = time.perf_counter_ns() + FLUSH_GRACE_NS
        marks[mark + 1] = start
        marks[mark] = msg.batch_id + 1
        body, bad = dumps_values(values, self.post)
        for i, text in bad:
            errors.append(m.ErrorInfo(start + i, m.Fault.RESULT_PICKLE, None, "SerializationError", text, ""))
        header = m.BatchDone(
            msg.batch_id, start, len(values), msg.attempt, msg.retries, tuple(errors), durations.tobytes()
        )
        self.send(header, body)
        self.marks[self.mark] = 0
        if self.side is not None and self.side.released:
            self.side.send_releases()  # arguments it unmapped: the parent may write them again


def main(
    slot: int,
    task_conn: connection.Connection,
    out_sock: socket.socket,
    token: bytes,
    markers: Any,
    fault_conn: connection.Connection,
    init: bytes | None,
    pdeathsig: bool,
    side_sock: socket.socket | None = None,
    post_results: bool = False,
) -> None:
    """Entry point of a worker process (the `target` of its `Process`)."""
    if pdeathsig:
        die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent
    os.set_blocking(fault_conn.fileno(), False)  # a full pipe must not hang a dying worker
    faulthandler.enable(file=fault_conn.fileno(), all_threads=True)
    _watch_parent()
    with contextlib.suppress(OSError):  # big results in fewer wake-ups of the collector (capped by the OS)
        out_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    out_sock.setblocking(True)
    out = connection.Connection(out_sock.detach())
    try:
        os.write(out.fileno(), token)  # raw, before any frame: the collector checks it first
        side = Side(side_sock) if side_sock is not None else None
        _serve(_Worker(slot, task_conn, out, markers, side, post_results), init)
    except (BrokenPipeError, ConnectionResetError):  # the collector is gone: the pool is ending
        os._exit(layout.EXIT_ORPHANED)
    out.close()


def _serve(worker: _Worker, init: bytes | None) -> None:
    if init is not None:
        try:
            initializer, initargs = loads_callable(init)
            initializer(*initargs)
        except BaseException as exc:
            worker.send(m.InitFailed(worker.slot, worker.pid, pack_exception(exc)[3]))
            worker.out.close()
            sys.stdout.flush()
            os._exit(layout.EXIT_INIT_FAILED)
    worker.serve()
