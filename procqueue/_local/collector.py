"""The collector process: reads every worker's outcomes and forwards them.

Wiring is drawn in `procqueue/_local/__init__.py`. What the collector owns:
- one socket per worker, each the collector's end of a socket pair the
  parent made for that worker and handed over as a descriptor (`layout.LINK`
  datagrams on the links socket): no socket listens, so no other process can
  reach it. A link's first bytes must be the pool's token, compared before
  anything on it is parsed as a frame;
- forwards outcomes to the parent as the bytes the worker pickled (never
  unpickled here), counting the attempts it forwarded in a shared array the
  monitor reads; or, with a FileOutput (`procqueue run`), writes the values to the
  output file itself (`procqueue/_file_writer.py`) and forwards only the header;
- on `WorkerLost` reads what the dead worker left in its socket (it wrote
  all it ever will: the process is gone) before answering `WorkerGone`, so
  the parent knows whether the outcome of the task it was running arrived.

It decides nothing: retry or final, and every count of the books, are the
parent's (`procqueue/_scheduler/`). So a collector killed from outside
loses no decision and no count: the parent starts another one.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing import connection, parent_process
from typing import Any

from procqueue._file_writer import OUTPUT, FileWriter, OutputSpec
from procqueue._protocol import framing, layout
from procqueue._protocol import messages as m

READ_SIZE = 1 << 20


@dataclass
class _Link:
    sock: socket.socket
    slot: int
    pid: int
    reader: framing.FrameReader
    eof: bool = False
    last: tuple[int, int, int] = (-1, 0, 0)  # batch_id, start, count of the last BatchDone


class Collector:
    def __init__(
        self,
        control: connection.Connection,
        links: socket.socket,
        results: connection.Connection,
        token: bytes,
        counters: Any,
        frame_limit: int,
        output: OutputSpec | None = None,
    ) -> None:
        self.control = control
        self.control_reader = framing.FrameReader(frame_limit)
        self.links = links
        self.results = results
        self.token = token
        self.frame_limit = frame_limit
        self.counts = memoryview(counters).cast("B").cast("q")
        self.sel = selectors.DefaultSelector()
        self.by_pid: dict[int, _Link] = {}
        self.running = True
        self.writer = FileWriter(output) if output is not None else None

    # --- plumbing -------------------------------------------------------------------

    def send(self, header: object, body: framing.Body = b"") -> None:
        framing.write_frame(self.results.fileno(), header, body)

    def take_links(self) -> None:
        """Adopt the worker sockets the parent has handed over so far."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.links, layout.LINK.size, 1)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            if len(fds) != 1 or len(data) != layout.LINK.size:
                for fd in fds:
                    os.close(fd)
                continue
            slot, pid = layout.LINK.unpack(data)
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            link = _Link(sock, slot, pid, framing.FrameReader(self.frame_limit, self.token))
            self.by_pid[pid] = link
            self.sel.register(sock, selectors.EVENT_READ, link)
            self.read(link)

    def read(self, link: _Link) -> None:
        """Take what the socket holds now; at its end (or on a bad stream), forget the link."""
        while not link.eof:
            try:
                data = link.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            frames = link.reader.feed(data) if data else []
            for frame in frames:
                self.on_worker_frame(link, frame)
            if not data or link.reader.error is not None:
                self.close(link)
                return

    def close(self, link: _Link) -> None:
        if link.eof:
            return
        link.eof = True
        self.sel.unregister(link.sock)
        link.sock.close()

    # --- forwarding -----------------------------------------------------------------

    def on_worker_frame(self, link: _Link, frame: memoryview) -> None:
        try:
            msg, body = framing.decode(frame)
        except Exception:  # a torn or corrupt frame from a dying worker: the rest of its stream is suspect
            link.reader.error = "a frame did not decode"
            return
        match msg:
            case m.BatchDone():
                self.counts[layout.FORWARDED] += msg.count
                link.last = (msg.batch_id, msg.start, msg.count)
                if self.writer is not None:
                    self.write_values(body, msg.errors)
                    body = memoryview(b"")
                self.send(
                    m.BatchResult(msg.batch_id, msg.start, msg.count, link.pid, msg.attempt, msg.errors, msg.durations),
                    body,
                )
            case m.InitFailed():
                self.send(msg)
            case m.Bye():
                pass
            case _:
                raise TypeError(f"collector got an unknown worker message {msg!r}")

    def write_values(self, body: memoryview, errors: tuple[m.ErrorInfo, ...]) -> None:
        from procqueue._protocol.pickling import loads_body

        try:
            values = loads_body(body)  # (seq, line) per item; None where it failed
        except Exception:
            return  # the parent hears of each item through the header; nothing to write
        self.write_records((v[0], OUTPUT, v[1]) for v in values if v is not None)

    def write_records(self, records: Iterable[tuple[int, int, bytes]]) -> None:
        writer = self.writer
        assert writer is not None
        failed = writer.error is not None
        writer.add(records)
        self.counts[layout.WRITTEN] = writer.written
        if writer.error is not None and not failed:  # tell the parent once; it stops the run
            err = writer.error
            self.send(m.OutputFailed(f"{type(err).__name__}: {err}", isinstance(err, BrokenPipeError)))

    def on_worker_lost(self, msg: m.WorkerLost) -> None:
        self.take_links()
        link = self.by_pid.pop(msg.pid, None)
        reported = False
        if link is not None:
            self.read(link)  # the worker is dead: all it wrote is here now
            self.close(link)
            run = msg.running
            if run is not None:
                batch_id, start, count = link.last
                reported = batch_id == run.batch_id and start <= run.index < start + count
        self.send(m.WorkerGone(msg.slot, msg.pid, msg.exitcode, msg.timed_out, reported))

    def on_control(self) -> None:
        try:
            data = os.read(self.control.fileno(), READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.running = False  # the parent is gone
            return
        for frame in self.control_reader.feed(data):
            msg, _ = framing.decode(frame)
            match msg:
                case m.WorkerLost():
                    self.on_worker_lost(msg)
                case m.OutputRecords():
                    if self.writer is not None:
                        self.write_records(msg.records)
                case m.Shutdown():
                    self.take_links()
                    for link in list(self.by_pid.values()):
                        self.read(link)
                        self.close(link)
                    self.close_writer()
                    self.send(m.CollectorDone())
                    self.running = False
                    return
                case _:
                    raise TypeError(f"collector got an unknown control message {msg!r}")

    def close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.counts[layout.WRITTEN] = self.writer.written
            self.writer = None

    def serve(self) -> None:
        sel = self.sel
        self.links.setblocking(False)
        os.set_blocking(self.control.fileno(), False)
        sel.register(self.links, selectors.EVENT_READ, "links")
        sel.register(self.control, selectors.EVENT_READ, "control")
        parent = parent_process()
        if parent is not None and parent.sentinel is not None:
            sel.register(parent.sentinel, selectors.EVENT_READ, "parent")
        while self.running:
            for key, _ in sel.select():
                what = key.data
                if isinstance(what, _Link):
                    if not what.eof:
                        self.read(what)  # kept in by_pid after its end, until WorkerLost asks
                elif what == "links":
                    self.take_links()
                elif what == "control":
                    self.on_control()
                else:  # the parent died: nobody is left to serve
                    self.running = False
                if not self.running:
                    break


def main(pdeathsig: bool, *args: Any) -> None:
    """Entry point of the collector process: `args` are `Collector`'s."""
    if pdeathsig:
        from procqueue._local.worker import die_with_parent

        die_with_parent()
    # Ctrl-C and a SIGTERM to the process group (`timeout`, a job scheduler) are the
    # parent's to act on: it ends the pool, and this process with it (by SIGKILL, or
    # PDEATHSIG if the parent dies). Dying here first would only restart a collector.
    # (The fork server is multiprocessing's, shared with the user's own processes: it
    # keeps SIGTERM's default, and its death still looks like its children's.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past a file size limit: an error to report, not death
    collector = Collector(*args)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the parent went away
            collector.serve()
    finally:
        with contextlib.suppress(OSError):  # what is written need not run again after a crash
            collector.close_writer()
    os._exit(0)
