"""The supervisor: worker processes, their task pipes, and their ends.

Wiring is drawn in `procqueue/_local/__init__.py`. What the supervisor owns, per worker slot:
the process and how its death is seen (a pidfd on Linux: it fires when the
worker exits even if a child the handler forked still holds the worker's
descriptors, which keeps `Process.sentinel` open); the write end of the task
pipe, written non-blocking through a buffer so a busy or dead worker never
stalls the manager thread; the worker's marker (which item it runs, since
when) in a shared array; the read end of its faulthandler pipe; and the
mirror of the worker's handler cache.

Which worker must be killed (a timeout, a stall) is the scheduler's call
(`procqueue/_scheduler/limits.py`); the supervisor reads the markers it decides by.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from procqueue._local import worker as _worker
from procqueue._local.shm import Side
from procqueue._protocol import framing, layout
from procqueue._protocol.pickling import main_is_importable
from procqueue._scheduler.instructions import KillReason

PIPE_SIZE = 1 << 20  # bytes: a big batch crosses in one write, not in 16 wake-ups of the manager
WRITEV_MAX = 512  # buffers per writev (IOV_MAX is at least 1024)
RESPAWN_BACKOFF = (0.05, 5.0)  # a failed spawn (out of descriptors, say) is tried again after this, doubling


@dataclass(eq=False)
class Slot:
    """One worker position; a replacement worker takes over the slot of a dead one."""

    index: int
    process: BaseProcess | None = None
    pid: int = -1
    task_w: connection.Connection | None = None
    fault_r: connection.Connection | None = None
    out: list[bytes | memoryview] = field(default_factory=list)  # frames the pipe has not taken yet
    known: OrderedDict[int, None] = field(default_factory=OrderedDict)
    kill_reason: KillReason | None = None  # why we killed it, if we did
    generation: int = 0  # bumped per worker: selector events of a dead predecessor are stale
    death_fd: int = -1  # readable once the worker has exited (a pidfd, or the sentinel)
    pidfd: int = -1  # owned by the slot (closed at reap); -1 where there is none
    respawn_at: float | None = None  # a spawn failed: try again at this time
    spawn_failures: int = 0
    collector_generation: int = 0  # the collector its socket was handed to
    side: Side | None = None  # our end of its side socket: shared memory segments both ways
    held_body: int = 0  # key of the forwarded body it loaded last, which it still holds (relay.Loader)

    @property
    def alive(self) -> bool:
        return self.process is not None

    @property
    def fd(self) -> int:
        assert self.task_w is not None
        return self.task_w.fileno()

    def knows(self, handler_id: int) -> bool:
        """Mirror of the worker's LRU of handlers, updated exactly as the worker will."""
        known = self.known
        if handler_id in known:
            known.move_to_end(handler_id)
            return True
        known[handler_id] = None
        if len(known) > layout.HANDLER_CACHE:
            known.popitem(last=False)
        return False


class Supervisor:
    """Starts, feeds, watches and ends the worker processes."""

    def __init__(
        self, ctx: BaseContext, workers: int, token: bytes, init: bytes | None, shm: bool, post_results: bool
    ) -> None:
        self.ctx = ctx
        self.token = token
        self.init = init
        self.shm = shm  # large buffers as shared memory (where memfds work)
        self.post_results = post_results  # ... results too (not when the collector writes them to a file)
        # Each worker's side socket, by pid: kept past its death until the collector has
        # forwarded all it sent (`WorkerGone`), as its results name segments on it.
        self.sides: dict[int, Side] = {}
        self._markers: Any = ctx.RawArray("q", layout.MARK_WORDS * workers)  # type: ignore[attr-defined]
        self.marks = memoryview(self._markers).cast("B").cast("q")
        self.slots = [Slot(i) for i in range(workers)]
        self.manager: threading.Thread | None = None  # the thread that respawns workers

    def spawn(self, slot: Slot) -> socket.socket:
        """Start a worker in `slot`; returns the collector's end of its socket pair.
        On failure (OSError: out of descriptors, say) nothing is left open."""
        with Launch(self.ctx) as launch:
            task_r, task_w = launch.pipe()
            fault_r, fault_w = launch.pipe()
            theirs, ours = launch.socketpair(socket.SOCK_STREAM)
            side_theirs, side_ours = launch.socketpair(socket.SOCK_SEQPACKET) if self.shm else (None, None)
            # Wrapped before the start: a worker forked ("fork") closes the parent's ends it inherits.
            side = Side(side_ours, parents=True) if side_ours is not None else None
            self.marks[layout.MARK_WORDS * slot.index] = 0
            proc = launch.start(
                _worker.main,
                (slot.index, task_r, theirs, self.token, self._markers, fault_w, self.init, self.pdeathsig_safe(),
                 side_theirs, self.post_results),
                f"procqueue-worker-{slot.index}",
            )  # fmt: skip
        for obj in (task_r, fault_w, theirs, side_theirs):
            if obj is not None:
                obj.close()
        os.set_blocking(task_w.fileno(), False)
        os.set_blocking(fault_r.fileno(), False)
        slot.process, slot.pid, slot.task_w, slot.fault_r = proc, proc.pid or -1, task_w, fault_r
        slot.pidfd = _pidfd(slot.pid)
        slot.side = side
        if slot.side is not None:
            self.sides[slot.pid] = slot.side
        slot.death_fd = slot.pidfd if slot.pidfd >= 0 else proc.sentinel
        slot.generation += 1
        slot.out = []
        slot.known.clear()
        slot.held_body = 0
        slot.kill_reason = None
        slot.respawn_at = None
        slot.spawn_failures = 0
        return ours

    def forget_side(self, pid: int) -> None:
        """Everything worker `pid` sent has been read: close its side socket (segments
        it posted for results nobody read are freed with it)."""
        side = self.sides.pop(pid, None)
        if side is not None:
            side.close()

    def close_sides(self) -> None:
        for pid in list(self.sides):
            self.forget_side(pid)

    def spawn_failed(self, slot: Slot) -> float:
        """A spawn failed: when to try again (exponential backoff)."""
        first, cap = RESPAWN_BACKOFF
        delay = min(cap, first * 2.0 ** min(slot.spawn_failures, 30))
        slot.spawn_failures += 1
        slot.respawn_at = time.monotonic() + delay
        return delay

    def pdeathsig_safe(self) -> bool:
        """Whether the worker may ask to die with its parent: PR_SET_PDEATHSIG fires
        when the *thread* that started it ends, so only for starters that live as
        long as the pool (the fork server, the main thread, the manager)."""
        if self.ctx.get_start_method() == "forkserver":
            return True
        me = threading.current_thread()
        return me is threading.main_thread() or me is self.manager

    def send(self, slot: Slot, parts: list[bytes | memoryview]) -> bool:
        """Queue a frame (its buffers, uncopied) for the worker and write what the
        pipe takes now. True when some are left over (wait for the pipe to be writable)."""
        if slot.task_w is None:
            return False
        if slot.out:
            slot.out.extend(parts)
            return True
        slot.out = parts
        return self.flush(slot)

    def flush(self, slot: Slot) -> bool:
        """Write queued buffers; True while some remain."""
        if not slot.out or slot.task_w is None:
            return False
        try:
            n = os.writev(slot.fd, slot.out[:WRITEV_MAX])
        except BlockingIOError:
            return True
        except OSError:  # the worker is gone; its sentinel will tell
            slot.out = []
            return False
        slot.out = framing.drop_written(slot.out, n)
        return bool(slot.out)

    def running(self, slot: Slot) -> tuple[int, int, int] | None:
        """`(batch_id, index, started_ns)` of the item the worker is in, if any;
        index `UNMARKED` inside an unmarked batch, `LOADING` while it unpickles
        one. Read twice around the start time: the worker writes without a lock."""
        marks, k = self.marks, layout.MARK_WORDS * slot.index
        for _ in range(3):
            tag, index = marks[k], marks[k + 1]
            if tag == 0:
                return None
            started = marks[k + 2]
            if marks[k] == tag and marks[k + 1] == index:
                return tag - 1, index, started
        return None

    def kill(self, slot: Slot, reason: KillReason | None = None) -> None:
        if slot.kill_reason is None:
            slot.kill_reason = reason
        if slot.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)

    def reap(self, slot: Slot) -> tuple[int | None, str]:
        """After its death fired: exit code, what faulthandler wrote; close the slot's ends."""
        proc = slot.process
        exitcode = None
        if proc is not None:
            popen = getattr(proc, "_popen", None)
            # waitpid(WNOHANG) first: after a pidfd fired the process is a zombie,
            # while join() would wait on a sentinel a grandchild may still hold.
            if popen is not None and slot.pidfd >= 0:
                with contextlib.suppress(OSError, ValueError):
                    popen.poll()
            if proc.exitcode is None:
                proc.join(5.0)
            exitcode = proc.exitcode
            proc.close() if exitcode is not None else None
        text = b""
        if slot.fault_r is not None:
            try:
                while chunk := os.read(slot.fault_r.fileno(), 65536):
                    text += chunk
            except OSError:
                pass
            slot.fault_r.close()
        if slot.task_w is not None:
            slot.task_w.close()
        if slot.pidfd >= 0:
            os.close(slot.pidfd)
        slot.process, slot.task_w, slot.fault_r, slot.side = None, None, None, None
        slot.pid = slot.pidfd = slot.death_fd = -1
        return exitcode, text.decode("utf-8", "replace")


class Launch:
    """The channels made for a new process, and the process: used as a context
    manager, a failure anywhere (out of descriptors, say) leaves none of them open."""

    def __init__(self, ctx: BaseContext) -> None:
        self.ctx = ctx
        self.made: list[Any] = []
        self.proc: BaseProcess | None = None

    def __enter__(self) -> Launch:
        ensure_headroom()
        return self

    def pipe(self) -> tuple[connection.Connection, connection.Connection]:
        """A one-way pipe (read end, write end), widened."""
        r, w = self.ctx.Pipe(duplex=False)
        self.made += [r, w]
        widen_pipe(w.fileno())
        return r, w

    def socketpair(self, kind: int) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        self.made += [a, b]
        return a, b

    def start(self, target: Any, args: tuple[Any, ...], name: str) -> BaseProcess:
        self.proc = self.ctx.Process(target=target, args=args, name=name)  # type: ignore[attr-defined]
        with unrunnable_main_hidden():
            self.proc.start()
        return self.proc

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if kind is None:
            return
        for obj in self.made:
            obj.close()
        proc = self.proc
        if proc is not None and getattr(proc, "_popen", None) is not None:  # it may hold a sentinel
            with contextlib.suppress(Exception):
                proc.kill()
                proc.join(2.0)
                proc.close()


_hide_lock = threading.Lock()


@contextlib.contextmanager
def unrunnable_main_hidden() -> Iterator[None]:
    """While a child starts: hide a `__main__.__file__` that is no file ('<stdin>'),
    which spawn and forkserver children would try to run again and die of."""
    with _hide_lock:
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        if path is None or main_is_importable():
            yield
            return
        del main.__file__  # type: ignore[union-attr]
        try:
            yield
        finally:
            main.__file__ = path  # type: ignore[union-attr]


HEADROOM = 16  # descriptors a process start needs, counting multiprocessing's own


def ensure_headroom() -> None:
    """Raise EMFILE before starting a process that would run out of descriptors half
    way: multiprocessing's fork server client leaks a pipe when its second
    `os.pipe()` fails, so the start must not begin without room for all."""
    import errno
    import resource

    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        used = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and used + HEADROOM > soft:
        raise OSError(errno.EMFILE, f"{used} of {soft} file descriptors are open; starting a process needs more")


def _pidfd(pid: int) -> int:
    """A descriptor that becomes readable when `pid` exits (Linux 5.3+), or -1."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None or pid <= 0:
        return -1
    try:
        return int(opener(pid))
    except OSError:
        return -1


def widen_pipe(fd: int) -> None:
    """Grow a pipe's buffer where the OS allows it (Linux); elsewhere keep the default."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is not None:
        with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: keep what it has
            fcntl.fcntl(fd, setsize, PIPE_SIZE)
