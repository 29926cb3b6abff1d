"""procqueue against itself: the bench suite's procqueue cases on two commits, interleaved.

    python -m bench.compare BEFORE AFTER [--workload W ...] [--rounds 3] [--repeats 3] [--quick]
    python -m bench.compare HEAD~3 HEAD

Each commit-ish is checked out in a git worktree of its own under /tmp (detached),
and each case runs in a fresh process with cwd and PYTHONPATH set to that worktree,
so it imports that commit's procqueue (checked before anything is timed: each side
prints the procqueue.__file__ it imports, in the case process and in a pool worker).
Both sides run the same bench code, a copy of this checkout's bench/ taken at the
start (as the package `pqcompare_bench`): only procqueue differs between them.

Per workload (by default tiny, stream, cpu, skewed, payload-in, payload-out), the suite's own
procqueue case with its default settings (the suite's sizes, 2 workers, 3 timed
repeats per case) runs before, after, before, after, ... for `--rounds` rounds, in
this one invocation on this machine. The table gives per workload the suite's metric,
the median of every timed repeat per side (min-max), the ratio of the medians after /
before, which side of 1 is better for the metric (tiny, stream, cpu, payload-in/out: higher
is better, ratio > 1; skewed's makespan / ideal: lower is better, ratio < 1), the
paired ratios (each round's before and after ran back to back: their median, then each),
and a verdict: "after better" / "after worse" when the ratio of medians and the
median paired ratio both differ from 1 by over 5 %, every round agrees, and the two
sides' timed repeats do not overlap (min-max apart); "leans better" / "leans worse"
when all that holds but they overlap; otherwise "within noise". To see the noise
itself, compare a commit with itself (python -m bench.compare HEAD HEAD): on a
shared, busy machine cpu and skewed swing by tens of percent between rounds (their
serial-speed probe swings too), so several rounds "lean" one way by chance.
Raw figures go to bench-results/compare.json.

Time: a full compare (5 workloads x 3 rounds x 2 sides) takes about 3 minutes on a
2-core machine: 161 s with a load average of 2-4, 220 s at 6 (cpu and skewed are
most of it, 5-18 s a case); --quick (the suite's quick sizes, 2 repeats) about 1 minute.

The worktrees and the copy are removed at the end, on an error and on Ctrl-C or
SIGTERM too; every case runs in a process group of its own, killed by its id.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import workloads as w
from .suite import BY_NAME, Workload, figures, fmt, machine, run_case

DEFAULT_WORKLOADS = ["tiny", "stream", "cpu", "skewed", "payload-in", "payload-out"]
CHOICES = [*DEFAULT_WORKLOADS, "startup", "priority"]  # the workloads whose figures are one number per repeat
HARNESS = "pqcompare_bench"  # the name the copy of bench/ runs under (the worktrees have a bench/ of their own)
NOISE = 0.05  # a difference of medians below this is never called a change

# Run in each side's environment before anything is timed: which procqueue the case
# process imports, and which one a pool worker imports.
WHERE = '''"""Which procqueue this side imports (written by bench.compare)."""
import json
import sys

import procqueue


def worker_file(_: object) -> str:
    return str(sys.modules["procqueue"].__file__)


if __name__ == "__main__":
    out = {"procqueue": procqueue.__file__, "harness": __file__, "worker": None}
    try:
        pool = procqueue.Pool(workers=1)
        try:
            out["worker"] = list(pool.map(worker_file, [0]))[0]
        finally:
            pool.shutdown()
    except Exception as exc:
        out["worker_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
'''


@dataclass
class Side:
    label: str  # "before" or "after"
    rev: str  # as given
    sha: str
    subject: str
    tree: Path  # the worktree
    where: dict[str, Any] | None = None


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def run_in_group(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run `cmd` in a process group of its own; kill the group (by the process's id) when done or on any error."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} exited with {proc.returncode}: {err.strip()[-800:]}")
    return out


def check_imports(side: Side, harness_dir: Path) -> None:
    """Each side must import its own worktree's procqueue, in the case process and in its workers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(side.tree), str(harness_dir)]))
    out = run_in_group([sys.executable, "-m", f"{HARNESS}._where"], side.tree, env, timeout=60)
    where: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    side.where = where
    own = side.tree.resolve()
    for key in ("procqueue", "worker"):
        found = where.get(key)
        if found is None:
            print(f"  note: {side.label}: could not ask a worker ({where.get('worker_error')})")
            continue
        if not Path(found).resolve().is_relative_to(own):
            raise SystemExit(f"{side.label} imports procqueue from {found}, not from its worktree {own} ({key})")
    print(f"  {side.label:6s} {side.sha[:9]} {side.subject[:60]}")
    print(f"         procqueue: {where['procqueue']}  (worker: {where.get('worker')})")


def spec_for(wl: Workload, lpm: int, args: argparse.Namespace) -> dict[str, Any]:
    """The spec the suite gives procqueue's defaults case (see suite.main)."""
    return {
        "workload": wl.name, "peer": "procqueue", "chunksize": None, "options": {},
        "n": wl.quick_n if args.quick else wl.n, "repeats": args.repeats, "workers": args.workers,
        "loops_per_ms": lpm, "budget": 3.0 if args.quick else 8.0, "seconds": 0.3 if args.quick else 1.0,
        "fill": 0.3 if args.quick else 1.0, **wl.extra,
    }  # fmt: skip


def one_case(side: Side, harness_dir: Path, spec: dict[str, Any], limit: float) -> dict[str, Any]:
    return run_case(spec, limit, cwd=str(side.tree), path=[str(side.tree), str(harness_dir)], package=HARNESS)


def summarise(wl: Workload, cases: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    """Medians per side over every timed repeat, their ratio, the per-round paired ratios and a verdict."""
    vals: dict[str, list[float]] = {"before": [], "after": []}
    per_round: dict[str, dict[int, float]] = {"before": {}, "after": {}}
    failed: list[str] = []
    ns: dict[str, set[int]] = {"before": set(), "after": set()}
    for c in cases:
        if c["figures"]:
            vals[c["side"]].extend(c["figures"])
            per_round[c["side"]][c["round"]] = statistics.median(c["figures"])
            if "n" in c["result"]:
                ns[c["side"]].add(c["result"]["n"])
        else:
            failed.append(f"{c['side']} round {c['round'] + 1}: {failed_reason(c['result'])}")
    row: dict[str, Any] = {
        "workload": wl.name, "metric": wl.unit, "higher_is_better": wl.higher_is_better,
        "failed": failed, "n": {k: sorted(v) for k, v in ns.items()},
    }  # fmt: skip
    if not vals["before"] or not vals["after"]:
        row["verdict"] = "no figures"
        return row
    b, a = statistics.median(vals["before"]), statistics.median(vals["after"])
    paired = [per_round["after"][r] / per_round["before"][r] for r in range(rounds) if r in per_round["before"] and r in per_round["after"]]  # fmt: skip
    ratio = a / b
    paired_median = statistics.median(paired) if paired else ratio
    up = all(p > 1 for p in paired) and min(ratio, paired_median) > 1 + NOISE
    down = all(p < 1 for p in paired) and max(ratio, paired_median) < 1 - NOISE
    better, worse = (up, down) if wl.higher_is_better else (down, up)
    apart = max(vals["before"]) < min(vals["after"]) or max(vals["after"]) < min(vals["before"])
    verdict = "after better" if better else "after worse" if worse else "within noise"
    if verdict != "within noise" and not apart:
        verdict = verdict.replace("after", "leans")  # every round agrees, but the two sides' figures overlap
    row.update(
        before=b, after=a, ratio=ratio, paired=paired, paired_median=paired_median,
        before_range=[min(vals["before"]), max(vals["before"])], after_range=[min(vals["after"]), max(vals["after"])],
        verdict=verdict,
    )  # fmt: skip
    return row


def failed_reason(result: dict[str, Any]) -> str:
    if result.get("hang"):
        return f"hang (no result within {result['limit']:.0f} s)"
    return str(result.get("error", "no figures")).splitlines()[0][:120]


def table(rows: list[dict[str, Any]], before: Side, after: Side) -> str:
    lines = [
        f"\nprocqueue {before.rev} ({before.sha[:9]}) -> {after.rev} ({after.sha[:9]}): medians of every timed repeat (min-max)",
        "ratio = median after / median before; 'better' = which side of 1 means after is better for this metric;",
        "paired = the median of the per-round ratios (each round's before and after ran back to back), then each round's",
        "",
        f"{'workload':9s} {'metric':20s} {'before':>24s} {'after':>24s} {'ratio':>6s} {'better':>7s}  {'paired':26s} verdict",
    ]
    wide = max([26, *(len(r.get("paired", [])) * 5 + 8 for r in rows)])
    lines[-1] = lines[-1].replace(f"{'paired':26s}", f"{'paired':{wide}s}")
    for r in rows:
        unit = r["metric"]
        if "ratio" not in r:
            lines.append(
                f"{r['workload']:9s} {unit:20s} {'-':>24s} {'-':>24s} {'-':>6s} {'':>7s}  {'':{wide}s} {r['verdict']}"
            )
        else:

            def cell(median: float, rng: list[float], unit: str = unit) -> str:
                return f"{fmt(median, unit)} ({fmt(rng[0], unit)}-{fmt(rng[1], unit)})"

            rounds = f"{r['paired_median']:.3f} (" + " ".join(f"{p:.2f}" for p in r["paired"]) + ")"
            lines.append(
                f"{r['workload']:9s} {unit:20s} {cell(r['before'], r['before_range']):>24s} "
                f"{cell(r['after'], r['after_range']):>24s} {r['ratio']:6.3f} {'ratio>1' if r['higher_is_better'] else 'ratio<1':>7s}"
                f"  {rounds:{wide}s} {r['verdict']}"
            )
        lines.extend(f"  {' ' * 7}failed: {f}" for f in r["failed"])
        if r["n"]["before"] != r["n"]["after"] or len(r["n"]["before"]) > 1:
            lines.append(f"  {' ' * 7}note: sizes differ (the case trims n to its time budget): {r['n']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("before", help="the commit-ish before (e.g. HEAD~3)")
    ap.add_argument("after", help="the commit-ish after (e.g. HEAD)")
    ap.add_argument(
        "--workload", action="append", choices=CHOICES, help=f"repeatable (default {' '.join(DEFAULT_WORKLOADS)})"
    )
    ap.add_argument("--rounds", type=int, default=3, help="before/after pairs per workload (default 3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3, quick 2, as the suite)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes per pool (default 2)")
    ap.add_argument("--quick", action="store_true", help="the suite's quick sizes and time budgets")
    ap.add_argument("--repo", default=".", help="the git repository (default: the one around the current directory)")
    ap.add_argument("--out", default="bench-results", help="where compare.json goes (default bench-results/)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.repeats = args.repeats or (2 if args.quick else 3)
    todo = [BY_NAME[n] for n in (args.workload or DEFAULT_WORKLOADS)]
    repo = Path(git(Path(args.repo), "rev-parse", "--show-toplevel"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="pq-compare-", dir="/tmp"))
    sides: list[Side] = []
    try:
        harness_dir = tmp / "harness"
        (harness_dir / HARNESS).mkdir(parents=True)
        for src in Path(__file__).resolve().parent.glob("*.py"):
            shutil.copy2(src, harness_dir / HARNESS / src.name)
        (harness_dir / HARNESS / "_where.py").write_text(WHERE)
        for label, rev in (("before", args.before), ("after", args.after)):
            sha = git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
            side = Side(label, rev, sha, git(repo, "log", "-1", "--format=%s", sha), tmp / label)
            sides.append(side)  # before it exists: the finally removes whatever part of it was made
            git(repo, "worktree", "add", "--detach", str(side.tree), sha)
        before, after = sides
        print(f"procqueue compare: {', '.join(wl.name for wl in todo)}; {args.rounds} rounds x 2 sides, interleaved")
        if before.sha == after.sha:
            print("  note: both sides are the same commit (an A/A run: the ratios show the noise)")
        for side in sides:
            check_imports(side, harness_dir)
        lpm = w.calibrate()
        print(f"  calibrated: {lpm:,} loops per ms; {args.workers} workers; {args.repeats} timed repeats per case")
        load = [os.getloadavg()[0]]
        print(f"  load average {load[0]:.2f} on {os.cpu_count()} cpus\n")

        cases: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        for wl in todo:
            spec = spec_for(wl, lpm, args)
            limit = wl.quick_limit if args.quick else wl.limit
            mine: list[dict[str, Any]] = []
            for rnd in range(args.rounds):
                for side in sides:
                    result = one_case(side, harness_dir, spec, limit)
                    figs = figures(wl, result, args.workers) if "times" in result and "error" not in result else []
                    case = {"workload": wl.name, "side": side.label, "round": rnd, "spec": spec, "result": result, "figures": figs}  # fmt: skip
                    mine.append(case)
                    shown = fmt(statistics.median(figs), wl.unit) if figs else failed_reason(result)
                    print(
                        f"  {wl.name:8s} round {rnd + 1} {side.label:6s} {shown:>9s} {wl.unit}  ({result.get('wall', 0):.1f} s)"
                    )
            cases.extend(mine)
            rows.append(summarise(wl, mine, args.rounds))
        took = time.monotonic() - t0
        load.append(os.getloadavg()[0])
        text = table(rows, before, after)
        print(text)
        print(f"\ncompare took {took:.0f} s; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end")
        if max(load) > (os.cpu_count() or 1):
            print(
                f"note: the machine was busy (more runnable processes than its {os.cpu_count()} cpus): expect wide noise"
            )
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "before": {"rev": before.rev, "sha": before.sha, "subject": before.subject, "imports": before.where},
            "after": {"rev": after.rev, "sha": after.sha, "subject": after.subject, "imports": after.where},
            "machine": machine(), "loops_per_ms": lpm, "rounds": args.rounds, "repeats": args.repeats,
            "workers": args.workers, "quick": args.quick, "seconds": took, "load_average": load, "summary": rows,
            "cases": cases,
        }  # fmt: skip
        (out_dir / "compare.json").write_text(json.dumps(data, indent=1))
        print(f"raw figures: {out_dir / 'compare.json'}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        cleanup(repo, sides, tmp)


def cleanup(repo: Path, sides: list[Side], tmp: Path) -> None:
    """Remove the worktrees (and git's record of them) and the temporary directory; never raises."""
    with contextlib.suppress(KeyboardInterrupt):
        stale = False
        for side in sides:
            if side.tree.exists():
                git_args = ["git", "-C", str(repo), "worktree", "remove", "--force", str(side.tree)]
                stale |= subprocess.run(git_args, capture_output=True, check=False).returncode != 0
        shutil.rmtree(tmp, ignore_errors=True)
        if stale:  # a worktree git could not remove: its directory is gone now, so prune forgets it
            subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True, check=False)
        leftover = [str(s.tree) for s in sides if s.tree.exists()]
        if leftover or tmp.exists():
            print(f"warning: could not remove {leftover or tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
