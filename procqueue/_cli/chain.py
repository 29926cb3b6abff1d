"""`procqueue run A:f B:g C:h`: the records of a file through a chain of stages, restartably.

Where each record goes::

    parent, the pipeline's reader thread       stage 0 workers        stage 1 .. n-2      stage n-1 workers
    read lines / CSV rows; skip what the  ─(seq, line, raw)─► parse, f0(record) ─► f1(value) ... ─► fn(value), encode
    output holds (--resume)                     (seq, line, id, value) ──►                  the output record
                                                                                                 │
    parent, this loop ◄──── (seq, output record) in input order (or as they finish), or an item's error
    both as whole lines ──► the writer thread ──► -o (and the error records to --errors)

Built on the public API only: `pq.Pipeline`, one `pq.Stage` per MODULE:FUNC.
The first stage parses the record as `RecordHandler` does (its line number and
id travel with the value), the last encodes its value as the output record in
the worker, so the parent moves bytes. An item that fails at a stage ends
there; its error (a `pq.StageFailed` in its cause chain names the stage) becomes
an error record with `"stage": {"index", "function"}`; the others go on.

Exactly one record per input line, even after `kill -9`: the parent is the
only writer of the output files (it holds their `flock`, as the collector does
for one stage), and its writer thread appends whole lines to O_APPEND
descriptors. A kill can leave only the last line of a file torn, which
`scan_done` cuts off on --resume before it reads which lines have a record;
a line has a whole record or none, and those with none run again. Bytes
handed to the writer thread are written once: signals raise in the main
thread only, so no exception can cut a write and have it done again.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import procqueue as pq
from procqueue._cli import records as r
from procqueue._cli.records import UsageError
from procqueue._cli.run import (
    SHOWN_FAILURES,
    RunSettings,
    Summary,
    Terminated,
    backend_options,
    check_files,
    failure_text,
    live_view,
    load_and_scan,
    on_input,
    on_sigterm,
    open_records,
    quiet_stdout,
    with_status,
)

FLUSH_EVERY = 0.1  # seconds a finished record waits in the parent, at most, before it is written
FLUSH_AT = 1 << 16  # bytes waiting that wake the writer at once
HOLD_AT_MOST = 1 << 24  # bytes waiting for one file beyond which the run waits for the writer

_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_loads = json.loads


@dataclass
class ChainSettings:
    """`procqueue run` with several MODULE:FUNC: `run` holds every other option
    (`run.target` is the first stage's; `run.workers` is not used)."""

    run: RunSettings
    targets: list[str]
    workers: list[int | None]  # one per target


def stage_workers(counts: tuple[int, ...] | None, stages: int) -> list[int | None]:
    """--workers for each stage: one number for all, or one per stage (UsageError otherwise)."""
    if counts is None:
        return [None] * stages
    if len(counts) == 1:
        return [counts[0]] * stages
    if len(counts) != stages:
        given = ",".join(map(str, counts))
        raise UsageError(
            f"--workers {given} gives {len(counts)} numbers for {stages} stages (MODULE:FUNC arguments): "
            f"give one per stage, in order, or a single number for every stage"
        )
    return list(counts)


# --- in the workers ---------------------------------------------------------------------


@dataclass
class FirstStep:
    """Stage 0: parses the record (as `RecordHandler` does) and calls the first function;
    `(seq, line, id, value)` goes on to the next stage."""

    handler: r.RecordHandler

    def __call__(self, item: tuple[int, int, Any]) -> tuple[int, int, Any, Any]:
        seq, line, raw = item
        h = self.handler
        if isinstance(raw, r.BadInput):  # a row the parent could not cut out: failed here, in its place
            raise r.InvalidRecord(raw.message)
        record = h.record_of(line, raw)
        value = h.fn(record)
        return seq, line, h.ident(record), value


@dataclass
class MiddleStep:
    """A stage between the first and the last: its function gets the previous stage's value."""

    fn: Callable[[Any], Any]

    def __call__(self, item: tuple[int, int, Any, Any]) -> tuple[int, int, Any, Any]:
        seq, line, ident, value = item
        return seq, line, ident, self.fn(value)


@dataclass
class LastStep:
    """The last stage: its function's value becomes the output record, here in the worker."""

    handler: r.RecordHandler  # its `fn` is the last stage's function

    def __call__(self, item: tuple[int, int, Any, Any]) -> tuple[int, bytes]:
        seq, line, ident, value = item
        value = self.handler.fn(value)
        try:
            return seq, f'{{"line": {line}, "id": {_encode(ident)}, "ok": true, "value": {_encode(value)}}}\n'.encode()
        except (TypeError, ValueError):  # as `RecordHandler`: an id that is not JSON is null, a value fails
            return seq, self.handler.careful(line, ident, value)


# --- writing the output -------------------------------------------------------------------


class WriteFailed(Exception):
    """The writer could not write (a full disk, a closed pipe): the run stops."""


class Writer:
    """The output files of a chain, written by a thread of the parent: whole lines
    appended (O_APPEND) at most FLUSH_EVERY seconds after they were added. Holds an
    exclusive `flock` on each file (see `pq.FileOutput.wait_released`). After a
    failed write it writes nothing more: `error` says why."""

    def __init__(self, output: str | None, errors: str | None) -> None:
        self.own: list[int] = []
        try:
            if output is None:
                sys.stdout.flush()
                out = sys.stdout.fileno()
            else:
                out = self._open(output)
            self.fds = [out, self._open(errors) if errors else out]
        except BaseException:
            self._close_fds()
            raise
        self.separate = errors is not None
        self.bufs = [bytearray(), bytearray()]
        self.cv = threading.Condition(threading.Lock())
        self.closing = False
        self.written = 0  # records (lines) written
        self.error: OSError | None = None
        # Started by `start()`, once the pools are: a process that is still single-threaded
        # when its first pool starts gets the quicker forked fork server.
        self.thread = threading.Thread(target=self._loop, name="procqueue-run-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _open(self, path: str) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.own.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another procqueue run is still writing {path!r}; wait for it to end, or stop it first"
            ) from None
        return fd

    def add(self, data: bytes, error: bool) -> None:
        """Whole lines for the output (`error`: for --errors when given); waits while
        HOLD_AT_MOST bytes wait for that file."""
        with self.cv:
            buf = self.bufs[1 if error and self.separate else 0]
            buf.extend(data)  # one C call: a signal cannot land half-way
            if len(buf) >= FLUSH_AT:
                self.cv.notify_all()
                while len(buf) >= HOLD_AT_MOST and self.error is None and not self.closing:
                    self.cv.wait()

    def _loop(self) -> None:
        while True:
            with self.cv:
                if not self.closing and max(map(len, self.bufs)) < FLUSH_AT:
                    self.cv.wait(FLUSH_EVERY)
                bufs, self.bufs = self.bufs, [bytearray(), bytearray()]
                closing = self.closing
                self.cv.notify_all()  # an `add` waiting for room
            for fd, data in zip(self.fds, bufs, strict=True):
                if data and self.error is None:
                    self._write(fd, data)
            if closing:
                return

    def _write(self, fd: int, data: bytearray) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, view[done:])
        except OSError as exc:
            self.error = exc
        self.written += data.count(b"\n", 0, done)  # a record is one line: JSON escapes its newlines

    def close(self) -> None:
        """Write what waits, then close the files."""
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        if self.thread.ident is not None:  # started
            self.thread.join()
        else:
            self._loop()  # never started (no pool came up): writes what waits, in this thread
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self.own:
            os.close(fd)  # releases the lock
        self.own = []


# --- the run ------------------------------------------------------------------------------


class Chain:
    """One `procqueue run` of several stages: checked and set up by the constructor
    (which raises `UsageError` before anything is touched), then `execute()`."""

    def __init__(self, c: ChainSettings) -> None:
        s = self.s = c.run
        self.targets = c.targets
        self.workers = c.workers
        self.summary = Summary()
        self.to_stdout = s.output is None
        self.handed: dict[int, tuple[int, Any]] = {}  # seq -> (line, raw): records in the pipeline
        self.failures = 0
        self.ok = 0
        self.skipped = 0
        self.shown: list[tuple[int, str]] = []  # heap of (-line, text): the failures of the lowest lines
        if len(self.workers) != len(self.targets):
            raise UsageError(f"--workers: {len(self.workers)} numbers for {len(self.targets)} stages")
        if s.priority_field is not None:
            raise UsageError(
                "--priority-field runs one MODULE:FUNC; a chain of stages runs the records in input order "
                "(or as they finish, with --unordered)"
            )
        check_files(s)
        backend_options(s)  # its UsageError now, before anything starts
        with quiet_stdout(self.to_stdout):
            self.fns = [r.load_callable(target, f"stage {i}") for i, target in enumerate(self.targets)]
        self.done = load_and_scan(s, self.to_stdout)

    def quiet_stdout(self) -> contextlib.AbstractContextManager[Any]:
        return quiet_stdout(self.to_stdout)

    def execute(self) -> Summary:
        return on_input(self.s, self._execute)

    def _execute(self, stream: IO[bytes], t0: float) -> Summary:
        s = self.s
        csv_in, header = open_records(s, stream)  # (--priority-field was refused for a chain)
        self.handler = r.RecordHandler(self.fns[0], s.fmt, s.id_field, header)
        self.ordered = s.ordered is not False
        source = csv_in.rows() if csv_in is not None else r.read_lines(stream, s.fmt)
        sm = self.summary
        writer = Writer(s.output, s.errors)
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            old = signal.signal(signal.SIGTERM, on_sigterm)  # stop as on Ctrl-C: what is written stays
        pipe: pq.Pipeline | None = None
        try:
            pipe = pq.Pipeline(*self.stages(header), capacity=s.capacity, **backend_options(s))
            with pipe, self.view(pipe):
                writer.start()
                results = pipe.map(self.items(source), ordered=self.ordered, return_exceptions=True)
                self.drain(results, writer)
        except KeyboardInterrupt:
            sm.interrupted, sm.status = "interrupted (Ctrl-C); run again with --resume to finish", 130
        except Terminated:
            sm.interrupted = "terminated (SIGTERM); run again with --resume to finish"
            sm.status = 128 + signal.SIGTERM
        except WriteFailed:
            pass  # told below, from `writer.error`
        except pq.ProcQueueError as exc:  # a stage's pool broke (its initializer failed, say)
            sm.interrupted = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()  # what was read back is written, even on Ctrl-C
            if main_thread:
                signal.signal(signal.SIGTERM, old)
        stats = pipe.stats() if pipe is not None else []
        sm.failed = self.failures
        sm.first_failures = [text for _, text in sorted(self.shown, reverse=True)]
        sm.errors_in = s.errors or s.output or "the output (stdout)"
        sm.ok, sm.retried = self.ok, sum(st.retried for st in stats)
        sm.skipped, sm.skipped_failed = self.skipped, self.done.failed
        sm.repaired, sm.foreign = self.done.repaired, self.done.foreign
        sm.wall = time.perf_counter() - t0
        written = sm.written = writer.written
        if writer.error is not None:
            if isinstance(writer.error, BrokenPipeError):
                sm.interrupted, sm.status = "the output was closed (broken pipe)", 128 + signal.SIGPIPE
            else:
                error = f"{type(writer.error).__name__}: {writer.error}"
                sm.interrupted = f"could not write the output ({error}); fix that, then run again with --resume"
        elif sm.interrupted is None and written != sm.records:
            sm.interrupted = f"only {written:,} of {sm.records:,} records reached the output; run again with --resume"
        return sm

    def stages(self, header: list[str] | None) -> list[pq.Stage]:
        """A `pq.Stage` per MODULE:FUNC, each with the run's options and its own workers."""
        s = self.s
        last = len(self.fns) - 1
        out = []
        for i, (fn, target, workers) in enumerate(zip(self.fns, self.targets, self.workers, strict=True)):
            step: Callable[[Any], Any]
            if i == 0:
                step = FirstStep(self.handler)
            elif i == last:
                step = LastStep(r.RecordHandler(fn, s.fmt, s.id_field, header))
            else:
                step = MiddleStep(fn)
            stage = pq.Stage(
                step, workers, retries=s.retries, timeout=s.timeout, initializer=r.prepare_worker,
                initargs=(self.to_stdout, s.initializer), max_tasks_per_worker=s.max_tasks_per_worker,
                max_worker_memory=s.max_worker_memory, chunksize=s.chunksize or "auto",
                name=getattr(fn, "__name__", None) or target,
            )  # fmt: skip
            out.append(stage)
        return out

    def view(self, pipe: pq.Pipeline) -> contextlib.AbstractContextManager[Any]:
        return live_view(self.s, self.done, lambda total: pipe.live(total=total))

    def items(self, source: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, int, Any]]:
        """The records to run, `(seq, line, raw)` (on the pipeline's reader thread), each
        also in `handed` until its result is read. `seq` counts them from 0 as the
        pipeline does its items, so a `StageFailed`'s `item` is the `seq` of its record.
        A row the parent cannot cut out goes too: the first stage fails it, in its place."""
        done, handed, sm = self.done, self.handed, self.summary
        seq = 0
        for line, raw in source:
            if line in done:
                self.skipped += 1
                continue
            sm.records += 1
            if isinstance(raw, r.BadInput):
                sm.bad += 1
            handed[seq] = (line, raw)
            yield seq, line, raw
            seq += 1

    def drain(self, results: Iterator[Any], writer: Writer) -> None:
        """Hand each result to the writer: an output record `(seq, bytes)` made by the
        last stage, or the error of a record that failed at some stage."""
        handed = self.handed
        ok = 0
        try:
            for result in results:
                if type(result) is tuple:
                    seq, data = result
                    del handed[seq]
                    writer.add(data, False)
                    ok += 1
                else:
                    self.failed(result, writer)
                if writer.error is not None:
                    raise WriteFailed
        finally:
            self.ok += ok

    def failed(self, exc: BaseException, writer: Writer) -> None:
        """Write the error record of the record that failed for good with `exc`."""
        if isinstance(exc, pq.PoolBroken | pq.PoolClosed):
            raise exc  # not a record's failure: a stage's, which ends the run
        note = stage_of(exc)
        stage: r.Stage
        if note is not None:
            seq, stage = note.item, (note.stage, note.function)
        elif self.ordered and self.handed:  # no note (its type refused one): in order, it is the oldest
            seq, stage = min(self.handed.copy()), (None, None)
        else:
            return  # which record it was is unknown: left for --resume (the summary says one is missing)
        line, raw = self.handed.pop(seq)
        self.failures += 1
        if isinstance(raw, r.BadInput):  # as with one stage: no traceback, and the handler never ran
            type_name, message = "InvalidRecord", raw.message
            record = r.error_record(line, None, type_name, message, "", 0, stage)
        else:
            record, type_name, message = r.failure_record(line, raw, exc, self.handler, stage)
        writer.add(record, True)
        text = failure_text(line, type_name, message)
        if stage[0] is not None:
            text = f"line {line}, stage {stage[0]} ({stage[1]}): " + text.removeprefix(f"line {line}: ")
        shown = self.shown
        if len(shown) < SHOWN_FAILURES:
            heapq.heappush(shown, (-line, text))
        elif line < -shown[0][0]:
            heapq.heapreplace(shown, (-line, text))


def stage_of(exc: BaseException) -> pq.StageFailed | None:
    """The `StageFailed` in `exc`'s cause chain, taken out of it, so that the chain
    is as a single stage's error (the handler's own exception, its `__cause__` a
    `TaskFailed`), which `records.failure_record` reads."""
    prev, seen = exc, set()
    while (cause := prev.__cause__) is not None and id(cause) not in seen:
        if isinstance(cause, pq.StageFailed):
            with contextlib.suppress(Exception):
                prev.__cause__ = cause.__cause__
            return cause
        seen.add(id(prev))
        prev = cause
    return None


def run_chain(settings: ChainSettings) -> tuple[Summary, int]:
    """Run it: the summary and the exit status (0 all ok, 1 some failed, now or in
    the run resumed). Raises `UsageError` before starting anything if the settings cannot work."""
    return with_status(Chain(settings).execute())
