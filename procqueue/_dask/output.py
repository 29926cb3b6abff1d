"""A `FileOutput` on the Dask backend: there is no collector process, so a
writer thread in the parent writes the values. They arrive pickled (each
task's `(seq, data)`) and are unpickled on this thread, never on the loop's,
so a value that is slow to unpickle holds up only the file."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from procqueue._errors import PoolBroken
from procqueue._file_writer import OUTPUT, FileWriter, OutputSpec
from procqueue._output import OutputStatus
from procqueue._protocol.pickling import loads_body

_END = object()


class ParentWriter:
    """Writes values and the parent's own records, in `seq` order when ordered."""

    def __init__(self, spec: OutputSpec, broken: Callable[[PoolBroken], None]) -> None:
        self.writer = FileWriter(spec)  # opens and locks the files now: a bad path fails the pool's start
        self.broken = broken
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="procqueue-output", daemon=True)
        self.thread.start()

    def values(self, body: bytes) -> None:
        """A batch's pickled values (a list, None where a task failed)."""
        self.inbox.put(body)

    def records(self, records: list[tuple[int, int, bytes]]) -> None:
        """The parent's own records: `(seq, target, data)`."""
        self.inbox.put(records)

    def status(self) -> OutputStatus:
        error = self.writer.error
        return OutputStatus(
            self.writer.written,
            None if error is None else f"{type(error).__name__}: {error}",
            isinstance(error, BrokenPipeError),
        )

    def close(self) -> None:
        """Write what is queued, then close the files."""
        self.inbox.put(_END)
        self.thread.join()
        stream = self.writer.spec.stream
        if stream is not None:
            stream.close()

    def _run(self) -> None:
        writer = self.writer
        reported = False
        while (item := self.inbox.get()) is not _END:
            if isinstance(item, bytes):
                try:
                    values = loads_body(item)
                    writer.add((v[0], OUTPUT, v[1]) for v in values if v is not None)
                except Exception:
                    continue
            elif isinstance(item, list):
                writer.add(item)
            if writer.error is not None and not reported:
                reported = True
                self.broken(PoolBroken(f"the output could not be written: {self.status().error}"))
        writer.close()
