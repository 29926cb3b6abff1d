"""Invariant 7: only the pool's own processes are heard (issue items 1-3).

No pool process listens on any socket: every channel is a pipe or a socket
pair handed down at start. A worker's stream is parsed only after it has
presented the pool's token (raw bytes, compared in constant time), and no
length prefix is believed beyond the machine's memory. The property tests
feed the frame reader arbitrary bytes.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import procqueue as pq
from procqueue._protocol import framing
from procqueue._protocol import messages as m

import handlers as h

LISTENING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags column


def _listening_inodes() -> dict[int, str]:
    out: dict[int, str] = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if int(parts[3], 16) & LISTENING:
                out[int(parts[6])] = parts[7] if len(parts) > 7 else ""
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _pool_pids(pool: pq.Pool) -> list[int]:
    s = pool.stats()
    pids = [w.pid for w in s.workers if w.pid > 0]
    assert s.collector is not None
    return [*pids, s.collector.pid]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_pool_process_listens_on_any_socket() -> None:
    with pq.Pool(workers=2) as pool:
        assert pool.submit(h.square, 3).result(timeout=30) == 9
        listening = _listening_inodes()
        for pid in [os.getpid(), *_pool_pids(pool)]:
            held = _socket_inodes(pid) & listening.keys()
            assert not held, f"pid {pid} listens on {[listening[i] for i in held]}"


ATTACK = textwrap.dedent(
    """
    import os, pickle, socket, struct, sys
    marker, drop = sys.argv[1], sys.argv[2] == "drop"
    if drop:  # become another user (nobody), with every module this needs already imported
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    frame = struct.pack("!i", 4 + len(payload)) + struct.pack("!I", len(payload)) + payload
    hits = 0
    for name in sys.argv[3:]:
        if not name.startswith("@"):
            continue
        for data in (frame, b"junkjunkjunk", struct.pack("!i", -1) + struct.pack("!Q", 64 << 40)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(0.5)
            try:
                s.connect(b"\\0" + name[1:].encode())
                s.sendall(data)
                hits += 1
            except OSError:
                pass
            finally:
                s.close()
    print(hits)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
@pytest.mark.parametrize("other_uid", [True, False], ids=["another-user", "same-user"])
def test_another_process_can_neither_run_code_nor_break_the_pool(tmp_path: Path, other_uid: bool) -> None:
    """Every listening socket of the pool's processes (there should be none) gets a
    pickle that would run a command, junk, and a 64 TiB length prefix; nothing
    runs and the pool goes on."""
    if other_uid and os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    script = tmp_path / "attack.py"
    script.write_text(ATTACK)
    marker = tmp_path / "owned"
    os.chmod(tmp_path, 0o777)
    with pq.Pool(workers=2) as pool:
        assert pool.submit(h.square, 2).result(timeout=30) == 4

        listening = _listening_inodes()
        names = [listening[i] for pid in _pool_pids(pool) for i in _socket_inodes(pid) & listening.keys()]
        proc = subprocess.run(
            [sys.executable, str(script), str(marker), "drop" if other_uid else "stay", *names],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert all(psutil.pid_exists(pid) for pid in _pool_pids(pool))  # nothing was killed
        assert [f.result(timeout=30) for f in [pool.submit(h.square, i) for i in range(20)]] == [
            i * i for i in range(20)
        ]
    assert not marker.exists()
    s = pool.stats()
    assert s.balanced and s.failed == 0


def test_pool_channels_are_private() -> None:
    """What the pool creates on disk or in /dev/shm is not readable by others."""
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    with pq.Pool(workers=1) as pool:
        pool.submit(h.square, 1).result(timeout=30)
        for name in set(os.listdir("/dev/shm")) - before if before is not None else ():
            mode = os.stat(os.path.join("/dev/shm", name)).st_mode
            assert mode & 0o077 == 0, f"/dev/shm/{name} is readable by others"
        for pid in _pool_pids(pool):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                ours = target.startswith("/") and not target.startswith(("/dev/", "/proc/")) and "procqueue" in target
                if ours and os.path.exists(target) and os.stat(target).st_uid == os.getuid():
                    assert os.stat(target).st_mode & 0o077 == 0, target


# --- the frame reader, on arbitrary bytes -----------------------------------------------

TOKEN = bytes(range(framing.TOKEN_SIZE))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=1, max_value=64), max_size=20))
def test_reader_never_raises_and_never_parses_before_the_token(data: bytes, cuts: list[int]) -> None:
    reader = framing.FrameReader(limit=1 << 20, token=TOKEN)
    frames = []
    pos = 0
    for cut in [*cuts, len(data)]:
        frames += reader.feed(data[pos : pos + cut])
        pos += cut
    if not data.startswith(TOKEN):
        assert frames == []
        assert not reader.proven
    assert reader.pending <= max(len(data), 12) or reader.error is not None


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=50), max_size=30),
    st.binary(max_size=40),
)
def test_frames_after_the_token_come_out_whole_whatever_the_split(
    bodies: list[bytes], cuts: list[int], tail: bytes
) -> None:
    wire = TOKEN + b"".join(framing.framed(m.Stop(), body) for body in bodies) + tail
    reader = framing.FrameReader(limit=1 << 20, token=TOKEN)
    frames = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        frames += [bytes(f) for f in reader.feed(wire[pos : pos + cut])]
        pos += cut
    got = [bytes(framing.decode(f)[1]) for f in frames[: len(bodies)]]
    assert got == bodies


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=(1 << 20) + 1, max_value=(1 << 63) - 1), st.binary(max_size=64))
def test_an_oversized_length_prefix_ends_the_stream_without_allocating(size: int, rest: bytes) -> None:
    import struct

    prefix = struct.pack("!i", size) if size < 0x7FFFFFFF else struct.pack("!i", -1) + struct.pack("!Q", size)
    reader = framing.FrameReader(limit=1 << 20, token=TOKEN)
    assert reader.feed(TOKEN + prefix + rest) == []
    assert reader.error is not None and "limit" in reader.error
    assert reader.pending < 64 + 12
    assert reader.feed(framing.framed(m.Stop())) == []  # once ended, nothing more is parsed


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=framing.TOKEN_SIZE, max_size=framing.TOKEN_SIZE).filter(lambda b: b != TOKEN))
def test_a_wrong_token_ends_the_stream(token: bytes) -> None:
    reader = framing.FrameReader(limit=1 << 20, token=TOKEN)
    payload = pickle.dumps(m.Stop())
    assert reader.feed(token + framing.framed(m.Stop()) + payload) == []
    assert reader.error is not None and not reader.proven


def test_a_negative_length_prefix_is_refused() -> None:
    import struct

    reader = framing.FrameReader(limit=1 << 20)
    assert reader.feed(struct.pack("!i", -5) + b"x" * 10) == []
    assert reader.error is not None


def test_collector_drops_a_link_whose_peer_lacks_the_token() -> None:
    """The collector's end of a link checks the token before parsing (unit level, one process)."""
    a, b = socket.socketpair()
    try:
        reader = framing.FrameReader(limit=1 << 20, token=TOKEN)
        a.sendall(b"\x00" * framing.TOKEN_SIZE + framing.framed(m.Stop()))
        assert reader.feed(b.recv(4096)) == []
        assert reader.error == "the peer did not present the pool's token"
    finally:
        a.close()
        b.close()


def test_collector_process_is_alive_after_the_attacks_it_cannot_even_see() -> None:
    with pq.Pool(workers=1) as pool:
        pool.submit(h.square, 1).result(timeout=30)
        s = pool.stats()
        assert s.collector is not None and psutil.pid_exists(s.collector.pid)
