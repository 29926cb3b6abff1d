"""`procqueue run` against a plain `multiprocessing.Pool.imap` script doing the same
work: parse each JSON line, call a trivial handler, write one JSON record per line.

    python -m bench.records [--lines 1000000] [--repeats 5] [--chunksize 1000 --chunksize 1]

Each repeat runs every contender once, in turn, as a fresh process (`time` of
the whole command, start-up included); the table gives medians and the ratio
to `procqueue run`. Every output is checked to hold one record per line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAP_SCRIPT = Path(__file__).with_name("imap_records.py")


def plus_one(record: dict[str, int]) -> int:
    """The trivial handler both sides run."""
    return record["x"] + 1


def make_input(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            f.write(json.dumps({"id": i, "x": i, "name": f"item-{i}"}) + "\n")


def timed(cmd: list[str], out: Path, lines: int) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with out.open("rb") as f:
        got = sum(1 for _ in f)
    if got != lines:
        raise SystemExit(f"{' '.join(cmd)} wrote {got} records for {lines} lines")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunksize", type=int, action="append", help="imap chunksizes to try (default 1000)")
    ap.add_argument("--unordered", action="store_true", help="also time procqueue run --unordered")
    args = ap.parse_args(argv)
    sizes = args.chunksize or [1000]
    with tempfile.TemporaryDirectory(prefix="procqueue-records-") as tmp:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        make_input(src, args.lines)
        run = [sys.executable, "-m", "procqueue", "run", "procqueue_bench.records:plus_one"]
        contenders = {"procqueue run": [*run, "-i", str(src), "-o", str(out), "--no-live"]}
        if args.unordered:
            contenders["procqueue run --unordered"] = [*contenders["procqueue run"], "--unordered"]
        for cs in sizes:
            contenders[f"mp.Pool.imap chunksize={cs}"] = [sys.executable, str(IMAP_SCRIPT), str(src), str(out), str(cs)]
        walls: dict[str, list[float]] = {name: [] for name in contenders}
        for rep in range(args.repeats):
            for name, cmd in contenders.items():
                walls[name].append(timed(cmd, out, args.lines))
            print(f"repeat {rep + 1}: " + ", ".join(f"{n} {w[-1]:.2f} s" for n, w in walls.items()), flush=True)
    base = statistics.median(walls["procqueue run"])
    print(f"\n{args.lines:,} JSON lines, trivial handler, {os.cpu_count()} CPUs, median of {args.repeats}:")
    for name, w in walls.items():
        med = statistics.median(w)
        print(f"  {name:32} {med:6.2f} s  {args.lines / med:>10,.0f} records/s  x{base / med:.2f} of procqueue run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
