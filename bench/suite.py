"""The bench suite: procqueue against its peers, each case in a fresh process
under a hard time limit. Prints a table, writes every raw figure to JSON with
the machine's description, and draws PNG charts (with matplotlib).

    procqueue bench [--quick] [--workload tiny --workload cpu ...] [--out DIR]
    python -m bench ...                       (the same, from a checkout)

Example: procqueue bench --quick --workload tiny --workload faults
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

from . import workloads as w
from .peers import PEERS, Peer

POOLS = [p.name for p in PEERS if p.name not in ("serial", "limit (bare fork)", "procqueue")]


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
    extra: dict[str, Any] = field(default_factory=dict)


WORKLOADS = [
    Workload("tiny", "ordered map of {n:,} trivial tasks (a list in)", "tasks/s", True, 200_000, 200_000,
             (None, 1000, 10_000), (None, 10_000), serial=True, limit_peer=True),
    Workload("cpu", "{n:,} tasks of ~1 ms pure-Python CPU", "speedup over serial", True, 4000, 1000,
             (None, 10), (None, 10), limit_peer=True),
    Workload("skewed", "{n:,} tasks with heavy-tailed durations (mean ~2 ms)", "makespan / ideal", False, 1000, 300,
             (None, 1), (None,), limit_peer=True),
    Workload("payload", "{n} tasks of 8 MB numpy arrays in and out", "MB/s moved", True, 32, 8, needs="numpy",
             serial=True, extra={"mb": 8}),
    Workload("stream", "lazy map over a generator of {n:,} items", "items/s", True, 2_000_000, 500_000,
             (None, 1000, 10_000), (None, 10_000), limit=60.0, quick_limit=15.0, serial=True),
    Workload("startup", "a cold pool to its first result", "seconds", False, 1, 1, limit=60.0, quick_limit=20.0),
    Workload("faults", "{n} tasks: one exits its worker, one segfaults it", "outcome", True, 100, 100,
             limit=20.0, quick_limit=8.0),
    Workload("priority", "an urgent task submitted behind {n:,} queued tasks of ~1 ms", "seconds to finish", False,
             2000, 500, limit=60.0, quick_limit=20.0),
    Workload("durations", "throughput against task duration", "tasks/s", True, 0, 0, limit=120.0, quick_limit=40.0,
             extra={"durations_ms": [0.01, 0.1, 1.0, 10.0]}),
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
    versions = {p.name: p.version() for p in PEERS if p.package and p.available()}
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
    if peer.name in ("serial", "limit (bare fork)"):
        return [{"label": "-"}]
    sweep = wl.quick_sweep if quick else wl.sweep
    if peer.name == "procqueue":
        sweep = (None,)  # its defaults are what it is judged by
    return [{"label": "defaults" if cs is None else f"chunksize={cs}", "chunksize": cs} for cs in sweep]


def plan(wl: Workload, chosen: list[Peer], two_best: list[str]) -> list[Peer]:
    peers = []
    for peer in sorted(chosen, key=lambda p: p.name != "serial"):  # serial first: the others' figures use it
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
    if wl.name in ("tiny", "stream"):
        return [n / t for t in times]
    if wl.name in ("cpu", "skewed"):  # serial time: the loops at the speed probed just before each run
        total, longest = result["loops"]
        serial = [total * spl for spl in result["per_loop"]]
        if wl.name == "cpu":
            return [s / t for s, t in zip(serial, times, strict=True)]
        ideal = [max(s / workers, longest * spl) for s, spl in zip(serial, result["per_loop"], strict=True)]
        return [t / i for t, i in zip(times, ideal, strict=True)]
    if wl.name == "payload":
        return [n * result["mb"] * 2 / t for t in times]
    return list(times)


def fmt(value: float, unit: str) -> str:
    if unit in ("tasks/s", "items/s"):
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
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3, quick 2)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes per pool (default 2)")
    ap.add_argument("--out", default="bench-results", help="where the JSON and PNG files go (default bench-results/)")
    args = ap.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed suite still ends the case it runs
    chosen = [p for p in PEERS if args.peer is None or p.name in args.peer or p.name == "procqueue"]
    notes = [
        f"{p.name} is not installed: skipped (pip install 'procqueue[bench]')" for p in chosen if not p.available()
    ]
    chosen = [p for p in chosen if p.available()]
    todo = [BY_NAME[n] for n in args.workload] if args.workload else WORKLOADS
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
            print(f"\n{wl.name}: skipped, it needs {wl.needs} (pip install 'procqueue[bench]')")
            continue
        n = wl.quick_n if quick else wl.n
        print(f"\n{wl.name}: {wl.title.format(n=n)}")
        rows = []
        for peer in plan(wl, chosen, two_best):
            for setting in settings(wl, peer, quick):
                spec = {
                    "workload": wl.name, "peer": peer.name, "chunksize": setting.get("chunksize"),
                    "options": setting.get("options", {}), "n": n, "repeats": repeats if wl.name != "faults" else 1,
                    "workers": args.workers, "loops_per_ms": lpm, "budget": 3.0 if quick else 8.0,
                    "seconds": 0.3 if quick else 1.0, **wl.extra,
                }  # fmt: skip
                result = run_case(spec, wl.quick_limit if quick else wl.limit)
                cases.append({"spec": spec, "result": result})
                row = {"peer": peer.name, "setting": setting["label"], "result": result}
                if "times" in result and wl.name not in ("faults", "durations"):
                    vals = figures(wl, result, args.workers)
                    row.update(median=statistics.median(vals), low=min(vals), high=max(vals))
                rows.append(row)
                print("  " + describe(wl, row))
        summary[wl.name] = rows
        if wl.name == "tiny":
            two_best = best_peers(rows, 2) or two_best
    print(f"\nsuite took {time.monotonic() - t_suite:.0f} s")
    table = report(summary, quick)
    print(table)
    data = {"machine": machine(), "quick": quick, "repeats": repeats, "workers": args.workers,
            "loops_per_ms": lpm, "notes": notes, "cases": cases}  # fmt: skip
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


def describe(wl: Workload, row: dict[str, Any]) -> str:
    r = row["result"]
    head = f"{row['peer']:22s} {row['setting']:16s}"
    if r.get("hang"):
        return f"{head} HANG: no result within {r['limit']:.0f} s (killed)"
    if "error" in r:
        return f"{head} ERROR: {r['error'].splitlines()[0][:100]}"
    if wl.name == "faults":
        return f"{head} {r['outcome']} in {r['times'][0]:.2f} s"
    if wl.name == "durations":
        return (
            head + "  " + "  ".join(f"{x['ms']} ms: {x['n'] / statistics.median(x['times']):,.0f}/s" for x in r["rows"])
        )
    extra = ""
    if wl.name == "stream":
        extra = f"  parent RSS +{statistics.median(r['rss_growth']) / 2**20:.0f} MB"
    if wl.name == "startup":
        extra = f"  shutdown {statistics.median(r['shutdown']):.3f} s"
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
        lines.append(f"\n{name}: {wl.title.format(n=wl.quick_n if quick else wl.n)} [{wl.unit}]")
        if name in ("faults", "durations"):
            lines.extend("  " + describe(wl, row) for row in rows)
            continue
        sign = 1 if wl.higher_is_better else -1
        peers_best = [r for r in rows if r["peer"] in POOLS and "median" in r]
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
