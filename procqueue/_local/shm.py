"""Large buffers through shared memory, past the pipes and the collector.

A buffer of `layout.SHM_MIN` bytes and up (a numpy array's data, a bytearray: any
out-of-band pickle buffer) that crosses between the parent and a worker is
copied once into an anonymous memfd, sealed against growing and shrinking,
and handed over on the pair's side socket (SCM_RIGHTS). The frame carries only
its size and sequence number. The receiver maps it: a result shared and
writable (nothing else maps it any more: an ordinary array that outlives the
pool), an argument private (copy on write: the handler's own copy, which
cannot change the caller's array).

A memfd has no name, so nothing is ever left in `/dev/shm`, and a segment in
flight is freed by the kernel with the socket when either process dies. Where
a step fails (no memfd, out of memory or descriptors, the socket full) that
buffer stays in the frame, through the pipes, with one note in the log.
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
from typing import Any

_SEQ = struct.Struct("<Q")
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
        done, n = 0, raw.nbytes
        while done < n:
            done += os.write(fd, raw[done:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_shm(fd: int, size: int, private: bool) -> memoryview:
    """Map a segment received from the other side, after checking it is one: a
    regular file of the announced size, sealed so that nobody can shrink it
    under the mapping (which would turn a read into SIGBUS)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise ShmLost(f"a segment of {size} bytes arrived as {st.st_size} bytes (or not a file)")
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
        raise ShmLost("a segment arrived unsealed")
    return _mapping(fd, size, private)


def _mapping(fd: int, size: int, private: bool) -> memoryview:
    """`size` bytes of `fd`, mapped, as a writable byte view that unmaps itself when
    the last object built on it goes. Not `mmap.mmap`: before Python 3.13 it keeps a
    duplicate of the descriptor open for the mapping's life, one per result array."""
    import ctypes
    import weakref

    libc = _libc()
    flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
    block = (ctypes.c_char * size).from_address(addr)
    # Not at exit: an atexit handler of the user's may still read the array.
    weakref.finalize(block, libc.munmap, addr, size).atexit = False
    return memoryview(block).cast("B")


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
    of the parent's ends of the side sockets, or segments queued on them would stay
    alive as long as that child."""
    for side in list(_live):
        with contextlib.suppress(OSError):
            side.sock.close()
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


class Side:
    """One end of a worker's side socket (a SOCK_SEQPACKET pair): posts segments
    one way and takes them the other, each way numbered from 0. Non-blocking: a
    post that would wait falls back to the frame, and a take finds its segment
    already there, as the sender posts before it writes the frame naming it."""

    def __init__(self, sock: socket.socket, parents: bool = False) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.next_seq = 0
        self.ahead: dict[int, int] = {}  # received past the one asked for: a later frame's
        if parents:  # the parent's end: no child of the parent may keep it
            _live.add(self)

    def post(self, raw: memoryview) -> int | None:
        """Send `raw` as a segment: its sequence number, or None to keep it in the frame."""
        try:
            fd = to_shm(raw)
        except OSError as exc:
            _note_fallback(exc)
            return None
        try:
            socket.send_fds(self.sock, [_SEQ.pack(self.next_seq)], [fd])
        except OSError as exc:  # full (a stopped reader), too many descriptors in flight, gone
            if not isinstance(exc, BlockingIOError | BrokenPipeError | ConnectionError):
                _note_fallback(exc)
            return None
        finally:
            os.close(fd)
        self.next_seq += 1
        return self.next_seq - 1

    def take(self, seq: int, size: int, private: bool) -> memoryview:
        """The segment numbered `seq`, mapped; raises `ShmLost`."""
        fd = self._receive(seq)
        try:
            return map_shm(fd, size, private)
        except (OSError, ValueError) as exc:
            raise ShmLost(f"segment {seq} could not be mapped: {exc}") from exc
        finally:
            os.close(fd)

    def _receive(self, seq: int) -> int:
        for old in [k for k in self.ahead if k <= seq]:
            fd = self.ahead.pop(old)
            if old == seq:
                return fd
            os.close(fd)
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, _SEQ.size + 1, 2, _CLOEXEC)
            except (BlockingIOError, InterruptedError) as exc:
                raise ShmLost(f"segment {seq} is not on the side socket") from exc
            except OSError as exc:
                raise ShmLost(f"the side socket failed: {exc}") from exc
            if flags & socket.MSG_CTRUNC:  # the kernel dropped the descriptor: none was free here
                for fd in fds:
                    os.close(fd)
                raise ShmLost(
                    f"segment {seq} arrived without its descriptor: process {os.getpid()} is out of file "
                    "descriptors (close some, or raise `ulimit -n`)"
                )
            if len(data) != _SEQ.size or len(fds) != 1:  # not what a pool process sends
                for fd in fds:
                    os.close(fd)
                if not data and not fds:
                    raise ShmLost(f"segment {seq}: the side socket is closed")
                continue
            (got,) = _SEQ.unpack(data)
            if got == seq:
                return fds[0]
            if got > seq:  # ours never came (its post fell back); this one is a later frame's
                self.ahead[got] = fds[0]
                raise ShmLost(f"segment {seq} is missing")
            os.close(fds[0])  # posted for a frame that was never read (dropped, settled meanwhile)

    def close(self) -> None:
        for fd in self.ahead.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ahead.clear()
        self.sock.close()
