"""The collector process: the accountant of every attempt.

Wiring is drawn in `_pool.py`. What the collector owns:
- reads each worker's outcome socket (accepted from one listening socket;
  the first frame must carry the pool's token);
- decides, for every failed attempt, retry-after-backoff or final, and counts
  completed / failed / retried / crashed / timed-out and per-slot work into a
  shared array the parent reads without asking;
- forwards values to the parent as the bytes the worker pickled (never
  unpickled here), with its decisions in a small header; or, with a sink
  (`procqueue run`), writes them to the output file itself (`_sink.py`) and
  forwards only the header;
- on `WorkerLost` drains the dead worker's socket to its end before charging
  the task it was running, so an outcome that made it out is never charged
  twice, then answers `WorkerGone`.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing import connection, parent_process
from typing import Any

from . import _messages as m
from ._retry import backoff_delay, should_retry
from ._sink import OUTPUT, FileSink, SinkSpec

# Indexes into the shared counters array; slot k's work is at SLOTS + k.
COMPLETED, FAILED, RETRIED, CRASHED, TIMED_OUT, ATTEMPTS, WRITTEN = range(7)  # WRITTEN: records the sink wrote
SLOTS = 8
REQUEUE = -2.0  # decision: put the item back uncharged (a merged batch that would not unpickle)
FINAL = -1.0
DRAIN_TIMEOUT = 5.0


@dataclass
class _Link:
    sock: socket.socket
    reader: m.FrameReader = field(default_factory=m.FrameReader)
    slot: int = -1
    pid: int = -1
    eof: bool = False
    last: tuple[int, int, int] = (-1, 0, 0)  # batch_id, start, count of the last BatchDone


class Collector:
    def __init__(
        self,
        listener: socket.socket,
        control: connection.Connection,
        results: connection.Connection,
        token: bytes,
        counters: Any,
        backoff: float,
        backoff_max: float,
        sink: SinkSpec | None = None,
    ) -> None:
        self.listener = listener
        self.control = control
        self.results = results
        self.token = token
        self.counts = memoryview(counters).cast("B").cast("q")
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.rng = random.Random()
        self.sel = selectors.DefaultSelector()
        self.links: dict[int, _Link] = {}
        self.by_pid: dict[int, _Link] = {}
        self.running = True
        self.sink = FileSink(sink) if sink is not None else None

    # --- plumbing -------------------------------------------------------------------

    def send(self, header: object, body: m.Body = b"") -> None:
        m.write_frame(self.results.fileno(), header, body)

    def accept_all(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            link = _Link(sock)
            self.links[sock.fileno()] = link
            self.sel.register(sock, selectors.EVENT_READ, link)
            self.read(link)

    def read(self, link: _Link) -> None:
        """Take what the socket holds now; at its end, forget the link."""
        while not link.eof:
            try:
                data = link.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close(link)
                return
            for frame in link.reader.feed(data):
                self.on_worker_frame(link, frame)

    def close(self, link: _Link) -> None:
        link.eof = True
        self.sel.unregister(link.sock)
        self.links.pop(link.sock.fileno(), None)
        link.sock.close()

    def drain(self, link: _Link) -> None:
        """Read a dead worker's socket to its end (it comes promptly: the writer is gone)."""
        while not link.eof:
            if not connection.wait([link.sock], DRAIN_TIMEOUT):
                self.close(link)  # should not happen; never block the pool on it
                return
            self.read(link)

    # --- accounting -----------------------------------------------------------------

    def decide(self, fault: int, attempt: int, retries: int, count: int, by_value: bool = False) -> float:
        counts = self.counts
        if fault == m.Fault.ARGS_UNPICKLE and (count > 1 or not by_value):
            return REQUEUE  # alone, then by value, before it counts as failed
        if fault in m.RETRYABLE and should_retry(attempt, retries):
            counts[RETRIED] += 1
            return backoff_delay(attempt, self.backoff, self.backoff_max, self.rng)
        counts[FAILED] += 1
        return FINAL

    def on_worker_frame(self, link: _Link, frame: memoryview) -> None:
        msg, body = m.decode(frame)
        if link.pid < 0 and not (isinstance(msg, m.Hello) and msg.token == self.token):
            self.close(link)  # not one of ours
            return
        match msg:
            case m.BatchDone():
                errors = msg.errors
                decisions = tuple(
                    self.decide(e.fault, msg.attempt, msg.retries, msg.count, msg.by_value) for e in errors
                )
                counts = self.counts
                counts[COMPLETED] += msg.count - len(errors)
                counts[ATTEMPTS] += msg.count
                counts[SLOTS + link.slot] += msg.count
                link.last = (msg.batch_id, msg.start, msg.count)
                if self.sink is not None:
                    self.sink_values(body)
                    body = memoryview(b"")
                self.send(
                    m.BatchResult(msg.batch_id, msg.start, msg.count, link.pid, errors, decisions, msg.durations), body
                )
            case m.Hello():
                link.slot, link.pid = msg.slot, msg.pid
                self.by_pid[msg.pid] = link
            case m.InitFailed():
                self.send(msg)
            case m.Bye():
                pass
            case _:
                raise TypeError(f"collector got an unknown worker message {msg!r}")

    def sink_values(self, body: memoryview) -> None:
        from ._serialization import loads_body

        values = loads_body(body)  # (seq, line) per item; None where it failed
        self.to_sink((v[0], OUTPUT, v[1]) for v in values if v is not None)

    def to_sink(self, records: Iterable[tuple[int, int, bytes]]) -> None:
        sink = self.sink
        assert sink is not None
        failed = sink.error is not None
        sink.add(records)
        self.counts[WRITTEN] = sink.written
        if sink.error is not None and not failed:  # tell the parent once; it stops the run
            err = sink.error
            self.send(m.SinkFailed(f"{type(err).__name__}: {err}", isinstance(err, BrokenPipeError)))

    def on_worker_lost(self, msg: m.WorkerLost) -> None:
        self.accept_all()
        link = self.by_pid.pop(msg.pid, None)
        if link is not None:
            self.drain(link)
        fault = m.Fault.TIMED_OUT if msg.timed_out else m.Fault.CRASHED
        decision: float | None = None
        run = msg.running
        if run is not None:
            batch_id, start, count = link.last if link is not None else (-1, 0, 0)
            reported = batch_id == run.batch_id and start <= run.index < start + count
            if not reported:
                self.counts[CRASHED if fault == m.Fault.CRASHED else TIMED_OUT] += 1
                self.counts[ATTEMPTS] += 1
                decision = self.decide(fault, run.attempt, run.retries, 1)
        self.send(m.WorkerGone(msg.slot, msg.pid, msg.exitcode, fault, decision))

    def on_control(self) -> None:
        try:
            payload = self.control.recv_bytes()
        except (EOFError, OSError):
            self.running = False
            return
        msg, _ = m.decode(payload)
        match msg:
            case m.WorkerLost():
                self.on_worker_lost(msg)
            case m.SinkRecords():
                if self.sink is not None:
                    self.to_sink(msg.records)
            case m.Shutdown():
                self.accept_all()
                for link in list(self.links.values()):
                    self.drain(link)
                self.close_sink()
                self.send(m.CollectorDone())
                self.running = False
            case _:
                raise TypeError(f"collector got an unknown control message {msg!r}")

    def close_sink(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.counts[WRITTEN] = self.sink.written
            self.sink = None

    def serve(self) -> None:
        self.listener.setblocking(False)
        sel = self.sel
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self.control, selectors.EVENT_READ, "control")
        parent = parent_process()
        if parent is not None and parent.sentinel is not None:
            sel.register(parent.sentinel, selectors.EVENT_READ, "parent")
        while self.running:
            for key, _ in sel.select():
                what = key.data
                if isinstance(what, _Link):
                    if not what.eof:
                        self.read(what)
                elif what == "accept":
                    self.accept_all()
                elif what == "control":
                    self.on_control()
                else:  # the parent died: nobody is left to serve
                    self.running = False
                if not self.running:
                    break


def main(*args: Any) -> None:
    """Entry point of the collector process: `args` are `Collector`'s."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past a file size limit: an error to report, not death
    collector = Collector(*args)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the parent went away
            collector.serve()
    finally:
        with contextlib.suppress(OSError):  # what is written need not run again after a crash
            collector.close_sink()
    os._exit(0)
