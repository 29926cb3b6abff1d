"""Hostile handlers and objects for tests/test_hardening.py (importable by every start method).

Each one is a real fault: objects whose unpickling exits, segfaults or raises
`SystemExit`; exceptions whose `__str__` or `__repr__` blow up; a handler that
will not unpickle the first time in each process; handlers that fork, hold the
GIL, or hang at one index of a huge batch.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

# --- gates ------------------------------------------------------------------------------


def wait_for_file(path: str, value: Any, timeout: float = 30.0) -> Any:
    """Return `value` once `path` exists: lets a test act while the task is surely not done."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return value


# --- item 7: unpickling in the parent raises SystemExit --------------------------------


class ExitsOnLoad:
    """Pickles fine; unpickling it calls `sys.exit(3)` (a `SystemExit` in whoever loads it)."""

    def __reduce__(self) -> Any:
        return (sys.exit, (3,))


def make_exits_on_load(_: Any = None) -> Any:
    return ExitsOnLoad()


class SetstateExits:
    """Pickles fine; its `__setstate__` raises `SystemExit` (in whoever loads it)."""

    def __init__(self) -> None:
        self.payload = "state"

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise SystemExit(4)


def make_setstate_exits(_: Any = None) -> Any:
    return SetstateExits()


class ExitingError(Exception):
    """An exception that pickles in the worker; unpickling it raises `SystemExit`."""

    def __reduce__(self) -> Any:
        return (sys.exit, (5,))


def raise_exiting_error(_: Any = None) -> None:
    raise ExitingError("unpickling me exits")


# --- item 8: unpickling an argument in the worker kills the worker --------------------------


class ExitsWorkerOnLoad:
    """An argument whose unpickling calls `os._exit(9)`: the worker dies before the handler runs."""

    def __reduce__(self) -> Any:
        return (os._exit, (9,))


class SegfaultsOnLoad:
    """An argument whose unpickling reads address 0: SIGSEGV before the handler runs."""

    def __reduce__(self) -> Any:
        return (ctypes.string_at, (0,))


# --- item 9: exceptions that cannot be described ---------------------------------------


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ refuses")


class StrAndReprRaise(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ refuses")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ refuses")


class StrExits(Exception):
    def __str__(self) -> str:
        raise SystemExit(6)


def raise_str_raises(_: Any = None) -> None:
    raise StrRaises("x")


def raise_str_and_repr_raise(_: Any = None) -> None:
    raise StrAndReprRaise("x")


def raise_str_exits(_: Any = None) -> None:
    raise StrExits("x")


# --- item 10: a handler that fails to unpickle once per process -----------------------------


class FirstLoadFails:
    """A callable whose unpickling raises the first time in each process (a marker
    file per pid in `folder` remembers), and works every later time."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, x: int) -> int:
        return x * 2

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder = state["folder"]
        marker = os.path.join(self.folder, str(os.getpid()))
        if not os.path.exists(marker):
            with open(marker, "w"):
                pass
            raise RuntimeError("FirstLoadFails: the first unpickle in this process fails")


# --- item 11: one bad item past index 2**20 of a single batch ---------------------------

BIG_HANG = 2**20 + 3
BIG_EXIT = 2**20 + 4


def hang_at_big(x: int) -> int:
    """Trivial, except item BIG_HANG, which sleeps well past any timeout the test sets."""
    if x == BIG_HANG:
        time.sleep(8)
    return x


def exit_at_big(x: int) -> int:
    """Trivial, except item BIG_EXIT, which kills its worker."""
    if x == BIG_EXIT:
        os._exit(9)
    return x


# --- item 12: a handler that leaves a long-lived grandchild ---------------------------------


def fork_sleeper(seconds: float = 30.0) -> int:
    """Fork a child that sleeps `seconds` holding every descriptor the worker had; return its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(seconds)
        finally:
            os._exit(0)
    return pid


def die_later(seconds: float = 0.0, code: int = 1) -> None:
    time.sleep(seconds)
    os._exit(code)


# --- item 13: a call that holds the GIL for a long time ------------------------------------------


def gil_hog(path: str) -> int:
    """Write our pid to `path`, then sum a huge range in C: no bytecode runs, the GIL is never released."""
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    return sum(range(10**11))


class NeedsLock:
    """Pickling it takes a lock: the caller may hold it while it submits."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def __reduce__(self) -> tuple[Any, ...]:
        with self.lock:
            return (int, (7,))


class ExitsWhenPickled:
    """Pickling it raises SystemExit."""

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(3)


class BlocksInParent:
    """Unpickling it in the process whose pid is `PARENT_PID` waits until the file `gate` exists."""

    def __init__(self, parent_pid: int, gate: str) -> None:
        self.parent_pid = parent_pid
        self.gate = gate

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.getpid() == self.parent_pid:
            while not os.path.exists(self.gate):
                time.sleep(0.01)


def blocks_in_parent(x: int, parent_pid: int, gate: str) -> Any:
    return BlocksInParent(parent_pid, gate) if x == 0 else x


class HandlerThatExitsWhenPickled:
    """A callable whose pickling raises SystemExit."""

    def __call__(self, x: Any) -> Any:
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(1)
