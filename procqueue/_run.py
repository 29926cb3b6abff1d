"""`procqueue run`: map a handler over the records of a file, restartably.

Where each record goes::

    parent (this module)                 workers                       collector
    read lines / CSV rows ──(seq, line, raw)──► parse, call the handler,
    skip what the output holds           encode the output record ──► writes it (seq order when
    (--resume); rows it cannot cut ──────── error records, as SinkRecords ─► ordered) to -o / stdout;
    and tasks that failed for good                                     errors to --errors

The parent never sees a value: values go from the workers through the
collector to disk. It only counts, and renders the few error records.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from multiprocessing import connection
from pathlib import Path
from typing import IO, Any

from . import _records as r
from ._errors import ProcQueueError
from ._pool import Future, Options, Pool
from ._sink import ERRORS, OUTPUT, SinkSpec, wait_unlocked

LOCK_WAIT = 5.0  # seconds to wait for the collector of a killed run to let go of the output
WINDOW = 4  # --priority-field: futures outstanding, in multiples of capacity


class UsageError(Exception):
    """What the user must fix before the run can start (exit status 2)."""


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


@dataclass
class Summary:
    """How a run went, for the closing line and the exit status."""

    records: int = 0  # read and not skipped
    ok: int = 0
    failed: int = 0
    bad: int = 0  # of `failed`: input the parent could not cut out
    retried: int = 0
    skipped: int = 0  # already in the output (--resume)
    wall: float = 0.0
    interrupted: str | None = None
    status: int = 0  # the exit status: 0 all ok, 1 some failed or stopped early, 130 Ctrl-C

    def line(self) -> str:
        rate = self.records / self.wall if self.wall > 0 else 0.0
        text = (
            f"procqueue run: {self.records:,} records in {self.wall:.2f} s ({rate:,.0f} records/s): "
            f"{self.ok:,} ok, {self.failed:,} failed"
        )
        if self.bad:
            text += f" ({self.bad:,} unreadable)"
        text += f", {self.retried:,} retried"
        if self.skipped:
            text += f"; {self.skipped:,} skipped, already in the output"
        if self.interrupted:
            unfinished = self.records - self.ok - self.failed
            text += f"; stopped early, {unfinished:,} unfinished: {self.interrupted}"
        return text


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """`package.module:func` or `path/to/file.py:func`, imported here (and by
    reference in the workers, which get the same `sys.path`)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {spec!r} is not MODULE:FUNC or path/to/file.py:FUNC (e.g. mymodule:handle)")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"{what}: no file {module_name!r} (from {os.getcwd()})")
        directory, module_name = str(path.resolve().parent), path.stem
    else:
        directory = os.getcwd()  # as `python -m` does: modules beside you import
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"{what}: could not import {module_name!r}: {type(exc).__name__}: {exc} "
            "(run from the directory that holds it, or add it to PYTHONPATH)"
        ) from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise UsageError(f"{what}: module {module_name!r} ({module.__file__}) has no attribute {attr!r}")
    if not callable(fn):
        raise UsageError(f"{what}: {spec} is a {type(fn).__name__}, not a function")
    return fn  # type: ignore[no-any-return]


class Run:
    """One `procqueue run`: set up with `RunSettings`, then `execute()`."""

    def __init__(self, s: RunSettings) -> None:
        self.s = s
        self.summary = Summary()
        self.pending: deque[tuple[int, int, bytes]] = deque()  # error records for the collector
        self.target = ERRORS if s.errors else OUTPUT
        self.failures = 0  # tasks that failed for good (counted by the pool's hook)
        self.lock = threading.Lock()
        self.check_files()
        self.fn = load_callable(s.target, "handler")
        self.init = load_callable(s.initializer, "--initializer") if s.initializer else None
        self.done = r.Done(bytearray())
        if s.resume:
            for path in (s.output, s.errors):
                if path:
                    r.scan_done(path, self.done)

    def check_files(self) -> None:
        s = self.s
        if s.input is not None and not os.access(s.input, os.R_OK):
            raise UsageError(f"cannot read the input {s.input!r}")
        if s.resume and s.output is None:
            raise UsageError("--resume needs the output file of the earlier run: add -o FILE")
        if s.resume and s.overwrite:
            raise UsageError("--resume and --overwrite contradict each other: pick one")
        outputs = [p for p in (s.output, s.errors) if p]
        if s.input is not None and any(_same_file(s.input, p) for p in outputs):
            raise UsageError("the output would overwrite the input: choose another -o / --errors file")
        for path in outputs:
            if not wait_unlocked(path, LOCK_WAIT):
                raise UsageError(
                    f"another procqueue run is still writing {path!r}; wait for it to end, or stop it first"
                )
            if s.overwrite:
                with contextlib.suppress(FileNotFoundError):
                    os.truncate(path, 0)
            elif not s.resume and os.path.exists(path) and os.path.getsize(path) > 0:
                raise UsageError(
                    f"{path!r} already holds records; add --resume to finish that run, or --overwrite to start over"
                )
            parent = os.path.dirname(os.path.abspath(path))
            if not os.access(parent, os.W_OK):
                raise UsageError(f"cannot write {path!r}: its directory is not writable")

    # --- the run ------------------------------------------------------------------

    def execute(self) -> Summary:
        s = self.s
        t0 = time.perf_counter()
        stream: IO[bytes] = open(s.input, "rb") if s.input is not None else sys.stdin.buffer  # noqa: SIM115
        header = None
        csv_reader = None
        if s.fmt == "csv":
            csv_reader, header = r.csv_header(r.text_of(stream))
        self.handler = r.RecordHandler(self.fn, s.fmt, s.id_field, header)
        out_stream = None if s.output else connection.Connection(os.dup(sys.stdout.fileno()), readable=False)
        ordered = s.ordered if s.ordered is not None else s.priority_field is None
        spec = SinkSpec(s.output, s.errors, ordered, out_stream)
        pool = Pool(
            s.workers, s.capacity, max_retries=s.retries, task_timeout=s.timeout,
            max_tasks_per_worker=s.max_tasks_per_worker, max_worker_memory=s.max_worker_memory,
            initializer=r.prepare_worker, initargs=(out_stream is not None, self.init), _sink=spec,
        )  # fmt: skip
        if out_stream is not None:
            out_stream.close()  # the collector holds its own copy
        pool._engine.on_final_failure = self.on_final_failure
        items = self.items(stream, csv_reader, header)
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            old = signal.signal(signal.SIGTERM, _terminated)  # stop as on Ctrl-C: what is written stays
        try:
            with pool, self.view(pool):
                if s.priority_field is None:
                    self.by_map(pool, items, ordered)
                else:
                    self.by_priority(pool, items)
                self.flush(pool)
        except KeyboardInterrupt:
            self.summary.interrupted = "interrupted (Ctrl-C); run again with --resume to finish"
            self.summary.status = 130
        except Terminated:
            self.summary.interrupted = "terminated (SIGTERM); run again with --resume to finish"
            self.summary.status = 128 + signal.SIGTERM
        except ProcQueueError as exc:
            self.summary.interrupted = f"{type(exc).__name__}: {exc}"
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, old)
            if stream is not sys.stdin.buffer:
                stream.close()
        stats = pool.stats()
        sm = self.summary
        sm.failed = self.failures + sm.bad
        sm.ok = stats.completed
        sm.retried = stats.retried
        sm.skipped = self.skipped
        sm.wall = time.perf_counter() - t0
        return sm

    def view(self, pool: Pool) -> Any:
        s = self.s
        live = s.live if s.live is not None else sys.stderr.isatty()
        if not live:
            return contextlib.nullcontext()
        total = None
        if s.input is not None and s.fmt != "csv":
            total = max(0, r.count_lines(s.input) - self.done.records)
        return pool.live(total=total, title=f"run {s.target}")

    def items(self, stream: IO[bytes], csv_reader: Any, header: list[str] | None) -> Iterator[Any]:
        """The records to run: `(seq, line, raw)`, or with --priority-field
        `((seq, line, raw), priority)`. What cannot be cut out becomes an error record here."""
        s = self.s
        source: Iterator[tuple[int, Any]]
        if csv_reader is not None:
            assert header is not None
            source = r.read_csv(csv_reader, header)
        else:
            source = r.read_lines(stream, s.fmt)
        done = self.done
        prio = self.priority_of(header) if s.priority_field else None
        seq = 0
        self.skipped = 0
        for line, raw in source:
            if line in done:
                self.skipped += 1
                continue
            self.summary.records += 1
            if isinstance(raw, r.BadInput):
                self.reject(seq, line, raw.message)
            elif prio is None:
                yield seq, line, raw
            else:
                p = prio(line, raw)
                if isinstance(p, str):
                    self.reject(seq, line, p)
                else:
                    yield (seq, line, raw), p
            seq += 1

    def reject(self, seq: int, line: int, message: str) -> None:
        self.summary.bad += 1
        self.pending.append((seq, self.target, r.error_record(line, None, "InvalidRecord", message, "", 0)))

    def priority_of(self, header: list[str] | None) -> Callable[[int, Any], int | str]:
        """A record's priority from its field (0 without one), or the message of why not."""
        import json

        name = self.s.priority_field
        assert name is not None
        col = header.index(name) if header is not None and name in header else None

        def get(line: int, raw: Any) -> int | str:
            if header is not None:
                value: Any = raw[col] if col is not None else 0
            else:
                try:
                    record = json.loads(raw)
                except ValueError as exc:
                    return f"line {line} is not valid JSON: {exc}"
                value = record.get(name, 0) if isinstance(record, dict) else 0
            try:
                if isinstance(value, bool | float):
                    raise ValueError
                return int(value)
            except (TypeError, ValueError):
                return f"line {line}: the priority field {name!r} must be an integer, not {value!r}"

        return get

    def by_map(self, pool: Pool, items: Iterator[Any], ordered: bool) -> None:
        results = pool.map(self.handler, items, chunksize=self.s.chunksize, ordered=ordered, return_exceptions=True)
        pending = self.pending
        for _ in results:  # values went to disk; errors were recorded by the hook
            if pending:
                self.flush(pool)

    def by_priority(self, pool: Pool, items: Iterator[Any]) -> None:
        options: dict[int, Options] = {}
        futures: deque[Future] = deque()
        limit = WINDOW * self.s.capacity
        for item, p in items:
            opts = options.get(p) or options.setdefault(p, pool.options(priority=p))
            futures.append(opts.submit(self.handler, item))
            if self.pending:
                self.flush(pool)
            while futures and futures[0].done():
                futures.popleft()
            if len(futures) > limit:
                wait(futures, return_when=FIRST_COMPLETED)
        wait(futures)

    def on_final_failure(self, item: Any, exc: BaseException, attempts: int) -> None:
        """The pool's hook (manager thread): a task failed for good; record it. Sent
        later, from this thread, so the manager never blocks on the collector."""
        seq, line, raw = item
        type_name, message, tb = r.describe_failure(exc)
        self.failures += 1
        record = r.error_record(line, self.handler.ident_of_raw(raw), type_name, message, tb, attempts)
        self.pending.append((seq, self.target, record))

    def flush(self, pool: Pool) -> None:
        batch = []
        pending = self.pending
        while pending:
            batch.append(pending.popleft())
        pool._engine.sink_records(batch)


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, so that the pool is ended at once, as on Ctrl-C)."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def run(settings: RunSettings) -> tuple[Summary, int]:
    """Run it: the summary and the exit status (0 all ok, 1 some failed). Raises
    `UsageError` before starting anything if the settings cannot work."""
    summary = Run(settings).execute()
    if not summary.status and (summary.failed or summary.interrupted):
        summary.status = 1
    return summary, summary.status
