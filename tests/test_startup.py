"""A cold start: the fork server forked from a single-threaded parent (`procqueue/_local/fork_server.py`).

Each scenario runs in a fresh child Python under a kill timer, since only a
process that is still single-threaded forks its server (pytest's own process
has threads: the faulthandler watchdog, the timeout). The child reports what
it saw as JSON lines; every process it started must be gone afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from procqueue._local import fork_server

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# What a child script starts with: where the server and tracker run, and how they were made.
PRELUDE = """
import json, os, sys, threading, time
sys.path.insert(0, {tests!r})
import procqueue as pq
import handlers as h


def say(**fields):
    print(json.dumps(fields), flush=True)


def cmdline(pid):
    with open(f"/proc/{{pid}}/cmdline", "rb") as f:
        return f.read().replace(b"\\0", b" ").decode()


def helpers():
    from multiprocessing import forkserver, resource_tracker

    server, tracker = forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid
    mine = cmdline(os.getpid())
    how = lambda pid: None if pid is None else "forked" if cmdline(pid) == mine else "exec"
    return {{"server": server, "server_how": how(server), "tracker": tracker, "tracker_how": how(tracker)}}
"""


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(PRELUDE.format(tests=TESTS) + textwrap.dedent(body))
    return path


def _end_family(pid: int) -> None:
    """SIGKILL a child Python and everything under it, by pid."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _run(args: list[str], timeout: float = 60.0) -> tuple[list[dict[str, Any]], str]:
    """Run a child Python to its end; its JSON lines and its stderr. Fails on a non-zero exit."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_family(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{args} did not end within {timeout} s\nstdout:\n{out}\nstderr:\n{err}") from None
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-4000:]}"
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def _gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running (not zombies) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# --- every start method, from a fresh process ---------------------------------------------

WORKS = """
def die_once(x, path):
    if not os.path.exists(path):
        open(path, "w").close()
        os._exit(9)
    return x


if __name__ == "__main__":
    method = sys.argv[1]
    if method == "forkserver-threaded":
        method = "forkserver"
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    with pq.Pool(workers=2, start_method=method, max_retries=1) as pool:
        first = pool.submit(abs, -1).result(timeout=30)
        squares = list(pool.map(lambda x: x * x, range(50)))
        # A worker that dies costs one attempt; its replacement comes from the same server.
        revived = pool.submit(die_once, 7, os.path.join(sys.argv[2], "died")).result(timeout=30)
        pids = sorted(w.pid for w in pool.stats().workers)
    with pq.Pool(workers=1, start_method=method) as again:  # a second pool reuses the server
        second = again.submit(h.square, 3).result(timeout=30)
    say(first=first, squares=squares == [x * x for x in range(50)], revived=revived, second=second,
        balanced=pool.stats().balanced, workers=len(pids), **helpers())
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["forkserver", "forkserver-threaded", "spawn", "fork"])
def test_the_first_pool_of_a_fresh_process_works_on_every_start_path(tmp_path: Path, method: str) -> None:
    """forkserver from a single-threaded process forks its server and tracker; from a threaded one
    multiprocessing execs them; spawn and fork need no server. Every path runs tasks, survives a
    worker's death and serves a second pool."""
    (line,), _ = _run([str(_script(tmp_path, WORKS)), method, str(tmp_path)])
    assert line["first"] == 1 and line["squares"] and line["revived"] == 7 and line["second"] == 9, line
    assert line["balanced"] and line["workers"] == 2, line
    expected = {"forkserver": "forked", "forkserver-threaded": "exec"}.get(method)
    assert line["server_how"] == expected, line
    assert line["tracker_how"] == expected or (expected is None and method == "spawn"), line


# --- what the forked server must not hold or run of the parent ------------------------------

DESCRIPTORS = """
import contextlib, select, socket


def in_worker(n):
    # fd n was the parent's log file: here a read-only /dev/null, so a stale object cannot write.
    try:
        os.write(n, b"stale")
        wrote = "wrote"
    except OSError as exc:
        wrote = exc.strerror
    return os.readlink(f"/proc/self/fd/{n}"), wrote


def pipes_of(pid):
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


if __name__ == "__main__":
    r, w = os.pipe()
    theirs, mine = socket.socketpair()
    log = open(sys.argv[1], "w")
    log.write("buffered, not flushed")
    pipe = os.readlink(f"/proc/self/fd/{w}")
    with pq.Pool(workers=2) as pool:
        assert pool.submit(abs, -1).result(timeout=30) == 1
        seen = pool.submit(in_worker, log.fileno()).result(timeout=30)
        family = [helpers()["server"], helpers()["tracker"], *(wk.pid for wk in pool.stats().workers)]
        held = [pid for pid in family if pipe in pipes_of(pid)]
        os.close(w)  # the parent's was the last write end: the reader must see EOF now, pool open
        ready, _, _ = select.select([r], [], [], 10)
        eof = bool(ready) and os.read(r, 1) == b""
        theirs.close()
        ready, _, _ = select.select([mine], [], [], 10)
        hangup = bool(ready) and mine.recv(1) == b""
        say(eof=eof, hangup=hangup, held=held, seen=list(seen), **helpers())
    log.close()
"""


@pytest.mark.timeout(60)
def test_the_forked_server_holds_no_descriptor_of_the_parent(tmp_path: Path) -> None:
    """A pipe and a socket of the parent reach EOF once the parent closes its end while the pool
    runs: neither the server, the tracker nor a worker holds them. The parent's other descriptors
    are read-only /dev/null there, so a stale file object of the parent writes nowhere."""
    log = tmp_path / "parent.log"
    (line,), _ = _run([str(_script(tmp_path, DESCRIPTORS)), str(log)])
    assert line["server_how"] == "forked" and line["tracker_how"] == "forked", line
    assert line["eof"], f"the pipe's reader saw no EOF: {line}"
    assert line["hangup"], f"the socket's peer saw no hang-up: {line}"
    assert line["held"] == [], line
    assert line["seen"] == ["/dev/null", "Bad file descriptor"], line
    assert log.read_text() == "buffered, not flushed"  # written once, by the parent


EXIT_PATHS = """
import atexit, weakref


class Noted:
    pass


def note(what):
    with open(sys.argv[1], "a") as f:
        f.write(f"{what} {os.getpid()}\\n")


if __name__ == "__main__":
    atexit.register(note, "atexit")
    keep = Noted()
    weakref.finalize(keep, note, "finalizer")
    print("printed before the pool, not flushed", end="|")
    sys.stderr.write("stderr before the pool|")
    with pq.Pool(workers=2, max_tasks_per_worker=2) as pool:  # workers end and are replaced
        assert sum(pool.map(h.square, range(20))) == sum(x * x for x in range(20))
        print(json.dumps({**helpers(), "pid": os.getpid()}), flush=True)
"""


LOGS = """
import logging


def warn(x):
    logging.getLogger("job").warning("worker says %s", x)
    return x


if __name__ == "__main__":
    logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
    with pq.Pool(workers=1) as pool:
        got = pool.submit(warn, 5).result(timeout=30)
    logging.getLogger("job").info("parent done")
    say(got=got, **helpers())
"""


@pytest.mark.timeout(90)
def test_a_log_file_of_the_parent_is_not_an_error_in_a_worker(tmp_path: Path) -> None:
    """The parent's log file is a stub in the forked server: its handler is dropped there, so a
    worker's record does not print a "Logging error" (it goes where a fresh process's would)."""
    log = tmp_path / "run.log"
    (line,), err = _run([str(_script(tmp_path, LOGS)), str(log)])
    assert line["got"] == 5 and line["server_how"] == "forked", line
    assert "Logging error" not in err, err[-3000:]
    assert "parent done" in log.read_text()  # the parent's own handler is untouched


@pytest.mark.timeout(60)
def test_the_parents_exit_path_runs_once_in_the_parent(tmp_path: Path) -> None:
    """The parent's atexit handlers and finalizers run in the parent only (not in the server,
    the tracker or a worker, which end with os._exit), and what it had buffered is printed once."""
    marker = tmp_path / "marker"
    proc = subprocess.run(
        [sys.executable, str(_script(tmp_path, EXIT_PATHS)), str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, info = proc.stdout.split("|", 1)
    assert head == "printed before the pool, not flushed" and "printed before" not in info, proc.stdout
    assert proc.stderr.count("stderr before the pool|") == 1, proc.stderr
    line = json.loads(info)
    assert line["server_how"] == "forked", info
    notes = marker.read_text().split("\n")[:-1]
    assert sorted(n.split()[0] for n in notes) == ["atexit", "finalizer"], notes
    assert {n.split()[1] for n in notes} == {str(line["pid"])}, notes


# --- when the stock, exec'd server is the one -----------------------------------------------

FALLS_BACK = """
if __name__ == "__main__":
    case = sys.argv[1]
    options = {}
    keep = []
    if case == "thread":
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
    elif case == "os-thread":  # a thread that Python's threading module does not know of
        import faulthandler
        faulthandler.dump_traceback_later(600)
    elif case == "large":  # the snapshot would count in each worker's RSS
        options["max_worker_memory"] = 8 << 20
    elif case == "descriptors":
        keep = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
    elif case == "preload":  # the user asked the server to preload a module the parent lacks
        import multiprocessing
        multiprocessing.set_forkserver_preload(["colorsys"])
    elif case == "shared-mapping":  # untouched shared memory: no RSS, but a forked server would pin it
        import mmap
        keep = [mmap.mmap(-1, 300 << 20)]
    elif case == "stderr-closed":  # the tracker's pipe could take descriptor 2's number
        if sys.stderr is not None:  # again, as a Python started with it closed
            os.close(2)
            os.execv(sys.executable, [sys.executable, *sys.argv])
    elif case == "disabled":
        os.environ["PROCQUEUE_FORKED_SERVER"] = "0"
    threads = threading.active_count()
    with pq.Pool(workers=2, **options) as pool:
        say(result=pool.submit(h.square, 4).result(timeout=30), threads=threads, **helpers())
    if case == "os-thread":
        faulthandler.cancel_dump_traceback_later()
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case", ["thread", "os-thread", "large", "descriptors", "preload", "shared-mapping", "stderr-closed", "disabled"]
)
def test_the_server_is_execd_when_forking_is_not_safe(tmp_path: Path, case: str) -> None:
    """A threaded parent (a Python thread, or one only the OS sees), one whose snapshot would be
    too large for `max_worker_memory`, one with many descriptors open, one that asked for a
    preload the parent lacks, one with 300 MB of shared memory mapped, one with stderr closed and
    one that opted out all get multiprocessing's own exec'd server, and work."""
    (line,), _ = _run([str(_script(tmp_path, FALLS_BACK)), case])
    assert line["result"] == 16, line
    assert line["server_how"] == "exec" and line["tracker_how"] == "exec", line
    if case == "os-thread":
        assert line["threads"] == 1, "the watchdog thread should be invisible to threading"


SIGNALS = """
import signal

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a common way to make SIGTERM a Ctrl-C
    with pq.Pool(workers=1) as pool:
        worker = pool.stats().workers[0].pid
        family = helpers()
        caught = {}
        for name, pid in (("server", family["server"]), ("worker", worker)):
            with open(f"/proc/{pid}/status") as f:
                mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
            caught[name] = bool(mask & (1 << (signal.SIGTERM - 1)))
        say(caught=caught, **family)
"""


@pytest.mark.timeout(60)
def test_the_parents_sigterm_handler_is_not_the_servers(tmp_path: Path) -> None:
    """A parent that turned SIGTERM into KeyboardInterrupt: its forked server and workers do not
    catch SIGTERM (a `kill -TERM` of the group ends them, as it would fresh ones)."""
    (line,), _ = _run([str(_script(tmp_path, SIGNALS))])
    assert line["server_how"] == "forked", line
    assert line["caught"] == {"server": False, "worker": False}, line


DAEMON = """
import multiprocessing


def inside():
    try:
        pq.Pool(workers=1)
    except Exception as exc:
        say(error=type(exc).__name__, **helpers())


if __name__ == "__main__":
    child = multiprocessing.get_context("fork").Process(target=inside, daemon=True)
    child.start()
    child.join(30)
"""


@pytest.mark.timeout(60)
def test_a_daemonic_child_starts_no_helper(tmp_path: Path) -> None:
    """A daemonic multiprocessing child may not start processes: Pool() fails there, and must not
    have forked a server or tracker first."""
    (line,), _ = _run([str(_script(tmp_path, DAEMON))])
    assert line["error"], line
    assert line["server"] is None and line["tracker"] is None, line


# --- the end --------------------------------------------------------------------------------

KILLED = """
if __name__ == "__main__":
    pool = pq.Pool(workers=2)
    assert pool.submit(abs, -1).result(timeout=30) == 1
    family = helpers()
    say(pids=[family["server"], family["tracker"], pool._core.backend.collector.pid,
              *(w.pid for w in pool.stats().workers)], forked=family["server_how"])
    time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_the_forked_server_and_tracker_end_when_the_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL the parent: the server, the resource tracker, the collector and the workers go too."""
    proc = subprocess.Popen(
        [sys.executable, str(_script(tmp_path, KILLED))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline() or "{}")
        assert line.get("forked") == "forked", f"{line}\n{proc.stderr.read() if proc.poll() is not None else ''}"
        pids = line["pids"]
        assert len(pids) == 5 and all(psutil.pid_exists(p) for p in pids), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        left = _gone(pids, timeout=10.0)
        assert not left, f"outlived their parent: {left} of {pids}"
    finally:
        _end_family(proc.pid)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# --- other Pythons, and shapes we do not know -----------------------------------------------

STDLIB_ONLY = """
import multiprocessing as mp, os, sys
sys.path.insert(0, {root!r})
from procqueue._local import fork_server


def child(q):
    q.put(os.getppid())


if __name__ == "__main__":
    outcome = fork_server.start([])
    ctx = mp.get_context("forkserver")
    q = ctx.SimpleQueue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    p.join(30)
    from multiprocessing import forkserver
    print(outcome.value, p.exitcode, q.get() == forkserver._forkserver._forkserver_pid)
"""


def _other_pythons() -> list[str]:
    """Interpreters of 3.10 and up other than ours that pyenv keeps on this machine, if any."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = []
    for exe in sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3"))):
        version = os.path.basename(os.path.dirname(os.path.dirname(exe))).split(".")
        if len(version) < 2 or not version[1].isdigit():
            continue
        if int(version[1]) >= 10 and (int(version[0]), int(version[1])) != sys.version_info[:2]:
            found.append(exe)
    return found


@pytest.mark.timeout(120)
@pytest.mark.skipif(not _other_pythons(), reason="no other Python 3.10+ on this machine")
def test_the_server_forks_on_the_other_pythons_of_this_machine(tmp_path: Path) -> None:
    """multiprocessing's forkserver differs between versions: on each one found, the server is
    forked (or, for a shape we do not know, exec'd) and a child starts from it."""
    script = tmp_path / "stdlib_only.py"
    script.write_text(textwrap.dedent(STDLIB_ONLY.format(root=ROOT)))
    for exe in _other_pythons():
        run = subprocess.run([exe, "-W", "error", str(script)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{exe}:\n{run.stderr[-3000:]}"
        outcome, exitcode, from_server = run.stdout.split()
        assert outcome in ("forked", "unsupported") and exitcode == "0" and from_server == "True", (exe, run.stdout)


class _Server:
    def __init__(self, authkey: bool) -> None:
        self._forkserver_address = self._forkserver_alive_fd = self._forkserver_pid = None
        self._lock = None
        self._preload_modules = ["__main__"]
        if authkey:
            self._forkserver_authkey = None


def main_310(listener_fd: int, alive_r: int, preload: list[str], main_path: str = "", sys_path: str = "") -> None:
    """`multiprocessing.forkserver.main` of 3.10 to 3.13."""


def main_314(
    listener_fd: int, alive_r: int, preload: list[str], main_path: str = "", sys_path: str = "", *, authkey_r: int = -1
) -> None:
    """`multiprocessing.forkserver.main` of 3.14: the authkey arrives on a pipe."""


def main_unknown(listener_fd: int, alive_r: int, preload: list[str], *, authkey_r: int = -1, other: int = 0) -> None:
    """A shape this module does not know."""


def test_the_shapes_of_multiprocessing_it_knows() -> None:
    """3.10-3.13 (no authkey) and 3.14 (an authkey pipe) are recognised; anything else means
    the exec'd server, as do a server with its fields missing and a mismatched pair."""
    shape = fork_server._server_shape
    assert shape(_Server(authkey=False), main_310) is False
    assert shape(_Server(authkey=True), main_314) is True
    assert shape(_Server(authkey=True), main_310) is None
    assert shape(_Server(authkey=False), main_314) is None
    assert shape(_Server(authkey=True), main_unknown) is None
    assert shape(object(), main_310) is None
    assert fork_server.start([], max_rss=0) in (fork_server.Outcome.LARGE, fork_server.Outcome.RUNNING)
