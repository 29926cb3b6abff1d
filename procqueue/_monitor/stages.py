"""The live view of a `Pipeline`: one row per stage, so the slowest one shows.

Like the pool's view (`view.py`) it redraws in place on a terminal and writes
plain lines otherwise, and only reads each stage's `Pool.stats()`.
"""

from __future__ import annotations

from types import TracebackType
from typing import IO, TYPE_CHECKING

from procqueue._monitor.view import Redraw, _bytes, _duration, _pct

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import RenderableType

    from procqueue._stats import Stats


def _row(i: int, name: str, s: Stats, held: int) -> tuple[str, ...]:
    cpu = sum(w.cpu_percent for w in s.workers)
    rss = sum(w.rss for w in s.workers)
    busy = sum(1 for w in s.workers if w.state == "running")
    return (
        str(i), name, f"{busy}/{len(s.workers)}", f"{max(held - s.in_flight, 0):,}", f"{s.in_flight:,}",
        f"{s.completed:,}", f"{s.failed:,}", f"{s.retried:,}", f"{s.throughput:,.1f}", f"{cpu:.0f}", _bytes(rss),
    )  # fmt: skip


def _out(stats: list[Stats]) -> int:
    """Items out of the pipeline: through the last stage, or failed at any."""
    return stats[-1].completed + sum(s.failed for s in stats)


COLUMNS = ("stage", "function", "busy", "waiting", "in flight", "done", "failed", "retried", "items/s", "cpu %", "rss")


class StagesView:
    """`with pipe.live(total=n): ...`: a row per stage with the items waiting at it
    (its depth), in flight, done, failed and retried, its throughput, its busy
    workers, CPU and RSS; the stage whose queue grows is the bottleneck."""

    def __init__(
        self,
        names: list[str],
        stats: Callable[[], list[Stats]],
        depths: Callable[[], list[int]],
        total: int | None = None,
        file: IO[str] | None = None,
        interval: float | None = None,
    ) -> None:
        self.total = total
        self._names = names
        self._stats = stats
        self._depths = depths
        self._before = _out(stats())  # what came out before the view: `total` counts this map's items
        self._show = Redraw(file, interval, self._render, self.plain)
        self.fancy = self._show.fancy

    def rows(self) -> list[tuple[str, ...]]:
        """The table's rows, as text (what both the redrawn and the plain view show)."""
        held = self._depths()
        stats = self._stats()
        return [_row(i, name, s, h) for i, (name, s, h) in enumerate(zip(self._names, stats, held, strict=True))]

    def _head(self, stats: list[Stats]) -> str:
        done = _out(stats) - self._before
        elapsed = max((s.elapsed for s in stats), default=0.0)
        goal = f"/{self.total:,} {_pct(done, self.total)}" if self.total else ""
        return f"pipeline {done:,}{goal} items out | elapsed {_duration(elapsed)}"

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, padding=(0, 1), header_style="dim", show_edge=False)
        for name in COLUMNS:
            table.add_column(name, justify="left" if name == "function" else "right")
        for row in self.rows():
            table.add_row(*row)
        return Group(Text(self._head(self._stats()), style="bold cyan"), table)

    def plain(self) -> str:
        """One line: the head and each stage's figures."""
        stages = [
            f"stage {r[0]} {r[1]}: busy {r[2]} waiting {r[3]} in flight {r[4]} done {r[5]} failed {r[6]} {r[8]}/s"
            for r in self.rows()
        ]
        return " | ".join([self._head(self._stats()), *stages])

    def __enter__(self) -> StagesView:
        self._show.start("procqueue-pipe-view")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._show.stop()
