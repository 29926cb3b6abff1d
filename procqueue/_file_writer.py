"""Writing a `FileOutput`: on the local backend the collector process does it,
so values go from the workers to disk without passing through the parent; on
the Dask backend a writer thread in the parent does (`procqueue/_dask/output.py`).

Each value a worker returns for the output is `(seq, line)`: `line` is whole
lines of bytes, `seq` the record's place in the input (0, 1, 2, ... over every
record of the run). The parent's own records (errors) come as `OutputRecords`. Every write is whole lines in one `write()` on an O_APPEND
descriptor, so a reader never sees a record cut short unless the writer was
killed inside a write (`procqueue run --resume` repairs that tail).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

OUTPUT, ERRORS = 0, 1


@dataclass(frozen=True)
class OutputSpec:
    """Where the collector writes: `output` (target 0), `errors` (target 1, or
    the output when None), in input order (`ordered`) or as records come."""

    output: str | None
    errors: str | None = None
    ordered: bool = True
    stream: Any = None  # instead of `output`: a `Connection` on stdout (descriptors reach the collector so)


class FileWriter:
    """Writes records to their files, in `seq` order when ordered. After a failed
    write (disk full, a closed pipe) it writes nothing more: `error` says why."""

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec
        self.written = 0  # records
        self.error: OSError | None = None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        out = spec.stream.fileno() if spec.output is None else os.open(spec.output, flags, 0o644)
        self.fds = [out, os.open(spec.errors, flags, 0o644) if spec.errors else out]
        for fd, path in zip(self.fds, (spec.output, spec.errors), strict=True):
            if path is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while we write: see `FileOutput.wait_released`
        self.next = 0  # ordered: the seq to write next
        self.held: dict[int, tuple[int, bytes]] = {}  # ordered: records waiting for an earlier one

    def add(self, records: Iterable[tuple[int, int, bytes]]) -> None:
        if not self.spec.ordered:
            self._write(records)
            return
        held = self.held
        if not held:  # most batches come in order: write what is next, hold the rest
            records = list(records)
            i = 0
            for seq, _, _ in records:
                if seq != self.next + i:
                    break
                i += 1
            if i:
                self.next += i
                self._write(records[:i])
                records = records[i:]
        for seq, target, line in records:
            held[seq] = (target, line)
        ready = []
        while self.next in held:
            ready.append((self.next, *held.pop(self.next)))
            self.next += 1
        self._write(ready)

    def close(self) -> None:
        """Write what is still held (the run ended early: gaps are for `--resume`), then close."""
        self._write((seq, *self.held.pop(seq)) for seq in sorted(self.held))
        for fd in set(self.fds):
            if self.spec.stream is None or fd != self.spec.stream.fileno():
                os.close(fd)
        self.fds = []

    def _write(self, records: Iterable[tuple[int, int, bytes]]) -> None:
        if self.error is not None:
            return
        if self.fds[0] == self.fds[1]:  # one file: in the order given, which is `seq` order when ordered
            lines = [line for _, _, line in records]
            self._write_lines(self.fds[0], lines)
            return
        parts: tuple[list[bytes], list[bytes]] = ([], [])
        for _, target, line in records:
            parts[target].append(line)
        for target, lines in enumerate(parts):
            self._write_lines(self.fds[target], lines)

    def _write_lines(self, fd: int, lines: list[bytes]) -> None:
        if lines and self.error is None:
            try:
                _write_all(fd, b"".join(lines))
            except OSError as exc:
                self.error = exc
                return
            self.written += len(lines)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
