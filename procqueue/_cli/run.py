"""`procqueue run`: map a handler over the records of a file, restartably.

Where each record goes::

    parent (this module)                 workers                       collector
    read lines / CSV rows ──(seq, line, raw)──► parse, call the handler,
    skip what the output holds           encode the output record ──► writes it (seq order when
    (--resume); rows it cannot cut ───── error records, pool.output.write ─► ordered) to -o / stdout;
    and records the map says failed                                    errors to --errors

Built on the public API only: `Pool(output=FileOutput(...))` has the collector
write each task's value, `(seq, line of bytes)`; the map hands the parent None
for each record that went well and, with `return_exceptions=True`, the error
of each that failed for good, which the parent turns into an error record and
hands to the collector with `pool.output.write`. The parent never sees a
value: values go from the workers through the collector to disk. It only
counts, and renders the few error records.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import procqueue as pq
from procqueue._cli import records as r
from procqueue._cli.records import UsageError

LOCK_WAIT = 5.0  # seconds to wait for the collector of a killed run to let go of the output
PRIORITY_BLOCK = 1024  # --priority-field: records read at a time (at most capacity), grouped by priority
MAP_AT_LEAST = 8  # --priority-field: a group this large is a map; a smaller one, a submit per record
WINDOW = 4  # --priority-field: records handed to maps and not yet read back, in multiples of capacity
SHOWN_FAILURES = 5  # failed records the summary names, those of the lowest lines
FAILURE_WIDTH = 100  # characters at most of each


@dataclass
class RunSettings:
    """Everything `procqueue run` was asked to do."""

    target: str
    input: str | None = None  # None: stdin
    output: str | None = None  # None: stdout
    errors: str | None = None
    fmt: str = "jsonl"
    workers: int | None = None
    capacity: int = 1024
    retries: int = 0
    timeout: float | None = None
    priority_field: str | None = None
    ordered: bool | None = None  # None: ordered unless --priority-field
    chunksize: int | None = None
    max_tasks_per_worker: int | None = None
    max_worker_memory: int | None = None
    initializer: str | None = None
    resume: bool = False
    overwrite: bool = False
    id_field: str | None = "id"
    live: bool | None = None  # None: when stderr is a terminal
    backend: str = "local"
    address: str | None = None  # with backend "dask": the scheduler's


@dataclass
class Summary:
    """How a run went, for the closing line and the exit status."""

    records: int = 0  # read and not skipped
    written: int = 0  # records the collector wrote, ok or failed
    ok: int = 0
    failed: int = 0
    bad: int = 0  # of `failed`: input the parent could not cut out
    retried: int = 0
    skipped: int = 0  # already in the output (--resume)
    skipped_failed: int = 0  # of `skipped`: error records
    repaired: int = 0  # bytes of a torn last line cut off the output
    foreign: int = 0  # lines in the output that are not records
    wall: float = 0.0
    interrupted: str | None = None
    status: int = 0  # the exit status: 0 all ok, 1 some failed or stopped early, 128+N on signal N
    first_failures: list[str] = field(default_factory=list)  # `line N: ...` of the lowest lines that failed
    errors_in: str = "the output"  # where the error records go, as the summary names it

    def line(self) -> str:
        rate = self.records / self.wall if self.wall > 0 else 0.0
        text = (
            f"procqueue run: {self.records:,} records in {self.wall:.2f} s ({rate:,.0f} records/s): "
            f"{self.ok:,} ok, {self.failed:,} failed"
        )
        if self.bad:
            text += f" ({self.bad:,} rejected before running)"
        text += f", {self.retried:,} retried"
        if self.skipped:
            text += f"; {self.skipped:,} skipped, already in the output"
            if self.skipped_failed:
                text += f" ({self.skipped_failed:,} of them failed)"
        if self.repaired:
            text += f"; cut a torn last line ({self.repaired} bytes) off the output first"
        if self.foreign:
            text += f"; {self.foreign:,} lines in the output are not records (left as they are)"
        if self.interrupted:
            text += f"; stopped early with {self.records - self.written:,} not written: {self.interrupted}"
        return text

    def report(self) -> str:
        """The closing line, then the first few records that failed (one line each)
        and where all of them are."""
        lines = [self.line()]
        lines += [f"  {text}" for text in self.first_failures]
        more = self.failed - len(self.first_failures)
        if more > 0:
            lines.append(f"  ... and {more:,} more; see the error records in {self.errors_in}")
        elif self.failed:
            lines.append(f"  see the error records in {self.errors_in}")
        return "\n".join(lines)


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so that the pool is ended at once, as on Ctrl-C)."""


class Run:
    """One `procqueue run`: checked and set up by the constructor (which raises
    `UsageError` before anything is touched), then `execute()`."""

    def __init__(self, s: RunSettings) -> None:
        self.s = s
        self.summary = Summary()
        self.pending: list[tuple[int, bytes]] = []  # error records `(seq, line)` for the collector
        self.handed: deque[tuple[int, int, Any]] = deque()  # records in the map whose result is not read yet
        self.to_stdout = s.output is None
        self.failures = 0  # records that failed for good (read from the map)
        self.shown: list[tuple[int, str]] = []  # heap of (-line, text): the failures of the lowest lines
        self.skipped = 0
        self.check_files()
        with quiet_stdout(self.to_stdout):
            self.fn = r.load_callable(s.target, "handler")
        self.done = load_and_scan(s, self.to_stdout)

    def quiet_stdout(self) -> contextlib.AbstractContextManager[Any]:
        return quiet_stdout(self.to_stdout)

    def check_files(self) -> None:
        check_files(self.s)

    # --- the run ------------------------------------------------------------------

    def execute(self) -> Summary:
        return on_input(self.s, self._execute)

    def _execute(self, stream: IO[bytes], t0: float) -> Summary:
        s = self.s
        csv_in, header = open_records(s, stream)
        self.handler = r.RecordHandler(self.fn, s.fmt, s.id_field, header)
        ordered = s.ordered if s.ordered is not None else s.priority_field is None
        output = pq.FileOutput(s.output, s.errors, ordered, sys.stdout.fileno() if self.to_stdout else None)
        pool = pq.Pool(
            s.workers, s.capacity, max_retries=s.retries, task_timeout=s.timeout,
            max_tasks_per_worker=s.max_tasks_per_worker, max_worker_memory=s.max_worker_memory,
            initializer=r.prepare_worker, initargs=(self.to_stdout, s.initializer), output=output,
            **backend_options(s),
        )  # fmt: skip
        out = pool.output
        assert out is not None  # a pool made with output= has its handle
        source = csv_in.rows() if csv_in is not None else r.read_lines(stream, s.fmt)
        items = self.items(source, header)
        sm = self.summary
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            old = signal.signal(signal.SIGTERM, on_sigterm)  # stop as on Ctrl-C: what is written stays
        try:
            with pool, self.view(pool):
                if s.priority_field is None:
                    self.by_map(pool, items)
                else:
                    self.by_priority(pool, items)
                self.flush(out)
        except KeyboardInterrupt:
            sm.interrupted, sm.status = "interrupted (Ctrl-C); run again with --resume to finish", 130
        except Terminated:
            sm.interrupted = "terminated (SIGTERM); run again with --resume to finish"
            sm.status = 128 + signal.SIGTERM
        except pq.ProcQueueError as exc:  # the pool broke (its initializer failed, say): the map raised it
            sm.interrupted = f"{type(exc).__name__}: {exc}"
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, old)
        stats = pool.stats()
        sm.failed = self.failures + sm.bad
        sm.first_failures = [text for _, text in sorted(self.shown, reverse=True)]
        sm.errors_in = s.errors or s.output or "the output (stdout)"
        sm.ok, sm.retried = stats.completed, stats.retried
        sm.skipped, sm.skipped_failed = self.skipped, self.done.failed
        sm.repaired, sm.foreign = self.done.repaired, self.done.foreign
        sm.wall = time.perf_counter() - t0
        status = out.status()
        written = sm.written = status.written
        if status.error is not None:
            if status.broken_pipe:
                sm.interrupted, sm.status = "the output was closed (broken pipe)", 128 + signal.SIGPIPE
            else:
                sm.interrupted = f"could not write the output ({status.error}); fix that, then run again with --resume"
        elif sm.interrupted is None and written != sm.records:
            sm.interrupted = f"only {written:,} of {sm.records:,} records reached the output; run again with --resume"
        return sm

    def view(self, pool: pq.Pool) -> contextlib.AbstractContextManager[Any]:
        return live_view(self.s, self.done, lambda total: pool.live(total=total, title=f"run {self.s.target}"))

    def items(self, source: Iterator[tuple[int, Any]], header: list[str] | None) -> Iterator[Any]:
        """The records to run: `(seq, line, raw)`, each also put in `handed` (to pair
        with its result), or with --priority-field `((seq, line, raw), priority)`.
        What cannot be cut out becomes an error record here."""
        done = self.done
        handed = self.handed
        prio = self.priority_of(header) if self.s.priority_field else None
        seq = 0
        for line, raw in source:
            if line in done:
                self.skipped += 1
                continue
            self.summary.records += 1
            if isinstance(raw, r.BadInput):
                self.reject(seq, line, raw.message, None)
            elif prio is None:
                item = (seq, line, raw)
                handed.append(item)
                yield item
            else:
                p = prio(line, raw)
                if isinstance(p, str):
                    self.reject(seq, line, p, self.handler.ident_of_raw(raw))
                else:
                    yield (seq, line, raw), p
            seq += 1

    def reject(self, seq: int, line: int, message: str, ident: Any) -> None:
        self.summary.bad += 1
        self.pending.append((seq, r.error_record(line, ident, "InvalidRecord", message, "", 0)))
        self.note_failure(line, "InvalidRecord", message)

    def priority_of(self, header: list[str] | None) -> Callable[[int, Any], int | str]:
        """A record's priority from its field (0 without one), or the message of why not."""
        name = self.s.priority_field
        assert name is not None
        col = header.index(name) if header is not None else None

        def get(line: int, raw: Any) -> int | str:
            if col is not None:
                value: Any = raw[col]
            else:
                try:
                    record = json.loads(raw)
                except ValueError:
                    return 0  # the worker fails it, naming the line, as without --priority-field
                value = record.get(name) if isinstance(record, dict) else None
            if value is None or value == "":
                return 0
            try:
                if isinstance(value, bool | float):
                    raise ValueError
                return int(value)
            except (TypeError, ValueError):
                shown = json.dumps(value) if col is None else repr(value)
                return f"line {line}: the priority field {name!r} must be an integer, not {shown}"

        return get

    def by_map(self, pool: pq.Pool, items: Iterator[Any]) -> None:
        """Map over the records. Ordered even when the output is not (the collector
        orders the file, or not): so each result pairs with the oldest record in
        `handed`, which `items()` put there as the map pulled it."""
        results: Iterator[Any] = pool.map(self.handler, items, chunksize=self.s.chunksize, return_exceptions=True)
        out, handed, pending = pool.output, self.handed, self.pending
        assert out is not None
        for result in results:  # None: the value went to disk; else the error of a record that failed for good
            item = handed.popleft()
            if result is not None:
                self.failed(item, result)
            if pending:
                self.flush(out)

    def by_priority(self, pool: pq.Pool, items: Iterator[Any]) -> None:
        """Records in blocks, each block's records grouped by priority, each group
        run at its priority (`_run_group`): dispatch by priority at the cost of a
        map rather than of a submit each. At most WINDOW * capacity records are
        queued and not read back; to make room, the group the pool runs first
        (the highest priority, then the oldest) is read, waiting for it: a
        failure's record is written about when its group ends, urgent ones early."""
        out = pool.output
        assert out is not None
        queued: list[tuple[int, int, Iterator[Any], list[Any]]] = []  # heap of (-priority, order, results, records)
        order = itertools.count()
        held, limit = 0, WINDOW * self.s.capacity
        block = max(1, min(PRIORITY_BLOCK, self.s.capacity))
        chunksize = self.s.chunksize
        while group := list(itertools.islice(items, block)):
            by_priority: dict[int, list[Any]] = {}
            for item, p in group:
                by_priority.setdefault(p, []).append(item)
            for p in sorted(by_priority, reverse=True):  # the most urgent first, while workers wait
                records = by_priority[p]
                results = _run_group(pool.options(priority=p), self.handler, records, chunksize)
                heapq.heappush(queued, (-p, next(order), results, records))
                held += len(records)
            if self.pending:
                self.flush(out)
            while held > limit:
                _, _, results, records = heapq.heappop(queued)
                self.read_back(out, results, records)
                held -= len(records)
        while queued:
            _, _, results, records = heapq.heappop(queued)
            self.read_back(out, results, records)

    def read_back(self, out: pq.OutputHandle, results: Iterator[Any], records: list[Any]) -> None:
        """Wait for a group's results (None, or the error of a record that failed for
        good), in order, making the error records of the failures."""
        pending = self.pending
        for result, item in zip(results, records, strict=True):
            if result is not None:
                self.failed(item, result)
            if pending:
                self.flush(out)

    def failed(self, item: tuple[int, int, Any], exc: BaseException) -> None:
        """Record `item`, which failed for good with `exc`; sent with the next `flush`."""
        if isinstance(exc, pq.PoolBroken | pq.PoolClosed):
            raise exc  # not this record's failure: the pool's, which ends the run
        seq, line, raw = item
        self.failures += 1
        record, type_name, message = r.failure_record(line, raw, exc, self.handler)
        self.note_failure(line, type_name, message)
        self.pending.append((seq, record))

    def note_failure(self, line: int, type_name: str, message: str) -> None:
        """Keep the failure for the summary if its line is among the lowest that failed."""
        shown = self.shown
        if len(shown) < SHOWN_FAILURES:
            heapq.heappush(shown, (-line, failure_text(line, type_name, message)))
        elif line < -shown[0][0]:
            heapq.heapreplace(shown, (-line, failure_text(line, type_name, message)))

    def flush(self, out: pq.OutputHandle) -> None:
        """Hand the error records made so far to the collector, to --errors when given.
        (Without it they go in the output as values do: `errors=False`, so that the
        collector writes them in their place when ordered.)"""
        pending = self.pending
        if pending:
            records = pending[:]
            pending.clear()
            out.write(records, errors=self.s.errors is not None)


def _run_group(opts: pq.Options, handler: r.RecordHandler, records: list[Any], chunksize: int | None) -> Iterator[Any]:
    """Run `records` at `opts`' priority; as it is read, None or the error of each, in order.
    A map costs the parent about as much as 7 submits, and its batches hold its own records
    only, so a group smaller than MAP_AT_LEAST is a submit per record (those batch together
    across priorities)."""
    if len(records) < MAP_AT_LEAST:
        futures = [opts.submit(handler, item) for item in records]
        return (future.exception() for future in futures)
    # Over an iterator, not the list: the pool sizes its batches by the records' cost alone
    # (a list it also cuts in four per worker, to even its tail: here, 3x as many batches for
    # trivial records). A group is at most `capacity` records: the map pulls it all at once.
    return opts.map(handler, iter(records), chunksize=chunksize, return_exceptions=True)


def check_files(s: RunSettings) -> None:
    """UsageError if the input, the output or the errors file cannot be used as `s` asks
    (nothing is touched)."""
    if s.input is not None:
        if os.path.isdir(s.input):
            raise UsageError(f"the input {s.input!r} is a directory; give a file")
        if not os.access(s.input, os.R_OK):
            raise UsageError(f"cannot read the input {s.input!r}")
    if s.resume and s.output is None:
        raise UsageError("--resume needs the output file of the earlier run: add -o FILE")
    if s.resume and s.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pick one")
    outputs = [p for p in (s.output, s.errors) if p]
    if s.output and s.errors and _same_path(s.output, s.errors):
        raise UsageError("-o and --errors name the same file; leave out --errors to keep failures in the output")
    if s.input is not None and any(_same_path(s.input, p) for p in outputs):
        raise UsageError("the output would overwrite the input: choose another -o / --errors file")
    for path in outputs:
        if os.path.isdir(path):
            raise UsageError(f"{path!r} is a directory; give a file name for the records")
        if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise UsageError(f"cannot write {path!r}: its directory is missing or not writable")
        if not pq.FileOutput.wait_released(path, LOCK_WAIT):
            raise UsageError(f"another procqueue run is still writing {path!r}; wait for it to end, or stop it first")
        if not s.resume and not s.overwrite and os.path.exists(path) and os.path.getsize(path) > 0:
            raise UsageError(
                f"{path!r} already holds records; add --resume to finish that run, or --overwrite to start over"
            )


def quiet_stdout(to_stdout: bool) -> contextlib.AbstractContextManager[Any]:
    """When the records go to stdout, what user code prints goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext()


def load_and_scan(s: RunSettings, to_stdout: bool) -> r.Done:
    """Check that --initializer loads (the workers load it again, by name), then, with
    --resume, which input lines the output files hold a record of already."""
    if s.initializer:
        with quiet_stdout(to_stdout):
            r.load_callable(s.initializer, "--initializer")
    done = r.Done(bytearray())
    if s.resume:
        for path in (s.output, s.errors):
            if path:
                r.scan_done(path, done)
    return done


def live_view(
    s: RunSettings, done: r.Done, make: Callable[[int | None], contextlib.AbstractContextManager[Any]]
) -> contextlib.AbstractContextManager[Any]:
    """`make(total)`, the live view, with --live (default: when stderr is a terminal); the
    total is the lines of a regular input file not done yet (a pipe cannot be read twice)."""
    live = s.live if s.live is not None else sys.stderr.isatty()
    if not live:
        return contextlib.nullcontext()
    total = None
    if s.input is not None and s.fmt != "csv" and stat.S_ISREG(os.stat(s.input).st_mode):
        total = max(0, r.count_lines(s.input) - done.records)
    return make(total)


def on_input(s: RunSettings, execute: Callable[[IO[bytes], float], Summary]) -> Summary:
    """`execute(stream, started)` on the input file (or stdin), closed after."""
    t0 = time.perf_counter()
    stream: IO[bytes] = open(s.input, "rb") if s.input is not None else sys.stdin.buffer  # noqa: SIM115
    try:
        return execute(stream, t0)
    finally:
        if s.input is not None:
            stream.close()


def open_records(s: RunSettings, stream: IO[bytes]) -> tuple[r.CsvInput | None, list[str] | None]:
    """The CSV reader (and its header) or None for lines; checks the fields named exist,
    then empties the output files with --overwrite (only now is anything touched)."""
    csv_in = r.CsvInput(stream) if s.fmt == "csv" else None
    header = csv_in.header if csv_in is not None else None
    if header is not None:
        for name, what in ((s.priority_field, "--priority-field"), (s.id_field, "--id-field")):
            if name is not None and name not in header and (what != "--id-field" or name != "id"):
                raise UsageError(f"{what} {name!r} is not a column of the CSV; its header is {header}")
    if s.input is None and sys.stdin.isatty():
        print("procqueue run: reading records from the terminal; end with Ctrl-D, or give -i FILE", file=sys.stderr)
    if s.overwrite:
        for path in (s.output, s.errors):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.truncate(path, 0)
    return csv_in, header


def backend_options(s: RunSettings) -> dict[str, Any]:
    """`Pool` keywords for --backend / --address (UsageError where they do not fit)."""
    if s.backend != "dask":
        if s.address is not None:
            raise UsageError("--address needs --backend dask")
        return {}
    if s.max_tasks_per_worker is not None or s.max_worker_memory is not None:
        raise UsageError(
            "--max-tasks-per-worker and --max-worker-memory are for --backend local; on Dask a worker's limits are its nanny's"
        )
    return {"backend": "dask", "address": s.address}


def failure_text(line: int, type_name: str, message: str) -> str:
    """A failed record in one line of the summary: `line 9: ValueError: boom`, or for
    input that could not be read, `line 4: not valid JSON: ...` (its message names the line)."""
    if type_name == "InvalidRecord":
        for prefix in (f"line {line}: ", f"line {line} is ", f"line {line} "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
                break
        head = f"line {line}: "
    else:
        head = f"line {line}: {type_name}: "
    text = _one_line(message, max(20, FAILURE_WIDTH - len(head)))
    return head + text if text else f"line {line}: {type_name}"


def _one_line(text: str, width: int) -> str:
    """The first line of `text` that is not blank, at most `width` characters (cut
    to `...` when there is more); characters a terminal would act on (escapes,
    tabs, lone surrogates) are shown escaped."""
    lines = text[: 4 * width].split("\n")  # a message may be megabytes
    at = next((i for i, part in enumerate(lines) if part.strip()), len(lines))
    if at == len(lines):
        return ""
    first = "".join(c if c.isprintable() else repr(c)[1:-1] for c in lines[at].strip())
    if len(first) > width or any(part.strip() for part in lines[at + 1 :]) or len(text) > 4 * width:
        first = first[: width - 3].rstrip() + "..."
    return first


def on_sigterm(signum: int, frame: object) -> None:
    """The SIGTERM handler of a run (one stage or several): stop as on Ctrl-C."""
    raise Terminated


def _same_path(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def run(settings: RunSettings) -> tuple[Summary, int]:
    """Run it: the summary and the exit status (0 all ok, 1 some failed, now or in
    the run resumed). Raises `UsageError` before starting anything if the settings cannot work."""
    return with_status(Run(settings).execute())


def with_status(summary: Summary) -> tuple[Summary, int]:
    """The summary and the run's exit status: 1 when a record failed (now or in the run
    resumed) or the run stopped early, unless a signal's status was set already."""
    if not summary.status and (summary.failed or summary.skipped_failed or summary.interrupted):
        summary.status = 1
    return summary, summary.status
