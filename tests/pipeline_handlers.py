"""Stage functions for tests/test_pipeline.py (importable by every start method)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def neg(x: int) -> int:
    return -x


class Bad(ValueError):
    pass


def double_but_13(x: int) -> int:
    """Stage 1 of the error tests: item 12 (value 13 after `inc`) fails."""
    if x == 13:
        raise Bad(f"no {x}")
    return x * 2


def double_but_kill_13(x: int) -> int:
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


def kill_once_at_13(marks: str, x: int) -> int:
    """SIGKILLs its worker the first time it sees 13 (a marker file in `marks` remembers)."""
    if x == 13:
        mark = os.path.join(marks, "killed-13")
        if not os.path.exists(mark):
            with open(mark, "w"):
                pass
            os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


def hang_at_13(x: int) -> int:
    if x == 13:
        time.sleep(60)
    return x * 2


def refuse(x: int) -> int:
    raise ValueError(f"refused {x}")


def same(x: Any) -> Any:
    return x


def slow(x: Any) -> Any:
    time.sleep(0.002)
    return x


def pixels(i: int) -> bytes:
    """A small 'image': 64 x 64 bytes from a seed."""
    return bytes((i * 31 + k) % 251 for k in range(64 * 64))


def blur(img: bytes) -> bytes:
    return bytes((img[k - 1] + img[k] + img[(k + 1) % len(img)]) // 3 for k in range(len(img)))


def checksum(img: bytes) -> int:
    import zlib

    return zlib.crc32(img)


def hostile_at(x: int) -> Any:
    """Values whose unpickling in the parent raises SystemExit, at 7 (itself) and 11 (nested)."""
    from tests import hostile

    if x == 7:
        return hostile.ExitsOnLoad()
    if x == 11:
        return {"deep": [(x, hostile.SetstateExits())]}
    return x


def fail_every_fifth(x: int) -> int:
    if x % 5 == 4:
        raise Bad(f"no {x}")
    return x


def _interrupt() -> None:
    raise KeyboardInterrupt


class InterruptsOnLoad:
    """Pickles fine; unpickling it raises KeyboardInterrupt (in whoever loads it)."""

    def __reduce__(self) -> Any:
        return (_interrupt, ())


def interrupts_at_5(x: int) -> Any:
    return InterruptsOnLoad() if x == 5 else x


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this one does not pickle")


def _loaded(marks: str, x: int, delay: float = 0.0) -> int:
    """Unpickling a `Tracked`: note which process did it (it is loading now), take `delay`."""
    with open(os.path.join(marks, f"loaded-{os.getpid()}"), "a") as f:
        f.write(f"{x}\n")
    time.sleep(delay)
    return x


class Tracked:
    """A value that leaves a marker file of the process that unpickles it, and becomes `x` there."""

    def __init__(self, marks: str, x: int, delay: float = 0.0) -> None:
        self.marks, self.x, self.delay = marks, x, delay

    def __reduce__(self) -> tuple[Any, ...]:
        return (_loaded, (self.marks, self.x, self.delay))


def track(marks: str, x: int) -> Tracked:
    return Tracked(marks, x)


def slow_to_load(marks: str, x: int) -> Tracked:
    """A value that takes 20 ms to unpickle."""
    return Tracked(marks, x, 0.02)


class ExitsWhenLoaded:
    """A value whose unpickling ends the process that unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os._exit, (7,))


def exits_when_loaded_at_13(x: int) -> Any:
    return ExitsWhenLoaded() if x == 13 else x


def _refuse_load() -> None:
    raise ValueError("will not load")


class RefusesLoad:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_load, ())


def deep_bad_at_13(x: int) -> Any:
    """At 13: a value that will not unpickle, nested deeper than salvage looks (its whole batch fails to load)."""
    if x != 13:
        return x
    v: Any = RefusesLoad()
    for _ in range(80):
        v = [v]
    return v
