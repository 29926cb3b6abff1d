"""Large buffers through shared memory, past the pipes and the collector.

A buffer of `layout.SHM_MIN` bytes and up (a numpy array's data, a bytearray: any
out-of-band pickle buffer) that crosses between the parent and a worker is
copied into an anonymous memfd and handed over on the pair's side socket
(SCM_RIGHTS). The frame carries only its size and sequence number.

- A result (worker to parent) is a fresh memfd, sealed against growing and
  shrinking, which the parent maps shared and writable: nothing else maps it any
  more, so it is an ordinary array that outlives the pool.
- An argument (parent to worker) is mapped by the worker private (copy on write:
  the handler's own copy, which cannot change the caller's array). The parent
  keeps the segment, and once the worker has unmapped it (it says so on the same
  socket) writes a later argument into it: a fresh segment costs the kernel an
  allocated, zeroed page per 4 kB, about four times the copy itself, on one core
  at a time. The segments kept are let go when the pool has had no batch out
  for a while (`Manager.let_go_segments`).

A memfd has no name, so nothing is ever left in `/dev/shm`, and a segment is
freed by the kernel when the last process holding or mapping it ends. Where a
step fails (no memfd, out of memory or descriptors, the socket full) that buffer
stays in the frame, through the pipes, with one note in the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import mmap
import os
import socket
import stat
import struct
import weakref
from collections.abc import Callable
from typing import Any

_SEQ = struct.Struct("<Q")
WARM_MIN_BYTES = 64 << 20  # argument segments kept free for reuse: this much, or the most ever out
_RELEASE = b"R"  # a worker unmapped an argument segment: this, then its number
_MSG_MAX = _SEQ.size + 2  # the longest message a pool process sends, and a byte to tell a longer one
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)

log = logging.getLogger("procqueue")


class ShmLost(Exception):
    """A segment a frame refers to did not arrive intact on the side socket."""


def supported() -> bool:
    """Whether this platform has sealable memfds (Linux)."""
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")


_noted = False


def _note_fallback(exc: OSError) -> None:
    global _noted
    if not _noted:
        _noted = True
        log.warning(
            "procqueue: shared memory for large buffers failed in pid %d (%s: %s); "
            "they go through pipes instead, which is slower",
            os.getpid(),
            type(exc).__name__,
            exc,
        )


def to_shm(raw: memoryview) -> int:
    """A sealed memfd holding a copy of `raw` (a contiguous byte view)."""
    fd = os.memfd_create("procqueue", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write_all(fd, raw)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, raw: memoryview) -> None:
    done, n = 0, raw.nbytes
    while done < n:
        done += os.pwrite(fd, raw[done:], done)


def map_shm(fd: int, size: int, private: bool, unmapped: Callable[[], None] | None = None) -> memoryview:
    """Map a segment received from the other side, after checking it is one: a
    regular file that holds `size` bytes. A result's (shared) must be exactly that
    size and sealed, so that nobody can shrink it under the mapping (which would
    turn a read into SIGBUS); an argument's (private) is the parent's to write
    again, which it does only after `unmapped` has run and said so."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < size or (not private and st.st_size != size):
        raise ShmLost(f"a segment of {size} bytes arrived as {st.st_size} bytes (or not a file)")
    if not private and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
        raise ShmLost("a segment arrived unsealed")
    return _mapping(fd, size, private, unmapped)


def _mapping(fd: int, size: int, private: bool, unmapped: Callable[[], None] | None) -> memoryview:
    """`size` bytes of `fd`, mapped, as a writable byte view that unmaps itself when
    the last object built on it goes, then calls `unmapped`. Not `mmap.mmap`: before
    Python 3.13 it keeps a duplicate of the descriptor open for the mapping's life,
    one per result array."""
    import ctypes

    libc = _libc()
    flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
    block = (ctypes.c_char * size).from_address(addr)
    # Not at exit: an atexit handler of the user's may still read the array.
    weakref.finalize(block, _unmap, libc, addr, size, unmapped).atexit = False
    return memoryview(block).cast("B")


def _unmap(libc: Any, addr: int, size: int, unmapped: Callable[[], None] | None) -> None:
    libc.munmap(addr, size)
    if unmapped is not None:
        unmapped()


_MAP_FAILED = (1 << 64) - 1  # (void *) -1 as ctypes returns it


@functools.cache
def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_live: weakref.WeakSet[Side] = weakref.WeakSet()  # the parent's ends, closed in any child it forks


def _close_inherited() -> None:
    """In a child forked from the parent (a worker under "fork", a user's fork): let go
    of the parent's ends of the side sockets and of the segments it keeps, or they
    would stay alive as long as that child."""
    for side in list(_live):
        side.close()
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def _forked(ref: weakref.ref[Side]) -> None:
    side = ref()
    if side is not None:
        side.mapped.clear()


class Side:
    """One end of a worker's side socket (a SOCK_SEQPACKET pair): posts segments
    one way and takes them the other, each way numbered from 0. Non-blocking: a
    post that would wait falls back to the frame, and a take finds its segment
    already there, as the sender posts before it writes the frame naming it.

    The parent's end keeps the argument segments it sends (`lend`) and writes
    later arguments into them once the worker has unmapped them: the worker's end
    sends a release (`_RELEASE` and the segment's number, no descriptor) with its
    next results (`send_releases`). Only the manager thread uses the parent's end."""

    def __init__(self, sock: socket.socket, parents: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.next_seq = 0
        self.ahead: dict[int, int] = {}  # received past the one asked for: a later frame's
        # The parent's end: argument segments out with the worker (by number), and free ones.
        self.lent: dict[int, tuple[int, int]] = {}  # seq: (fd, capacity)
        self.lent_bytes = 0
        self.peak_bytes = 0  # the most ever out at once, since the last `let_go`
        self.warm: list[tuple[int, int]] = []  # (fd, capacity), oldest first
        self.warm_bytes = 0
        # The worker's end: argument segments mapped now, and those to tell the parent it let go.
        self.mapped: set[int] = set()
        self.released: list[int] = []
        self.watching = False  # for forks (`_watch_forks`)
        self.parents = parents
        if parents:  # the parent's end: no child of the parent may keep it
            _live.add(self)

    def post(self, raw: memoryview) -> int | None:
        """Send `raw` as a fresh sealed segment (a result): its sequence number, or
        None to keep it in the frame."""
        try:
            fd = to_shm(raw)
        except OSError as exc:
            _note_fallback(exc)
            return None
        try:
            return self._send(fd)
        finally:
            os.close(fd)

    def lend(self, raw: memoryview) -> int | None:
        """Send `raw` as an argument segment (the parent's end), written into a free
        one where one fits (no more than twice its size), kept until released."""
        self.read_releases()
        n = raw.nbytes
        fits = [k for k, (_, cap) in enumerate(self.warm) if n <= cap <= 2 * n]
        try:
            if fits:
                fd, cap = self.warm.pop(min(fits, key=lambda k: self.warm[k][1]))
                self.warm_bytes -= cap
            else:  # none fits: free ones that do not make room for a new one first
                while self.warm and self.warm_bytes + self.lent_bytes + n > self._room():
                    self._close_oldest()
                fd, cap = os.memfd_create("procqueue", os.MFD_CLOEXEC), n
        except OSError as exc:
            _note_fallback(exc)
            return None
        try:
            _write_all(fd, raw)
        except OSError as exc:
            _note_fallback(exc)
            os.close(fd)
            return None
        seq = self._send(fd)
        if seq is None:
            self._keep(fd, cap)
        else:
            self.lent[seq] = (fd, cap)
            self.lent_bytes += cap
            self.peak_bytes = max(self.peak_bytes, self.lent_bytes)
        return seq

    def _send(self, fd: int) -> int | None:
        try:
            socket.send_fds(self.sock, [_SEQ.pack(self.next_seq)], [fd])
        except OSError as exc:  # full (a stopped reader), too many descriptors in flight, gone
            if not isinstance(exc, BlockingIOError | BrokenPipeError | ConnectionError):
                _note_fallback(exc)
            return None
        self.next_seq += 1
        return self.next_seq - 1

    def read_releases(self) -> None:
        """File what the worker sent so far (the parent's end): its releases, and the
        segments of results, kept in `ahead` for their frames."""
        while True:
            try:
                data, fds, _flags, _ = socket.recv_fds(self.sock, _MSG_MAX, 2, _CLOEXEC)
            except OSError:  # nothing more now, or the worker's end is gone (`take` reports it)
                return
            if not data and not fds:
                return
            seq = self._file(data, fds)
            if seq is not None:
                self.ahead[seq] = fds[0]

    def _file(self, data: bytes, fds: list[int]) -> int | None:
        """One message from the other end: a segment's number (the caller keeps its
        descriptor), or None: a release (filed here), or what no pool process sends."""
        if len(data) == _SEQ.size and len(fds) == 1:
            seq: int = _SEQ.unpack(data)[0]
            return seq
        for fd in fds:
            os.close(fd)
        if len(data) == _SEQ.size + 1 and data[:1] == _RELEASE:
            self._free(_SEQ.unpack_from(data, 1)[0])
        return None

    def _free(self, seq: int) -> None:
        """Lent segment `seq` (if it is one) is read by nobody any more: kept to write again."""
        got = self.lent.pop(seq, None)
        if got is not None:
            self.lent_bytes -= got[1]
            self._keep(*got)

    def _room(self) -> int:
        """Bytes of segments to keep, free and lent: the most ever out at once (or the minimum)."""
        return max(WARM_MIN_BYTES, self.peak_bytes)

    def _keep(self, fd: int, cap: int) -> None:
        """`fd` is free to be written again: kept, the oldest closed past the most that
        was ever out at once (so a steady stream of arguments reuses every segment, and
        what is kept and out together stays about what was out before)."""
        self.warm.append((fd, cap))
        self.warm_bytes += cap
        while self.warm_bytes > self._room():
            self._close_oldest()

    def _close_oldest(self) -> None:
        fd, cap = self.warm.pop(0)
        self.warm_bytes -= cap
        os.close(fd)

    def holds_segments(self) -> bool:
        return bool(self.warm or self.lent)

    def let_go(self) -> None:
        """Close the argument segments kept: a worker that still maps one keeps it
        alive, and its release, when it comes, is ignored."""
        for fd, _ in [*self.warm, *self.lent.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.warm.clear()
        self.lent.clear()
        self.warm_bytes = self.lent_bytes = self.peak_bytes = 0

    def unlend(self, since: int) -> None:
        """The frame naming segments `since` and after was never written (its batch was
        settled meanwhile, or turned back): nothing will map them, so they are free."""
        for seq in [k for k in self.lent if k >= since]:
            self._free(seq)

    def take(self, seq: int, size: int, private: bool) -> memoryview:
        """The segment numbered `seq`, mapped: private (an argument, copy on write: the
        handler's own; its release is sent once it is unmapped) or shared (a result);
        raises `ShmLost`."""
        fd = self._receive(seq)
        try:
            view = map_shm(fd, size, private, functools.partial(self._unmapped, seq) if private else None)
        except (OSError, ValueError) as exc:
            self._not_mapped(seq)
            raise ShmLost(f"segment {seq} could not be mapped: {exc}") from exc
        except BaseException:
            self._not_mapped(seq)
            raise
        finally:
            os.close(fd)
        if private:
            self._watch_forks()
            self.mapped.add(seq)
        return view

    def _unmapped(self, seq: int) -> None:
        if seq in self.mapped:  # else a child forked meanwhile may map it still: never released
            self.mapped.discard(seq)
            self.released.append(seq)

    def _not_mapped(self, seq: int) -> None:
        """An argument segment this end received (or skipped) and never mapped: free."""
        if not self.parents:
            self.released.append(seq)

    def _watch_forks(self) -> None:
        """A process forked here (by a handler) inherits the argument mappings of that
        moment and may read them after this process let go: those are never released."""
        if not self.watching:
            self.watching = True
            os.register_at_fork(after_in_parent=functools.partial(_forked, weakref.ref(self)))

    def send_releases(self) -> None:
        """Tell the parent which argument segments this worker has unmapped (its end)."""
        while self.released:
            try:
                self.sock.send(_RELEASE + _SEQ.pack(self.released[0]))
            except OSError:  # full, or gone: with the next results, or never
                return
            self.released.pop(0)

    def _receive(self, seq: int) -> int:
        for old in [k for k in self.ahead if k <= seq]:
            fd = self.ahead.pop(old)
            if old == seq:
                return fd
            os.close(fd)
            self._not_mapped(old)
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, _MSG_MAX, 2, _CLOEXEC)
            except (BlockingIOError, InterruptedError) as exc:
                raise ShmLost(f"segment {seq} is not on the side socket") from exc
            except OSError as exc:
                raise ShmLost(f"the side socket failed: {exc}") from exc
            if flags & socket.MSG_CTRUNC:  # the kernel dropped the descriptor: none was free here
                for fd in fds:
                    os.close(fd)
                if len(data) == _SEQ.size:
                    self._not_mapped(_SEQ.unpack(data)[0])
                raise ShmLost(
                    f"segment {seq} arrived without its descriptor: process {os.getpid()} is out of file "
                    "descriptors (close some, or raise `ulimit -n`)"
                )
            if not data and not fds:
                raise ShmLost(f"segment {seq}: the side socket is closed")
            got = self._file(data, fds)
            if got is None:
                continue
            if got == seq:
                return fds[0]
            if got > seq:  # ours never came (its post fell back); this one is a later frame's
                self.ahead[got] = fds[0]
                raise ShmLost(f"segment {seq} is missing")
            os.close(fds[0])  # posted for a frame that was never read (dropped, settled meanwhile)
            self._not_mapped(got)

    def close(self) -> None:
        """Close the socket and every descriptor held (reading nothing: in a forked
        child the socket is still the parent's)."""
        self.let_go()
        for fd in self.ahead.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ahead.clear()
        with contextlib.suppress(OSError):
            self.sock.close()
