"""The worker process: take a batch, run the handler per item, report outcomes.

Wiring and channels are drawn in `_pool.py`. What a worker owns:
- reads `RunBatch`/`Stop` from its own task pipe (nobody else reads it);
- writes outcomes to its own socket to the collector (nobody else writes it),
  so a worker killed mid-write tears only its own stream;
- before each item it writes `(tag, start time)` into its slot of a shared
  array, so the parent knows which item a crash or a timeout belongs to
  without any message (the acknowledgement costs two stores).
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

from . import _messages as m
from ._serialization import dumps_values, loads_body, loads_callable, pack_exception

# A batch reports what it has so far at least this often, so a crash late in a
# long batch re-runs little, and the collector's counters stay fresh.
FLUSH_NS = 200_000_000
FLUSH_GRACE_NS = 60_000_000_000
HANDLER_CACHE = 256  # the parent mirrors this LRU to know what a worker holds
TAG_BITS = 20  # marker tag = (batch_id << TAG_BITS | index) + 1; 0 means idle
SOCKET_BUFFER = 4 << 20
EXIT_INIT_FAILED = 3
EXIT_ORPHANED = 4


def tag_of(batch_id: int, index: int) -> int:
    return (batch_id << TAG_BITS | index) + 1


def untag(tag: int) -> tuple[int, int]:
    tag -= 1
    return tag >> TAG_BITS, tag & ((1 << TAG_BITS) - 1)


def _watch_parent() -> None:
    """Exit when the parent dies, even in the middle of a long task (no orphans)."""
    parent = parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        connection.wait([sentinel])
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="procqueue-parent-watch", daemon=True).start()


class _Worker:
    def __init__(
        self,
        slot: int,
        task_conn: connection.Connection,
        out: connection.Connection,
        markers: Any,
    ) -> None:
        self.slot = slot
        self.pid = os.getpid()
        self.task_conn = task_conn
        self.out = out
        view = memoryview(markers).cast("B").cast("q")
        self.marks = view
        self.mark = 2 * slot
        self.handlers: OrderedDict[int, Callable[..., Any]] = OrderedDict()

    def send(self, header: object, body: m.Body = b"") -> None:
        m.write_frame(self.out.fileno(), header, body)

    def serve(self) -> None:
        fd = self.task_conn.fileno()
        while True:
            try:
                payload = m.read_frame(fd)
            except (EOFError, OSError):
                return  # the parent closed our pipe: nothing more will come
            msg, body = m.decode(payload)
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
            # we lack them; a failure here is reported for every item.
            cache[msg.handler_id] = loads_callable(msg.handler)
            if len(cache) > HANDLER_CACHE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(msg.handler_id)
        return cache[msg.handler_id]

    def fail_all(self, msg: m.RunBatch, fault: m.Fault, exc: BaseException) -> None:
        blob, name, text, tb = pack_exception(exc)
        errors = tuple(m.ErrorInfo(i, fault, blob, name, text, tb) for i in range(msg.count))
        durations = array("q", bytes(8 * msg.count)).tobytes()
        values = [None] * msg.count
        body, _ = dumps_values(values)
        self.send(
            m.BatchDone(msg.batch_id, 0, msg.count, msg.attempt, msg.retries, errors, durations, msg.by_value), body
        )

    def run(self, msg: m.RunBatch, body: memoryview) -> None:
        try:
            fn = self.handler(msg)
        except BaseException as exc:
            self.handlers.pop(msg.handler_id, None)
            self.fail_all(msg, m.Fault.HANDLER_UNPICKLE, exc)
            return
        try:
            items = loads_body(body)
        except BaseException as exc:
            self.fail_all(msg, m.Fault.ARGS_UNPICKLE, exc)
            return
        if not msg.careful:
            self.run_fast(msg, fn, items)
            return
        marks, mark, call = self.marks, self.mark, msg.call
        base = tag_of(msg.batch_id, 0)
        clock = time.perf_counter_ns
        values: list[Any] = []
        durations = array("q")
        errors: list[m.ErrorInfo] = []
        start = 0
        t0 = clock()
        flush_at = t0 + FLUSH_NS
        for i, item in enumerate(items):
            marks[mark + 1] = t0
            marks[mark] = base + i
            try:
                if call is m.Call.ONE:
                    value = fn(item)
                elif call is m.Call.STAR:
                    value = fn(*item)
                else:
                    value = fn(*item[0], **item[1])
            except BaseException as exc:
                value = None
                blob, name, text, tb = pack_exception(exc)
                errors.append(m.ErrorInfo(i, _fault(exc), blob, name, text, tb))
            marks[mark] = 0
            t1 = clock()
            values.append(value)
            durations.append(t1 - t0)
            t0 = t1
            if t1 >= flush_at:
                self.flush(msg, start, values, durations, errors)
                start = i + 1
                values, durations, errors = [], array("q"), []
                t0 = clock()
                flush_at = t0 + FLUSH_NS
        if values or start == 0:
            self.flush(msg, start, values, durations, errors)

    def run_fast(self, msg: m.RunBatch, fn: Callable[..., Any], items: list[Any]) -> None:
        """Tiny tasks: a tight loop, one mark for the whole batch (its tag negated)."""
        marks, mark, call = self.marks, self.mark, msg.call
        clock = time.perf_counter_ns
        t0 = clock()
        marks[mark + 1] = t0
        marks[mark] = -tag_of(msg.batch_id, 0)
        values: list[Any] = []
        append = values.append
        errors: list[m.ErrorInfo] = []
        n = len(items)
        while len(values) < n:
            rest = itertools.islice(items, len(values), None)
            try:
                if call is m.Call.ONE:
                    for item in rest:
                        append(fn(item))
                elif call is m.Call.STAR:
                    for item in rest:
                        append(fn(*item))
                else:
                    for item in rest:
                        append(fn(*item[0], **item[1]))
            except BaseException as exc:  # the item at len(values) raised; go on after it
                blob, name, text, tb = pack_exception(exc)
                errors.append(m.ErrorInfo(len(values), _fault(exc), blob, name, text, tb))
                append(None)
        marks[mark] = 0
        self.flush(msg, 0, values, array("q", [clock() - t0]), errors)  # one total: see BatchDone

    def flush(
        self, msg: m.RunBatch, start: int, values: list[Any], durations: array[int], errors: list[m.ErrorInfo]
    ) -> None:
        # A crash while pickling (a __reduce__ that segfaults) is charged to the
        # first unreported item, so it cannot requeue the batch forever. The mark's
        # start lies ahead, so a send stalled by a busy collector is not a task timeout.
        self.marks[self.mark + 1] = time.perf_counter_ns() + FLUSH_GRACE_NS
        self.marks[self.mark] = tag_of(msg.batch_id, start)
        body, bad = dumps_values(values)
        for i, text in bad:
            errors.append(m.ErrorInfo(start + i, m.Fault.RESULT_PICKLE, None, "SerializationError", text, ""))
        header = m.BatchDone(
            msg.batch_id, start, len(values), msg.attempt, msg.retries, tuple(errors), durations.tobytes()
        )
        self.send(header, body)
        self.marks[self.mark] = 0


def _fault(exc: BaseException) -> m.Fault:
    """RAISED, or REJECTED for an error its class marks final (`procqueue_final = True`)."""
    return m.Fault.REJECTED if getattr(exc, "procqueue_final", False) is True else m.Fault.RAISED


def main(
    slot: int,
    task_conn: connection.Connection,
    address: str | bytes,
    token: bytes,
    markers: Any,
    fault_conn: connection.Connection,
    init: bytes | None,
) -> None:
    """Entry point of a worker process (the `target` of its `Process`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent
    os.set_blocking(fault_conn.fileno(), False)  # a full pipe must not hang a dying worker
    faulthandler.enable(file=fault_conn.fileno(), all_threads=True)
    _watch_parent()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(OSError):  # big results in fewer wake-ups of the collector (capped by the OS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    try:
        sock.connect(address)
    except OSError:  # the collector is gone: the pool is ending, nobody needs this worker
        os._exit(EXIT_ORPHANED)
    out = connection.Connection(sock.detach())
    try:
        _serve(_Worker(slot, task_conn, out, markers), token, init)
    except (BrokenPipeError, ConnectionResetError):  # the collector is gone: the pool is ending
        os._exit(EXIT_ORPHANED)
    out.close()


def _serve(worker: _Worker, token: bytes, init: bytes | None) -> None:
    worker.send(m.Hello(worker.slot, worker.pid, token))
    if init is not None:
        try:
            initializer, initargs = loads_callable(init)
            initializer(*initargs)
        except BaseException as exc:
            worker.send(m.InitFailed(worker.slot, worker.pid, pack_exception(exc)[3]))
            worker.out.close()
            sys.stdout.flush()
            os._exit(EXIT_INIT_FAILED)
    worker.serve()
