"""The parent's end of the collector process (wiring: `procqueue/_local/__init__.py`).

It starts the collector with three channels the parent makes and hands down
(no socket listens anywhere): the control pipe and the links socket, both
written only through one ordered, non-blocking outbox, and the results pipe,
read non-blocking by the manager thread. The outbox is why a thread that
sends a large record (`procqueue run`'s error records) can never hold up the
manager, and why the manager can never block on a collector that is itself
blocked writing results to it: whoever sends appends and writes what the
pipe takes now; the manager writes the rest when the pipe has room.

A new worker's socket to the collector travels as a descriptor on the links
socket (a datagram per worker); because links and control messages leave
through the same outbox, a worker's `WorkerLost` can never overtake its link.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections import deque
from multiprocessing import connection
from multiprocessing.context import BaseContext
from typing import Any

from procqueue._local import collector as _collector
from procqueue._local.supervisor import Launch
from procqueue._protocol import framing, layout

CONTROL, LINK = 0, 1


class CollectorLink:
    """One collector process and the parent's ends of its channels."""

    def __init__(self, ctx: BaseContext, token: bytes, counters: Any, frame_limit: int, output: Any) -> None:
        self.ctx = ctx
        self.token = token
        self.counters = counters
        self.frame_limit = frame_limit
        self.output = output
        self.lock = threading.Lock()  # the outbox; held only while writing non-blocking
        self.outbox: deque[tuple[int, Any, Any]] = deque()  # (CONTROL, frame, None) | (LINK, header, socket)
        self.process: Any = None
        self.pid = -1
        self.results: connection.Connection | None = None
        self.control_w: connection.Connection | None = None
        self.links_w: socket.socket | None = None
        self.reader = framing.FrameReader(frame_limit)
        self.generation = 0

    def start(self, pdeathsig: bool) -> None:
        """Start a collector; on failure nothing it made stays open (OSError goes up)."""
        with Launch(self.ctx) as launch:
            control_r, control_w = launch.pipe()
            links_r, links_w = launch.socketpair(socket.SOCK_DGRAM)
            results_r, results_w = launch.pipe()
            proc = launch.start(
                _collector.main,
                (pdeathsig, control_r, links_r, results_w, self.token, self.counters, self.frame_limit, self.output),
                "procqueue-collector",
            )
        for obj in (control_r, links_r, results_w):
            obj.close()
        os.set_blocking(results_r.fileno(), False)
        os.set_blocking(control_w.fileno(), False)
        links_w.setblocking(False)
        with self.lock:
            self.process, self.pid = proc, proc.pid or -1
            self.results, self.control_w, self.links_w = results_r, control_w, links_w
            self.reader = framing.FrameReader(self.frame_limit)
            self.generation += 1
            self.outbox.clear()

    @property
    def sentinel(self) -> int:
        return int(self.process.sentinel)

    # --- the outbox -------------------------------------------------------------------

    def send(self, msg: object) -> None:
        """A control message, from any thread; never blocks."""
        self._post((CONTROL, memoryview(framing.framed(msg)), None))

    def link(self, slot: int, pid: int, sock: socket.socket) -> None:
        """Hand a new worker's socket to the collector (the parent's copy is closed once sent)."""
        self._post((LINK, layout.LINK.pack(slot, pid), sock))

    def _post(self, entry: tuple[int, Any, Any]) -> None:
        with self.lock:
            self.outbox.append(entry)
            if len(self.outbox) == 1:
                self._flush_locked()

    def flush(self) -> None:
        with self.lock:
            self._flush_locked()

    def waiting_fd(self) -> int | None:
        """The descriptor the outbox waits to write to, if it holds anything."""
        with self.lock:
            if not self.outbox or self.control_w is None or self.links_w is None:
                return None
            return self.control_w.fileno() if self.outbox[0][0] == CONTROL else self.links_w.fileno()

    def _flush_locked(self) -> None:
        box = self.outbox
        while box:
            kind, data, sock = box[0]
            if self.control_w is None or self.links_w is None:  # closed: the collector is gone
                self._drop_locked()
                return
            try:
                if kind == CONTROL:
                    n = os.write(self.control_w.fileno(), data)
                    if n < len(data):
                        box[0] = (kind, data[n:], None)
                        return
                else:
                    socket.send_fds(self.links_w, [data], [sock.fileno()])
                    sock.close()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the collector is gone: its death is handled on its own
                self._drop_locked()
                return
            box.popleft()

    def _drop_locked(self) -> None:
        for kind, _, sock in self.outbox:
            if kind == LINK:
                sock.close()
        self.outbox.clear()

    # --- results ----------------------------------------------------------------------

    def read(self) -> tuple[list[memoryview], bool]:
        """Frames the results pipe holds now, and whether it reached its end."""
        frames: list[memoryview] = []
        if self.results is None:
            return frames, True
        fd = self.results.fileno()
        while True:
            try:
                data = os.read(fd, 1 << 22)
            except BlockingIOError:
                return frames, False
            except OSError:
                return frames, True
            if not data:
                return frames, True
            frames.extend(self.reader.feed(data))
            if self.reader.error is not None:
                return frames, True

    # --- the end --------------------------------------------------------------------

    def close(self, kill: bool) -> None:
        """Wait for (or kill) the process and close the parent's ends."""
        proc = self.process
        if proc is not None:
            if kill:
                with contextlib.suppress(OSError, ValueError):
                    proc.kill()
            proc.join(2.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join(2.0)
            if proc.exitcode is not None:
                proc.close()  # its sentinel too
            self.process = None
        with self.lock:
            self._drop_locked()
            for end in (self.results, self.control_w, self.links_w):
                if end is not None:
                    end.close()
            self.results = self.control_w = None
            self.links_w = None
