"""What a person sees: the live view of a pool and the progress bar of a map.

Both redraw in place (rich) on a terminal or in a notebook, and fall back to
one plain line every few seconds when the output is a pipe or a log file.
They only read `Pool.stats()`, so looking never slows the pool.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from ._monitor import Stats

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

PLAIN_EVERY = 5.0  # seconds between plain lines when not on a terminal
REDRAW_EVERY = 0.25  # seconds between redraws on a terminal


def _console(file: IO[str] | None) -> tuple[Console, bool]:
    """A rich console on `file` (default stderr), and whether it can redraw in place."""
    from rich.console import Console

    console = Console(file=file or sys.stderr)
    fancy = (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter
    return console, fancy


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _bytes(n: int) -> str:
    if n >= 10 * 2**30:
        return f"{n / 2**30:,.1f} GB"
    return f"{n / 2**20:,.0f} MB"


def _eta(left: int, rate: float) -> float | None:
    return left / rate if rate > 0 else (0.0 if left <= 0 else None)


def _progress(s: Stats, total: int | None) -> tuple[int, int, float, float | None]:
    """`(ended, total, rate, eta seconds)`; with no total given, the total is what was submitted."""
    goal = s.submitted if total is None else total
    rate = s.throughput_ewma or s.throughput
    return s.ended, goal, rate, _eta(goal - s.ended, rate)


def plain_line(s: Stats, total: int | None = None, title: str = "procqueue") -> str:
    """One line for logs and pipes: progress, queue, failures, and each worker."""
    done, goal, rate, eta = _progress(s, total)
    pct = f" {100 * done / goal:.0f}%" if goal else ""
    workers = ", ".join(
        f"w{w.slot} {w.state} {w.cpu_percent:.0f}% {_bytes(w.rss)}" + (f" recycled {w.recycled}" if w.recycled else "")
        for w in s.workers
    )
    return (
        f"{title} {done:,}/{goal:,}{pct} | {rate:,.1f} tasks/s | ETA {_duration(eta)} | "
        f"pending {s.pending:,} in flight {s.in_flight:,} retrying {s.retrying:,} | "
        f"failed {s.failed:,} retried {s.retried:,} crashed {s.crashed:,} timed out {s.timed_out:,} | {workers}"
    )


def render(s: Stats, total: int | None = None, title: str = "procqueue") -> RenderableType:
    """The live view: a progress bar with rate and ETA, the queue, and one row per process."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    done, goal, rate, eta = _progress(s, total)
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(title, style="bold cyan"),
        ProgressBar(total=max(goal, 1), completed=done, width=36),
        f"{100 * done / goal:3.0f}%" if goal else "  -%",
        f"{done:,}/{goal:,}",
        f"{rate:,.1f} tasks/s",
        f"ETA {_duration(eta)}",
        f"elapsed {_duration(s.elapsed)}",
    )
    queue = Text.assemble(
        ("pending ", "dim"), f"{s.pending:,}", ("  in flight ", "dim"), f"{s.in_flight:,}",
        ("  retrying ", "dim"), f"{s.retrying:,}", ("  │  completed ", "dim"), (f"{s.completed:,}", "green"),
        ("  failed ", "dim"), (f"{s.failed:,}", "red" if s.failed else ""), ("  retried ", "dim"),
        (f"{s.retried:,}", "yellow" if s.retried else ""), ("  crashed ", "dim"), f"{s.crashed:,}",
        ("  timed out ", "dim"), f"{s.timed_out:,}",
    )  # fmt: skip
    table = Table(box=None, padding=(0, 1), header_style="dim", show_edge=False)
    for name in ("worker", "pid", "state", "task", "cpu %", "rss", "done", "recycled"):
        table.add_column(name, justify="left" if name in ("state", "worker") else "right")
    style = {"running": "green", "idle": "dim", "recycling": "yellow", "stopping": "dim", "dead": "red"}
    for w in s.workers:
        table.add_row(
            str(w.slot), str(w.pid) if w.pid > 0 else "-", Text(w.state, style=style.get(w.state, "")),
            "" if w.task_id is None else str(w.task_id), f"{w.cpu_percent:.0f}", _bytes(w.rss),
            f"{w.tasks_done:,}", str(w.recycled),
        )  # fmt: skip
    if s.collector is not None:
        c = s.collector
        table.add_row(
            "collector", str(c.pid), c.state, "", f"{c.cpu_percent:.0f}", _bytes(c.rss), f"{c.tasks_done:,}", ""
        )
    return Group(head, queue, table)


class LiveView:
    """The live view of a pool, as a context manager: `with pool.live(total=n): ...`.

    On a terminal (or in a notebook) it redraws in place every `interval`
    seconds (default 0.25): a progress bar with rate and ETA, the queue depth,
    in-flight tasks, retries and failures, and one row per worker with its
    state, CPU and RSS. Otherwise it writes one plain line every `interval`
    seconds (default 5) and a last one on exit. `total` is the number of tasks
    the bar counts to (default: the tasks submitted so far); it can be set
    while the view runs.
    """

    def __init__(
        self,
        stats: Callable[[], Stats],
        total: int | None = None,
        file: IO[str] | None = None,
        interval: float | None = None,
        title: str = "procqueue",
    ) -> None:
        self.total = total
        self._stats = stats
        self._console, self.fancy = _console(file)
        self._interval = interval or (REDRAW_EVERY if self.fancy else PLAIN_EVERY)
        self._title = title
        self._live: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _render(self) -> RenderableType:
        return render(self._stats(), self.total, self._title)

    def _print_plain(self) -> None:
        self._console.file.write(plain_line(self._stats(), self.total, self._title) + "\n")
        self._console.file.flush()

    def _plain_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._print_plain()

    def __enter__(self) -> LiveView:
        if self.fancy:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, console=self._console, refresh_per_second=1 / self._interval)
            self._live.start()
        else:
            self._thread = threading.Thread(target=self._plain_loop, name="procqueue-view", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()  # draws once more: the view ends with the final figures
            self._live = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._print_plain()


class MapProgress:
    """The progress bar of `map(..., progress=True)`: results handed out so far."""

    def __init__(self, total: int | None, file: IO[str] | None = None, title: str = "map") -> None:
        self.total = total
        self.count = 0
        self._title = title
        self._console, fancy = _console(file)
        self._t0 = self._last = time.monotonic()
        self._bar: Any = None
        self._closed = False
        if fancy:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold cyan]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self._console,
            )  # fmt: skip
            self._task = self._bar.add_task(title, total=total, rate="")
            self._bar.start()

    def advance(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if self._bar is not None:
            rate = self.count / (now - self._t0) if now > self._t0 else 0.0
            self._bar.update(self._task, advance=n, rate=f"{rate:,.0f}/s")
        elif now - self._last >= PLAIN_EVERY:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        took = now - self._t0
        rate = self.count / took if took > 0 else 0.0
        of = f"/{self.total:,} ({100 * self.count / self.total:.0f}%)" if self.total else ""
        eta = f" ETA {_duration(_eta(self.total - self.count, rate))}" if self.total else ""
        self._console.file.write(f"{self._title} {self.count:,}{of} {rate:,.0f}/s{eta} elapsed {_duration(took)}\n")
        self._console.file.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.stop()
        else:
            self._line(time.monotonic())
