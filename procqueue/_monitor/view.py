"""What a person sees: the live view of a pool and the progress bar of a map.

Both redraw in place (rich) on a terminal or in a notebook, and fall back to
one plain line every few seconds when the output is a pipe or a log file.
They only read `Pool.stats()`, so looking never slows the pool. A map's bar
opened while a live view runs becomes a row of that view (two live displays
on one terminal would overwrite each other).
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from procqueue._stats import Stats

if TYPE_CHECKING:
    from collections.abc import Callable

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


def _pct(done: int, total: int | None) -> str:
    return f"{100 * done / total:.0f}%" if total else "-%"


class _Since:
    """A pool's counters since a view opened: the view counts its own block's work."""

    def __init__(self, s: Stats, base: Stats, total: int | None) -> None:
        self.s = s
        self.done = s.ended - base.ended
        self.total = total
        self.goal = s.submitted - base.submitted if total is None else total
        self.rate = s.throughput_ewma or s.throughput
        self.eta = _eta(total - self.done, self.rate) if total is not None else None
        self.completed = s.completed - base.completed
        self.failed = s.failed - base.failed
        self.retried = s.retried - base.retried
        self.crashed = s.crashed - base.crashed
        self.timed_out = s.timed_out - base.timed_out


class MapProgress:
    """The progress bar of `map(..., progress=True)`: results handed out so far.

    Created when the map's iteration starts. Inside a live view it is a row of
    that view; on its own it is a rich bar on a terminal, plain lines otherwise.
    """

    def __init__(self, total: int | None, title: str, view: LiveView | None, file: IO[str] | None = None) -> None:
        self.total = total
        self.title = title
        self.count = 0
        self.t0 = self._last = time.monotonic()
        self._view = view
        self._bar: Any = None
        self._closed = False
        self._console: Console | None = None
        if view is not None:
            view.attach(self)
            return
        self._console, fancy = _console(file)
        if fancy:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold cyan]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self._console,
            )  # fmt: skip
            self._task = self._bar.add_task(title, total=total, rate="")
            self._bar.start()
            _open_bars.add(self)

    @property
    def rate(self) -> float:
        took = time.monotonic() - self.t0
        return self.count / took if took > 0 else 0.0

    def advance(self, n: int) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate:,.0f}/s")
        elif self._view is None and time.monotonic() - self._last >= PLAIN_EVERY:
            self._last = time.monotonic()
            self._line()

    def describe(self) -> str:
        of = f"/{self.total:,} ({_pct(self.count, self.total)})" if self.total else ""
        eta = f" ETA {_duration(_eta(self.total - self.count, self.rate))}" if self.total else ""
        return f"{self.title} {self.count:,}{of} {self.rate:,.0f}/s{eta}"

    def _line(self) -> None:
        assert self._console is not None
        took = time.monotonic() - self.t0
        self._console.file.write(f"{self.describe()} elapsed {_duration(took)}\n")
        self._console.file.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._view is not None:
            self._view.detach(self)
        elif self._bar is not None:
            self._bar.stop()
            _open_bars.discard(self)
        else:
            self._line()


_open_bars: weakref.WeakSet[MapProgress] = weakref.WeakSet()


@atexit.register
def _close_bars() -> None:
    # A map abandoned mid-way closes its bar when collected; at exit that may be
    # too late for the terminal (cursor hidden). Close what is still open now.
    for bar in list(_open_bars):
        bar.close()


def plain_line(s: Stats, total: int | None = None, title: str = "procqueue", base: Stats | None = None) -> str:
    """One line for logs and pipes: progress, queue, failures, and each worker."""
    v = _Since(s, base or Stats(), total)
    eta = f" | ETA {_duration(v.eta)}" if total is not None else ""
    workers = ", ".join(
        f"w{w.slot} {w.state} {w.cpu_percent:.0f}% {_bytes(w.rss)}"
        + (f" recycled {w.recycled}" if w.recycled else "")
        + (f" died {w.deaths}" if w.deaths else "")
        for w in s.workers
    )
    return (
        f"{title} {v.done:,}/{v.goal:,} {_pct(v.done, v.goal)} | {v.rate:,.1f} tasks/s{eta} | "
        f"pending {s.pending:,} in flight {s.in_flight:,} retrying {s.retrying:,} | "
        f"failed {v.failed:,} retried {v.retried:,} crashed {v.crashed:,} timed out {v.timed_out:,} | {workers}"
    )


def render(
    s: Stats,
    total: int | None = None,
    title: str = "procqueue",
    base: Stats | None = None,
    bars: tuple[MapProgress, ...] = (),
) -> RenderableType:
    """The live view: a progress bar with rate and ETA, the queue, and one row per process."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    v = _Since(s, base or Stats(), total)
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(title, style="bold cyan"), ProgressBar(total=max(v.goal, 1), completed=v.done, width=36),
        f"{_pct(v.done, v.goal):>4}", f"{v.done:,}/{v.goal:,}", f"{v.rate:,.1f} tasks/s",
        f"ETA {_duration(v.eta)}" if total is not None else "", f"elapsed {_duration(s.elapsed)}",
    )  # fmt: skip
    for bar in bars:
        head.add_row(
            Text(bar.title, style="cyan"), ProgressBar(total=bar.total or max(bar.count, 1), completed=bar.count, width=36),
            f"{_pct(bar.count, bar.total):>4}", f"{bar.count:,}/{bar.total:,}" if bar.total else f"{bar.count:,}",
            f"{bar.rate:,.0f}/s", f"ETA {_duration(_eta(bar.total - bar.count, bar.rate))}" if bar.total else "", "",
        )  # fmt: skip
    queue = Text.assemble(
        ("pending ", "dim"), f"{s.pending:,}", ("  in flight ", "dim"), f"{s.in_flight:,}",
        ("  retrying ", "dim"), f"{s.retrying:,}", ("  │  completed ", "dim"), (f"{v.completed:,}", "green"),
        ("  failed ", "dim"), (f"{v.failed:,}", "red" if v.failed else ""), ("  retried ", "dim"),
        (f"{v.retried:,}", "yellow" if v.retried else ""), ("  crashed ", "dim"), f"{v.crashed:,}",
        ("  timed out ", "dim"), f"{v.timed_out:,}",
    )  # fmt: skip
    table = Table(box=None, padding=(0, 1), header_style="dim", show_edge=False)
    for name in ("worker", "pid", "state", "task", "cpu %", "rss", "done", "recycled", "died"):
        table.add_column(name, justify="left" if name in ("state", "worker") else "right")
    style = {"running": "green", "idle": "dim", "recycling": "yellow", "stopping": "dim", "dead": "red"}
    for w in s.workers:
        table.add_row(
            str(w.slot), str(w.pid) if w.pid > 0 else "-", Text(w.state, style=style.get(w.state, "")),
            "" if w.task_id is None else str(w.task_id), f"{w.cpu_percent:.0f}", _bytes(w.rss),
            f"{w.tasks_done:,}", str(w.recycled), str(w.deaths),
        )  # fmt: skip
    if s.collector is not None:
        c = s.collector
        table.add_row(
            "collector", str(c.pid), c.state, "", f"{c.cpu_percent:.0f}", _bytes(c.rss), f"{c.tasks_done:,}", "", ""
        )
    return Group(head, queue, table)


class Redraw:
    """Shows `render()` redrawn in place on a terminal (or a notebook), or writes
    `plain()` as a line every `interval` seconds and once more at the end."""

    def __init__(
        self,
        file: IO[str] | None,
        interval: float | None,
        render: Callable[[], RenderableType],
        plain: Callable[[], str],
    ) -> None:
        self.console, self.fancy = _console(file)
        self.interval = interval or (REDRAW_EVERY if self.fancy else PLAIN_EVERY)
        self._render = render
        self._plain = plain
        self._live: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _print_plain(self) -> None:
        self.console.file.write(self._plain() + "\n")
        self.console.file.flush()

    def _plain_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._print_plain()

    def start(self, thread_name: str) -> None:
        if self.fancy:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=1 / self.interval)
            self._live.start()
        else:
            self._stop.clear()
            self._thread = threading.Thread(target=self._plain_loop, name=thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ends the display with the final figures."""
        if self._live is not None:
            self._live.stop()  # draws once more
            self._live = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._print_plain()


class LiveView:
    """The live view of a pool while a `with` block runs: `with pool.live(total=n): ...`.

    On a terminal (or in a notebook) it redraws in place every `interval`
    seconds (default 0.25): a progress bar with rate and ETA, the queue depth,
    in-flight tasks, retries and failures, and one row per worker with its
    state, the task it runs, CPU and RSS. Otherwise it writes one plain line
    every `interval` seconds (default 5) and a last one on exit.

    It counts the work of its own block: tasks that end while it is open,
    against `total` (the tasks you are about to run; settable while the view
    runs) or, without one, against the tasks submitted since it opened (then
    there is no ETA). A `map(..., progress=True)` inside the block adds its
    bar to the view.
    """

    def __init__(
        self,
        stats: Callable[[], Stats],
        registry: list[LiveView],
        total: int | None = None,
        file: IO[str] | None = None,
        interval: float | None = None,
        title: str = "procqueue",
    ) -> None:
        self.total = total
        self._stats = stats
        self._registry = registry
        self._title = title
        self._base = Stats()
        self._bars: list[MapProgress] = []
        self._show = Redraw(file, interval, self._render, self._plain)
        self.fancy = self._show.fancy

    def attach(self, bar: MapProgress) -> None:
        self._bars.append(bar)

    def detach(self, bar: MapProgress) -> None:
        self._bars.remove(bar)

    def _render(self) -> RenderableType:
        return render(self._stats(), self.total, self._title, self._base, tuple(self._bars))

    def _plain(self) -> str:
        line = plain_line(self._stats(), self.total, self._title, self._base)
        for bar in self._bars:
            line += f" | {bar.describe()}"
        return line

    def __enter__(self) -> LiveView:
        self._base = self._stats()
        self._registry.append(self)
        self._show.start("procqueue-view")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._registry.remove(self)
        self._show.stop()
