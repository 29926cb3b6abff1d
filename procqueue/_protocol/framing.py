"""Framing: how a message (`messages.py`) travels as bytes, and how a reader
that trusts no one takes frames apart.

A frame is the length prefix `multiprocessing.connection` uses, then a 4-byte
header length, the pickled header and an optional body of raw bytes.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

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
            import hmac  # here: only the collector checks tokens, and hmac loads OpenSSL (~3 ms of a pool's start)

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
