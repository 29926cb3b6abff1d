"""The fork server and the resource tracker, forked from the parent instead of
exec'd (wiring: `procqueue/_local/__init__.py`).

multiprocessing's "forkserver" start method execs two fresh interpreters
before the first child runs: the fork server, which imports the package
before it forks anything, and the resource tracker. On two cores that was
~0.15 s of a process's first pool, most of its cold start. The start method
exists so that no child is forked from a threaded process (a lock another
thread held stays locked forever in the child). A process that still has one
OS thread when its first pool starts can make both by forking itself: no
thread exists to hold anything, and every child is then forked from the
single-threaded server, as with the stock one.

`start()` does so when all of these hold, and otherwise leaves both to
multiprocessing (which execs them, as before):

- Linux (threads are counted in `/proc/self/task`, which sees those that C
  libraries start too: OpenBLAS, a faulthandler watchdog, a debugger);
- no fork server was started for this process yet;
- the process has one thread;
- its RSS is at most `FORK_MAX_RSS` (and half of `max_worker_memory`): the
  server and every worker share a copy-on-write snapshot of the parent, which
  counts in each worker's RSS, and which a parent that later frees or changes
  a large structure keeps alive in the server (README, "Cold start");
- it has at most `FORK_MAX_FDS` descriptors open (and a quarter of its
  limit): each stays taken, as a stub, in the server and every worker;
- every module the user asked multiprocessing to preload in the server is
  loaded in the parent already;
- multiprocessing has a shape this module knows (3.10 to 3.14: the
  signatures of `forkserver.main` and `resource_tracker.main`, the fields of
  `ForkServer` and `ResourceTracker`).

The forked processes run multiprocessing's own loops (`forkserver.main`,
`resource_tracker.main`), and the parent sets the fields of
`forkserver._forkserver` and `resource_tracker._resource_tracker` that their
`ensure_running` would, so the client side, the children and the 3.14
authentication are the standard library's, unchanged. Before its loop each
forked process sheds what it holds of the parent (`_shed_parent`): every
descriptor but its own and the standard output and error becomes a read-only
/dev/null (a pipe or socket of the parent is not kept open, and its number is
not reused by one the server or a worker opens later, where a stale file
object of the parent could write), the parent's atexit handlers and Python
signal handlers are dropped, and the parent's objects are frozen out of the
garbage collector (no finalizer of the parent's garbage runs there). Both end
with `os._exit`, never through the parent's exit path.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import gc
import importlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

FORK_MAX_RSS = 256 << 20  # bytes: a larger parent gets the exec'd server
FORK_MAX_FDS = 256  # open descriptors (and at most a quarter of RLIMIT_NOFILE): each is a stub in every worker
AUTHKEY_SIZE = 32  # multiprocessing.forkserver._authkey_len (3.14)
QUIET = (signal.SIGINT, signal.SIGTERM)  # blocked while the tracker starts, as its ensure_running does


class Outcome(enum.Enum):
    """What `start()` did."""

    FORKED = "forked"  # this process forked its fork server
    RUNNING = "running"  # a fork server was started before
    UNSUPPORTED = "unsupported"  # not Linux, or a multiprocessing this module does not know
    THREADED = "threaded"  # more than one OS thread
    LARGE = "large"  # RSS over the limit
    DESCRIPTORS = "descriptors"  # more open descriptors than the limit
    PRELOAD = "preload"  # the server should preload a module the parent has not loaded
    STDIO = "stdio"  # standard output or error is closed (the tracker's pipe could take its number)
    DAEMON = "daemon"  # a daemonic multiprocessing child: it may not start processes at all
    DISABLED = "disabled"  # PROCQUEUE_FORKED_SERVER=0 in the environment
    FAILED = "failed"  # something failed on the way; multiprocessing starts what is missing


def start(preload: Iterable[str], max_rss: int = FORK_MAX_RSS) -> Outcome:
    """Fork this process's fork server (and resource tracker, unless one runs) if it
    may be, see the module's docstring; `preload` (our own modules) is imported in
    the parent first. Never raises: on anything but `Outcome.FORKED` the caller
    lets multiprocessing start what is missing."""
    try:
        return _start(preload, max_rss)
    except Exception:
        return Outcome.FAILED


def _start(preload: Iterable[str], max_rss: int) -> Outcome:
    if not sys.platform.startswith("linux"):
        return Outcome.UNSUPPORTED
    if os.environ.get("PROCQUEUE_FORKED_SERVER", "1") == "0":
        return Outcome.DISABLED
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    if getattr(multiprocessing.current_process(), "daemon", False):
        return Outcome.DAEMON  # Process.start() refuses there: start nothing before it does
    if not _stdio_open():
        return Outcome.STDIO

    server: Any = forkserver._forkserver
    tracker: Any = resource_tracker._resource_tracker
    authkey = _server_shape(server, forkserver.main)
    if authkey is None or not _tracker_shape(tracker, resource_tracker.main):
        return Outcome.UNSUPPORTED
    for name in preload:
        importlib.import_module(name)
    with server._lock:
        if server._forkserver_pid is not None:
            return Outcome.RUNNING
        wanted = [name for name in server._preload_modules or [] if name != "__main__"]
        if any(name not in sys.modules for name in wanted):
            return Outcome.PRELOAD
        if resident_bytes() + shared_mapped_bytes() > max_rss:
            return Outcome.LARGE
        if len(os.listdir("/proc/self/fd")) > descriptor_limit():
            return Outcome.DESCRIPTORS
        if os_threads() != 1:
            return Outcome.THREADED
        _ensure_tracker(tracker)
        return _fork_server_locked(server, authkey)


def _server_shape(server: Any, main: Callable[..., Any]) -> bool | None:
    """Whether the fork server takes an authkey pipe (3.14+), or None for a shape we do not know."""
    fields = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_lock", "_preload_modules")
    if not all(hasattr(server, field) for field in fields):
        return None
    known = ("listener_fd", "alive_r", "preload", "main_path", "sys_path")
    if _parameters(main) == (known, 0) and not hasattr(server, "_forkserver_authkey"):
        return False
    if _parameters(main) == ((*known, "authkey_r"), 1) and hasattr(server, "_forkserver_authkey"):
        return True
    return None


def _tracker_shape(tracker: Any, main: Callable[..., Any]) -> bool:
    return _parameters(main) == (("fd",), 0) and all(hasattr(tracker, f) for f in ("_fd", "_pid", "_lock"))


def _parameters(fn: Callable[..., Any]) -> tuple[tuple[str, ...], int]:
    """Names of `fn`'s parameters, and how many of them are keyword-only."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return (), -1
    return tuple(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]), code.co_kwonlyargcount


def _ensure_tracker(tracker: Any) -> None:
    """Fork the resource tracker if none runs (multiprocessing hands its pipe to
    every child), as `ResourceTracker.ensure_running` would exec it."""
    from multiprocessing import resource_tracker

    with tracker._lock:
        running = tracker._fd is not None
        if not running:
            r, w = os.pipe()
            try:
                before = signal.pthread_sigmask(signal.SIG_BLOCK, QUIET)  # resource_tracker.main unblocks them
                try:
                    pid = _fork(lambda: resource_tracker.main(r), keep={r})
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, before)
            except BaseException:
                os.close(w)
                raise
            finally:
                os.close(r)
            tracker._fd, tracker._pid = w, pid
    if running:
        resource_tracker.ensure_running()  # alive, or relaunched the stock way


def _fork_server_locked(server: Any, authkey: bool) -> Outcome:
    """Make the listener and pipes as `ForkServer.ensure_running` does, then fork (its lock held)."""
    from multiprocessing import connection, forkserver, util

    address = _any(connection).arbitrary_address("AF_UNIX")
    made: list[int] = []
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        fd = listener.fileno()
        alive_r, alive_w = os.pipe()
        made += [alive_r, alive_w]
        key_r, key_w = os.pipe() if authkey else (-1, -1)
        made += [key_r, key_w] if authkey else []

        def serve() -> None:
            server._lock = threading.Lock()  # held by the parent as it forked: a fresh one, as a new server has
            if authkey:
                _any(forkserver).main(fd, alive_r, [], authkey_r=key_r)
            else:
                forkserver.main(fd, alive_r, [])

        pid = _fork(serve, keep={fd, alive_r, key_r})
    except BaseException:
        for each in made:
            with contextlib.suppress(OSError):
                os.close(each)
        if not util.is_abstract_socket_namespace(address):
            with contextlib.suppress(OSError):
                os.unlink(address)
        raise
    finally:
        listener.close()
    os.close(alive_r)
    if authkey:
        os.close(key_r)
        key = os.urandom(AUTHKEY_SIZE)
        try:
            os.write(key_w, key)  # fits an empty pipe in one write
        finally:
            os.close(key_w)
        server._forkserver_authkey = key
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid
    return Outcome.FORKED


def _any(module: object) -> Any:
    """A module as typeshed does not know it (private or newer names)."""
    return module


def _fork(run: Callable[[], object], keep: set[int]) -> int:
    """Fork a child that sheds the parent, then calls `run` and exits; its pid."""
    _flush_stdio()  # what the parent buffered is printed once, by the parent
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _shed_parent(keep)
        run()
        code = 0
    except SystemExit as exc:  # how forkserver.main ends (every client is gone), and 3.13's tracker
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        with contextlib.suppress(BaseException):
            sys.excepthook(*sys.exc_info())
            sys.stderr.flush()
    finally:
        os._exit(code)


def _shed_parent(keep: set[int]) -> None:
    """What a forked helper must not hold or run of the parent (see the module's docstring)."""
    gc.freeze()  # the parent's objects: never collected here, so no finalizer of theirs runs
    gc.enable()  # as in a fresh interpreter, whatever the parent chose for itself
    sys.settrace(None)
    sys.setprofile(None)
    tracemalloc: Any = sys.modules.get("tracemalloc")
    if tracemalloc is not None and tracemalloc.is_tracing():
        tracemalloc.stop()
    clear = getattr(atexit, "_clear", None)
    if clear is not None:
        clear()
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(sig)
            if callable(handler) and not (sig == signal.SIGINT and handler is signal.default_int_handler):
                # What a fresh interpreter has: Python's own SIGINT handler, else the default.
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    _drop_log_handlers(keep | {1, 2})
    _stub_descriptors(keep | {1, 2})
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker  # as in a fresh process: the server gets one per child
    tracker._fd = tracker._pid = None


def _drop_log_handlers(keep: set[int]) -> None:
    """The parent's logging handlers that write to a descriptor about to be stubbed (a log
    file): in a worker each record would print a "Logging error" instead. Not closed:
    closing flushes into the stub."""
    logging: Any = sys.modules.get("logging")
    if logging is None:
        return
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", ())):
            try:
                fd = handler.stream.fileno()
            except Exception:  # not a stream handler, or one without a descriptor
                continue
            if fd not in keep:
                logger.removeHandler(handler)


def _stub_descriptors(keep: set[int]) -> None:
    """Every open descriptor not in `keep` becomes a read-only /dev/null: the parent's
    pipes and sockets are released (a reader sees EOF when the parent closes its
    end), and their numbers stay taken, so a stale object of the parent reads EOF
    and fails to write instead of reaching a descriptor opened later."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep or fd == null:
                continue
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed already
                os.fstat(fd)
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _flush_stdio() -> None:
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}.values():
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


def os_threads() -> int:
    """Threads of this process as the kernel counts them (C libraries' too)."""
    return len(os.listdir("/proc/self/task"))


def descriptor_limit() -> int:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FORK_MAX_FDS if soft == resource.RLIM_INFINITY else min(FORK_MAX_FDS, soft // 4)


def _stdio_open() -> bool:
    """Whether standard output and error are open, as the server keeps 1 and 2: with
    either closed, a pipe made here could take its number and be kept by mistake (the
    tracker would then hold its own pipe open and never end)."""
    if sys.__stdout__ is None or sys.__stderr__ is None:  # Python started with them closed
        return False
    try:
        os.fstat(1)
        os.fstat(2)
    except OSError:
        return False
    return True


def shared_mapped_bytes() -> int:
    """Bytes of shared mappings (shared memory, mapped files): a forked server keeps each
    alive after the parent lets go, touched or not, so they count as RSS does."""
    total = 0
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            span, perms = line.split(None, 2)[:2]
            if perms[3:4] == b"s":
                lo, hi = span.split(b"-")
                total += int(hi, 16) - int(lo, 16)
    return total


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
