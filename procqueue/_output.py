"""Values to files instead of back to the parent: `FileOutput`, the extension
point `procqueue run` is built on.

With `Pool(output=FileOutput(...))` every task's handler returns
`(seq, data)`: `seq` its record's place in the input (0, 1, 2, ... over every
record the pool will write) and `data` whole lines of bytes. The collector
process writes `data` to the file, in `seq` order when `ordered`, so the
values never pass through the parent; the future or map yields None for each.
The parent adds records of its own (failures, say) with `OutputHandle.write`.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FileOutput:
    """Where the pool writes its tasks' values (see the module docstring).

    `path` is opened for appending (created 0o644) and locked while the pool
    writes it; `fd` instead writes to an open descriptor (stdout, a pipe),
    which the pool duplicates. `errors` takes the records the parent writes
    with `errors=True` (the output itself when None). A record is written whole,
    in one `write()`, so a reader never sees half of one unless the writer was
    killed inside it.
    """

    path: str | None = None
    errors: str | None = None
    ordered: bool = True
    fd: int | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.fd is None):
            raise ValueError("FileOutput needs exactly one of path= and fd=")

    @staticmethod
    def wait_released(path: str, timeout: float = 5.0) -> bool:
        """Whether no pool is writing `path` (a pool holds an exclusive `flock` on its
        output while it writes), waiting up to `timeout` seconds for one that is
        ending, e.g. of a run just killed. False if one still is."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        deadline = time.monotonic() + timeout
        try:
            while not _try_lock(fd):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            return True
        finally:
            os.close(fd)  # releases the lock


@dataclass(frozen=True)
class OutputStatus:
    """How the writing goes: records `written` so far (values and the parent's
    own), and the `error` that stopped it (`broken_pipe` when the reader went away)."""

    written: int
    error: str | None = None
    broken_pipe: bool = False


class OutputHandle:
    """A pool's `FileOutput` while it runs: `pool.output`."""

    def __init__(
        self,
        send: Callable[[list[tuple[int, int, bytes]]], None],
        status: Callable[[], OutputStatus],
        check_open: Callable[[], None],
    ) -> None:
        self._send = send
        self._status = status
        self._check_open = check_open

    def write(self, records: Iterable[tuple[int, bytes]], *, errors: bool = True) -> None:
        """Have the collector write `(seq, data)` records made in the parent (to the
        `errors` file when `errors` and there is one). Never blocks; safe from any thread.
        Raises `PoolClosed` once the pool has ended (`PoolBroken` if it broke): nothing
        could write them any more."""
        self._check_open()
        target = 1 if errors else 0
        self._send([(seq, target, data) for seq, data in records])

    def status(self) -> OutputStatus:
        """Records written so far, and the error that stopped the writing, if any."""
        return self._status()


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
