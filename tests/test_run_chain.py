"""`procqueue run A:f B:g C:h`: a chain of stages, end to end through the installed
console script, with a real SIGKILL of the parent and `--resume` after it."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from test_run import SCRIPT, _tagged, by_line, cli, read_records, tag, work, write_jsonl

import procqueue
from procqueue._cli import chain as c
from procqueue._cli import records as r

from conftest import _settled

__all__ = ["tag", "work"]  # fixtures, from tests/test_run.py
pytestmark = pytest.mark.timeout(120)

STAGES = """
import collections
import sys
import time

Pair = collections.namedtuple("Pair", "a b")


class ExitsOnLoad:
    def __reduce__(self):
        return (sys.exit, (3,))


def unloadable(v):
    if v["x"] == 5:
        return Pair(5, ExitsOnLoad())  # the failure hides inside a namedtuple
    if v["x"] == 6:
        return ExitsOnLoad()
    return v["x"]

def decode(rec):
    return {"x": rec["x"], "tag": rec.get("tag", "")}

def score(v):
    if v["x"] % 10 == 3:
        raise ValueError(f"score refuses {v['x']}")
    return v["x"] * 10 + len(v["tag"])

def write(n):
    return {"score": n}

def slow_score(v):
    time.sleep(0.004)
    if v["x"] % 50 == 7:
        raise ValueError("slow_score refuses")
    return v["x"] * 10
"""


@pytest.fixture
def stages(work: Path) -> Path:
    (work / "st.py").write_text(STAGES)
    return work


@pytest.mark.parametrize("mode", [[], ["--unordered", "--errors", "bad.jsonl"]])
def test_three_stages_values_and_an_error_at_stage_1_naming_it(stages: Path, tag: str, mode: list[str]) -> None:
    n = 200
    write_jsonl(stages / "in.jsonl", [{"id": f"r{i}", "x": i, "tag": "ab"} for i in range(n)], extra="{torn\n")
    args = ["run", "st:decode", "st:score", "st:write", "-i", "in.jsonl", "-o", "out.jsonl", "--workers", "1,2,1"]
    got = cli([*args, *mode], stages, tag)
    assert got.returncode == 1, got.stderr
    out = read_records(stages / "out.jsonl")
    bad = read_records(stages / "bad.jsonl") if mode else [rec for rec in out if not rec["ok"]]
    if not mode:
        assert [rec["line"] for rec in out] == list(range(1, n + 2))  # in input order, errors in their place
    rows = by_line(out + bad if mode else out)
    assert sorted(rows) == list(range(1, n + 2))
    for i in range(n):
        rec = rows[i + 1]
        if i % 10 == 3:
            assert rec["ok"] is False and rec["id"] == f"r{i}"
            err = rec["error"]
            assert err["stage"] == {"index": 1, "function": "score"}
            assert err["type"] == "ValueError" and err["message"] == f"score refuses {i}" and err["attempts"] == 1
            assert "in score" in err["traceback"] and "chain.py" not in err["traceback"]
        else:
            assert rec == {"line": i + 1, "id": f"r{i}", "ok": True, "value": {"score": i * 10 + 2}}
    torn = rows[n + 1]["error"]
    assert torn["type"] == "InvalidRecord" and torn["stage"] == {"index": 0, "function": "decode"}
    assert f"line {n + 1} is not valid JSON" in torn["message"] and torn["attempts"] == 0
    assert len(bad) == n // 10 + 1
    assert f"{n + 1} records in" in got.stderr and f"{n - n // 10} ok, {n // 10 + 1} failed" in got.stderr
    assert "line 4, stage 1 (score): ValueError: score refuses 3" in got.stderr


def test_a_result_that_will_not_unpickle_fails_its_record_alone(stages: Path, tag: str) -> None:
    """In one batch of 10, two values of stage 1 will not unpickle (one hidden in a
    namedtuple). They go on to stage 2 still pickled and fail in its worker: only
    their two records fail, naming stage 2; the other eight go on."""
    write_jsonl(stages / "in.jsonl", [{"x": i} for i in range(10)])
    args = ["run", "st:decode", "st:unloadable", "st:write", "-i", "in.jsonl", "--chunksize", "10"]
    got = cli(args, stages, tag)
    assert got.returncode == 1, got.stderr
    rows = by_line([json.loads(line) for line in got.stdout.splitlines()])
    assert sorted(rows) == list(range(1, 11))
    for x in range(10):
        rec = rows[x + 1]
        if x in (5, 6):
            err = rec["error"]
            assert err["type"] == "SerializationError" and "SystemExit: 3" in err["message"], err
            assert "the stage before made could not be unpickled in this stage's worker" in err["message"]
            assert err["stage"] == {"index": 2, "function": "write"}
        else:
            assert rec["ok"] is True and rec["value"] == {"score": x}, rec


def test_one_target_still_takes_one_worker_count(stages: Path, tag: str) -> None:
    write_jsonl(stages / "in.jsonl", [{"x": i} for i in range(5)])
    got = cli(["run", "st:decode", "-i", "in.jsonl", "--workers", "1"], stages, tag)
    assert got.returncode == 0, got.stderr
    assert [json.loads(line)["value"] for line in got.stdout.splitlines()] == [{"x": i, "tag": ""} for i in range(5)]
    assert "stage" not in got.stdout


def test_csv_rows_and_a_row_that_cannot_be_cut_out(stages: Path, tag: str) -> None:
    (stages / "in.csv").write_text("id,x\n1,2\n2,3,4\n")
    got = cli(["run", "st:decode", "st:write", "--format", "csv", "-i", "in.csv"], stages, tag)
    assert got.returncode == 1, got.stderr
    rows = by_line([json.loads(line) for line in got.stdout.splitlines()])
    assert rows[2] == {"line": 2, "id": "1", "ok": True, "value": {"score": {"x": "2", "tag": ""}}}
    assert rows[3]["error"] == {
        "type": "InvalidRecord", "message": "line 3 has 3 fields where the header has 2", "traceback": "",
        "attempts": 0, "stage": {"index": 0, "function": "decode"},
    }  # fmt: skip
    assert "(1 rejected before running)" in got.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["st:decode", "st:score", "--workers", "2,4,1"], "--workers 2,4,1 gives 3 numbers for 2 stages"),
        (["st:decode", "st:score", "st:write", "--workers", "2,4"], "gives 2 numbers for 3 stages"),
        (["st:decode", "--workers", "2,4"], "there is one MODULE:FUNC: give one number"),
        (["st:decode", "st:score", "--workers", "2,x"], "'x' is not a number of workers"),
        (["st:decode", "st:score", "--workers", "1,0"], "0 is not in the range x>=1"),
        (["st:decode", "st:nosuch"], "stage 1: module 'st'"),
        (["st:decode", "st:score", "--priority-field", "p"], "--priority-field runs one MODULE:FUNC"),
        (["st:decode", "st:score", "-o", "full.jsonl"], "add --resume to finish that run"),
    ],
)
def test_usage_errors_of_a_chain(stages: Path, tag: str, args: list[str], message: str) -> None:
    write_jsonl(stages / "in.jsonl", [{"x": 1}])
    (stages / "full.jsonl").write_text('{"line": 1}\n')
    got = cli(["run", *args, "-i", "in.jsonl"], stages, tag)
    assert got.returncode == 2, (got.stdout, got.stderr)
    assert message in got.stderr, got.stderr
    assert not got.stdout
    assert (stages / "full.jsonl").read_text() == '{"line": 1}\n'  # nothing was touched


def test_help_tells_of_stages(stages: Path, tag: str) -> None:
    got = cli(["run", "--help"], stages, tag)
    assert got.returncode == 0, got.stderr
    text = " ".join(got.stdout.split())
    assert "MODULE:FUNC..." in text and "--workers 2,4,1" in text and '"stage": {"index": K' in text
    assert "apply to every stage" in text


def test_sigkill_of_the_parent_then_resume_gives_each_record_once(stages: Path, tag: str) -> None:
    n = 3000
    write_jsonl(stages / "in.jsonl", [{"id": i, "x": i} for i in range(n)])
    out, bad = stages / "out.jsonl", stages / "bad.jsonl"
    args = ["run", "st:decode", "st:slow_score", "st:write", "-i", "in.jsonl", "-o", "out.jsonl", "--errors"]
    args += ["bad.jsonl", "--workers", "1,2,1"]
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    proc = subprocess.Popen([SCRIPT, *args], cwd=stages, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 40 * n // 4) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    started = psutil.Process(proc.pid).children(recursive=True)  # the fork server, the workers
    assert len(started) >= 4, started
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    alive = _settled(lambda: [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 10.0)
    assert not alive, f"processes outlived the killed run: {alive}"
    assert not _settled(lambda: _tagged(tag), 10.0)
    before = out.read_bytes().count(b"\n") + bad.read_bytes().count(b"\n")
    assert 0 < before < n, f"{before} records before the kill: not part-way"
    written = {json.loads(line)["line"] for line in (out.read_text() + bad.read_text()).splitlines()}
    torn_line = min(set(range(1, n + 1)) - written)
    with out.open("ab") as f:  # as if the kill had landed inside a write
        if out.read_bytes().endswith(b"\n"):
            f.write(b'{"line": %d, "id": %d, "ok": tr' % (torn_line, torn_line - 1))

    got = cli([*args, "--resume"], stages, tag)
    assert got.returncode == 1, got.stderr  # some records fail at stage 1 (now or before)
    rows = by_line(read_records(out) + read_records(bad))
    assert sorted(rows) == list(range(1, n + 1))
    for i in range(n):
        rec = rows[i + 1]
        if i % 50 == 7:
            assert rec["error"]["stage"] == {"index": 1, "function": "slow_score"}
        else:
            assert rec["value"] == {"score": i * 10}, rec
    assert f"{before:,} skipped" in got.stderr or f"{before - 1:,} skipped" in got.stderr, got.stderr
    assert "cut a torn last line" in got.stderr


# --- pieces --------------------------------------------------------------------------------


def test_sigterm_to_the_process_group_stops_a_chain_quietly(stages: Path, tag: str) -> None:
    """`kill -TERM -PGID` (as `timeout` or a job scheduler sends): the chain stops as on
    Ctrl-C, leaves no process, and `--resume` finishes with each record once."""
    n = 3000
    write_jsonl(stages / "in.jsonl", [{"x": i} for i in range(n)])
    out = stages / "out.jsonl"
    env = {**os.environ, "PROCQUEUE_TEST_TAG": tag}
    args = [SCRIPT, "run", "st:decode", "st:slow_score", "-i", "in.jsonl", "-o", "out.jsonl", "--workers", "1,2"]
    proc = subprocess.Popen(args, cwd=stages, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size < 2000) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: parent, fork servers, collectors, workers
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM); run again with --resume" in err
    assert not _settled(lambda: _tagged(tag), 10.0)
    got = cli([*args[1:], "--resume"], stages, tag)
    assert got.returncode == 1, got.stderr  # slow_score refuses every 50th
    assert sorted(by_line(read_records(out))) == list(range(1, n + 1))


def test_steps_carry_the_line_and_id_to_the_output_record() -> None:
    first = c.FirstStep(r.RecordHandler(lambda rec: rec["x"] + 1, "jsonl", "id", None))
    middle = c.MiddleStep(lambda v: v * 2)
    last = c.LastStep(r.RecordHandler(lambda v: {"v": v}, "jsonl", "id", None))
    assert last(middle(first((5, 9, b'{"id": "a", "x": 1}')))) == (
        5,
        b'{"line": 9, "id": "a", "ok": true, "value": {"v": 4}}\n',
    )
    with pytest.raises(r.InvalidRecord, match="line 3 is not valid JSON"):
        first((0, 3, b"{nope"))
    with pytest.raises(r.InvalidRecord, match="not JSON"):
        c.LastStep(r.RecordHandler(lambda v: {1, 2}, "jsonl", "id", None))((0, 1, None, 0))
    assert c.stage_workers(None, 3) == [None] * 3 and c.stage_workers((2,), 2) == [2, 2]


def test_stage_of_takes_the_note_out_of_the_chain() -> None:
    cause = procqueue.TaskFailed("task 4 raised")
    exc = ValueError("boom")
    note = procqueue.StageFailed("at stage 1", stage=1, function="score", item=7)
    note.__cause__ = cause
    exc.__cause__ = note
    assert c.stage_of(exc) is note and exc.__cause__ is cause
    assert c.stage_of(ValueError("plain")) is None


def test_the_chain_uses_only_the_public_api() -> None:
    tree = ast.parse(Path(c.__file__).read_text())
    modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    private = [mod for mod in modules if mod and mod.startswith("procqueue.") and not mod.startswith("procqueue._cli")]
    assert not private, f"chain.py imports private modules of procqueue: {private}"
