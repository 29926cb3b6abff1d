"""A pool's settings, validated once, and the defaults that depend on the machine."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from procqueue._file_writer import OutputSpec
    from procqueue._monitor.sampler import Monitor

BACKPRESSURE = ("block", "drop", "error")


@dataclass
class Config:
    """Everything a Pool was built with, validated."""

    workers: int
    capacity: int
    backpressure: str
    max_retries: int
    backoff: float
    backoff_max: float
    task_timeout: float | None
    max_tasks_per_worker: int | None
    max_worker_memory: int | None
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    start_method: str
    block_timeout: float | None = None
    monitor: Monitor | None = None
    output: OutputSpec | None = None  # a FileOutput: the collector writes values to files instead of returning them
    on_pressure: Callable[[str], Any] | None = None  # told "full" and "drained" (on the callback runner)
    low_water: float = 0.7  # "drained" once the queue falls under this share of capacity


def default_workers() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"
