"""What only the Dask backend has (`Pool(backend="dask")`, procqueue/_dask/).

The behaviour both backends share runs on Dask in tests/test_conformance.py; here: the
cluster the pool owns, reaches at an `address` or borrows as a `client` (and what it leaves
of itself there), the options Dask refuses, the error without `distributed`, a worker's
death and a hung worker on a cluster, `stats()` from the scheduler's metrics, TLS, and
priorities with Dask running the batches.

Every cluster is a real `distributed.LocalCluster` on 127.0.0.1. Tests that only need an
address or a client share one module-scoped cluster (`cluster`, `client`); its worker
processes live across tests, so this module's `no_leftover_processes` leaves them out, and
the fixture checks at the module's end that they ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

distributed = pytest.importorskip("distributed")

import procqueue as pq  # noqa: E402

import handlers as h  # noqa: E402
from conftest import balanced, helper_pids  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
INSTALL = "pip install 'procqueue[dask]'"

# --- handlers (module level: Dask workers import this module by name, as the pool's
# spawned workers inherit our sys.path) -----------------------------------------------------


def crash_once(path: str, pause: float = 0.0) -> int:
    """The first call writes its pid to `path`, waits `pause` and kills its worker;
    any later call (the file exists) returns its worker's pid."""
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(pause)
        os._exit(7)
    return os.getpid()


def pid_and_stamp(seconds: float) -> tuple[int, int]:
    time.sleep(seconds)
    return os.getpid(), time.monotonic_ns()


def scheduler_plugins(dask_scheduler: Any) -> list[str]:
    return list(dask_scheduler.worker_plugins)


def scheduler_allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


def set_allowed_failures(n: int, dask_scheduler: Any = None) -> None:
    dask_scheduler.allowed_failures = n


# --- processes: the shared cluster's are not a test's leftovers -------------------------------

_shared: list[Any] = []  # the module's LocalCluster while it runs


def _shared_pids() -> set[int]:
    pids: set[int] = set()
    for lc in _shared:
        for nanny in list(lc.workers.values()):
            pid = getattr(nanny, "pid", None)
            if not pid:
                continue
            pids.add(pid)
            with contextlib.suppress(psutil.Error):
                pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
    return pids


def _ours() -> list[psutil.Process]:
    """Our live descendants, but multiprocessing's helpers and the shared cluster's workers."""
    skip = helper_pids() | _shared_pids()
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.pid not in skip and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _wait_for(cond: Callable[[], Any], timeout: float, poll: float = 0.05) -> Any:
    """`cond()` once it is truthy, or its last (falsy) value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll)


def _leftovers(timeout: float = 5.0) -> list[psutil.Process]:
    left = _ours()
    if left:
        _wait_for(lambda: not _ours(), timeout)
        left = _ours()
    return left


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """conftest's check, but for the shared cluster's workers (ended at the module's end)."""
    yield
    left = _leftovers()
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"


def _local_cluster(**kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        # The scheduler serves HTTP even without a dashboard, by default on 8787: a second
        # cluster at once would warn (an error here) that the port is taken.
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
    options.update(kwargs)
    return distributed.LocalCluster(**options)


def _close_cluster(lc: Any) -> None:
    pids = {n.pid for n in lc.workers.values() if n.pid}
    lc.close()
    alive = _wait_for(lambda: not [p for p in pids if _running(p)], 10.0)
    assert alive, f"the cluster's workers outlived it: {[p for p in pids if _running(p)]}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A LocalCluster that is not the pool's: reached by `address=` or a `client=`."""
    lc = _local_cluster()
    _shared.append(lc)
    try:
        yield lc
    finally:
        _shared.remove(lc)
        _close_cluster(lc)


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    """A plain Client of the shared cluster, held by the tests (never by a pool)."""
    c = distributed.Client(cluster.scheduler_address, set_as_default=False)
    try:
        yield c
    finally:
        c.close()


def _worker_pids(c: Any) -> set[int]:
    return set(c.run(os.getpid).values())


def _procqueue_plugins(c: Any) -> list[str]:
    return [p for p in c.run_on_scheduler(scheduler_plugins) if p.startswith("procqueue-")]


def _stat_pids(pool: pq.Pool) -> list[int]:
    return [w.pid for w in pool.stats().workers]


# --- 1. an owned cluster ends with the pool -------------------------------------------------------


def _listening() -> set[tuple[int, str, int]]:
    """(pid, ip, port) of every socket we and our processes listen on."""
    out = set()
    for p in [psutil.Process(), *_ours()]:
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add((p.pid, c.laddr.ip, c.laddr.port))
    return out


def test_owned_cluster_and_its_client_end_with_the_pool() -> None:
    listening = _listening()
    with pq.Pool(backend="dask", workers=2) as pool:
        dask = pool._core.backend.cluster  # type: ignore[attr-defined]
        lc, own = dask.cluster, dask.client
        assert lc is not None and pool.workers == 2
        assert list(pool.map(h.square, range(200))) == [x * x for x in range(200)]
        pids = _worker_pids(own)
        assert len(pids) == 2 and set(_stat_pids(pool)) == pids
        assert pids <= {p.pid for p in _ours()}, "the pool's Dask workers are not our child processes"
        # Only this pool gets in: loopback only, TLS with a throwaway certificate.
        addr = lc.scheduler_address
        assert addr.startswith("tls://127.0.0.1:")
        opened = _listening() - listening
        assert opened and {ip for _, ip, _ in opened} == {"127.0.0.1"}, opened
        assert 8787 not in {port for _, _, port in opened}
        foreign = distributed.security.Security.temporary()
        for address, security in ((addr, foreign), (addr.replace("tls://", "tcp://"), None)):
            with pytest.raises((OSError, TimeoutError)):
                distributed.Client(address, security=security, set_as_default=False, timeout=5)
    assert own.status == "closed"
    assert lc.status == distributed.core.Status.closed and dask.cluster is None
    assert _wait_for(lambda: not [p for p in pids if _running(p)], 10.0), "a Dask worker outlived the pool"
    left = _leftovers()
    assert not left, f"the pool's cluster left processes: {[(p.pid, p.cmdline()[-1:]) for p in left]}"
    assert _listening() <= listening


def test_a_monitor_that_cannot_start_leaves_no_cluster(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        pq.Pool(backend="dask", workers=1, monitor=pq.Monitor(log=str(tmp_path / "missing" / "log.jsonl")))
    try:
        left = _leftovers(3.0)
        assert not left, f"the failed pool's cluster left processes: {[p.pid for p in left]}"
    finally:
        _close_leaked_cluster(info.value)


def _close_leaked_cluster(exc: BaseException) -> None:
    """What the failed constructor should have closed, found in its traceback's frames."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        backend = getattr(frame.f_locals.get("self"), "backend", None)
        dask = getattr(backend, "cluster", None)
        if dask is not None:
            dask._close_owned()
            return


# --- 2. address=: an existing cluster is used, then left as it was ---------------------------------


def test_address_runs_on_an_existing_cluster_and_leaves_it_running(cluster: Any, client: Any) -> None:
    pids = _worker_pids(client)
    with pq.Pool(
        backend="dask", workers=7, address=cluster.scheduler_address, initializer=h.set_global, initargs=(5,)
    ) as pool:
        assert pool.workers == 2  # the cluster's worker threads, not `workers=`
        assert set(_stat_pids(pool)) == pids
        ran = set(pool.map(h.pid, range(50)))
        assert ran and ran <= pids
        assert set(pool.map(h.read_global, range(10))) == {5}  # the initializer ran there
        futs = [pool.submit(h.sleep_then, i, 0.3) for i in range(2)]
        assert {f.result(timeout=30) for f in futs} == {0, 1} and {f.worker_pid for f in futs} == pids
        installed = _procqueue_plugins(client)
        assert len(installed) == 2, installed  # the start notifier and the initializer
        own = pool._core.backend.cluster.client  # type: ignore[attr-defined]
        assert own is not client
        s = pool.stats()
    assert s.collector is None and balanced(s) and s.completed == 62
    assert own.status == "closed"  # the pool's own connection, not the cluster
    assert cluster.status == distributed.core.Status.running
    assert _worker_pids(client) == pids, "the cluster's workers did not survive the pool"
    assert _procqueue_plugins(client) == []
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as plain:
        assert plain.submit(h.square, 12, pure=False).result(timeout=30) == 144
        assert sorted(plain.gather(plain.map(h.add, range(4), [10] * 4, pure=False))) == [10, 11, 12, 13]


def test_address_leaves_the_schedulers_allowed_failures_as_it_was(cluster: Any, client: Any) -> None:
    client.run_on_scheduler(set_allowed_failures, 5)  # what its owner chose (Dask's default is 3)
    try:
        with pq.Pool(backend="dask", address=cluster.scheduler_address) as pool:
            assert pool.submit(h.square, 3).result(timeout=30) == 9
            assert client.run_on_scheduler(scheduler_allowed_failures) == 0  # while the pool runs
        assert client.run_on_scheduler(scheduler_allowed_failures) == 5
    finally:
        client.run_on_scheduler(set_allowed_failures, 3)


def test_address_nobody_listens_at_is_a_pool_start_error() -> None:
    import dask

    with socket_nobody_listens_at() as port, dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        t0 = time.monotonic()
        with pytest.raises(pq.PoolStartError, match="could not be reached"):
            pq.Pool(backend="dask", address=f"tcp://127.0.0.1:{port}")
        assert time.monotonic() - t0 < 20


@contextlib.contextmanager
def socket_nobody_listens_at() -> Iterator[int]:
    """A loopback port bound (so no one else takes it) but not listening: connections are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --- 3. client=: the caller's client is never closed --------------------------------------------


def test_a_client_the_caller_holds_is_never_closed(cluster: Any, client: Any) -> None:
    with pq.Pool(backend="dask", client=client) as pool:
        assert pool._core.backend.cluster.client is client  # type: ignore[attr-defined]
        assert pool.submit(h.add, 1, b=2).result(timeout=30) == 3
        assert sorted(pool.imap_unordered(h.square, range(100))) == [x * x for x in range(100)]
    assert client.status == "running"
    assert client.submit(h.square, 9, pure=False).result(timeout=30) == 81
    assert _procqueue_plugins(client) == []
    # terminate() with work in flight: its futures fail, the client stays
    pool = pq.Pool(backend="dask", client=client)
    running = pool.submit(h.sleep_then, "x", 1.0)
    assert _wait_for(lambda: _executing(client), 10.0)
    pool.terminate()
    with pytest.raises(pq.PoolClosed):
        running.result(timeout=30)
    assert client.status == "running"
    assert client.submit(h.square, 4, pure=False).result(timeout=30) == 16
    assert _procqueue_plugins(client) == []
    assert _wait_for(lambda: not _executing(client), 10.0)  # the next test's cluster is idle


def executing_keys(dask_worker: Any) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def _executing(c: Any) -> list[str]:
    """The pool's task keys (pq-...) that the cluster's workers are executing now."""
    return [k for keys in c.run(executing_keys).values() for k in keys if k.startswith("pq-")]


def test_terminate_frees_the_worker_of_a_hung_task_on_a_cluster_it_does_not_own(client: Any) -> None:
    pool = pq.Pool(backend="dask", client=client)
    try:
        hung = pool.submit(h.hang, 5.0)
        assert _wait_for(lambda: _executing(client), 10.0)
        pool.terminate()
        with pytest.raises(pq.PoolClosed):
            hung.result(timeout=30)
        still = _wait_for(lambda: not _executing(client), 2.0)
        assert still, f"after terminate() the cluster still runs the pool's task: {_executing(client)}"
    finally:
        pool.terminate()
        _wait_for(lambda: not _executing(client), 10.0)


# --- 4. what the constructor refuses ---------------------------------------------------------------


def test_options_the_backends_refuse() -> None:
    with pytest.raises(ValueError, match="'ray'"):
        pq.Pool(backend="ray")
    dask_only: dict[str, Any] = {"address": "tcp://127.0.0.1:8786", "client": object(), "security": object()}
    for name, value in dask_only.items():
        with pytest.raises(ValueError, match=f"{name}="):
            pq.Pool(backend="local", **{name: value})
        with pytest.raises(ValueError, match=f"{name}="):
            pq.Pool(**{name: value})  # local is the default
    local_only: dict[str, Any] = {"max_tasks_per_worker": 10, "max_worker_memory": 2**30}
    for name, value in local_only.items():
        with pytest.raises(ValueError, match=f'{name}=.*backend="dask"'):
            pq.Pool(backend="dask", **{name: value})


def record(x: int) -> tuple[int, bytes]:
    """A FileOutput handler: item x is record x."""
    if x == 13:
        raise h.Boom("unlucky")
    return x, b"%d\n" % x


def test_file_output_is_written_by_the_parent(cluster: Any, tmp_path: Path) -> None:
    """On Dask there is no collector: a parent thread writes the values, in seq order."""
    path = str(tmp_path / "out.txt")
    with pq.Pool(backend="dask", address=cluster.scheduler_address, output=pq.FileOutput(path=path)) as pool:
        assert pool.output is not None
        got: list[Any] = list(pool.map(record, reversed(range(300)), return_exceptions=True))
        assert [type(v) for v in got].count(h.Boom) == 1 and got.count(None) == 299
        pool.output.write([(13, b"failed 13\n")])
        s = pool.stats()
    assert Path(path).read_bytes() == b"".join(b"failed 13\n" if x == 13 else b"%d\n" % x for x in range(300))
    assert pool.output.status().written == 300 and pool.output.status().error is None
    assert pq.FileOutput.wait_released(path, timeout=5)
    assert balanced(s) and (s.completed, s.failed) == (299, 1)
    with pytest.raises(pq.PoolClosed):
        pool.output.write([(300, b"late\n")])


# --- 5. without distributed ------------------------------------------------------------------------

WITHOUT_DISTRIBUTED = """
import sys, threading
sys.modules["distributed"] = None  # as if it were not installed
import procqueue as pq
assert sys.modules["distributed"] is None
with pq.Pool(workers=1) as pool:  # the local backend does not need it
    assert pool.submit(abs, -3).result(timeout=30) == 3
try:
    pq.Pool(backend="dask", workers=1)
except ImportError as exc:
    print("ImportError:", exc)
else:
    print("no error")
print("threads:", sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()))
"""


def _without_distributed() -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_DISTRIBUTED], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("ImportError:"), done.stdout
    assert lines[1] == "threads: []", f"the failed pool left threads: {lines[1]}"
    return lines


def test_without_distributed_procqueue_imports_and_a_dask_pool_fails_cleanly() -> None:
    _without_distributed()


def test_without_distributed_the_dask_backend_says_how_to_install_it() -> None:
    lines = _without_distributed()
    assert INSTALL in lines[0], lines[0]


# --- 6. a worker's death is one attempt of its task -----------------------------------------------


def test_os_exit_costs_one_attempt_and_bystanders_nothing(tmp_path: Path) -> None:
    with pq.Pool(backend="dask", workers=2, backoff=0.01) as pool:
        list(pool.map(h.square, range(10)))  # both workers up
        before = set(_stat_pids(pool))
        marker = str(tmp_path / "crashed")
        doomed = pool.submit(crash_once, marker, 0.3)
        bystanders = [pool.submit(pid_and_stamp, 0.2) for _ in range(6)]
        with pytest.raises(pq.WorkerCrashed) as info:
            doomed.result(timeout=60)
        dead = int(Path(marker).read_text())
        assert info.value.attempts == 1 and doomed.attempts == 1
        assert info.value.exitcode is None  # Dask does not say how a worker died
        assert info.value.pid == dead and dead in before
        assert [f.result(timeout=60)[0] > 0 for f in bystanders] == [True] * 6
        assert [f.attempts for f in bystanders] == [1] * 6
        s = pool.stats()
        assert (s.crashed, s.failed, s.retried) == (1, 1, 0)
        assert s.completed == 10 + 6 and s.attempts == s.submitted == 10 + 7

        # retries=1: the retry runs on a live worker and succeeds
        marker2 = str(tmp_path / "crashed-again")
        fut = pool.options(retries=1).submit(crash_once, marker2, 0.0)
        ran_on = fut.result(timeout=60)
        assert fut.attempts == 2 and fut.worker_pid == ran_on != int(Path(marker2).read_text())
        s = pool.stats()
        assert (s.crashed, s.failed, s.retried, s.completed) == (2, 1, 1, 17)
        assert s.attempts == s.submitted + 1

        # the nanny's replacement takes the dead worker's seat
        assert _wait_for(lambda: len(set(_stat_pids(pool)) - before) >= 1, 15.0), _stat_pids(pool)
        assert _wait_for(lambda: all(p > 0 for p in _stat_pids(pool)) and len(_stat_pids(pool)) == 2, 15.0)
        assert dead not in _stat_pids(pool)
        assert list(pool.map(h.square, range(100))) == [x * x for x in range(100)]
    s = pool.stats()
    assert balanced(s) and s.crashed == 2


def test_sigkill_of_a_worker_holding_two_batches_charges_the_one_that_ran() -> None:
    """The seat's second batch waits on its first inside Dask: when the worker is killed
    from outside, Dask names the running one, and the queued one runs again uncharged."""
    with pq.Pool(backend="dask", workers=1, backoff=0.01) as pool:
        list(pool.map(h.sleep_then, range(4), [0.01] * 4))  # measured: the next ones may be prefetched
        list(pool.map(h.square, range(4)))
        (pid,) = _stat_pids(pool)
        running = pool.submit(h.sleep_then, 1, 3.0)
        queued = pool.submit(h.square, 3)
        time.sleep(1.0)
        assert not running.done() and not queued.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(pq.WorkerCrashed) as info:
            running.result(timeout=60)
        assert info.value.attempts == 1 and info.value.pid == pid
        assert queued.result(timeout=60) == 9 and queued.attempts == 1 and queued.worker_pid != pid
        s = pool.stats()
        assert (s.crashed, s.failed, s.retried) == (1, 1, 0)
    assert balanced(pool.stats())


def test_a_crash_inside_a_batch_charges_only_the_item_that_ran_it() -> None:
    """Dask cannot say which item of a batch killed the worker: the batch is bisected,
    uncharged, and only the item that kills its worker alone is charged."""
    with pq.Pool(backend="dask", workers=2) as pool:
        got: list[Any] = list(pool.map(h.exit_on, range(400), [150] * 400, chunksize=50, return_exceptions=True))
        s = pool.stats()
    crashed = [(i, v) for i, v in enumerate(got) if isinstance(v, pq.WorkerCrashed)]
    assert [i for i, _ in crashed] == [150] and crashed[0][1].attempts == 1
    assert [v for i, v in enumerate(got) if i != 150] == [i for i in range(400) if i != 150]
    assert (s.crashed, s.failed, s.completed, s.retried) == (1, 1, 399, 0)
    assert s.attempts == 400, f"bisecting charged the bystanders: {s.attempts} attempts for 400 tasks"


# --- 7. a hung worker is killed through its nanny and replaced -------------------------------------


def test_timeout_kills_the_hung_worker_and_the_pool_goes_on() -> None:
    with pq.Pool(backend="dask", workers=2) as pool:
        list(pool.map(h.square, range(10)))
        before = set(_stat_pids(pool))
        assert len(before) == 2 and all(p > 0 for p in before)
        t0 = time.monotonic()
        hung = pool.options(timeout=0.5).submit(h.hang, 60)
        bystander = pool.submit(pid_and_stamp, 1.5)  # on the other worker, past the timeout
        with pytest.raises(pq.TaskTimeout) as info:
            hung.result(timeout=30)
        took = time.monotonic() - t0
        assert 0.5 <= took < 10, took
        err = info.value
        assert err.attempts == 1 and hung.attempts == 1 and err.timeout == 0.5
        assert err.pid in before
        assert _wait_for(lambda: not _running(err.pid), 10.0), "the hung worker was not killed"
        other, _ = bystander.result(timeout=30)
        assert other in before and other != err.pid and bystander.attempts == 1
        # its seat gets the nanny's new worker
        assert _wait_for(
            lambda: err.pid not in _stat_pids(pool) and len(_stat_pids(pool)) == 2 and min(_stat_pids(pool)) > 0, 15.0
        ), _stat_pids(pool)
        assert len(set(_stat_pids(pool)) - before) == 1
        # with retries: each attempt times out, each on a fresh worker
        again = pool.options(timeout=0.5, retries=1).submit(h.hang, 60)
        with pytest.raises(pq.TaskTimeout) as info2:
            again.result(timeout=60)
        assert info2.value.attempts == 2
        assert sorted(pool.map(h.pid, range(200))) and list(pool.map(h.square, range(300))) == [
            x * x for x in range(300)
        ]
        s = pool.stats()
        assert (s.timed_out, s.failed, s.crashed) == (3, 2, 0)
    assert balanced(pool.stats())


# --- 8. stats() from the scheduler -----------------------------------------------------------------


def test_stats_at_rest_has_one_row_per_dask_worker_thread(cluster: Any, client: Any) -> None:
    pids = _worker_pids(client)
    with pq.Pool(backend="dask", address=cluster.scheduler_address) as pool:
        assert list(pool.map(h.square, range(300))) == [x * x for x in range(300)]
        assert _wait_for(lambda: all(w.rss > 0 for w in pool.stats().workers), 3.0), pool.stats().workers
        s = pool.stats()
    assert len(s.workers) == 2 and {w.pid for w in s.workers} == pids
    assert sorted(w.slot for w in s.workers) == [0, 1]
    for w in s.workers:
        assert w.pid > 0 and w.rss > 10 * 2**20 and w.cpu_percent >= 0 and w.state == "idle"
        assert w.task_id is None and w.recycled == 0
    assert sum(w.tasks_done for w in s.workers) == 300
    assert s.collector is None
    assert balanced(s) and (s.submitted, s.completed, s.attempts, s.in_flight, s.pending) == (300, 300, 300, 0, 0)


def test_stats_has_a_row_per_thread_of_a_worker() -> None:
    lc = _local_cluster(n_workers=1, threads_per_worker=2)
    try:
        with pq.Pool(backend="dask", address=lc.scheduler_address) as pool:
            futs = [pool.submit(pid_and_stamp, 0.3) for _ in range(2)]
            assert pool.workers == 2
            (p1, t1), (p2, t2) = (f.result(timeout=30) for f in futs)
            assert p1 == p2 and abs(t1 - t2) < 0.25e9, "the worker's two threads did not run at once"
            assert _wait_for(lambda: all(w.rss > 0 for w in pool.stats().workers), 3.0)
            rows = pool.stats().workers
        assert [w.pid for w in rows] == [p1, p1] and [w.tasks_done for w in rows] == [1, 1]
    finally:
        _close_cluster(lc)


# --- 9. TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def security() -> Any:
    pytest.importorskip("cryptography")
    return distributed.security.Security.temporary()


def test_tls_owned_cluster(security: Any) -> None:
    with pq.Pool(backend="dask", workers=2, security=security) as pool:
        lc = pool._core.backend.cluster.cluster  # type: ignore[attr-defined]
        assert lc.scheduler_address.startswith("tls://127.0.0.1:")
        assert all(a.startswith("tls://") for a in lc.scheduler_info["workers"])
        assert list(pool.map(h.square, range(500))) == [x * x for x in range(500)]
    assert balanced(pool.stats())


def test_tls_external_cluster(security: Any) -> None:
    lc = _local_cluster(security=security)
    try:
        assert lc.scheduler_address.startswith("tls://")
        with pq.Pool(backend="dask", address=lc.scheduler_address, security=security) as pool:
            assert list(pool.map(h.add, range(100), range(100))) == [2 * x for x in range(100)]
            assert pool.options(retries=1).submit(h.square, 5).result(timeout=30) == 25
        with distributed.Client(lc.scheduler_address, security=security, set_as_default=False) as c:
            assert _procqueue_plugins(c) == []
    finally:
        _close_cluster(lc)


# --- 10. priorities hold with Dask running the batches --------------------------------------------


def test_an_urgent_task_overtakes_hundreds_waiting() -> None:
    with pq.Pool(backend="dask", workers=1, capacity=5000) as pool:
        low = [pool.submit(h.slow_stamp, i) for i in range(1500)]  # >= 1.5 s of 1 ms tasks
        assert _wait_for(lambda: low[20].done(), 30.0)
        done_at_submit = sum(f.done() for f in low)
        high = pool.options(priority=9).submit(h.stamp, "high")
        t_high = high.result(timeout=60)[1]
        t_low = [f.result(timeout=60)[1] for f in low]
    assert t_low == sorted(t_low), "equal priority did not run in submission order"
    before = sum(t < t_high for t in t_low)
    after = len(t_low) - before
    # Only what was dispatched when it came may run first: the seat's two batches of
    # ~200 ms of work (~400 of these 1 ms tasks), plus slack for a noisy machine.
    assert before - done_at_submit <= 500, (done_at_submit, before)
    assert after >= 800, f"the urgent task waited for {before} of 1500 lower ones"
    assert t_low[before:] == sorted(t_low[before:]) and min(t_low[before:]) > t_high
