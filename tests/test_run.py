"""`procqueue run` end to end: the installed console script in a subprocess,
real files, real pipes, a real SIGKILL, and every process it started gone after."""

from __future__ import annotations

import ast
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import procqueue
from procqueue._cli import records as r
from procqueue._cli.main import _Size

from conftest import _settled

SCRIPT = str(Path(sys.executable).with_name("procqueue"))
pytestmark = pytest.mark.timeout(120)

HANDLERS = """
import os, sys, time

def noisy(rec):
    print("a handler that prints", rec["x"])
    return rec["x"] * 2

def double(rec):
    if rec.get("boom"):
        raise ValueError(f"boom on record {rec['id']}")
    return rec["x"] * 2

def upper(row):
    return {k: v.upper() for k, v in row.items()}

def greet(line):
    return "hi " + line

def spin(rec):
    end = time.perf_counter() + 30e-6
    while time.perf_counter() < end:
        pass
    return rec["x"]

def faults(rec):
    if rec.get("crash"):
        os._exit(3)
    if rec.get("hang"):
        time.sleep(60)
    return rec["x"]

def slow(rec):
    time.sleep(0.002)
    if rec.get("boom"):
        raise ValueError("boom")
    return rec["x"]

def bad_init():
    raise RuntimeError("the initializer broke")

async def coroutine(rec):
    return rec

def pid(rec):
    return os.getpid()

def setup(value="ready"):
    global STATE
    STATE = value

def state(rec):
    return STATE

def not_json(rec):
    return {1, 2}

def loud(rec):
    if rec.get("long"):
        raise ValueError("a long message " + "x" * 300_000 + "\\nand a second line")
    return double(rec)
"""


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "h.py").write_text(HANDLERS)
    return tmp_path


@pytest.fixture
def tag() -> Iterator[str]:
    """A mark in the environment of every process a run starts: after the test,
    none may be left (they are not our children once the CLI has exited)."""
    mark = uuid.uuid4().hex
    yield mark
    left = _settled(lambda: _tagged(mark), 10.0)
    for proc in left:
        proc.kill()
    assert not left, f"processes left behind by procqueue run: {[(p.pid, p.name()) for p in left]}"


def _tagged(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PROCQUEUE_TEST_TAG") == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def cli(
    args: list[str], cwd: Path, tag: str, stdin: str | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    return subprocess.run(
        [SCRIPT, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def write_jsonl(path: Path, records: list[Any], extra: str = "") -> None:
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records) + extra)


def read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert not text or text.endswith("\n"), "the output ends inside a record"
    return [json.loads(line) for line in text.splitlines()]


def by_line(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    counts = collections.Counter(rec["line"] for rec in records)
    dupes = [line for line, n in counts.items() if n > 1]
    assert not dupes, f"records written twice for lines {dupes[:10]}"
    return {rec["line"]: rec for rec in records}


# --- formats ---------------------------------------------------------------------------


def test_jsonl_in_order_with_bad_lines_and_raising_records(work: Path, tag: str) -> None:
    recs = [{"id": f"r{i}", "x": i, "boom": i % 50 == 7} for i in range(300)]
    write_jsonl(work / "in.jsonl", recs[:100], extra='{"id": "torn", "x": \n\n')
    with (work / "in.jsonl").open("a") as f:
        f.write("".join(json.dumps(rec) + "\n" for rec in recs[100:]))
    got = cli(["run", "h:double", "-i", "in.jsonl", "-o", "out.jsonl"], work, tag)
    assert got.returncode == 1, got.stderr
    out = read_records(work / "out.jsonl")
    lines = [rec["line"] for rec in out]
    assert lines == sorted(lines) and len(out) == 301  # ordered; the blank line is not a record
    rows = by_line(out)
    assert rows[1] == {"line": 1, "id": "r0", "ok": True, "value": 0}
    bad = rows[101]
    assert bad["ok"] is False and bad["error"]["type"] == "InvalidRecord"
    assert "line 101 is not valid JSON" in bad["error"]["message"]
    assert bad["error"]["attempts"] == 0  # the handler never ran on it
    raised = [rec for rec in out if not rec["ok"] and rec["error"]["type"] == "ValueError"]
    assert [rec["id"] for rec in raised] == [f"r{i}" for i in range(300) if i % 50 == 7]
    err = raised[0]["error"]
    assert err["message"] == "boom on record r7" and err["attempts"] == 1
    assert 'h.py", line' in err["traceback"] and "in double" in err["traceback"]
    assert "_worker.py" not in err["traceback"]  # the traceback starts in the user's code
    assert rows[300 + 2]["value"] == 2 * 299  # lines after the bad one keep their numbers
    assert "301 records in" in got.stderr and "294 ok, 7 failed, 0 retried" in got.stderr


def test_csv_rows_as_dicts_and_bad_rows(work: Path, tag: str) -> None:
    (work / "in.csv").write_bytes(b'\xef\xbb\xbfid,name\n1,ann\n2,bob,extra\n3,"multi\nline"\n5,b\xffd\n4,"unclosed\n')
    got = cli(["run", "h:upper", "--format", "csv", "-i", "in.csv", "-o", "out.jsonl"], work, tag)
    assert got.returncode == 1, got.stderr
    rows = by_line(read_records(work / "out.jsonl"))
    assert rows[2] == {"line": 2, "id": "1", "ok": True, "value": {"id": "1", "name": "ANN"}}
    assert rows[3]["ok"] is False and rows[3]["error"]["message"] == "line 3 has 3 fields where the header has 2"
    assert rows[4]["value"] == {"id": "3", "name": "MULTI\nLINE"}  # a row may span lines
    assert rows[6]["error"]["message"] == "line 6 is not valid UTF-8"  # and the BOM did not stick to "id"
    assert rows[7]["ok"] is False and "line 7 is not a valid CSV row" in rows[7]["error"]["message"]
    assert sorted(rows) == [2, 3, 4, 6, 7]


def test_lines_through_a_shell_pipe(work: Path, tag: str) -> None:
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    got = subprocess.run(
        ["bash", "-c", f"printf 'ann\\n\\nbob\\n' | {SCRIPT} run h:greet --format lines | cat > piped.jsonl"],
        cwd=work, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    out = read_records(work / "piped.jsonl")
    assert [(rec["line"], rec["value"]) for rec in out] == [(1, "hi ann"), (2, "hi "), (3, "hi bob")]


def test_stdin_to_stdout_unordered(work: Path, tag: str) -> None:
    text = "".join(json.dumps({"id": i, "x": i}) + "\n" for i in range(2000))
    got = cli(["run", "h:noisy", "--unordered", "--workers", "2"], work, tag, stdin=text)
    assert got.returncode == 0, got.stderr
    rows = by_line([json.loads(line) for line in got.stdout.splitlines()])
    assert sorted(rows) == list(range(1, 2001))
    assert all(rows[i + 1]["value"] == 2 * i and rows[i + 1]["id"] == i for i in range(2000))
    assert "a handler that prints 7" in got.stderr  # not in the records


def test_file_path_handler_and_value_that_is_not_json(work: Path, tag: str) -> None:
    write_jsonl(work / "in.jsonl", [{"x": 1}])
    args = ["run", f"{work.name}/h.py:not_json", "-i", str(work / "in.jsonl"), "-o", str(work / "out.jsonl")]
    got = cli(args, work.parent, tag)  # a file path, from another directory
    assert got.returncode == 1, got.stderr
    (rec,) = read_records(work / "out.jsonl")
    assert rec["error"]["type"] == "InvalidRecord" and "returned set, which is not JSON" in rec["error"]["message"]


# --- failures, retries, options ----------------------------------------------------------


def summary_details(stderr: str) -> list[str]:
    """The lines the summary adds under its closing line: the failures it names, and where they are."""
    lines = stderr.splitlines()
    at = max(i for i, line in enumerate(lines) if line.startswith("procqueue run: "))
    assert all(line.startswith("  ") for line in lines[at + 1 :]), lines[at:]
    return [line[2:] for line in lines[at + 1 :]]


@pytest.mark.parametrize("mode", [[], ["--unordered", "--workers", "2", "--errors", "bad.jsonl"]])
def test_summary_names_the_first_failed_lines_and_where_the_rest_are(work: Path, tag: str, mode: list[str]) -> None:
    lines = [json.dumps({"id": f"r{i}", "x": i, "boom": i in (2, 8, 11, 14)}).encode() for i in range(30)]
    lines[1] = b'{"id": "torn", "x": '
    lines[4] = json.dumps({"id": "r4", "x": 4, "long": True}).encode()
    lines[5] = b"\xff is not UTF-8"
    (work / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    got = cli(["run", "h:loud", "-i", "in.jsonl", "-o", "out.jsonl", *mode], work, tag)
    assert got.returncode == 1, got.stderr
    assert "23 ok, 7 failed, 0 retried" in got.stderr
    details = summary_details(got.stderr)
    assert details[0] == "line 2: not valid JSON: Expecting value: line 1 column 21 (char 20)"
    assert details[1] == "line 3: ValueError: boom on record r2"
    assert details[2].startswith("line 5: ValueError: a long message xxxx") and details[2].endswith("x...")
    assert len(details[2]) <= 100  # 300 KB and two lines in the record, one line here
    assert details[3] == "line 6: not valid JSON: 'utf-8' codec can't decode byte 0xff in position 0: " + (
        "invalid start byte"
    )
    assert details[4] == "line 9: ValueError: boom on record r8"
    where = "bad.jsonl" if mode else "out.jsonl"
    assert details[5:] == [f"... and 2 more; see the error records in {where}"]  # lines 12 and 15
    records = by_line(read_records(work / where))
    assert sorted(records) == ([2, 3, 5, 6, 9, 12, 15] if mode else list(range(1, 31)))
    assert len(records[5]["error"]["message"]) > 300_000


def test_summary_names_bad_csv_rows_when_the_records_go_to_stdout(work: Path, tag: str) -> None:
    got = cli(["run", "h:upper", "--format", "csv"], work, tag, stdin="id,name\n1,ann\n2,bob,extra\n3\n")
    assert got.returncode == 1, got.stderr
    assert len(got.stdout.splitlines()) == 3
    assert summary_details(got.stderr) == [
        "line 3: has 3 fields where the header has 2",
        "line 4: has 1 fields where the header has 2",
        "see the error records in the output (stdout)",
    ]
    ok = cli(["run", "h:upper", "--format", "csv"], work, tag, stdin="id,name\n1,ann\n")
    assert ok.returncode == 0 and summary_details(ok.stderr) == [], ok.stderr


DEADLOCK_HANDLER = """
import os

def big_error_or_death(rec):
    if (rec["x"] + 1) % 7 == 0:
        os._exit(3)
    raise ValueError("x" * 300_000)
"""


def test_large_error_records_and_worker_deaths_do_not_deadlock(work: Path, tag: str) -> None:
    """Regression: error records larger than the 64 KiB control pipe, sent while
    workers die, once hung the run for good (10 of 300 records written, then nothing)."""
    (work / "deadlock.py").write_text(DEADLOCK_HANDLER)
    write_jsonl(work / "in.jsonl", [{"id": i, "x": i} for i in range(300)])
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    args = [SCRIPT, "run", "deadlock:big_error_or_death", "-i", "in.jsonl", "-o", "out.jsonl", "--retries", "0"]
    with (work / "stderr.txt").open("wb") as err:
        proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            status = proc.wait(60)
        except subprocess.TimeoutExpired:
            pool = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            proc.wait(10)
            for child in pool:  # the forkserver, the collector, the workers: by pid
                with contextlib.suppress(psutil.Error):
                    child.kill()
            written = len((work / "out.jsonl").read_bytes().splitlines())
            pytest.fail(f"procqueue run hung: {written} of 300 records written after 60 s")
    stderr = (work / "stderr.txt").read_text()
    assert status == 1, stderr
    rows = by_line(read_records(work / "out.jsonl"))
    assert sorted(rows) == list(range(1, 301))
    crashed = {n for n, rec in rows.items() if rec["error"]["type"] == "WorkerCrashed"}
    assert crashed == set(range(7, 301, 7)), stderr
    assert all("x" * 300_000 in rows[n]["error"]["message"] for n in rows if n not in crashed)
    assert "0 ok, 300 failed" in stderr


def test_errors_file_retries_crash_and_timeout(work: Path, tag: str) -> None:
    recs = [{"id": i, "x": i} for i in range(40)]
    recs[5]["crash"] = True
    recs[9]["hang"] = True
    write_jsonl(work / "in.jsonl", recs)
    args = ["run", "h:faults", "-i", "in.jsonl", "-o", "ok.jsonl", "--errors", "bad.jsonl"]
    got = cli([*args, "--retries", "1", "--timeout", "1"], work, tag)
    assert got.returncode == 1, got.stderr
    ok, bad = read_records(work / "ok.jsonl"), by_line(read_records(work / "bad.jsonl"))
    assert sorted(rec["line"] for rec in ok) == [n for n in range(1, 41) if n not in (6, 10)]
    assert all(rec["ok"] for rec in ok)
    assert bad[6]["error"]["type"] == "WorkerCrashed" and bad[6]["error"]["attempts"] == 2
    assert "exit code 3" in bad[6]["error"]["message"] and bad[6]["id"] == 5
    assert bad[10]["error"]["type"] == "TaskTimeout" and bad[10]["error"]["attempts"] == 2
    assert "38 ok, 2 failed, 2 retried" in got.stderr
    named = summary_details(got.stderr)
    assert named[0].startswith("line 6: WorkerCrashed: ") and "exit code 3" in named[0]
    assert named[1].startswith("line 10: TaskTimeout: ")
    assert named[2:] == ["see the error records in bad.jsonl"]


def test_priority_field_runs_urgent_records_first(work: Path, tag: str) -> None:
    recs: list[dict[str, Any]] = [{"id": i, "x": i} for i in range(300)]
    for rec in recs[-10:]:
        rec["p"] = 9
    recs[3]["p"] = "high"
    recs[10]["boom"] = recs[295]["boom"] = True  # failures, urgent or not, are records too
    write_jsonl(work / "in.jsonl", recs)
    got = cli(["run", "h:slow", "--priority-field", "p", "--workers", "1", "-i", "in.jsonl", "-o", "out.jsonl"],
              work, tag)  # fmt: skip
    assert got.returncode == 1, got.stderr
    out = read_records(work / "out.jsonl")
    rows = by_line(out)
    assert len(rows) == 300 and 'must be an integer, not "high"' in rows[4]["error"]["message"]
    assert rows[4]["id"] == 3 and rows[11]["error"]["type"] == "ValueError" and not rows[296]["ok"]
    where = [i for i, rec in enumerate(out) if rec["line"] > 290]
    assert max(where) < 150, f"urgent records were written at {where}"


def test_initializer_and_worker_recycling(work: Path, tag: str) -> None:
    write_jsonl(work / "in.jsonl", [{"x": i} for i in range(200)])
    got = cli(["run", "h:state", "--initializer", "h:setup", "-i", "in.jsonl", "-o", "a.jsonl"], work, tag)
    assert got.returncode == 0, got.stderr
    assert {rec["value"] for rec in read_records(work / "a.jsonl")} == {"ready"}
    args = ["--max-tasks-per-worker", "50", "--max-worker-memory", "2GB", "--workers", "2", "--chunksize", "10"]
    got = cli(["run", "h:pid", "-i", "in.jsonl", "-o", "b.jsonl", *args], work, tag)
    assert got.returncode == 0, got.stderr
    pids = {rec["value"] for rec in read_records(work / "b.jsonl")}
    assert len(pids) >= 4  # 200 records, at most 50 per worker


# --- kill and resume -------------------------------------------------------------------


def test_sigkill_halfway_then_resume_gives_each_record_once(work: Path, tag: str) -> None:
    n = 100_000
    write_jsonl(work / "in.jsonl", [{"id": i, "x": i} for i in range(n)])
    out = work / "out.jsonl"
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    args = [SCRIPT, "run", "h:spin", "-i", "in.jsonl", "-o", "out.jsonl"]
    proc = subprocess.Popen(args, cwd=work, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 45 * n // 2) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert not _settled(lambda: _tagged(tag), 10.0), "workers or the collector outlived the killed run"
    before = len(out.read_bytes().splitlines())
    assert 0 < before < n, f"{before} records before the kill: not halfway"

    got = cli(["run", "h:spin", "-i", "in.jsonl", "-o", "out.jsonl", "--resume"], work, tag)
    assert got.returncode == 0, got.stderr
    rows = by_line(read_records(out))
    assert sorted(rows) == list(range(1, n + 1))
    assert all(rows[i + 1]["value"] == i for i in range(n))
    assert f"{before:,} skipped" in got.stderr or f"{before - 1:,} skipped" in got.stderr


def test_sigterm_stops_cleanly_and_resume_finishes(work: Path, tag: str) -> None:
    n = 50_000
    write_jsonl(work / "in.jsonl", [{"id": i, "x": i} for i in range(n)])
    out = work / "out.jsonl"
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    args = [SCRIPT, "run", "h:spin", "-i", "in.jsonl", "-o", "out.jsonl", "--errors", "bad.jsonl"]
    proc = subprocess.Popen(args, cwd=work, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 45 * n // 4) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM); run again with --resume" in err
    assert not _settled(lambda: _tagged(tag), 10.0)
    got = cli([*args[1:], "--resume"], work, tag)
    assert got.returncode == 0, got.stderr
    assert sorted(by_line(read_records(out))) == list(range(1, n + 1))
    assert (work / "bad.jsonl").read_text() == ""


def test_resume_repairs_a_torn_last_line(work: Path, tag: str) -> None:
    write_jsonl(work / "in.jsonl", [{"id": i, "x": i} for i in range(50)])
    good = "".join(json.dumps({"line": i, "id": i - 1, "ok": True, "value": 0}) + "\n" for i in range(1, 21))
    (work / "out.jsonl").write_text(good + '{"line": 21, "id": 20, "ok": tr')
    got = cli(["run", "h:double", "-i", "in.jsonl", "-o", "out.jsonl", "--resume"], work, tag)
    assert got.returncode == 0, got.stderr
    rows = by_line(read_records(work / "out.jsonl"))
    assert sorted(rows) == list(range(1, 51)) and rows[21]["value"] == 40
    assert "20 skipped" in got.stderr


# --- usage errors, exit codes, help ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nosuchmodule:f", "-i", "in.jsonl"], "could not import 'nosuchmodule'"),
        (["run", "h:nosuchfunc", "-i", "in.jsonl"], "has no attribute 'nosuchfunc'"),
        (["run", "h", "-i", "in.jsonl"], "is not MODULE:FUNC"),
        (["run", "h:double", "-i", "missing.jsonl"], "cannot read the input 'missing.jsonl'"),
        (["run", "h:double", "--bogus"], "No such option"),
        (["run", "h:double", "-i", "in.jsonl", "-o", "full.jsonl"], "add --resume to finish that run"),
        (["run", "h:double", "-i", "in.jsonl", "--resume"], "--resume needs the output file"),
        (["run", "h:double", "--max-worker-memory", "lots"], "'lots' is not a size"),
        (["run", "h:double", "--workers", "0"], "0 is not in the range x>=1"),
        (["run", "h:double", "-i", "in.jsonl", "-o", "a.jsonl", "--errors", "a.jsonl"], "name the same file"),
        (["run", "h:double", "-i", "."], "is a directory"),
        (["run", "h:double", "-i", "in.jsonl", "-o", "."], "is a directory"),
        (["run", "h:coroutine", "-i", "in.jsonl"], "is an async function"),
        (["run", "broken:f", "-i", "in.jsonl"], "importing 'broken' failed: No module named 'nosuchdependency'"),
        (["run", "sub/queue.py:f", "-i", "in.jsonl"], "has the name of the standard library's module 'queue'"),
        (["run", "sub/code.py:f", "-i", "in.jsonl"], "has the name of the standard library's module 'code'"),
        (["run", "h:nosuchfunc", "-i", "in.jsonl", "-o", "full.jsonl", "--overwrite"], "has no attribute"),
        (
            [
                "run",
                "h:double",
                "--format",
                "csv",
                "-i",
                "in.csv",
                "-o",
                "full.jsonl",
                "--overwrite",
                "--priority-field",
                "p",
            ],
            "is not a column",
        ),
        (["run", "h:double", "--format", "csv", "-i", "twice.csv"], "names 'a' more than once"),
        (["demo", "--workers", "0"], "0 is not in the range x>=1"),
    ],
)
def test_usage_errors_exit_2_and_say_what_to_fix(work: Path, tag: str, args: list[str], message: str) -> None:
    write_jsonl(work / "in.jsonl", [{"x": 1}])
    (work / "full.jsonl").write_text('{"line": 1}\n')
    (work / "in.csv").write_text("id,x\n1,2\n")
    (work / "twice.csv").write_text("a,a\n1,2\n")
    (work / "broken.py").write_text("import nosuchdependency\n")
    (work / "sub").mkdir()
    (work / "sub" / "queue.py").write_text("def f(r):\n    return r\n")
    (work / "sub" / "code.py").write_text("def f(r):\n    return r\n")
    got = cli(args, work, tag)
    assert got.returncode == 2, (got.stdout, got.stderr)
    assert message in got.stderr, got.stderr
    assert not got.stdout
    assert (work / "full.jsonl").read_text() == '{"line": 1}\n'  # nothing was touched


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["bench"]])
def test_help_shows_an_example(work: Path, tag: str, command: list[str]) -> None:
    got = cli([*command, "--help"], work, tag)
    assert got.returncode == 0, got.stderr
    assert "Example" in got.stdout and "procqueue " in got.stdout


def test_live_view_on_a_terminal(work: Path, tag: str) -> None:
    pexpect = pytest.importorskip("pexpect")
    write_jsonl(work / "in.jsonl", [{"x": i} for i in range(20_000)])
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    child = pexpect.spawn(
        SCRIPT, ["run", "h:spin", "-i", "in.jsonl", "-o", "out.jsonl"], cwd=str(work), env=env,
        encoding="utf-8", timeout=60, dimensions=(40, 200),
    )  # fmt: skip
    child.expect(r"run h:spin")
    child.expect(r"20,000 records in .* records/s\): 20,000 ok, 0 failed")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert len(read_records(work / "out.jsonl")) == 20_000


def test_an_initializer_that_raises_stops_the_run_with_its_traceback(work: Path, tag: str) -> None:
    write_jsonl(work / "in.jsonl", [{"x": i} for i in range(3)])
    got = cli(["run", "h:double", "--initializer", "h:bad_init", "-i", "in.jsonl", "-o", "out.jsonl"], work, tag)
    assert got.returncode == 1, got.stderr
    assert "InitializerFailed" in got.stderr and "the initializer broke" in got.stderr
    assert "3 not written" in got.stderr


def test_an_output_that_cannot_be_written_is_reported(work: Path, tag: str) -> None:
    write_jsonl(work / "in.jsonl", [{"id": i, "x": i} for i in range(20_000)])
    got = cli(["run", "h:double", "-i", "in.jsonl", "-o", "/dev/full"], work, tag)
    assert got.returncode == 1, got.stderr
    assert "could not write the output (OSError: [Errno 28] No space left on device)" in got.stderr
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    piped = subprocess.run(
        ["bash", "-c", f"{SCRIPT} run h:double -i in.jsonl | head -2; echo status ${{PIPESTATUS[0]}}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert piped.stdout.splitlines()[-1] == "status 141", piped
    assert "the output was closed (broken pipe)" in piped.stderr


def test_failing_records_with_ids_that_are_not_json(work: Path, tag: str) -> None:
    text = '{"id": NaN, "x": 1, "boom": true}\n{"id": "\\udc00", "x": 2, "boom": true}\n{"id": 3, "x": 3}\n'
    got = cli(["run", "h:double"], work, tag, stdin=text)
    assert got.returncode == 1, got.stderr
    rows = by_line([json.loads(line) for line in got.stdout.splitlines()])
    assert rows[1]["id"] is None and rows[2]["id"] is None and rows[3]["value"] == 6
    assert rows[1]["error"]["message"].startswith("boom on record")


def test_resuming_a_finished_run_reports_its_failures(work: Path, tag: str) -> None:
    write_jsonl(work / "in.jsonl", [{"id": i, "x": i, "boom": i == 1} for i in range(3)])
    args = ["run", "h:double", "-i", "in.jsonl", "-o", "out.jsonl", "--errors", "bad.jsonl"]
    assert cli(args, work, tag).returncode == 1
    again = cli([*args, "--resume"], work, tag)
    assert again.returncode == 1 and "3 skipped, already in the output (1 of them failed)" in again.stderr
    (work / "bad.jsonl").unlink()  # to run the failures again: drop them, resume
    again = cli([*args, "--resume"], work, tag)
    assert again.returncode == 1 and "1 records in" in again.stderr and "2 skipped" in again.stderr


# --- pieces --------------------------------------------------------------------------------


def test_sizes() -> None:
    size = _Size()
    assert size.convert("2GB", None, None) == 2 << 30
    assert size.convert("512m", None, None) == 512 << 20
    assert size.convert("1.5GiB", None, None) == 3 << 29
    assert size.convert("4096", None, None) == 4096


def test_scan_done_reads_our_records_and_others(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(
        '{"line": 3, "ok": true, "value": {"ok": false}}\n{"ok": false, "line": 7}\nnot a record\n{"line": 9'
    )
    done = r.Done(bytearray())
    r.scan_done(str(path), done)
    assert (3 in done, 7 in done, 9 in done, 4 in done) == (True, True, False, False)
    assert (done.records, done.failed, done.foreign, done.repaired) == (2, 1, 1, len('{"line": 9'))
    assert path.read_text().endswith("not a record\n")


def test_record_handler_renders_records() -> None:
    h = r.RecordHandler(lambda rec: rec["x"] + 1, "jsonl", "id")
    assert h((0, 5, b'{"id": "a", "x": 1}')) == (0, b'{"line": 5, "id": "a", "ok": true, "value": 2}\n')
    with pytest.raises(r.InvalidRecord, match="line 6 is not valid JSON"):
        h((1, 6, b"{"))
    line = r.error_record(8, None, "ValueError", "no", "tb", 3)
    assert json.loads(line) == {
        "line": 8, "id": None, "ok": False,
        "error": {"type": "ValueError", "message": "no", "traceback": "tb", "attempts": 3},
    }  # fmt: skip


def _private_uses(source: str) -> list[str]:
    """Where code reaches into another object's privates: `x._name` (not a dunder)
    on anything but `self` / `cls`, `getattr(x, "_name")` and the like, and the
    engine's names (`_engine`, `_submit_items`) on anything at all."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = owner = None
        if isinstance(node, ast.Attribute):
            name, owner = node.attr, node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            name, owner = node.args[1].value, node.args[0]
        if name is None or not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        own = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
        if not own or name in ("_engine", "_submit_items"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_cli_uses_only_the_public_api() -> None:
    """`procqueue run` (and the rest of the CLI) is a user of the library like any
    other: no `pool._engine`, no `Options._submit_items`, no private attribute of
    a Pool (or of anything else that is not its own)."""
    sample = "pool._engine.on_final_failure = f\nopts._submit_items(h, xs)\ngetattr(pool, '_cfg')\nself._engine\n"
    assert len(_private_uses(sample)) == 4  # the check itself sees them
    assert _private_uses("self._lines()\nexc.__cause__\npool.output.write(x)\n") == []
    cli_dir = Path(procqueue.__file__).parent / "_cli"
    found = {path.name: uses for path in sorted(cli_dir.glob("*.py")) if (uses := _private_uses(path.read_text()))}
    assert not found, f"the CLI reaches into privates: {found}"
    for name in ("run.py", "records.py"):  # and `procqueue run` imports only public names, and its own modules
        tree = ast.parse((cli_dir / name).read_text())
        modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        private = [
            mod for mod in modules if mod and mod.startswith("procqueue.") and not mod.startswith("procqueue._cli")
        ]
        assert not private, f"{name} imports private modules of procqueue: {private}"
