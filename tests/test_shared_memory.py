"""Large buffers through shared memory (issue 13, items 2 and 3): arrays of 1 MB
and up cross as memfd segments on each worker's side socket, both ways; a result's
bytes skip the collector.

Black box where it can be: the public API, real arrays, real SIGKILLs by pid.
That a buffer really went through shared memory is read from `/proc/<pid>/maps`
(a mapped segment shows as `memfd:procqueue`), so a silent fallback to the pipes
fails these tests instead of passing them slowly."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import procqueue as pq
from procqueue._local import shm

from conftest import balanced, leftover_children

MB = 1 << 20


def _array(mb: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(mb * MB // 8)


def double(a: np.ndarray) -> np.ndarray:
    return a * 2


def fresh(mb: int, seed: int) -> np.ndarray:
    return _array(mb, seed)


def maps_segments(_: object = None) -> int:
    """How many shared memory segments this process has mapped."""
    with open("/proc/self/maps") as f:
        return sum("memfd:procqueue" in line for line in f)


def arg_is_mapped(a: np.ndarray) -> tuple[int, float]:
    """The argument is a mapped segment here; write to it, which must stay ours."""
    mapped = maps_segments()
    a[:] = -1.0
    return mapped, float(a.sum())


def hold(a: np.ndarray, path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


OURS = ("pym-", "psm_", "procqueue")  # multiprocessing's heap arenas, its SharedMemory, ours


def _dev_shm() -> set[str]:
    """Entries in /dev/shm that a pool could have made (the machine's other processes
    make theirs meanwhile: semaphores, joblib's folders)."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if n.startswith(OURS)}


def _wait_for(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written in {timeout} s")


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("mb", [8, 64])
def test_arrays_round_trip_exactly_both_ways_on_every_start_method(start_method: str, mb: int) -> None:
    arrays = [_array(mb, i) for i in range(3)]
    with pq.Pool(workers=2, start_method=start_method) as pool:
        doubled = list(pool.map(double, arrays))
        made = list(pool.map(fresh, [mb] * 3, range(3)))
        in_workers = pool.submit(arg_is_mapped, arrays[0]).result(timeout=60)
        stats = pool.stats()
    for a, d in zip(arrays, doubled):
        assert d.dtype == a.dtype and d.shape == a.shape
        assert np.array_equal(d, a * 2)
    for i, m in enumerate(made):
        assert np.array_equal(m, _array(mb, i))
    assert in_workers[0] >= 1, "the argument did not arrive as a shared memory segment"
    assert maps_segments() >= 6, "the results are not mapped shared memory segments"
    assert stats.completed == 7 and balanced(stats)


def test_a_result_is_an_ordinary_writable_array_that_outlives_the_pool() -> None:
    with pq.Pool(workers=2) as pool:
        out = pool.submit(fresh, 8, 1).result(timeout=60)
    assert out.flags.writeable
    out[:10] = 5.0
    assert out[:10].sum() == 50.0
    assert np.array_equal(out[10:], _array(8, 1)[10:])
    assert maps_segments() >= 1
    del out


def test_a_handler_that_writes_to_its_argument_does_not_change_the_callers_array() -> None:
    a = _array(8, 3)
    before = a.copy()
    with pq.Pool(workers=1) as pool:
        mapped, total = pool.submit(arg_is_mapped, a).result(timeout=60)
    assert mapped >= 1
    assert total == -float(a.size)
    assert np.array_equal(a, before)


def test_buffers_under_a_megabyte_stay_in_the_frame() -> None:
    with pq.Pool(workers=1) as pool:
        before = maps_segments()
        small = pool.submit(fresh, 0, 0).result(timeout=60)  # 0 MB: an empty array
        mid = pool.submit(np.ones, MB // 8 - 1).result(timeout=60)  # just under 1 MB
        assert maps_segments() == before
    assert small.size == 0 and mid.sum() == MB // 8 - 1


def test_a_result_mapping_is_released_with_the_array() -> None:
    with pq.Pool(workers=1) as pool:
        before = maps_segments()
        out = pool.submit(fresh, 8, 2).result(timeout=60)
        assert maps_segments() == before + 1
        del out
        assert maps_segments() == before


def test_kept_results_hold_no_descriptor() -> None:
    """A mapping of Python's `mmap` keeps a duplicate descriptor open (before 3.13): one per
    kept result would take a process to its descriptor limit."""
    with pq.Pool(workers=2) as pool:
        pool.submit(fresh, 1, 0).result(timeout=60)
        fds = len(os.listdir("/proc/self/fd"))
        kept = list(pool.map(fresh, [1] * 100, range(100)))
        assert len(os.listdir("/proc/self/fd")) <= fds + 2
    assert maps_segments() >= 100
    assert all(k[0] == _array(1, i)[0] for i, k in enumerate(kept))


def test_no_child_keeps_the_parents_end_of_a_side_socket() -> None:
    """Under "fork" a worker inherits every descriptor of the parent; the parent's side
    sockets must not stay open in it, or what is queued on them would outlive the pool's
    use of them."""
    with pq.Pool(workers=2, start_method="fork") as pool:
        pool.submit(fresh, 1, 0).result(timeout=60)
        sides = pool._core.backend.wiring.supervisor.sides  # type: ignore[attr-defined]
        ours = {f"socket:[{os.fstat(side.sock.fileno()).st_ino}]" for side in sides.values()}
        assert len(ours) == 2
        for pid in [w.pid for w in pool.stats().workers] + [pool._core.backend.collector.pid]:  # type: ignore[attr-defined]
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert not held & ours, f"process {pid} holds the parent's end of a side socket"


# --- faults -------------------------------------------------------------------------------


def test_sigkill_of_a_worker_holding_a_large_array_leaves_nothing_behind(tmp_path: Path) -> None:
    shm = _dev_shm()
    fds = len(os.listdir("/proc/self/fd"))
    marker = tmp_path / "pid"
    a = _array(64, 4)
    with pq.Pool(workers=2) as pool:
        fut = pool.submit(hold, a, str(marker))
        pid = _wait_for(marker)
        assert "memfd:procqueue" in Path(f"/proc/{pid}/maps").read_text()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(pq.WorkerCrashed):
            fut.result(timeout=60)
        assert np.array_equal(pool.submit(double, a).result(timeout=60), a * 2)  # the pool goes on
        stats = pool.stats()
    assert stats.failed == 1 and stats.completed == 1 and balanced(stats)
    assert _dev_shm() == shm
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_sigkill_of_the_collector_while_large_results_flow() -> None:
    shm = _dev_shm()
    with pq.Pool(workers=2, max_retries=3) as pool:
        results = pool.map(fresh, [8] * 60, range(60))
        first = next(results)
        os.kill(pool._core.backend.collector.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        rest = list(results)
        stats = pool.stats()
    assert np.array_equal(first, _array(8, 0))
    for i, m in enumerate(rest, 1):
        assert np.array_equal(m, _array(8, i))
        sides = len(pool._core.backend.wiring.supervisor.sides)  # type: ignore[attr-defined]
    assert stats.completed == 60 and stats.failed == 0 and balanced(stats)
    assert sides <= 2, f"{sides} side sockets are open for 2 workers: the old workers' leaked"
    assert _dev_shm() == shm


PARENT = """
import os, sys, time
import numpy as np
import procqueue as pq
sys.path.insert(0, {tests!r})
from test_shared_memory import fresh

if __name__ == "__main__":
    with pq.Pool(workers=2) as pool:
        pids = [w.pid for w in pool.stats().workers] + [pool._core.backend.collector.pid]
        print(" ".join(str(p) for p in pids), flush=True)
        for _ in pool.map(fresh, [16] * 10_000, range(10_000)):
            pass
"""


def test_sigkill_of_the_parent_mid_transfer_leaves_no_process_and_no_segment(tmp_path: Path) -> None:
    shm = _dev_shm()
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT.format(tests=os.path.dirname(__file__))))
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert pids, "the parent did not start its pool"
            time.sleep(1.0)  # results are flowing
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"pool processes outlived their parent: {alive}"
    assert _dev_shm() == shm
    assert not leftover_children()


_HOARD: list[int] = []


def low_descriptors() -> None:
    """Initializer: take every descriptor the worker may open, so no memfd can be made."""
    import resource

    _array(0, 0)  # what the handler imports, imported while it still can be
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        while True:
            _HOARD.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass


def test_a_worker_that_cannot_make_segments_sends_its_results_through_the_pipes() -> None:
    with pq.Pool(workers=1, initializer=low_descriptors) as pool:
        before = maps_segments()
        out = list(pool.map(fresh, [8] * 3, range(3)))
        assert maps_segments() == before  # no segment: the bytes came through the collector
    for i, m in enumerate(out):
        assert np.array_equal(m, _array(8, i))


SMALL_SHM = """
import sys
import numpy as np
import procqueue as pq
sys.path.insert(0, {tests!r})
from test_shared_memory import double

if __name__ == "__main__":
    a = np.arange(2_000_000, dtype=np.float64)
    with pq.Pool(workers=2) as pool:
        out = list(pool.map(double, [a] * 4))
    assert all(np.array_equal(o, a * 2) for o in out)
    print("ok", flush=True)
"""


def test_a_tiny_dev_shm_is_no_error(tmp_path: Path) -> None:
    """As in a container with a 64 MB /dev/shm, only smaller (4 kB): the pool still works, and
    its segments are memfds, which /dev/shm's size does not limit."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here to mount a private /dev/shm: {probe.stderr!r}")
    script = tmp_path / "small.py"
    script.write_text(textwrap.dedent(SMALL_SHM.format(tests=os.path.dirname(__file__))))
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs /dev/shm && exec "$0" "$1"',
         sys.executable, str(script)],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-3000:]


# --- the side socket, as a hostile or broken peer would use it ----------------------------------


@pytest.fixture
def sides() -> Iterator[tuple[shm.Side, shm.Side]]:
    """The two ends of a side socket: the parent's, and a worker's."""
    a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pair = shm.Side(a_sock), shm.Side(b_sock)
    try:
        yield pair
    finally:
        for side in pair:
            side.close()


def test_side_socket_checks_what_arrives(sides: tuple[shm.Side, shm.Side]) -> None:
    sender, receiver = sides
    a_sock = sender.sock
    data = memoryview(bytes(range(256)) * 4096)
    first = sender.post(data)
    second = sender.post(data)
    assert (first, second) == (0, 1)
    # Frames are taken in order; one nobody asked for (a dropped frame) is skipped.
    got = receiver.take(1, data.nbytes, private=True)
    assert bytes(got[:256]) == bytes(range(256))
    got[0] = 99  # private: the sender's copy is not changed
    with pytest.raises(shm.ShmLost):
        receiver.take(2, data.nbytes, private=False)  # never posted
    # An unsealed memfd (which its sender could shrink under our mapping: SIGBUS) is refused.
    fd = os.memfd_create("procqueue", os.MFD_CLOEXEC)
    os.write(fd, b"x" * 4096)
    socket.send_fds(a_sock, [(3).to_bytes(8, "little")], [fd])
    os.close(fd)
    with pytest.raises(shm.ShmLost, match="unsealed"):
        receiver.take(3, 4096, private=False)
    # A sealed one of another size than the frame says is refused.
    fd = shm.to_shm(memoryview(b"y" * 100))
    socket.send_fds(a_sock, [(4).to_bytes(8, "little")], [fd])
    os.close(fd)
    with pytest.raises(shm.ShmLost, match="arrived as 100 bytes"):
        receiver.take(4, 4096, private=False)
    # Garbage (no descriptor, a short message) is skipped, not trusted.
    a_sock.send(b"junk")
    fd = shm.to_shm(memoryview(b"z" * 8))
    socket.send_fds(a_sock, [(5).to_bytes(8, "little")], [fd])
    os.close(fd)
    assert bytes(receiver.take(5, 8, private=False)) == b"z" * 8
    fd = shm.to_shm(memoryview(b"s"))
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    os.close(fd)


def test_large_bytes_and_bytearrays_go_out_of_band_too() -> None:
    """Pickle keeps bytes and bytearrays in band; a batch takes those of 1 MB and up out
    (values and items, and arguments in a tuple)."""
    from procqueue._protocol.layout import SHM_MIN
    from procqueue._protocol.pickling import dumps_body, loads_body, shm_refs

    posted: list[bytes] = []

    def post(raw: memoryview) -> int:
        posted.append(bytes(raw))
        return len(posted) - 1

    value = [b"a" * SHM_MIN, bytearray(b"b" * SHM_MIN), b"s" * 100, 1, (2, b"c" * SHM_MIN)]
    body = b"".join(bytes(p) for p in dumps_body(value, post=post))
    assert [size for _, size in shm_refs(body)] == [SHM_MIN, SHM_MIN, SHM_MIN]
    assert len(body) < 1000  # the big ones are not in the frame
    back = loads_body(body, [memoryview(p) for p in posted])
    assert back == value and type(back[0]) is bytes and type(back[1]) is bytearray
    assert [size for _, size in shm_refs(b"".join(bytes(p) for p in dumps_body(value)))] == []  # no post: in band


def random_bytes(n: int) -> bytes:
    return np.random.default_rng(n).bytes(n)


def test_bytes_results_and_arguments_round_trip() -> None:
    with pq.Pool(workers=2) as pool:
        out = list(pool.map(random_bytes, [MB, 3 * MB, MB - 1]))
        lengths = list(pool.map(len, out))
    assert out == [random_bytes(n) for n in (MB, 3 * MB, MB - 1)]
    assert lengths == [MB, 3 * MB, MB - 1]


# --- argument segments, written again once released ----------------------------------------------


def checksum(a: np.ndarray) -> tuple[float, float]:
    return float(a[0]), float(a.sum())


def spoil(a: np.ndarray) -> tuple[float, float]:
    """Read the argument, then write over it (its own copy: copy on write)."""
    out = checksum(a)
    a[:] = -1.0
    return out


_KEPT: list[np.ndarray] = []


def keep(a: np.ndarray) -> tuple[float, float]:
    """Keep the argument past the task: its segment stays mapped, and must stay as it came."""
    _KEPT.append(a)
    return checksum(a)


def kept_now(_: object) -> list[tuple[float, float]]:
    return [checksum(a) for a in _KEPT]


def _memfds() -> int:
    """Shared memory segments this process holds a descriptor of."""
    out = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:procqueue")
    return out


def test_argument_segments_are_written_again_and_every_task_sees_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    real = os.memfd_create
    monkeypatch.setattr(os, "memfd_create", lambda *a: made.append(1) or real(*a))  # the parent's only
    arrays = [_array(2, i) for i in range(30)]
    want = [checksum(a) for a in arrays]
    with pq.Pool(workers=2) as pool:
        rounds = []
        for fn in (checksum, spoil, checksum, spoil):
            before = len(made)
            assert list(pool.map(fn, arrays)) == want
            rounds.append(len(made) - before)
        stats = pool.stats()
    assert rounds[0] >= 10, f"the arguments did not go as shared memory: {rounds}"
    # One a task, 120, when each argument gets a fresh segment; about one round's worth when reused.
    assert sum(rounds) <= 45, f"segments were made anew instead of written again: {rounds}"
    assert all(np.array_equal(a, _array(2, i)) for i, a in enumerate(arrays))  # the caller's, untouched
    assert stats.completed == 120 and balanced(stats)
    assert _memfds() == 0


def test_an_argument_the_handler_keeps_is_never_written_over() -> None:
    firsts = [_array(2, i) for i in range(10)]
    with pq.Pool(workers=1) as pool:
        kept = list(pool.map(keep, firsts))
        for r in range(3):  # more arrays than the kept ones, in segments written again meanwhile
            others = [_array(2, 100 + 10 * r + i) for i in range(20)]
            assert list(pool.map(checksum, others)) == [checksum(a) for a in others]
        assert pool.submit(kept_now, None).result(timeout=60) == kept == [checksum(a) for a in firsts]


def test_kept_segments_go_once_the_pool_is_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    from procqueue._local import manager

    monkeypatch.setattr(manager, "IDLE_LET_GO", 0.3)
    with pq.Pool(workers=2) as pool:
        assert len(list(pool.map(checksum, [_array(2, i) for i in range(20)]))) == 20
        assert _memfds() > 0  # kept for the next arguments
        deadline = time.monotonic() + 10
        while _memfds() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _memfds() == 0, "the pool kept its argument segments while idle"
        assert pool.submit(checksum, _array(2, 0)).result(timeout=60) == checksum(_array(2, 0))


def test_a_release_frees_a_lent_segment_and_nothing_else(sides: tuple[shm.Side, shm.Side]) -> None:
    parent, worker = sides
    b_sock = worker.sock
    data = memoryview(bytes(range(256)) * 4096)
    seq = parent.lend(data)
    assert seq == 0 and list(parent.lent) == [0] and not parent.warm
    got = worker.take(0, data.nbytes, private=True)
    got[0] = 7  # copy on write: the segment is not changed
    # Junk the parent must not trust: a release of a segment never lent, a long one, a short one.
    b_sock.send(b"R" + (5).to_bytes(8, "little"))
    b_sock.send(b"R" + bytes(16))
    b_sock.send(b"R")
    parent.read_releases()
    assert list(parent.lent) == [0] and not parent.warm
    worker.send_releases()
    assert not worker.released  # nothing was unmapped yet
    del got
    assert worker.released == [0]
    worker.send_releases()
    parent.read_releases()
    assert not parent.lent and len(parent.warm) == 1
    # Written again, and what the worker maps is the new content.
    again = memoryview(bytes(reversed(range(256))) * 4096)
    assert parent.lend(again) == 1 and not parent.warm
    assert bytes(worker.take(1, again.nbytes, private=True)[:3]) == bytes([255, 254, 253])
    parent.close()
    assert _memfds() == 0


class _Refuses:
    def __reduce__(self) -> Any:
        raise TypeError("this one does not pickle")


def first_of_pair(pair: tuple[np.ndarray, object]) -> float:
    return float(pair[0][0])


def test_a_batch_turned_back_frees_the_segments_it_lent(monkeypatch: pytest.MonkeyPatch) -> None:
    """An item that does not pickle turns its batch back after its neighbours' arrays were
    sent as segments: no frame names them, so no worker maps them, and they are free again
    at once (not after the pool has been idle a while, which a busy pool never is)."""
    from procqueue._local import manager

    monkeypatch.setattr(manager, "IDLE_LET_GO", 3600.0)
    with pq.Pool(workers=1) as pool:
        for _ in range(8):
            items = [(_array(4, i), _Refuses() if i % 4 == 3 else None) for i in range(40)]
            out = list(pool.map(first_of_pair, items, chunksize=4, return_exceptions=True))
            assert [isinstance(o, pq.SerializationError) for o in out] == [i % 4 == 3 for i in range(40)]
            assert [o for i, o in enumerate(out) if i % 4 != 3] == [_array(4, i)[0] for i in range(40) if i % 4 != 3]
        held = _memfds()
    assert held <= 24, f"the parent holds {held} segments: those of batches turned back leaked"


def fork_a_late_reader(a: np.ndarray, path: str) -> int:
    """Fork a child that reads the argument after this task has ended (and returned it)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            time.sleep(1.0)
            Path(path).write_text(repr(checksum(a)))
        finally:
            os._exit(0)
    return pid


def test_a_child_forked_by_the_handler_keeps_seeing_its_argument(tmp_path: Path) -> None:
    """MAP_PRIVATE pages a process has not written follow the segment: a segment the
    handler's child may still map is never written again."""
    path = tmp_path / "seen"
    first = _array(2, 0)
    with pq.Pool(workers=1) as pool:
        child = pool.submit(fork_a_late_reader, first, str(path)).result(timeout=60)
        others = [_array(2, 1 + i) for i in range(20)]
        for _ in range(3):  # same size: the segment would be written again now
            assert list(pool.map(checksum, others)) == [checksum(a) for a in others]
        deadline = time.monotonic() + 30
        while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert path.read_text() == repr(checksum(first))
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
