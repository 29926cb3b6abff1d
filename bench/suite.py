"""The bench suite: procqueue against its peers, each case in a fresh process
under a hard time limit. Prints a table, writes every raw figure to JSON with
the machine's description, and draws PNG charts (with matplotlib).

    procqueue bench [--quick] [--workload tiny --workload cpu ...] [--out DIR]
    python -m bench ...                       (the same, from a checkout)

Example: procqueue bench --quick --workload tiny --workload faults

The dask workload (it needs distributed: pip install 'procqueue[dask]') runs
procqueue's Dask backend on a LocalCluster against raw client.submit, client.map
and the local backend, and checks the Dask backend's goals (issue 12); its cases
run interleaved (one repeat each per round, the order reversed every other round),
each in a fresh process that starts its own cluster outside the timed maps.

The pipeline workload (issue 15) maps three stages over a generator with
`pq.Pipeline`, with three procqueue pools chained by hand and with three
multiprocessing.Pools chained by hand (`p3.imap(f3, p2.imap(f2, p1.imap(f1, xs)))`,
at each chunk size of a sweep), the same worker processes a stage on every side,
and checks its goals (see `pipelines.py`); its cases run interleaved too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import pipelines
from . import workloads as w
from .peers import PEERS, Peer

POOLS = [p.name for p in PEERS if p.general and p.name not in ("serial", "limit (bare fork)", "procqueue")]
CUSTOM = ("faults", "durations", "dask")  # workloads whose figures are not one number per repeat
# The Dask backend's goals (issue 12): its per-task cost on tiny tasks at most this share of
# raw client.submit's; its throughput on ~1 ms tasks at least this share of the local backend's.
DASK_GOALS = {"tiny_vs_submit": 0.10, "ms_vs_local": 0.90}


@dataclass
class Workload:
    name: str
    title: str
    unit: str  # what the table shows
    higher_is_better: bool
    n: int
    quick_n: int
    sweep: tuple[int | None, ...] = (None,)  # chunk sizes tried per peer (None: its default)
    quick_sweep: tuple[int | None, ...] = (None,)
    limit: float = 120.0  # seconds a case may take before it counts as a hang
    quick_limit: float = 30.0
    serial: bool = False  # the serial loop runs it too
    limit_peer: bool = False  # the bare-fork reference runs it too
    needs: str | None = None  # a module it needs (numpy)
    install: str = "pip install 'procqueue[bench]'"  # what installs the module it needs
    extra: dict[str, Any] = field(default_factory=dict)  # more of its spec
    quick_extra: dict[str, Any] = field(default_factory=dict)  # ... and what --quick changes of it
    peers: tuple[str, ...] | None = None  # the peers it runs, in this order (None: the general ones)
    interleave: bool = False  # its repeats run as rounds: every case once per round, in turn, the
    # order reversed every other round (so neighbours, as the two procqueue backends, stay neighbours)

    def spec_extra(self, quick: bool) -> dict[str, Any]:
        return {**self.extra, **(self.quick_extra if quick else {})}


WORKLOADS = [
    Workload("tiny", "ordered map of {n:,} trivial tasks (a list in)", "tasks/s", True, 200_000, 200_000,
             (None, 1000, 10_000), (None, 10_000), serial=True, limit_peer=True, interleave=True),
    Workload("cpu", "{n:,} tasks of ~1 ms pure-Python CPU", "speedup over serial", True, 4000, 1000,
             (None, 10), (None, 10), limit_peer=True, interleave=True),
    Workload("skewed", "{n:,} tasks with heavy-tailed durations (mean ~2 ms)", "makespan / ideal", False, 1000, 300,
             (None, 1), (None,), limit_peer=True, interleave=True),
    Workload("payload-in", "{n} tasks, each given an 8 MB numpy array (it reads all of it)", "MB/s", True, 200, 32,
             needs="numpy", serial=True, extra={"mb": 8}, interleave=True),
    Workload("payload-out", "{n} tasks, each returning a fresh 8 MB numpy array (read whole, then dropped)", "MB/s",
             True, 200, 32, needs="numpy", serial=True, extra={"mb": 8}, interleave=True),
    Workload("stream", "lazy map over a generator of {n:,} items", "items/s", True, 2_000_000, 500_000,
             (None, 1000, 10_000), (None, 10_000), limit=60.0, quick_limit=15.0, serial=True, interleave=True),
    Workload("startup", "a cold pool to its first result", "seconds", False, 1, 1, limit=60.0, quick_limit=20.0),
    Workload("faults", "{n} tasks: one exits its worker, one segfaults it", "outcome", True, 100, 100,
             limit=20.0, quick_limit=8.0),
    Workload("priority", "an urgent task submitted behind {n:,} queued tasks of ~1 ms", "seconds to finish", False,
             2000, 500, limit=60.0, quick_limit=20.0),
    Workload("durations", "throughput against task duration", "tasks/s", True, 0, 0, limit=120.0, quick_limit=40.0,
             extra={"durations_ms": [0.01, 0.1, 1.0, 10.0]}),
    Workload("async", "{n:,} awaited calls of a ~0.1 ms function from 200 coroutines", "calls/s", True, 20_000,
             5000, limit=120.0, quick_limit=60.0, extra={"concurrency": 200}, interleave=True,
             peers=("procqueue", "ProcessPoolExecutor", "aiomultiprocess")),
    Workload("dask", "on a Dask LocalCluster: {n:,} trivial tasks ({per_task_n:,} a task each for raw Dask), "
             "then {ms_n:,} tasks of ~{ms:g} ms", "us/task, tasks/s", True, 200_000, 200_000, limit=180.0,
             quick_limit=90.0, needs="distributed", install="pip install 'procqueue[dask]'",
             extra={"ms": 1.0, "ms_n": 2000, "per_task_n": 5000}, quick_extra={"ms_n": 1000, "per_task_n": 2000},
             peers=("dask client.submit", "dask client.map", "procqueue (dask)", "procqueue"), interleave=True),
    Workload("pipeline", "3 stages over a generator: {n:,} items of tiny stages, {ms_n:,} of ~1 ms stages",
             "items/s, share of ceiling", True, 500_000, 100_000, (100, 1000, 10_000), (1000, 10_000), limit=120.0,
             quick_limit=60.0, extra={"ms_n": 4000, "per_stage": [1, 2], "ms_sweep": [1, 10]},
             quick_extra={"ms_n": 1000, "per_stage": [1], "ms_sweep": [10]},
             peers=(pipelines.PIPELINE, "procqueue pools chained", pipelines.MP), interleave=True),
]  # fmt: skip
BY_NAME = {wl.name: wl for wl in WORKLOADS}


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {p.package: p.version() for p in PEERS if p.package and p.available()}
    for extra in ("numpy", "matplotlib", "cloudpickle", "psutil"):
        if importlib.util.find_spec(extra) is not None:
            versions[extra] = importlib.metadata.version(extra)
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
    }


def run_case(
    spec: dict[str, Any],
    limit: float,
    *,
    cwd: str | None = None,
    path: list[str] | None = None,
    package: str | None = None,
) -> dict[str, Any]:
    """Run one case in a fresh process group; past `limit` seconds, kill the group: a hang.

    The case writes its result to a file: a helper process a peer leaves behind
    (loky's resource tracker) may hold any pipe open long after the case ended.
    `cwd`, `path` (the case's whole PYTHONPATH) and `package` (the bench package it
    runs `.case` from) let bench.compare run a case against another checkout's
    procqueue; by default the case runs from this checkout, as the suite does.
    """
    if path is None:
        path = [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    with tempfile.TemporaryDirectory(prefix="procqueue-bench-") as tmp:
        out_path, err_path = Path(tmp, "result.json"), Path(tmp, "stderr.txt")
        cmd = [sys.executable, "-m", f"{package or __package__}.case", json.dumps(spec), str(out_path)]
        t = time.monotonic()
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                return {"hang": True, "limit": limit}
            finally:
                _kill_group(proc.pid)  # the case on a hang; otherwise whatever the peer left behind
                proc.wait()
        if proc.returncode != 0 or not out_path.exists():
            return {"error": f"the case process exited with {proc.returncode}: {err_path.read_text().strip()[-500:]}"}
        result: dict[str, Any] = json.loads(out_path.read_text())
    result["wall"] = time.monotonic() - t
    return result


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def settings(wl: Workload, peer: Peer, quick: bool) -> list[dict[str, Any]]:
    """The settings a peer runs a workload with: its defaults, then each chunk size of the sweep."""
    if wl.name == "faults" and peer.name == "procqueue":
        return [{"label": "defaults"}, {"label": "max_retries=1", "options": {"max_retries": 1}}]
    if wl.name == "pipeline":
        return pipelines.settings(wl, peer, quick)
    if wl.name == "dask":  # procqueue's defaults either way; raw Dask's pure=False, as procqueue's own tasks
        return [{"label": {"procqueue": "backend=local", "procqueue (dask)": "client=c"}.get(peer.name, "pure=False")}]
    if peer.name in ("serial", "limit (bare fork)"):
        return [{"label": "-"}]
    sweep = wl.quick_sweep if quick else wl.sweep
    if peer.name == "procqueue":
        sweep = (None,)  # its defaults are what it is judged by
    return [{"label": "defaults" if cs is None else f"chunksize={cs}", "chunksize": cs} for cs in sweep]


def plan(wl: Workload, chosen: list[Peer], two_best: list[str]) -> list[Peer]:
    if wl.peers is not None:
        order = list(wl.peers)
        return sorted((p for p in chosen if p.name in order), key=lambda p: order.index(p.name))
    peers = []
    for peer in sorted(chosen, key=lambda p: p.name != "serial"):  # serial first: the others' figures use it
        if not peer.general:
            continue
        if peer.name == "serial" and not wl.serial:
            continue
        if peer.name == "limit (bare fork)" and not wl.limit_peer:
            continue
        if wl.name == "priority" and peer.name == "joblib":
            continue  # it has no way to submit a single task
        if wl.name == "durations" and peer.name not in ["procqueue", *two_best]:
            continue
        peers.append(peer)
    return peers


def figures(wl: Workload, result: dict[str, Any], workers: int) -> list[float]:
    """Per-repeat figures in the workload's unit."""
    times = result.get("times", [])
    n = result.get("n", wl.n)
    if wl.name in ("tiny", "stream", "async"):
        return [n / t for t in times]
    if wl.name in ("cpu", "skewed"):  # serial time: the loops at the speed probed just before each run
        total, longest = result["loops"]
        serial = [total * spl for spl in result["per_loop"]]
        if wl.name == "cpu":
            return [s / t for s, t in zip(serial, times, strict=True)]
        ideal = [max(s / workers, longest * spl) for s, spl in zip(serial, result["per_loop"], strict=True)]
        return [t / i for t, i in zip(times, ideal, strict=True)]
    if wl.name.startswith("payload"):
        return [n * result["mb"] / t for t in times]
    if wl.name == "pipeline":
        return pipelines.figures(result)
    return list(times)


def fmt(value: float, unit: str) -> str:
    if unit in ("tasks/s", "items/s", "calls/s"):
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e4 else f"{value:.0f}"
    if unit == "MB/s":
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="procqueue bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats and settings: about 2 minutes")
    ap.add_argument("--workload", action="append", choices=list(BY_NAME), help="run only these (repeatable)")
    ap.add_argument("--peer", action="append", help="run only these peers (repeatable; procqueue always runs)")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed runs per case (default 3, quick 2; dask: rounds of its cases)"
    )
    ap.add_argument("--workers", type=int, default=2, help="worker processes per pool (default 2)")
    ap.add_argument("--out", default="bench-results", help="where the JSON and PNG files go (default bench-results/)")
    args = ap.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed suite still ends the case it runs
    todo = [BY_NAME[n] for n in args.workload] if args.workload else WORKLOADS
    named = {name for wl in todo for name in wl.peers or ()}
    always = ("procqueue", "procqueue (dask)", pipelines.PIPELINE)
    chosen = [p for p in PEERS if args.peer is None or p.name in args.peer or p.name in always]
    chosen = [p for p in chosen if p.general or p.name in named]
    notes = [f"{p.name} is not installed: skipped ({p.install})" for p in chosen if not p.available()]
    chosen = [p for p in chosen if p.available()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t_suite = time.monotonic()
    lpm = w.calibrate()
    print(
        f"procqueue bench{' --quick' if quick else ''}: {len(todo)} workloads, peers {', '.join(p.name for p in chosen)}"
    )
    print(f"calibrated: {lpm:,} loops of pure-Python work per ms; {args.workers} workers per pool; {repeats} repeats")
    for note in notes:
        print(f"note: {note}")
    cases: list[dict[str, Any]] = []
    two_best = ["multiprocessing.Pool", "ProcessPoolExecutor"]
    summary: dict[str, list[dict[str, Any]]] = {}
    for wl in todo:
        if wl.needs and importlib.util.find_spec(wl.needs) is None:
            print(f"\n{wl.name}: skipped, it needs {wl.needs} ({wl.install})")
            continue
        n = wl.quick_n if quick else wl.n
        print(f"\n{wl.name}: {wl.title.format(n=n, **wl.spec_extra(quick))}")
        rows = []
        jobs = [(peer, setting) for peer in plan(wl, chosen, two_best) for setting in settings(wl, peer, quick)]
        rounds = repeats if wl.interleave else 1
        got: list[list[dict[str, Any]]] = [[] for _ in jobs]
        specs = []
        for peer, setting in jobs:
            spec = {
                "workload": wl.name, "peer": peer.name, "chunksize": setting.get("chunksize"),
                "options": setting.get("options", {}), "n": n,
                "repeats": 1 if wl.interleave or wl.name == "faults" else repeats,
                "workers": args.workers, "loops_per_ms": lpm, "budget": 3.0 if quick else 8.0,
                "seconds": 0.3 if quick else 1.0, **wl.spec_extra(quick),
                **({"rounds": rounds, "fill": 0.3 if quick else 1.0} if wl.interleave else {}),
                **setting.get("spec", {}),
            }  # fmt: skip
            specs.append(spec)
        for r in range(rounds):
            for k in range(len(jobs)) if r % 2 == 0 else reversed(range(len(jobs))):
                peer, setting = jobs[k]
                if any(failed(res) for res in got[k]):
                    continue  # it failed in an earlier round: once is enough
                got[k].append(run_case(specs[k], wl.quick_limit if quick else wl.limit))
                if wl.interleave:
                    one = row_of(wl, peer.name, setting["label"], got[k][-1:], args.workers)
                    print(f"  round {r + 1}/{rounds}: {describe(wl, one)}")
                else:
                    rows.append(row_of(wl, peer.name, setting["label"], got[k], args.workers))
                    print("  " + describe(wl, rows[-1]))
        if wl.interleave:
            print(f"  medians of {rounds} rounds:")
            for k, (peer, setting) in enumerate(jobs):
                rows.append(row_of(wl, peer.name, setting["label"], got[k], args.workers))
                print("  " + describe(wl, rows[-1]))
        cases.extend({"spec": spec, "result": row["result"]} for spec, row in zip(specs, rows, strict=True))
        summary[wl.name] = rows
        if wl.name == "tiny":
            two_best = best_peers(rows, 2) or two_best
    print(f"\nsuite took {time.monotonic() - t_suite:.0f} s")
    table = report(summary, quick)
    print(table)
    data = {"machine": machine(), "quick": quick, "repeats": repeats, "workers": args.workers,
            "loops_per_ms": lpm, "notes": notes, "cases": cases}  # fmt: skip
    if "dask" in summary:
        data["dask_goals"] = dask_goals(summary["dask"])
    if "pipeline" in summary:
        data["pipeline_goals"] = pipelines.goals(summary["pipeline"])
    (out_dir / "results.json").write_text(json.dumps(data, indent=1))
    (out_dir / "table.txt").write_text(table)
    print(f"raw figures: {out_dir / 'results.json'}; table: {out_dir / 'table.txt'}")
    try:
        from .charts import draw
    except ImportError:
        print("charts: skipped, matplotlib is not installed (pip install 'procqueue[bench]')")
    else:
        for path in draw(summary, out_dir, args.workers):
            print(f"chart: {path}")
    return 0


def failed(result: dict[str, Any]) -> bool:
    return bool(result.get("hang")) or "error" in result


def merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's result from its rounds: their lists joined, their walls summed; a failed
    round (the last one run) stands for the case, with how many rounds went well before it."""
    if failed(results[-1]):
        return dict(results[-1], rounds_ok=len(results) - 1) if len(results) > 1 else results[-1]
    out: dict[str, Any] = {}
    for res in results:
        for key, value in res.items():
            if isinstance(value, list):
                out.setdefault(key, []).extend(value)
            else:
                out.setdefault(key, value)
    out["wall"] = sum(res["wall"] for res in results)
    return out


def row_of(wl: Workload, peer: str, setting: str, results: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """A table row: a case's result (its rounds merged) and its figures."""
    result = merged(results)
    row: dict[str, Any] = {"peer": peer, "setting": setting, "result": result}
    if "times" in result and wl.name not in CUSTOM:
        # Per round, then joined: a round's figures need its own n and serial speed.
        vals = [v for res in results if not failed(res) for v in figures(wl, res, workers)]
        row.update(median=statistics.median(vals), low=min(vals), high=max(vals))
    if "times" in result and wl.name == "dask":
        row["figures"] = dask_figures(result, workers)
    return row


def dask_figures(result: dict[str, Any], workers: int) -> dict[str, list[float]]:
    """Per-round figures of a dask case: per tiny task, microseconds of wall time and
    tasks/s; per ~1 ms task, tasks/s, the share of the ideal (every worker busy with
    the tasks' own work, `task_s` each: its serial probe) and the overhead, microseconds
    a worker spends on a task beyond its own work; the cluster's and the pool's start."""
    n, ms_n, times, ms_times = result["n"], result["ms_n"], result["times"], result["ms_times"]
    pairs = list(zip(ms_times, result["task_s"], strict=True))
    return {
        "tiny_us": [t / n * 1e6 for t in times],
        "tiny_rate": [n / t for t in times],
        "ms_rate": [ms_n / t for t in ms_times],
        "ms_ideal": [ms_n / t / (workers / s) for t, s in pairs],
        "ms_over_us": [(t * workers / ms_n - s) * 1e6 for t, s in pairs],
        "cluster_start": list(result["cluster_start"]),
        "pool_start": list(result["pool_start"]),
    }


def dask_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The Dask backend's goals (DASK_GOALS) from the medians, and the same ratio per round
    (the rounds ran interleaved: a round's cases ran one after another)."""
    figs = {row["peer"]: row["figures"] for row in rows if "figures" in row}
    goals: dict[str, Any] = {}
    pool, submit, local = figs.get("procqueue (dask)"), figs.get("dask client.submit"), figs.get("procqueue")
    if pool and submit:
        goals["tiny_vs_submit"] = _goal(
            "per-task cost on tiny tasks, procqueue (dask) / dask client.submit",
            pool["tiny_us"], submit["tiny_us"], DASK_GOALS["tiny_vs_submit"], higher_is_better=False,
        )  # fmt: skip
    if pool and local:
        goals["ms_vs_local"] = _goal(
            "throughput on ~1 ms tasks, procqueue (dask) / procqueue (local backend)",
            pool["ms_rate"], local["ms_rate"], DASK_GOALS["ms_vs_local"], higher_is_better=True,
        )  # fmt: skip
    return goals


def _goal(what: str, ours: list[float], theirs: list[float], bound: float, *, higher_is_better: bool) -> dict[str, Any]:
    """A goal on the ratio of two medians, with the same ratio per interleaved round."""
    ratio = statistics.median(ours) / statistics.median(theirs)
    return {
        "what": what,
        "ratio": ratio,
        "rounds": [a / b for a, b in zip(ours, theirs, strict=False)],
        "goal": f"{'>=' if higher_is_better else '<='} {bound}",
        "met": ratio >= bound if higher_is_better else ratio <= bound,
    }


def us(value: float) -> str:
    """Microseconds, to three figures or so."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def dask_table(wl: Workload, rows: list[dict[str, Any]]) -> list[str]:
    """The dask workload's lines of the table: per peer, medians (min-max) of the rounds, then the goals."""
    lines = [
        f"  {'':39s} | {'tiny tasks':^37s} | {'~1 ms tasks':^44s} | {'start (s)':^15s}",
        f"  {'peer':22s} {'setting':16s} | {'us/task':>8s} {'(min-max)':17s} {'tasks/s':>10s} | "
        f"{'tasks/s':>7s} {'(min-max)':15s} {'of ideal':>9s} {'+us/task':>10s} | {'cluster':>7s} {'pool':>7s}",
    ]
    for row in rows:
        if "figures" not in row:
            lines.append("  " + describe(wl, row))
            continue
        f = row["figures"]
        med = {k: statistics.median(v) for k, v in f.items() if v}
        tiny_range = f"({us(min(f['tiny_us']))}-{us(max(f['tiny_us']))})"
        ms_range = f"({min(f['ms_rate']):,.0f}-{max(f['ms_rate']):,.0f})"
        starts = " ".join(f"{med[k]:7.2f}" if k in med else f"{'-':>7s}" for k in ("cluster_start", "pool_start"))
        lines.append(
            f"  {row['peer']:22s} {row['setting']:16s} | {us(med['tiny_us']):>8s} {tiny_range:17s} "
            f"{fmt(med['tiny_rate'], 'tasks/s'):>10s} | {med['ms_rate']:7,.0f} {ms_range:15s} {med['ms_ideal']:9.2f} "
            f"{med['ms_over_us']:10,.0f} | {starts}"
        )
    return lines + goal_lines(dask_goals(rows), 4)


def goal_lines(goals: dict[str, dict[str, Any]], digits: int) -> list[str]:
    """The table's lines of a workload's goals: each ratio against its goal, and per round."""
    lines = []
    for key, g in goals.items():
        rounds = ", ".join(f"{x:.{digits}g}" for x in g["rounds"])
        verdict = "met" if g["met"] else "MISSED"
        lines.append(
            f"  goal {key}: {g['what']}: {g['ratio']:.{digits}g} (goal {g['goal']}): {verdict}  [per round: {rounds}]"
        )
    if not goals:
        lines.append("  goals: not judged (a case failed, or its peer did not run)")
    return lines


def describe(wl: Workload, row: dict[str, Any]) -> str:
    r = row["result"]
    peer_w, setting_w = pipelines.HEAD if wl.name == "pipeline" else (22, 16)
    head = f"{row['peer']:{peer_w}s} {row['setting']:{setting_w}s}"
    if r.get("hang"):
        return f"{head} HANG: no result within {r['limit']:.0f} s (killed)"
    if "error" in r:
        return f"{head} ERROR: {r['error'].splitlines()[0][:100]}"
    if wl.name == "pipeline":
        return pipelines.describe(head, row)
    if wl.name == "faults":
        return f"{head} {r['outcome']} in {r['times'][0]:.2f} s"
    if wl.name == "durations":
        return (
            head + "  " + "  ".join(f"{x['ms']} ms: {x['n'] / statistics.median(x['times']):,.0f}/s" for x in r["rows"])
        )
    if wl.name == "dask":
        f = {k: statistics.median(v) for k, v in row["figures"].items() if v}
        start = "".join(f", {k.split('_')[0]} start {f[k]:.2f} s" for k in ("cluster_start", "pool_start") if k in f)
        return (
            f"{head} tiny {us(f['tiny_us']):>6s} us/task ({fmt(f['tiny_rate'], 'tasks/s')} tasks/s, n={r['n']:,});"
            f"  ~1 ms: {f['ms_rate']:6,.0f} tasks/s ({f['ms_ideal']:.2f} of ideal, +{f['ms_over_us']:,.0f} us/task){start}"
        )
    extra = ""
    if wl.name == "stream" or wl.name.startswith("payload"):
        extra = f"  parent RSS +{statistics.median(r['rss_growth']) / 2**20:.0f} MB"
    if wl.name == "startup":
        extra = f"  shutdown {statistics.median(r['shutdown']):.3f} s"
        if r.get("cold"):
            extra += f", cold first pool {statistics.median(r['cold']):.3f} s"
        if r.get("import"):
            extra += f", import {statistics.median(r['import']) * 1000:.0f} ms"
    if wl.name == "async":
        extra = f"  max loop gap {statistics.median(r['max_gap']) * 1000:.0f} ms (worst {max(r['max_gap']) * 1000:.0f})"
    if wl.name == "priority":
        extra = f"  (overtook {statistics.median(r['overtaken']):.0f} of {r['n']:,} queued before it)"
    n_note = f"  [n={r['n']:,}]" if r.get("n") not in (None, wl.n, wl.quick_n) else ""
    return f"{head} {fmt(row['median'], wl.unit):>9s} {wl.unit}  ({fmt(row['low'], wl.unit)}-{fmt(row['high'], wl.unit)}){extra}{n_note}"


def best_peers(rows: list[dict[str, Any]], k: int) -> list[str]:
    best: dict[str, float] = {}
    for row in rows:
        if row["peer"] in POOLS and "median" in row:
            best[row["peer"]] = max(best.get(row["peer"], 0.0), row["median"])
    return sorted(best, key=lambda p: -best[p])[:k]


def report(summary: dict[str, list[dict[str, Any]]], quick: bool) -> str:
    """The table: per workload, each peer's defaults and its best setting, against the best peer."""
    lines = [
        f"\nprocqueue bench{' (quick)' if quick else ''}: medians (min-max); 'vs best peer' > 1 means better than the best other pool"
    ]
    for name, rows in summary.items():
        wl = BY_NAME[name]
        lines.append(
            f"\n{name}: {wl.title.format(n=wl.quick_n if quick else wl.n, **wl.spec_extra(quick))} [{wl.unit}]"
        )
        if name == "dask":
            lines.extend(dask_table(wl, rows))
            continue
        if name == "pipeline":
            lines.extend(pipelines.table(rows))
            continue
        if name in ("faults", "durations"):
            lines.extend("  " + describe(wl, row) for row in rows)
            continue
        sign = 1 if wl.higher_is_better else -1
        others = set(wl.peers or ()) - {"procqueue"} if wl.peers else set(POOLS)  # named peers count too
        peers_best = [r for r in rows if r["peer"] in others and "median" in r]
        best = max(peers_best, key=lambda r: sign * r["median"]) if peers_best else None
        shown: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            shown.setdefault(row["peer"], []).append(row)
        for prow in shown.values():
            timed = [r for r in prow if "median" in r]
            picks = [r for r in prow if r["setting"] in ("defaults", "-")] or prow[:1]
            if timed:
                top = max(timed, key=lambda r: sign * r["median"])
                if top not in picks:
                    picks.append(top)
            for r in picks:
                ratio = ""
                if best is not None and "median" in r and r["median"]:
                    x = r["median"] / best["median"] if wl.higher_is_better else best["median"] / r["median"]
                    ratio = f"{x:6.2f}x"
                label = r["setting"] + (" (best)" if r is not picks[0] else "")
                lines.append(f"  {describe(wl, dict(r, setting=label))}  {ratio}")
        if best is not None:
            lines.append(f"  best peer: {best['peer']} {best['setting']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
