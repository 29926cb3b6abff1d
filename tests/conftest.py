from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import psutil
import pytest

if TYPE_CHECKING:  # imported where used: tests/test_layout.py must run while the package does not import
    import procqueue as pq

T = TypeVar("T")
START_METHODS = [m for m in ("forkserver", "spawn", "fork") if m in multiprocessing.get_all_start_methods()]
# What runs the tasks in tests/test_conformance.py: every behaviour test there runs once per backend.
BACKENDS = ["local"] + (["dask"] if importlib.util.find_spec("distributed") is not None else [])


def helper_pids(root: psutil.Process | None = None) -> set[int]:
    """multiprocessing's own long-lived helpers (forkserver, resource tracker) are not ours to end.
    Only a direct child of `root` (default: us) can be one: the workers and collectors the fork
    server forks share its command line, and those must be counted. Ours are known by pid too:
    forked from this process (`procqueue/_local/fork_server.py`), they have its command line."""
    from multiprocessing import forkserver, resource_tracker

    keep = set()
    if root is None or root.pid == os.getpid():
        mine = (forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid)  # type: ignore[attr-defined]
        keep.update(pid for pid in mine if pid is not None)
    for child in (root or psutil.Process()).children(recursive=False):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd:
            keep.add(child.pid)
    return keep


def _settled(find: Callable[[], list[T]], timeout: float) -> list[T]:
    """What `find()` still returns once it comes back empty or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        left = find()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def leftover_children(timeout: float = 5.0) -> list[psutil.Process]:
    def find() -> list[psutil.Process]:
        helpers = helper_pids()
        return [
            c
            for c in psutil.Process().children(recursive=True)
            if c.pid not in helpers and c.is_running() and c.status() != psutil.STATUS_ZOMBIE
        ]

    return _settled(find, timeout)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test ends every process it started (psutil diff of our children)."""
    yield
    left = leftover_children()
    for proc in left:  # end them by pid so one leak does not cascade into other tests
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"


def leftover_threads(timeout: float = 5.0) -> list[str]:
    """procqueue's threads (manager, monitor, view) and the Prometheus server's, still alive."""
    return _settled(
        lambda: [t.name for t in threading.enumerate() if t.name.startswith("procqueue") or "serve_forever" in t.name],
        timeout,
    )


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Every pool ends its threads with it."""
    yield
    assert not leftover_threads(), f"threads left behind: {leftover_threads(0)}"


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _validate_books(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every pool in the tests follows each task through the state machine.
    monkeypatch.setenv("PROCQUEUE_VALIDATE", "1")


def balanced(stats: object) -> bool:
    s = stats
    return s.submitted == s.completed + s.failed + s.dropped + s.cancelled  # type: ignore[attr-defined]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a conformance test runs on (test ids end in `[local]`)."""
    return str(request.param)


@pytest.fixture
def make_pool(backend: str) -> Iterator[Callable[..., pq.Pool]]:
    """`make_pool(**kwargs)` is `pq.Pool(backend=backend, **kwargs)`. At teardown every pool
    it made is shut down, its books balance at rest and no child process is left."""
    import procqueue

    pools: list[pq.Pool] = []

    def make(**kwargs: object) -> pq.Pool:
        pool = procqueue.Pool(backend=backend, **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(wait=True)
    unbalanced = [s for s in (pool.stats() for pool in pools) if not balanced(s)]
    assert not unbalanced, f"{backend}: books do not balance at rest: {unbalanced}"
    left = leftover_children()
    assert not left, f"{backend}: processes left behind: {[(p.pid, p.name()) for p in left]}"


os.environ.setdefault("PYTHONFAULTHANDLER", "1")
