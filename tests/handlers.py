"""Handlers the tests send to workers (importable by every start method)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0) -> int:
    return a + b


def identity(x: Any) -> Any:
    return x


def pid(_: Any = None) -> int:
    return os.getpid()


def sleep_then(x: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return x


def spin(ms: float) -> float:
    end = time.perf_counter() + ms / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return ms


class Boom(ValueError):
    pass


def boom(x: Any) -> Any:
    raise Boom(f"boom {x}")


def fail_if(x: int, bad: frozenset[int] = frozenset()) -> int:
    if x in bad:
        raise Boom(f"bad item {x}")
    return x


def die(code: int = 7) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def exit_call(code: int = 3) -> None:
    sys.exit(code)


def hang(seconds: float = 60.0) -> None:
    time.sleep(seconds)


def kill_self_on(x: int, bad: int) -> int:
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def flaky(path: str, fails: int) -> int:
    """Fails `fails` times (counted in a file), then returns how many attempts it took."""
    with open(path, "a+") as fh:
        fh.seek(0)
        seen = len(fh.read())
        fh.write("x")
    if seen < fails:
        raise Boom(f"attempt {seen + 1} fails")
    return seen + 1


def stamp(tag: Any) -> tuple[Any, float]:
    return tag, time.monotonic()


def slow_stamp(tag: Any) -> tuple[Any, float]:
    time.sleep(0.001)
    return tag, time.monotonic()


def unpicklable_result(_: Any = None) -> Any:
    return threading.Lock()


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("this exception refuses to pickle")


def raise_unpicklable(_: Any = None) -> None:
    raise Unpicklable("cannot cross")


class NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)
        self.b = b


def raise_needs_two(_: Any = None) -> None:
    raise NeedsTwoArgs("first", "second")


def allocate(mb: int, hold: float = 0.0) -> int:
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _keep.append(block)
    time.sleep(hold)
    return os.getpid()


_keep: list[bytearray] = []


def bad_init() -> None:
    raise RuntimeError("initializer is broken")


def set_global(value: int) -> None:
    global _initialised
    _initialised = value


_initialised = 0


def read_global(_: Any = None) -> int:
    return _initialised


def chaos(x: int) -> int:
    """Random handler errors and, rarely, a hang past the timeout."""
    r = (x * 2654435761) % 1000
    if r < 20:
        raise Boom(f"chaos {x}")
    if r == 999 and x % 23 == 0:  # 4 of the first 100,000
        time.sleep(30)
    return x


def _explode() -> None:
    raise RuntimeError("refuses to unpickle here")


class FailsToUnpickle:
    """Pickles fine; unpickling raises (in any process)."""

    def __reduce__(self) -> Any:
        return (_explode, ())


def _explode_in_parent() -> Any:
    import multiprocessing

    if multiprocessing.parent_process() is None:
        raise RuntimeError("refuses to unpickle in the parent")
    return "fine in a worker"


class ParentCannotLoad:
    def __reduce__(self) -> Any:
        return (_explode_in_parent, ())


def make_parent_cannot_load(_: Any = None) -> Any:
    return ParentCannotLoad()


def pid_then_sleep(path: str, seconds: float) -> int:
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def wait_for_pid(path: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as fh:
                text = fh.read()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise TimeoutError(path)


def parent_script(method: str, mode: str) -> str:
    """Source of a child Python that runs a pool and reports its pids (for orphan tests)."""
    return f"""
import os, signal, sys, time
# Ctrl-C raises here, as in a program started from a terminal: a runner started in the
# background (`bash .ci/run &`) hands its children SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import procqueue as pq, handlers as h
pool = pq.Pool(workers=2, start_method={method!r})
# Every process up (a spawned child hit by SIGINT while still importing prints a traceback):
# a result means the collector runs, and two tasks of 0.3 s go one to each worker.
[f.result() for f in [pool.submit(time.sleep, 0.3) for _ in range(2)]]
futs = [pool.submit(h.hang, 60) for _ in range(4)]
time.sleep(0.5)
pids = [w.pid for w in pool.stats().workers] + [pool._core.backend.collector.pid]
if {mode!r} in ("ctrl-c", "ctrl-c-group"):
    try:
        with pool:
            print(" ".join(map(str, pids)), flush=True)
            for f in futs:
                f.result()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(0)
print(" ".join(map(str, pids)), flush=True)
time.sleep(60)
"""


def exit_on(x: int, bad: int) -> int:
    """Tiny (runs in unmarked batches) except for one item, which kills its worker."""
    if x == bad:
        os._exit(9)
    return x


def big(n_mb: int) -> bytes:
    return b"x" * (n_mb * 1024 * 1024)


def ok_or_die(x: str) -> int:
    """Tiny, except "die": sleeps a moment, then kills its worker."""
    if x == "die":
        time.sleep(0.5)
        os._exit(1)
    return len(x)


def uneven(x: int) -> int:
    """About 3 % of tasks take 10 ms, the rest nothing: durations that vary."""
    if x % 37 == 0:
        time.sleep(0.01)
    return x


def json_exit_at_1000(raw: str) -> str:
    """A few microseconds of JSON work per item; item 1000 kills its worker."""
    record = json.loads(raw)
    if record["x"] == 1000:
        os._exit(9)
    return json.dumps({"value": record["x"]})


def spin_if_negative(x: int) -> int:
    """Tiny for x >= 0; 2 ms of CPU for x < 0."""
    if x < 0:
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
    return x
