"""The bench suite runs end to end for a new user (stdlib peers only here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs_and_reports(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "procqueue", "bench", "--quick", "--repeats", "1", "--out", str(tmp_path),
        "--workload", "tiny", "--workload", "faults", "--workload", "priority",
        "--peer", "serial", "--peer", "ProcessPoolExecutor", "--peer", "multiprocessing.Pool",
    ]  # fmt: skip
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    out = got.stdout
    assert "tiny: ordered map of 200,000 trivial tasks" in out
    assert "vs best peer" in out and "best peer: multiprocessing.Pool" in out
    # the standard library's pools do not survive a dying worker; procqueue with a retry completes
    assert "procqueue              max_retries=1    completed" in out
    assert "multiprocessing.Pool   defaults         HANG" in out
    assert "failed (BrokenProcessPool)" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["python"] == sys.version.split()[0] and data["machine"]["logical_cpus"]
    kinds = {(c["spec"]["workload"], c["spec"]["peer"]) for c in data["cases"]}
    assert ("tiny", "procqueue") in kinds and ("priority", "ProcessPoolExecutor") in kinds
    assert (tmp_path / "table.txt").read_text().strip()


def test_bench_pipeline_runs_and_judges_its_goals(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    """The pipeline workload end to end at tiny sizes: every side runs, the goals are judged."""
    from bench import suite

    wl = suite.BY_NAME["pipeline"]
    monkeypatch.setattr(wl, "quick_n", 3000)
    monkeypatch.setattr(wl, "quick_extra", {**wl.quick_extra, "ms_n": 24})
    assert suite.main(["--quick", "--repeats", "1", "--workload", "pipeline", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("procqueue Pipeline           tiny 1/stage", "procqueue pools chained      ms 1/stage",
                 "multiprocessing.Pool chained tiny 1/stage cs=10000"):  # fmt: skip
        assert line in out
    assert "ERROR" not in out and "HANG" not in out, out
    data = json.loads((tmp_path / "results.json").read_text())
    goals = data["pipeline_goals"]
    assert set(goals) == {"tiny_vs_mp 1/stage", "ms_of_ceiling 1/stage", "rss_flat 1/stage"}
    assert all(g["ratio"] > 0 and len(g["rounds"]) >= 1 for g in goals.values())
    cases = [c for c in data["cases"] if c["spec"]["peer"] == "procqueue Pipeline"]
    assert {c["spec"]["part"] for c in cases} == {"tiny", "ms"} and all(c["result"]["n"] for c in cases)
