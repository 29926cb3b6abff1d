"""PNG charts of a bench run (needs matplotlib: pip install 'procqueue[bench]')."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

THROUGHPUT = {"tiny": "tiny tasks/s", "cpu": "speedup over serial", "payload-in": "MB/s in (8 MB arrays)", "payload-out": "MB/s out (8 MB arrays)", "stream": "items/s (generator)"}  # fmt: skip
HIGHLIGHT = "#d62728"


def best_per_peer(rows: list[dict[str, Any]]) -> dict[str, float]:
    best: dict[str, float] = {}
    for row in rows:
        if "median" in row and row["peer"] != "limit (bare fork)":
            best[row["peer"]] = max(best.get(row["peer"], 0.0), row["median"])
    return best


def draw(summary: dict[str, list[dict[str, Any]]], out: Path, workers: int) -> list[Path]:
    paths = []
    shown = [w for w in THROUGHPUT if w in summary]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.8), squeeze=False)
        for ax, name in zip(axes[0], shown, strict=True):
            best = best_per_peer(summary[name])
            names = sorted(best, key=lambda p: best[p])
            ax.barh(
                names, [best[p] for p in names], color=[HIGHLIGHT if p == "procqueue" else "#7f7f7f" for p in names]
            )
            ax.set_title(THROUGHPUT[name], fontsize=10)
            if name in ("tiny", "stream"):
                ax.set_xscale("log")
            ax.tick_params(labelsize=8)
        fig.suptitle(f"procqueue and its peers, {workers} workers, each at its best setting (median)", fontsize=11)
        fig.tight_layout()
        path = out / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if "durations" in summary:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        xs: list[float] = []
        for row in summary["durations"]:
            r = row["result"]
            if "rows" not in r:
                continue
            xs = [x["ms"] for x in r["rows"]]
            ys = [x["n"] / statistics.median(x["times"]) for x in r["rows"]]
            mine = row["peer"] == "procqueue"
            ax.plot(
                xs, ys, marker="o", label=row["peer"], color=HIGHLIGHT if mine else None, linewidth=2.5 if mine else 1.5
            )
        if xs:
            ax.plot(
                xs, [workers * 1000 / ms for ms in xs], linestyle="--", color="black", label=f"ideal ({workers} cores)"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("task duration (ms)")
        ax.set_ylabel("tasks per second")
        ax.set_title("throughput against task duration")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out / "durations.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if any("figures" in row for row in summary.get("dask", [])):
        paths.append(draw_dask(summary["dask"], out, workers))
    return paths


def draw_dask(rows: list[dict[str, Any]], out: Path, workers: int) -> Path:
    """The dask workload: per-task cost of tiny tasks (log scale), throughput of ~1 ms tasks."""
    rows = [r for r in rows if "figures" in r]
    names = [f"{r['peer']}\n{r['setting']}" for r in rows]
    colors = [HIGHLIGHT if r["peer"] == "procqueue (dask)" else "#7f7f7f" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.barh(names, [statistics.median(r["figures"]["tiny_us"]) for r in rows], color=colors)
    left.set_xscale("log")
    left.set_title("tiny tasks: microseconds per task (lower is better)", fontsize=10)
    right.barh(names, [statistics.median(r["figures"]["ms_rate"]) for r in rows], color=colors)
    ms = rows[0]["result"].get("ms", 1.0)
    right.axvline(workers * 1000 / ms, linestyle="--", color="black", label=f"ideal ({workers} workers)")
    right.legend(fontsize=8, loc="lower right")
    right.set_title("~1 ms tasks: tasks/s (higher is better)", fontsize=10)
    right.set_yticklabels([])
    for ax in (left, right):
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    fig.suptitle(f"procqueue's Dask backend on a {workers}-worker LocalCluster (median of rounds)", fontsize=11)
    fig.tight_layout()
    path = out / "dask.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
