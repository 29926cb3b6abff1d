"""Records for `procqueue run`: reading the input formats, the handler wrapper
that runs in the workers, the output records, and what `--resume` reads back.

An input record travels to a worker as `(seq, line, raw)`: its place among
the run's records, the line it starts on, and its unparsed form (the bytes of
a JSON or plain line, or a CSV row's fields). Parsing and encoding happen in
the workers, so the parent only splits lines and dispatches. The user's
handler and initializer are found by `load_callable` (`MODULE:FUNC` or
`path/to/file.py:FUNC`).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from procqueue import ProcQueueError, SerializationError, TaskFailed

FORMATS = ("jsonl", "csv", "lines")
Stage = tuple[int | None, str | None]  # a chain's stage in an error record: its index (from 0) and function
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_loads = json.loads


class InvalidRecord(ValueError):
    """An input record that cannot be read, or a value that is not JSON: never retried."""

    procqueue_final = True  # the worker reports it as final (`procqueue/_protocol/failures.py::fault_of`)


class UnreadRecord(InvalidRecord):
    """A record the worker could not parse: the handler never ran on it (0 attempts)."""


@dataclass(frozen=True)
class BadInput:
    """A record the parent could not even cut out (a bad CSV row, a bad priority)."""

    line: int
    message: str


@dataclass
class RecordHandler:
    """The pool's handler: parses one record, calls the user's function, and
    returns `(seq, output line)` for the collector to write."""

    fn: Callable[[Any], Any]
    fmt: str
    id_field: str | None
    header: list[str] | None = None  # CSV

    def __call__(self, item: tuple[int, int, Any]) -> tuple[int, bytes]:
        seq, line, raw = item
        record = self.record_of(line, raw)
        value = self.fn(record)
        ident = record.get(self.id_field) if type(record) is dict and self.id_field is not None else None
        try:
            return seq, f'{{"line": {line}, "id": {_encode(ident)}, "ok": true, "value": {_encode(value)}}}\n'.encode()
        except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError: a lone surrogate
            return seq, self.careful(line, ident, value)

    def careful(self, line: int, ident: Any, value: Any) -> bytes:
        """The output line, when the quick way failed: an id that is not JSON becomes
        null; a value that is not JSON fails the record, for good."""
        try:
            return f'{{"line": {line}, "id": {_ident_json(ident)}, "ok": true, "value": {_encode(value)}}}\n'.encode()
        except (TypeError, ValueError) as exc:
            raise InvalidRecord(
                f"line {line}: the handler returned {type(value).__name__}, which is not JSON: {exc}"
            ) from None

    def record_of(self, line: int, raw: Any) -> Any:
        """The record of input line `line` (the fast way for JSON lines, which is most)."""
        if self.fmt == "jsonl":
            try:
                return _loads(raw)
            except ValueError:  # JSONDecodeError, UnicodeDecodeError
                pass
        return self.parse(line, raw)  # raises with the line number

    def parse(self, line: int, raw: Any) -> Any:
        if self.fmt == "jsonl":
            try:
                return _loads(raw)
            except ValueError as exc:
                raise UnreadRecord(f"line {line} is not valid JSON: {exc}") from None
        if self.fmt == "lines":
            try:
                return raw.decode()
            except UnicodeDecodeError as exc:
                raise UnreadRecord(f"line {line} is not valid UTF-8: {exc}") from None
        assert self.header is not None
        return dict(zip(self.header, raw, strict=True))

    def ident(self, record: Any) -> Any:
        if self.id_field is not None and isinstance(record, dict):
            return record.get(self.id_field)
        return None

    def ident_of_raw(self, raw: Any) -> Any:
        """The id of a record that failed (parsed again, in the parent; None if it cannot be)."""
        try:
            return self.ident(self.parse(0, raw))
        except Exception:
            return None


def error_record(
    line: int, ident: Any, type_name: str, message: str, traceback: str, attempts: int, stage: Stage | None = None
) -> bytes:
    """The output line of a record that failed for good (never raises: text that is
    not valid Unicode is escaped, an id that is not JSON becomes null). A chain of
    stages adds `"stage": {"index", "function"}` to the error: where the record failed."""
    error: dict[str, Any] = {"type": type_name, "message": message, "traceback": traceback, "attempts": attempts}
    if stage is not None:
        error["stage"] = {"index": stage[0], "function": stage[1]}
    text = f'{{"line": {line}, "id": {_ident_json(ident)}, "ok": false, "error": {json.dumps(error)}}}\n'
    return text.encode("utf-8", "backslashreplace")


def _ident_json(ident: Any) -> str:
    """A record's id as JSON: null when it is not JSON (NaN, a set, a lone surrogate)."""
    try:
        text = _encode(ident)
        text.encode()
    except (TypeError, ValueError):
        return "null"
    return text


def failure_record(
    line: int, raw: Any, exc: BaseException, handler: RecordHandler, stage: Stage | None = None
) -> tuple[bytes, str, str]:
    """The error record of the record on `line` that failed for good with `exc`, as the
    pool's map gives it (the handler's own exception, its `__cause__` a `TaskFailed`; a
    `WorkerCrashed`, `TaskTimeout`, `SerializationError`), with the type and message the
    summary shows. Never raises: an exception whose str() raises still gets its record."""
    attempts = 0 if isinstance(exc, UnreadRecord) else attempts_of(exc)
    try:
        type_name, message, tb = describe_failure(exc)
        task_id = task_id_of(exc)
        if task_id is not None:  # the user thinks in lines, not in procqueue's task ids
            message = message.replace(f"task {task_id}", f"the record on line {line}")
        record = error_record(line, handler.ident_of_raw(raw), type_name, message, tb, attempts, stage)
        return record, type_name, message
    except Exception as bug:
        kind = type(exc).__name__
        return error_record(line, None, kind, f"{_safe_repr(exc)} ({_safe_repr(bug)})", "", attempts, stage), kind, ""


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<a {type(obj).__name__}>"


def describe_failure(exc: BaseException) -> tuple[str, str, str]:
    """`(type, message, traceback)` of a task's final error, as the error record shows it."""
    cause = exc.__cause__
    if isinstance(exc, InvalidRecord):
        return "InvalidRecord", str(exc), ""  # bad input: a traceback would be noise
    if isinstance(cause, TaskFailed):  # the handler's own exception, rebuilt: described as the worker saw it
        type_name = cause.type_name or _type_name(exc)
        message = cause.remote_message if cause.remote_message is not None else str(exc)
        return type_name, message, cause.remote_traceback
    if isinstance(exc, TaskFailed) and exc.remote_message is not None:
        # The handler's exception did not come back (it would not pickle or unpickle):
        # the worker's description of it stands in.
        if exc.type_name == f"{InvalidRecord.__module__}.{InvalidRecord.__qualname__}":
            return "InvalidRecord", exc.remote_message, ""
        return exc.type_name or "TaskFailed", exc.remote_message, exc.remote_traceback
    if isinstance(exc, TaskFailed):  # the exception itself did not travel back
        return "TaskFailed", str(exc).split("\n\nRemote traceback:")[0], exc.remote_traceback
    return type(exc).__name__, str(exc), getattr(exc, "fault_traceback", "") or ""


def attempts_of(exc: BaseException) -> int:
    """How many times the handler ran on a record whose final error is `exc`: the
    `attempts` of its `TaskFailed` cause, or of the error itself (`WorkerCrashed`,
    `TaskTimeout`); a `SerializationError` without one ran once in a worker (the
    result would not pickle there, or unpickle here), or never when the parent could
    not pickle the record."""
    cause = exc.__cause__
    if isinstance(cause, TaskFailed):
        return int(cause.attempts)
    attempts = getattr(exc, "attempts", None) if isinstance(exc, ProcQueueError) else None
    if isinstance(attempts, int):
        return attempts
    if isinstance(exc, SerializationError):
        ran = "(in worker pid " in exc.message or getattr(exc, "stage", None) == "result"
        return 1 if ran else 0
    return 0


def task_id_of(exc: BaseException) -> int | None:
    """procqueue's task id in a final error, which its messages name (the CLI names the line instead)."""
    cause = exc.__cause__
    for err in (exc, cause):
        if isinstance(err, ProcQueueError):
            task_id = getattr(err, "task_id", None)
            if isinstance(task_id, int):
                return task_id
    return None


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def prepare_worker(stdout_is_output: bool, init: str | None) -> None:
    """Each worker's initializer: when the records go to stdout, what the user's
    code prints (even as its module is imported) goes to stderr instead of into
    them; then the user's initializer, `MODULE:FUNC`."""
    if stdout_is_output:
        sys.stdout.flush()
        os.dup2(2, 1)
    if init is not None:
        load_callable(init, "--initializer")()


# --- finding the user's code ----------------------------------------------------------


class UsageError(Exception):
    """What the user must fix before the run can start (exit status 2)."""


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """`package.module:func` or `path/to/file.py:func`, imported here (and by
    reference in the workers, which get the same `sys.path`)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {spec!r} is not MODULE:FUNC or path/to/file.py:FUNC (e.g. mymodule:handle)")
    path = None
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"{what}: no file {module_name!r} (from {os.getcwd()})")
        directory, module_name = str(path.resolve().parent), path.stem
        if module_name in sys.stdlib_module_names:  # first on sys.path, it would hide the real one
            raise UsageError(
                f"{what}: {str(path)!r} has the name of the standard library's module {module_name!r}, "
                "which it would hide in this process and its workers; rename the file"
            )
    else:
        directory = os.getcwd()  # as `python -m` does: modules beside you import
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.partition(".")[0] and exc.name != module_name:
            raise UsageError(f"{what}: importing {module_name!r} failed: {exc}") from exc
        raise UsageError(
            f"{what}: could not import {module_name!r}: {exc} "
            "(run from the directory that holds it, give its file's path, or add it to PYTHONPATH)"
        ) from exc
    except Exception as exc:
        raise UsageError(f"{what}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    if path is not None and Path(module.__file__ or "").resolve() != path.resolve():
        raise UsageError(
            f"{what}: {str(path)!r} is hidden by another module of the same name, {module.__file__}; rename the file"
        )
    fn = getattr(module, attr, None)
    if fn is None:
        raise UsageError(f"{what}: module {module_name!r} ({module.__file__}) has no attribute {attr!r}")
    if not callable(fn):
        raise UsageError(f"{what}: {spec} is a {type(fn).__name__}, not a function")
    if inspect.iscoroutinefunction(fn):
        raise UsageError(
            f"{what}: {spec} is an async function; give a plain one (e.g. def f(r): return asyncio.run(g(r)))"
        )
    return fn  # type: ignore[no-any-return]


# --- reading the input ----------------------------------------------------------------


def read_lines(stream: IO[bytes], fmt: str) -> Iterator[tuple[int, bytes]]:
    """`(line number, bytes without the newline)`; blank JSON lines are skipped."""
    for n, raw in enumerate(stream, 1):
        raw = raw.rstrip(b"\r\n")
        if fmt == "jsonl" and not raw.strip():
            continue
        yield n, raw


class CsvInput:
    """The rows of a CSV stream, decoded line by line, so a line that is not UTF-8
    fails only its own row. A byte-order mark (as Excel writes) is dropped."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.undecodable: set[int] = set()
        self.reader = csv.reader(self._lines(), strict=True)
        self.header: list[str] = next(self.reader, [])
        repeated = sorted({name for name in self.header if self.header.count(name) > 1})
        if repeated:
            raise UsageError(f"the CSV header names {', '.join(map(repr, repeated))} more than once; rename them")

    def _lines(self) -> Iterator[str]:
        for n, raw in enumerate(self.stream, 1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield raw.decode()
            except UnicodeDecodeError:
                self.undecodable.add(n)
                yield raw.decode(errors="replace")

    def rows(self) -> Iterator[tuple[int, list[str] | BadInput]]:
        """`(line a row starts on, its fields)`; a bad row comes as `BadInput` and reading goes on."""
        reader, width = self.reader, len(self.header)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except csv.Error as exc:
                yield line, BadInput(line, f"line {line} is not a valid CSV row: {exc}")
                continue
            except StopIteration:
                return
            if self.undecodable and any(n in self.undecodable for n in range(line, reader.line_num + 1)):
                yield line, BadInput(line, f"line {line} is not valid UTF-8")
            elif len(row) != width and row:
                yield line, BadInput(line, f"line {line} has {len(row)} fields where the header has {width}")
            elif row:
                yield line, row


# --- reading the output back (--resume) -------------------------------------------------


@dataclass
class Done:
    """Which input lines already have a record, from the output files of an earlier run."""

    lines: bytearray  # lines[n] == 1: line n has its record
    records: int = 0
    failed: int = 0  # of `records`, errors
    repaired: int = 0  # bytes of a torn last line cut off
    foreign: int = 0  # lines that are not records of ours (left as they are)

    far: set[int] = field(default_factory=set)  # line numbers too large for the bitmap

    def __contains__(self, n: int) -> bool:
        return (n < len(self.lines) and self.lines[n] == 1) or (n >= BITMAP_LINES and n in self.far)

    def add(self, n: int) -> None:
        if n >= BITMAP_LINES:
            self.far.add(n)
        else:
            if n >= len(self.lines):
                self.lines.extend(bytes(n + 1 - len(self.lines) + len(self.lines) // 2))
            self.lines[n] = 1
        self.records += 1


def scan_done(path: str, done: Done) -> None:
    """Add the records in `path` to `done`; first cut off a torn last line, if the
    writer was killed inside a write, so the file ends on a whole record."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(fd, "rb", closefd=False) as f:
                f.seek(max(0, size - 1))
                if f.read(1) != b"\n":
                    data_end = _last_newline(f, size)
                    os.ftruncate(fd, data_end)
                    done.repaired += size - data_end
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            for raw in f:
                n = _line_of(raw)
                if n is None or n < 1:
                    done.foreign += 1
                else:
                    done.add(n)
                    done.failed += _failed(raw)
    finally:
        os.close(fd)


def _last_newline(f: IO[bytes], size: int) -> int:
    """Offset just after the last newline of a file of `size` bytes (0 if none)."""
    pos = size
    while pos > 0:
        step = min(pos, 1 << 16)
        f.seek(pos - step)
        at = f.read(step).rfind(b"\n")
        if at >= 0:
            return pos - step + at + 1
        pos -= step
    return 0


BITMAP_LINES = 1 << 26  # a byte per line up to here (64 MB at most)
_PREFIX = b'{"line": '


def _line_of(raw: bytes) -> int | None:
    if raw.startswith(_PREFIX):  # the records we write: no need to parse the whole line
        end = raw.find(b",", len(_PREFIX))
        try:
            return int(raw[len(_PREFIX) : end])
        except ValueError:
            pass
    try:
        n = json.loads(raw).get("line")
    except (ValueError, AttributeError):
        return None
    return n if isinstance(n, int) else None


def _failed(raw: bytes) -> bool:
    """Whether an output line is an error record (`"ok": false` may also sit inside a value)."""
    if b'"ok": false' not in raw:
        return False
    try:
        return json.loads(raw).get("ok") is False  # type: ignore[no-any-return]
    except (ValueError, AttributeError):
        return False


def count_lines(path: str) -> int:
    """Lines in a file, fast (for the live view's total)."""
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
    return n
