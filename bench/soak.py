"""Soak: a night-long job squeezed into minutes, under chaos, then an audit.

    python -m bench.soak [--tasks 1000000] [--seconds S] [--no-collector-kills] [--seed N] [-v]

One pool with the settings a long unattended job would use
(`max_retries=2`, `task_timeout=3`, `max_tasks_per_worker=5000`,
`max_worker_memory=1 GiB`, everything else default) runs `--tasks` tasks, most
of them tiny, through `submit` (some with per-call options) and through `map` /
`imap_unordered` over generators. Meanwhile:

- handlers fail on purpose: some once (a retry succeeds), some every time (the
  task fails for good); a few crash their worker (once, or every time) and a
  few hang past `task_timeout` (once, or every time);
- a chaos thread SIGKILLs a worker every 0.5-2 s, and now and then the
  collector (`--no-collector-kills` spares it), by pid from `pool.stats()`;
- maps over generators are abandoned: `break`, `next()` then dropped, `close()`,
  an exception in the loop body, never iterated, parked half-read and dropped
  later; some end at a task's error, some run with `return_exceptions=True`;
- done-callbacks submit follow-up tasks (which may have follow-ups of their own).

Every task gets an index, and what comes back is checked against what its
handler was told to do: one outcome per submitted future (the right value, or
an error its kind allows, a final failure after `retries + 1` attempts); a
map's results in input order (unordered: each once), never more than it was
given. At the end, with the pool shut down: `pool.stats()` must balance
(`submitted == completed + failed + dropped + cancelled`, nothing pending or in
flight) and agree with what was seen; the parent's RSS must grow by less than
50 MB from after a warm-up to the end; no pool process (any pid seen below this
one during the run) may be alive 5 s after shutdown (those are SIGKILLed by pid
and named). A watchdog ends the run if no task finishes for 60 s.

It prints one line, and exits 0 when everything held, 1 when something did not
(books, outcomes, RSS, orphans, a broken pool), 2 on a hang::

    soak: 20000 tasks in 14 s: 19327 ok, 19 failed (10 raised, 2 crashed, 1 timed out, 6 unread in
    abandoned maps), 79 retried, 654 cancelled by abandoned maps; books balanced; outcomes one per task;
    parent RSS +6 MB; orphans 0; hangs 0; collector kills 1, worker kills 5; seed 210293419

(on one line). `-v` adds progress on stderr and, on a hang, every thread's stack.
`--seed` replays the same choices (threads still interleave as they will).
To look past a failure that stops the run early, switch one stress off:
`--follow-up-rate 0` (no follow-up submits from callbacks), `--no-drops`
(abandoned maps are closed, not dropped), `--no-collector-kills`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import gc
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import psutil

import procqueue as pq

from .workloads import burn

# --- the handler -----------------------------------------------------------------------

# What a task does. A plain task travels as its index (an int) and returns it;
# any other kind travels as (index, kind, marker directory).
OK, SLOW, FLAKY, BAD, CRASH_ONCE, POISON, HANG_ONCE, HANG = range(8)
KIND_NAMES = ("ok", "slow", "flaky", "bad", "crash-once", "poison", "hang-once", "hang")
SLOW_LOOPS = 4000  # about 0.2 ms of pure Python
CRASH_EXIT = 70

# Per-task probabilities of the rare kinds, and how many of each a run has at least
# (handed out evenly over the run, so that a short run meets each fault too).
RATES = {SLOW: 0.05, FLAKY: 2e-3, BAD: 1e-3, CRASH_ONCE: 1e-4, POISON: 2e-5, HANG_ONCE: 2e-5, HANG: 5e-6}
AT_LEAST = {SLOW: 0, FLAKY: 10, BAD: 5, CRASH_ONCE: 5, POISON: 2, HANG_ONCE: 3, HANG: 2}
SUBMIT_KINDS = (SLOW, FLAKY, BAD, CRASH_ONCE, POISON, HANG_ONCE, HANG)
ORDERED_MAP_KINDS = (SLOW, FLAKY, BAD, CRASH_ONCE)  # no hangs in maps: a reader would wait them out
UNORDERED_MAP_KINDS = (SLOW, FLAKY, CRASH_ONCE)  # an unordered error cannot be traced to its task

Item = int | tuple[int, int, str]


def _first_attempt(markers: str, index: int) -> bool:
    """True the first time any worker asks about task `index` (a marker file remembers)."""
    try:
        os.close(os.open(os.path.join(markers, str(index)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def task(item: Item) -> int:
    """The one handler: returns the task's index, or fails the way its kind says."""
    if isinstance(item, int):
        return item
    index, kind, markers = item
    if kind == SLOW:
        burn(SLOW_LOOPS)
        return index
    first = kind in (FLAKY, CRASH_ONCE, HANG_ONCE) and _first_attempt(markers, index)
    if kind == BAD or (kind == FLAKY and first):
        raise ValueError(f"soak task {index}: bad input")
    if kind == POISON or (kind == CRASH_ONCE and first):
        os._exit(CRASH_EXIT)
    if kind == HANG or (kind == HANG_ONCE and first):
        time.sleep(3600)  # the pool's task_timeout kills it long before
    return index


# --- bookkeeping -----------------------------------------------------------------------

UNUSED, FUTURE, REFUSED, MAPPED = range(4)  # what became of an index


class Abandon(Exception):
    """Raised in a map's loop body to leave it by an exception."""


@dataclass
class MapRun:
    """One map call: the indices handed to it and not yet read back."""

    ordered: bool
    waiting: collections.deque[int] = field(default_factory=collections.deque)  # ordered: in input order
    unordered: set[int] = field(default_factory=set)
    consumed: int = 0

    def add(self, index: int) -> None:
        if self.ordered:
            self.waiting.append(index)
        else:
            self.unordered.add(index)


@dataclass
class Seen:
    """Outcomes observed: from futures' callbacks and from map results read."""

    ok: int = 0
    raised: int = 0
    crashed: int = 0
    timed_out: int = 0
    broken: int = 0
    retried_ok: int = 0  # futures that needed more than one attempt and succeeded
    wrong: int = 0
    examples: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = args.tasks
        self.seed = args.seed if args.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.cb_rng = random.Random(self.seed + 1)  # callbacks run on other threads
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        # One byte per task: what became of it, its kind, and how many outcomes it had.
        self.route = bytearray(self.n)
        self.kind = bytearray(self.n)
        self.outcomes = bytearray(self.n)
        self.allocated = 0
        self.open_futures = 0  # submitted, and their done-callback has not finished
        self.futures = 0
        self.refused = 0
        self.follow_ups = 0
        self.map_pulled = 0
        self.map_consumed = 0
        self.maps = 0
        self.seen = Seen()
        self.unattributed = 0  # errors that ended an unordered map (their task is unknown)
        self.progress = 0  # outcomes seen; the watchdog watches it
        self.phase = "starting"
        self.broken: BaseException | None = None
        self.error: BaseException | None = None  # an exception the run did not expect
        self.stash: list[tuple[MapRun, Iterator[Any]]] = []  # maps parked half-read
        self.worker_kills = 0
        self.collector_kills = 0
        self.spared: set[int] = set()  # pool task ids of hanging tasks: their timeouts, not kills, end them
        self.pids: dict[int, float] = {}  # every pool process seen: pid -> create_time
        self.last_stats: pq.Stats | None = None
        self.rss_start: int | None = None
        self.rss_end: int | None = None
        self.t0 = time.monotonic()
        self.t_end: float | None = None  # when shutdown returned
        self.deadline = None if args.seconds is None else self.t0 + args.seconds
        self.reported = threading.Lock()  # exactly one line, from whichever thread gets there first
        self.stop = threading.Event()
        self.me = psutil.Process()
        self.issued = dict.fromkeys(RATES, 0)  # tasks of each rare kind so far
        self.episode = max(20, min(3000, self.n // 100))  # mean size of a burst of submits or of a map read
        self.markers = tempfile.mkdtemp(prefix="procqueue-soak-")

    # --- choosing --------------------------------------------------------------------

    def _allocate(self, route: int) -> int | None:
        """The next task index, or None when the budget (or the time) is spent."""
        with self.lock:
            if self.allocated >= self.n or self.broken is not None or self._past_deadline():
                return None
            index = self.allocated
            self.allocated += 1
            self.route[index] = route
            return index

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _pick(self, rng: random.Random, kinds: tuple[int, ...]) -> int:
        kind = OK
        with self.lock:
            due = (self.allocated + 1) / self.n  # share of the run done
            for k in kinds:
                if self.issued[k] < int(AT_LEAST[k] * due):
                    kind = k  # behind its quota
                    break
            else:
                x = rng.random()
                for k in kinds:
                    x -= RATES[k]
                    if x < 0:
                        kind = k
                        break
            if kind != OK:
                self.issued[kind] += 1
        return kind

    def _item(self, index: int, kind: int) -> Item:
        self.kind[index] = kind
        return index if kind == OK else (index, kind, self.markers)

    # --- judging an outcome ------------------------------------------------------------

    def _judge(self, index: int, value: Any, exc: BaseException | None, retries: int, attempts: int | None) -> None:
        """Count one outcome of task `index` and check it is one its kind allows.
        `attempts` is None for map items (a map does not tell).

        A "once" kind fails for good only without retries; it may succeed even
        then, because a task whose worker was killed before it reported runs
        again uncharged (the README's "make side effects idempotent"), and then
        finds its marker. A worker crash may end any task: the chaos thread
        kills workers."""
        kind = self.kind[index]
        problem = None
        with self.lock:
            self.outcomes[index] = min(255, self.outcomes[index] + 1)
            self.progress += 1
            seen = self.seen
            if exc is None:
                seen.ok += 1
                if attempts is not None and attempts > 1:
                    seen.retried_ok += 1
                if kind in (BAD, POISON, HANG):
                    problem = f"returned {value!r}"
                elif value != index:
                    problem = f"returned {value!r}, not its index"
            else:
                if isinstance(exc, pq.PoolBroken):
                    seen.broken += 1  # the run fails on the broken pool itself
                elif isinstance(exc, pq.WorkerCrashed):
                    seen.crashed += 1
                elif isinstance(exc, pq.TaskTimeout):
                    seen.timed_out += 1
                    if not (kind == HANG or (kind == HANG_ONCE and retries == 0)):
                        problem = "timed out"
                elif isinstance(exc, ValueError) and str(exc).startswith(f"soak task {index}:"):
                    seen.raised += 1
                    if not (kind == BAD or (kind == FLAKY and retries == 0)):
                        problem = "raised its error for good"
                else:
                    problem = f"failed with {type(exc).__name__}: {str(exc)[:200]}"
                if (
                    problem is None
                    and attempts is not None
                    and not isinstance(exc, pq.PoolBroken)
                    and attempts != retries + 1
                ):
                    problem = f"failed for good after {attempts} attempts with retries={retries}"
            if problem is not None:
                self._wrong_locked(f"task {index} ({KIND_NAMES[kind]}) {problem}")

    def _wrong_locked(self, what: str) -> None:
        self.seen.wrong += 1
        if len(self.seen.examples) < 5:
            self.seen.examples.append(what)
            if self.args.verbose:
                print(f"soak: wrong: {what}", file=sys.stderr, flush=True)

    def _wrong(self, what: str) -> None:
        with self.lock:
            self._wrong_locked(what)

    # --- submit and done-callbacks --------------------------------------------------------

    def _submit(self, pool: pq.Pool, index: int, kind: int, opts: pq.Options | None, depth: int) -> bool:
        """Submit task `index`; False once the pool refuses (it broke or closed)."""
        item = self._item(index, kind)
        retries = self.args.retries if opts is None else opts.retries
        with self.lock:
            self.open_futures += 1
        try:
            fut = (pool if opts is None else opts).submit(task, item)
        except (pq.PoolBroken, pq.PoolClosed) as exc:
            with self.cv:
                self.open_futures -= 1
                self.route[index] = REFUSED
                self.refused += 1
                if self.broken is None:
                    self.broken = exc
                self.cv.notify_all()
            return False
        with self.lock:
            self.futures += 1
            if kind in (HANG, HANG_ONCE):
                self.spared.add(fut.task_id)
        fut.add_done_callback(partial(self._done, pool, index, retries, depth))
        return True

    def _done(self, pool: pq.Pool, index: int, retries: int, depth: int, fut: Any) -> None:
        """Done-callback: judge the outcome; now and then submit a follow-up task."""
        try:
            if fut.cancelled():
                self._wrong(f"task {index} ({KIND_NAMES[self.kind[index]]}) was cancelled; nobody cancelled it")
                return
            exc = fut.exception()
            if isinstance(exc, pq.PoolBroken):
                self._note_broken(exc)
            self._judge(index, None if exc is not None else fut.result(), exc, retries, fut.attempts)
            if exc is None and depth < 3 and self.cb_rng.random() < self.args.follow_up_rate:
                nxt = self._allocate(FUTURE)
                if nxt is not None:
                    with self.lock:
                        self.follow_ups += 1
                    self._submit(pool, nxt, self._pick(self.cb_rng, (SLOW, FLAKY, BAD)), None, depth + 1)
        except BaseException as e:  # a callback must not raise into the pool; say what went wrong
            self._wrong(f"task {index}: the soak's own done-callback failed: {type(e).__name__}: {e}")
        finally:
            with self.cv:
                self.open_futures -= 1
                self.cv.notify_all()

    def _note_broken(self, exc: BaseException) -> None:
        with self.lock:
            if self.broken is None:
                self.broken = exc

    def _submit_burst(self, pool: pq.Pool) -> None:
        rng = self.rng
        opts: pq.Options | None = None
        if rng.random() < 0.2:  # per-call options: a priority, sometimes no retries
            opts = pool.options(priority=rng.randint(-3, 9), retries=rng.choice((0, 1, 2, 3)))
        for _ in range(rng.randint(1, 2 * self.episode)):
            index = self._allocate(FUTURE)
            if index is None or not self._submit(pool, index, self._pick(rng, SUBMIT_KINDS), opts, 0):
                return

    # --- maps ------------------------------------------------------------------------------

    def _items(self, run: MapRun, length: int, kinds: tuple[int, ...]) -> Iterator[Item]:
        """A map's input: allocated one by one as the pool pulls them (in the reading thread)."""
        n = 0
        while n < length:
            index = self._allocate(MAPPED)
            if index is None:
                return
            item = self._item(index, self._pick(self.rng, kinds))
            run.add(index)
            with self.lock:
                self.map_pulled += 1
            n += 1
            yield item

    def _read(self, run: MapRun, y: Any) -> None:
        """One result read from a map (a value, or an error in its place)."""
        if run.ordered:
            if not run.waiting:
                self._wrong(f"an ordered map gave a result beyond its input: {y!r}")
                return
            index = run.waiting.popleft()
        elif isinstance(y, int) and y in run.unordered:
            index = y
            run.unordered.discard(y)
        else:
            self._wrong(f"an unordered map gave {y!r}: not one of its tasks still to come")
            return
        run.consumed += 1
        with self.lock:
            self.map_consumed += 1
        exc = y if isinstance(y, BaseException) else None
        self._judge(index, None if exc else y, exc, self.args.retries, None)

    def _read_error(self, run: MapRun, exc: BaseException) -> None:
        """An error raised by a map's iterator: at its task's place, or the pool broke."""
        if isinstance(exc, pq.PoolBroken):
            self._note_broken(exc)
        elif run.ordered:
            self._read(run, exc)
        else:
            with self.lock:
                self.unattributed += 1
                self.progress += 1
                if isinstance(exc, pq.WorkerCrashed):
                    self.seen.crashed += 1
                else:
                    self._wrong_locked(f"an unordered map ended with {type(exc).__name__}: {str(exc)[:200]}")

    def _consume(self, run: MapRun, it: Iterator[Any], k: int) -> bool:
        """Read up to `k` results; False when the map ended (input done, or an error)."""
        try:
            for _ in range(k):
                self._read(run, next(it))
        except StopIteration:
            return False
        except Exception as exc:
            self._read_error(run, exc)
            return False
        return True

    def _map_episode(self, pool: pq.Pool) -> None:
        rng = self.rng
        k = min(10 * self.episode, int(rng.expovariate(1 / self.episode)))  # results to read before leaving
        # Input a little past what is read, or (one map in ten) far past it.
        length = k + (10 * self.episode if rng.random() < 0.1 else rng.randint(0, 2 * k + 10))
        how = rng.choice(("break", "drop", "close", "raise", "park", "never", "unordered"))
        run = MapRun(ordered=how != "unordered")
        kinds = ORDERED_MAP_KINDS if how != "unordered" else UNORDERED_MAP_KINDS if self.args.retries else (SLOW,)
        items = self._items(run, length, kinds)
        with self.lock:
            self.maps += 1
        it: Iterator[Any] | None = None
        try:
            if how == "unordered":
                it = pool.imap_unordered(task, items)
            else:  # an error ends the map at its place, or (return_exceptions) takes its place
                it = pool.map(task, items, return_exceptions=how != "raise" and rng.random() < 0.5)
            if how in ("break", "unordered"):
                for n, y in enumerate(it, 1):
                    self._read(run, y)
                    if n >= k:
                        break
            elif how == "raise":
                with contextlib.suppress(Abandon):
                    for n, y in enumerate(it, 1):
                        self._read(run, y)
                        if n >= k:
                            raise Abandon
            elif how != "never" and self._consume(run, it, k) and how == "park":
                self.stash.append((run, it))  # read more later, then leave it
                it = None
        except (pq.PoolBroken, pq.PoolClosed) as exc:  # from map() itself, or between results
            self._note_broken(exc)
        except Exception as exc:
            self._read_error(run, exc)
        if it is not None:
            self._leave(it, close=how == "close")
        del it
        if len(self.stash) > 4 or (self.stash and rng.random() < 0.3):
            self._unpark(rng.randrange(len(self.stash)))

    def _leave(self, it: Iterator[Any], close: bool) -> None:
        """Abandon a map: close it, or (the default) just drop it; `--no-drops` closes them all."""
        if close or self.args.no_drops:
            shut = getattr(it, "close", None)
            if shut is not None:
                shut()

    def _unpark(self, i: int) -> None:
        """Read a little more from a parked map, then leave it."""
        run, it = self.stash.pop(i)
        self._consume(run, it, self.rng.randint(0, 500))
        self._leave(it, close=False)

    # --- chaos, watchdog, processes ---------------------------------------------------------

    def _is_helper(self, p: psutil.Process) -> bool:
        """multiprocessing's fork server or resource tracker: ours, but not the pool's (forked from
        this process, with its command line, or exec'd)."""
        from multiprocessing import forkserver, resource_tracker

        try:
            if p.ppid() != self.me.pid:
                return False
            if p.pid in (forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid):  # type: ignore[attr-defined]
                return True
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            return False
        return "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd

    def _descendants(self) -> list[psutil.Process]:
        try:
            return [p for p in self.me.children(recursive=True) if not self._is_helper(p)]
        except psutil.Error:
            return []

    def _note_pids(self) -> None:
        for p in self._descendants():
            if p.pid not in self.pids:
                with contextlib.suppress(psutil.Error):
                    self.pids[p.pid] = p.create_time()

    def _kill(self, pid: int) -> bool:
        """SIGKILL a live process of the pool; False if `pid` is gone or not the pool's."""
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE or self._is_helper(p):
                return False
            if self.me.pid not in {q.pid for q in p.parents()}:
                return False  # not below us: the pid was reused by someone else
            self.pids.setdefault(pid, p.create_time())
            p.kill()
        except psutil.Error:
            return False
        return True

    def _chaos(self, pool: pq.Pool) -> None:
        rng = random.Random(self.seed + 2)
        events, next_collector = 0, rng.randint(2, 6)  # then one kill in 5 to 15 goes to the collector
        while not self.stop.wait(rng.uniform(0.5, 2.0)):
            try:
                stats = pool.stats()
            except Exception as exc:  # stats() is documented safe from any thread, at any time
                self._wrong(f"pool.stats() raised {type(exc).__name__}: {exc}")
                continue
            self.last_stats = stats
            events += 1
            if not self.args.no_collector_kills and events >= next_collector and stats.collector is not None:
                if self._kill(stats.collector.pid):
                    self.collector_kills += 1
                    next_collector = events + rng.randint(5, 15)
                continue
            pids = [
                w.pid
                for w in stats.workers
                if w.pid > 0 and w.state in ("idle", "running", "recycling") and w.task_id not in self.spared
            ]
            if pids and self._kill(rng.choice(pids)):
                self.worker_kills += 1

    def _watchdog(self) -> None:
        last, since = (-1, ""), time.monotonic()
        next_note = time.monotonic() + 10
        while self.phase != "done":
            time.sleep(0.5)
            self._note_pids()
            now = time.monotonic()
            mark = (self.progress, self.phase)
            if mark != last:
                last, since = mark, now
            elif now - since >= self.args.hang_after:
                self._hang(now - since)
            if self.args.verbose and now >= next_note:
                next_note = now + 10
                print(f"soak: {now - self.t0:.0f} s, {self._status()}", file=sys.stderr, flush=True)

    def _status(self) -> str:
        return (
            f"phase {self.phase}: {self.allocated} tasks started, {self.progress} outcomes seen, "
            f"{self.open_futures} futures open, {self.maps} maps, "
            f"kills {self.collector_kills} collector / {self.worker_kills} worker"
        )

    def _hang(self, quiet: float) -> NoReturn:
        status = self._status()  # before the kills below wake the main thread
        if self.args.verbose:
            s = self.last_stats
            print(f"soak: no task finished for {quiet:.0f} s; {status}", file=sys.stderr)
            if s is not None:
                print(f"soak: the pool {time.time() - s.timestamp:.1f} s ago: {s.to_json()}", file=sys.stderr)
            print("soak: threads:", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        orphans = self._reap()
        self._print(self._line(self.last_stats, orphans, hang=f"no task finished for {quiet:.0f} s ({status})"))
        shutil.rmtree(self.markers, ignore_errors=True)
        os._exit(2)

    def _reap(self) -> list[int]:
        """Pool processes still alive: SIGKILL them (by pid) and return their pids."""
        self._note_pids()
        alive: list[psutil.Process] = []
        for pid, created in list(self.pids.items()):
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                continue
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        return sorted(p.pid for p in alive)

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        pool = pq.Pool(
            max_retries=args.retries,
            task_timeout=args.task_timeout,
            max_tasks_per_worker=args.max_tasks_per_worker or None,
            max_worker_memory=1 << 30,
        )
        self._note_pids()
        threads = [
            threading.Thread(target=self._chaos, args=(pool,), name="soak-chaos", daemon=True),
            threading.Thread(target=self._watchdog, name="soak-watchdog", daemon=True),
        ]
        for t in threads:
            t.start()
        self.phase = "running"
        warm = max(2000, self.n // 20)
        try:
            while self.broken is None and self.allocated < self.n and not self._past_deadline():
                if self.rng.random() < 0.7:
                    self._submit_burst(pool)
                else:
                    self._map_episode(pool)
                if self.rss_start is None and self.allocated >= warm:
                    gc.collect()
                    self.rss_start = self.me.memory_info().rss
            self.phase = "draining"
            while self.stash:
                self._unpark(0)
            with self.cv:
                while self.open_futures:
                    self.cv.wait(1.0)
        except Exception as exc:  # procqueue raised where it should not have: report it, still audit
            self.error = exc
            if self.args.verbose:
                traceback.print_exc()
        self.stop.set()  # no more kills: the pool comes to rest
        self.phase = "shutting down"
        threads[0].join()
        gc.collect()
        self.rss_end = self.me.memory_info().rss
        pool.shutdown(wait=True)
        stats = pool.stats()
        self.t_end = time.monotonic()
        self.phase = "done"
        threads[1].join()
        time.sleep(5.0)
        orphans = self._reap()
        line, ok = self._verdict(stats, orphans)
        if self.args.verbose:
            print(
                f"soak: {self.futures} futures ({self.follow_ups} follow-ups, {self.refused} refused, "
                f"{self.seen.retried_ok} ok after a retry), {self.maps} maps ({self.map_pulled} items pulled, "
                f"{self.map_consumed} read, {self.unattributed} unordered errors); kinds "
                + ", ".join(f"{name} {self.kind.count(k, 0, self.allocated)}" for k, name in enumerate(KIND_NAMES))
                + f"; pool: {stats.to_json()}",
                file=sys.stderr,
            )
        self._print(line)
        return 0 if ok else 1

    def _print(self, line: str) -> None:
        if self.reported.acquire(blocking=False):
            print(line, flush=True)

    # --- the audit -----------------------------------------------------------------------------

    def _books(self, s: pq.Stats) -> list[str]:
        """What is wrong with the pool's counters, at rest, against what was seen."""
        bad = []
        if not s.balanced:
            bad.append(
                f"submitted {s.submitted} != completed {s.completed} + failed {s.failed} "
                f"+ dropped {s.dropped} + cancelled {s.cancelled}"
            )
        if s.pending or s.in_flight or s.retrying:
            bad.append(f"not at rest: pending {s.pending}, in flight {s.in_flight}, retrying {s.retrying}")
        if s.dropped:
            bad.append(f"{s.dropped} dropped under backpressure 'block'")
        # Map items the pool took lie between those read and those its input gave.
        lo, hi = self.futures + self.map_consumed, self.futures + self.map_pulled
        if not lo <= s.submitted <= hi:
            bad.append(f"submitted {s.submitted} outside [{lo}, {hi}] (futures + map items read / pulled)")
        seen = self.seen
        failed_seen = seen.raised + seen.crashed + seen.timed_out + seen.broken
        if s.completed < seen.ok:
            bad.append(f"completed {s.completed} < {seen.ok} values seen")
        if s.failed < failed_seen:
            bad.append(f"failed {s.failed} < {failed_seen} errors seen")
        if s.cancelled > self.map_pulled - self.map_consumed:
            bad.append(f"cancelled {s.cancelled} > {self.map_pulled - self.map_consumed} map items never read")
        return bad

    def _outcome_problems(self) -> list[str]:
        missing = duplicated = stray = 0
        example = ""
        route, outcomes = self.route, self.outcomes
        for i in range(self.allocated):
            r, o = route[i], outcomes[i]
            if (r == FUTURE and o == 1) or (r == MAPPED and o <= 1) or (r == REFUSED and o == 0):
                continue
            if r == FUTURE and o == 0:
                missing += 1
            elif r == REFUSED:
                stray += 1
            else:
                duplicated += 1
            example = example or f"task {i} ({KIND_NAMES[self.kind[i]]}): {o} outcomes"
        out = []
        if missing or duplicated or stray:
            out.append(f"{missing} missing, {duplicated} duplicated, {stray} for refused submits (e.g. {example})")
        if self.seen.wrong:
            out.append(f"{self.seen.wrong} wrong (e.g. {'; '.join(self.seen.examples[:2])})")
        return out

    def _line(self, s: pq.Stats | None, orphans: list[int], hang: str | None = None) -> str:
        seen = self.seen
        took = (self.t_end or time.monotonic()) - self.t0
        ok = s.completed if s is not None else seen.ok
        failed = s.failed if s is not None else seen.raised + seen.crashed + seen.timed_out + seen.broken
        parts = [f"{seen.raised} raised", f"{seen.crashed} crashed", f"{seen.timed_out} timed out"]
        if seen.broken:
            parts.append(f"{seen.broken} PoolBroken")
        unread = failed - (seen.raised + seen.crashed + seen.timed_out + seen.broken)
        if unread > 0:
            parts.append(f"{unread} unread in abandoned maps")
        head = (
            f"soak: {self.allocated} tasks in {took:.0f} s: {ok} ok, {failed} failed ({', '.join(parts)}), "
            f"{s.retried if s is not None else '?'} retried, "
            f"{s.cancelled if s is not None else '?'} cancelled by abandoned maps"
        )
        rss = "parent RSS ?"
        if self.rss_start is not None and self.rss_end is not None:
            rss = f"parent RSS {(self.rss_end - self.rss_start) / 2**20:+.0f} MB"
        pids = f" (pids {', '.join(map(str, orphans))}, killed)" if orphans else ""
        # After a hang the pool was never shut down: what is left is killed, but is not an orphan.
        orphan_text = f"pool processes left {len(orphans)}{pids}" if hang else f"orphans {len(orphans)}{pids}"
        tail = [rss, orphan_text, f"hangs {1 if hang else 0}"]
        tail.append(f"collector kills {self.collector_kills}, worker kills {self.worker_kills}")
        tail.append(f"seed {self.seed}")
        if hang is not None:
            return f"{head}; hang: {hang}; " + "; ".join(tail)
        return head + "; " + "; ".join(tail)

    def _verdict(self, s: pq.Stats, orphans: list[int]) -> tuple[str, bool]:
        books = self._books(s)
        outcomes = self._outcome_problems()
        grew = self.rss_end - self.rss_start if self.rss_start is not None and self.rss_end is not None else 0
        line = self._line(s, orphans)
        head, _, tail = line.partition("; ")
        middle = [
            "books balanced" if not books else "BOOKS WRONG: " + "; ".join(books),
            "outcomes one per task" if not outcomes else "OUTCOMES WRONG: " + "; ".join(outcomes),
        ]
        if self.error is not None:
            middle.append(f"ERROR: {type(self.error).__name__}: {str(self.error).splitlines()[0][:200]}")
        if self.broken is not None:
            middle.append(f"POOL BROKEN: {type(self.broken).__name__}: {str(self.broken).splitlines()[0]}")
        if grew >= 50 * 2**20:
            middle.append("RSS GREW 50 MB OR MORE")
        ok = (
            not books
            and not outcomes
            and self.broken is None
            and self.error is None
            and grew < 50 * 2**20
            and not orphans
        )
        return f"{head}; {'; '.join(middle)}; {tail}", ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1_000_000, help="tasks to run (default 1,000,000)")
    ap.add_argument("--seconds", type=float, help="stop starting tasks after this long, then drain")
    ap.add_argument("--no-collector-kills", action="store_true", help="kill only workers, never the collector")
    ap.add_argument("--follow-up-rate", type=float, default=0.02, help="share of done-callbacks that submit (0: none)")
    ap.add_argument("--no-drops", action="store_true", help="close every abandoned map instead of dropping some")
    ap.add_argument("--retries", type=int, default=2, help="the pool's max_retries (default 2)")
    ap.add_argument("--task-timeout", type=float, default=3.0, help="the pool's task_timeout (default 3 s)")
    ap.add_argument("--max-tasks-per-worker", type=int, default=5000, help="the pool's (default 5000; 0: none)")
    ap.add_argument("--hang-after", type=float, default=60.0, help="seconds without an outcome that count as a hang")
    ap.add_argument("--seed", type=int, help="seed of the random choices (printed at the end)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress and diagnostics on stderr")
    args = ap.parse_args(argv)
    if args.tasks < 1:
        ap.error("--tasks must be at least 1")
    soak = Soak(args)
    try:
        return soak.run()
    finally:
        shutil.rmtree(soak.markers, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
