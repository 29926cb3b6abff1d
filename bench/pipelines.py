"""The pipeline workload's side of the suite (issue 15): its settings, figures, table
lines and goals. Its cases (`case.pipeline`) map three stages over a generator with
`per_stage` worker processes a stage on every side:

- "procqueue Pipeline": `pq.Pipeline(pq.Stage(f1, workers=k), ..., capacity=1024).map(xs)`;
- "procqueue pools chained": three `pq.Pool(k)`, `p3.map(f3, p2.map(f2, p1.map(f1, xs)))`;
- "multiprocessing.Pool chained": three `multiprocessing.Pool(k)`, `p3.imap(f3, p2.imap(f2,
  p1.imap(f1, xs, cs), cs), cs)` at each chunk size of a sweep (its best is the reference).

Part "tiny": x + 1, 2x, -x over 500,000 items, in items/s. Part "ms": three ~1 ms stages
over 4,000 items, as a share of the ceiling: the time bare forked processes, one a usable
CPU (at most one a worker), take for the same work, probed on every eighth item just
before each run (so a machine shared with other jobs lowers the ceiling with the run). Every side has 3k worker processes;
procqueue's pools also run a collector process each, which the count leaves out.

k is 1 and 2 (`per_stage`; --quick: 1), not `--workers`: the stages are alike, so one
worker a stage (3 processes) already asks for more than 2 cores and keeps every stage
as fast as the others; two a stage (6 processes) shows what oversubscribing costs each
side. The goals are judged for each k.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .peers import Peer
    from .suite import Workload

PIPELINE = "procqueue Pipeline"
MP = "multiprocessing.Pool chained"
# Goals (issue 15): the Pipeline's items/s on tiny stages at least this many times hand-chained
# multiprocessing.Pool's at its best chunk size; its ~1 ms throughput at least this share of the
# ceiling; the parent's RSS flat: its peak after the first fifth of the results at most this many
# MB over its RSS then.
GOALS = {"tiny_vs_mp": 1.5, "ms_of_ceiling": 0.95, "rss_late_mb": 8.0}


def settings(wl: Workload, peer: Peer, quick: bool) -> list[dict[str, Any]]:
    """Per worker count a stage, and part: procqueue with its defaults, multiprocessing.Pool at
    each chunk size of its sweep (the workload's `sweep` for tiny stages, `ms_sweep` for ~1 ms)."""
    extra = wl.spec_extra(quick)
    out = []
    for k in extra["per_stage"]:
        for part, sweep in (("tiny", wl.quick_sweep if quick else wl.sweep), ("ms", extra["ms_sweep"])):
            for cs in sweep if peer.name == MP else (None,):
                label = f"{part} {k}/stage" + ("" if cs is None else f" cs={cs}")
                out.append({"label": label, "chunksize": cs, "spec": {"part": part, "per_stage": k}})
    return out


def ideal_s(result: dict[str, Any], ceiling_s: float) -> float:
    """The ceiling's time for a run: the same work in bare forked processes, one a usable
    CPU (at most one a worker), as fast as the machine ran it just before."""
    return float(result["n"] * ceiling_s)


def figures(result: dict[str, Any]) -> list[float]:
    """Per run: items/s (tiny stages), or the share of the ceiling (~1 ms stages)."""
    if result["part"] == "tiny":
        return [result["n"] / t for t in result["times"]]
    return [ideal_s(result, s) / t for t, s in zip(result["times"], result["ceiling_s"], strict=True)]


HEAD = (28, 20)  # widths of the peer and setting columns: peer names are long here


def describe(head: str, row: dict[str, Any]) -> str:
    """The figures of a case that ran (`head`: its peer and setting, see `suite.describe`)."""
    r = row["result"]
    if r["part"] == "tiny":
        what = f"{_rate(row['median'])} items/s ({_rate(row['low'])}-{_rate(row['high'])})"
    else:
        rate = r["n"] / statistics.median(r["times"])
        what = f"{row['median']:.3f} of the ceiling ({row['low']:.3f}-{row['high']:.3f}), {rate:,.0f} items/s"
    mb = [x / 2**20 for x in r["rss_growth"]]
    late = [x / 2**20 for x in r["rss_late"]]
    return f"{head} {what}  parent RSS +{statistics.median(mb):.0f} MB (+{statistics.median(late):.1f} after 1/5)"


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def _timed(rows: list[dict[str, Any]], peer: str, part: str, k: int) -> list[dict[str, Any]]:
    return [r for r in rows if r["peer"] == peer and "median" in r and r["setting"].startswith(f"{part} {k}/")]


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals per worker count a stage, from the medians, with the same figure per
    interleaved round (a round's cases ran one after another)."""
    from .suite import _goal

    out: dict[str, Any] = {}
    counts = sorted({r["result"]["per_stage"] for r in rows if "per_stage" in r["result"]})
    for k in counts:
        figs = {part: _timed(rows, PIPELINE, part, k) for part in ("tiny", "ms")}
        mp = _timed(rows, MP, "tiny", k)
        if figs["tiny"] and mp:
            best = max(mp, key=lambda r: r["median"])
            out[f"tiny_vs_mp {k}/stage"] = _goal(
                f"items/s on tiny stages, Pipeline / multiprocessing.Pool chained {best['setting'].split()[-1]}",
                figures(figs["tiny"][0]["result"]), figures(best["result"]), GOALS["tiny_vs_mp"],
                higher_is_better=True,
            )  # fmt: skip
        if figs["ms"]:
            share = figures(figs["ms"][0]["result"])
            out[f"ms_of_ceiling {k}/stage"] = _goal(
                "~1 ms stages, Pipeline's share of the ceiling", share, [1.0] * len(share), GOALS["ms_of_ceiling"],
                higher_is_better=True,
            )  # fmt: skip
        late = [x / 2**20 for part in ("tiny", "ms") for r in figs[part] for x in r["result"]["rss_late"]]
        if late:
            out[f"rss_flat {k}/stage"] = _goal(
                "Pipeline's parent RSS growth after the first fifth of the results, MB (tiny and ~1 ms runs)",
                late, [1.0] * len(late), GOALS["rss_late_mb"], higher_is_better=False,
            )  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The workload's lines of the table: every case (medians, min-max of the rounds), then the goals."""
    from .suite import BY_NAME, goal_lines
    from .suite import describe as line  # its head, and a hang or an error, as for any workload

    return ["  " + line(BY_NAME["pipeline"], row) for row in rows] + goal_lines(goals(rows), 3)
