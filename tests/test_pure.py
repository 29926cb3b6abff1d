"""Fast tests of the pure parts: framing, messages, state machine, retry arithmetic, heap."""

from __future__ import annotations

import itertools
import pickle
import random
import statistics
import struct
import subprocess
import sys

import pytest

import procqueue as pq
from procqueue._protocol import framing
from procqueue._protocol import messages as m
from procqueue._results import Chunk, Stream
from procqueue._scheduler import states
from procqueue._scheduler.queue import PendingQueue as Dispatcher
from procqueue._scheduler.retry import backoff_delay, should_retry
from procqueue._scheduler.sizing import Sizing
from procqueue._scheduler.tasks import Handlers, Run


def test_public_names_are_pinned() -> None:
    assert sorted(pq.__all__) == sorted(
        [
            "Dropped", "FileOutput", "Future", "InitializerFailed", "LiveView", "Monitor", "Options", "OutputHandle", "OutputStatus", "Pipeline", "Pool", "PoolBroken",
            "PoolClosed", "PoolStartError", "ProcQueueError", "QueueFull", "Result", "SerializationError", "Stage",
            "StageFailed", "Stats", "Task", "TaskFailed",
            "TaskQueue", "TaskState", "TaskTimeout", "WorkerCrashed", "WorkerStats", "__version__",
        ]
    )  # fmt: skip
    assert pq.TaskFailed.__module__ == "procqueue"


def test_public_names_resolve_and_all_are_named_procqueue() -> None:
    for name in pq.__all__:
        obj = getattr(pq, name)
        if isinstance(obj, type):
            assert obj.__module__ == "procqueue", name
    assert set(pq.__all__) <= set(dir(pq))
    with pytest.raises(AttributeError, match="no attribute 'Poool'"):
        pq.Poool  # noqa: B018


# What each entry point may not load: `import procqueue` is cheap (the pool's modules come
# with the first use of a name), and a worker or the collector loads no parent-side code.
_MUST_NOT_LOAD = {
    "import procqueue": ["procqueue._pool", "procqueue._core", "procqueue._local.manager", "psutil", "rich", "click"],
    "import procqueue._local.worker": [
        "procqueue._pool", "procqueue._core", "procqueue._scheduler.scheduler", "procqueue._monitor.sampler",
        "psutil", "rich", "click",
    ],
    "import procqueue._local.collector": ["procqueue._pool", "procqueue._core", "psutil", "rich", "click"],
}  # fmt: skip


@pytest.mark.parametrize("statement", sorted(_MUST_NOT_LOAD))
def test_entry_points_load_only_what_they_need(statement: str) -> None:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    assert not loaded & set(_MUST_NOT_LOAD[statement]), (
        f"{statement} loads {sorted(loaded & set(_MUST_NOT_LOAD[statement]))}"
    )


def test_errors_pickle_with_their_fields() -> None:
    err = pq.WorkerCrashed("died", task_id=3, attempts=2, pid=10, exitcode=-11, signal=11, fault_traceback="tb")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is pq.WorkerCrashed
    assert (back.task_id, back.exitcode, back.signal, str(back)) == (3, -11, 11, "died")
    assert isinstance(pq.PoolClosed("x"), RuntimeError)
    # A task's timeout must not look like a wait's timeout: polling loops catch TimeoutError.
    assert not isinstance(pq.TaskTimeout("x"), TimeoutError)
    assert isinstance(pq.SerializationError("x"), pickle.PicklingError)
    assert all(issubclass(e, pq.ProcQueueError) for e in (pq.QueueFull, pq.Dropped, pq.SerializationError))


@pytest.mark.parametrize(
    "msg",
    [
        m.RunBatch(1, 2, 3, b"h", m.Call.ONE, 1, 0, True),
        m.BatchDone(1, 0, 2, 1, 0, (m.ErrorInfo(1, m.Fault.RAISED, None, "ValueError", "x", "tb"),), b""),
        m.WorkerLost(0, 123, -9, False, m.Running(1, 2)),
        m.WorkerGone(0, 123, -9, False, True),
        m.Stop(),
    ],
)
def test_messages_round_trip_through_frames(msg: object) -> None:
    reader = framing.FrameReader()
    wire = framing.framed(msg, b"body")
    frames = reader.feed(wire[:5]) + reader.feed(wire[5:])
    assert len(frames) == 1
    header, body = framing.decode(frames[0])
    assert type(header) is type(msg)
    assert header == msg or type(msg) is m.Stop  # a message of no fields has no equality of its own
    assert bytes(body) == b"body"


def test_torn_frame_is_held_back_not_misread() -> None:
    reader = framing.FrameReader()
    good = framing.framed(m.Stop())
    torn = framing.framed(m.Bye(1, 2))[:-3]
    frames = reader.feed(good + torn)
    assert len(frames) == 1
    assert reader.pending == len(torn)


def test_frames_survive_any_split_of_the_byte_stream() -> None:
    import random

    rng = random.Random(3)
    bodies = [b"", b"x", bytes(range(256)) * 3, bytes(rng.randrange(256) for _ in range(70_000)), b"end"]
    wire = b"".join(framing.framed(m.Stop(), body) for body in bodies)
    # a frame with the 64-bit length prefix, as Connection writes frames over 2 GiB
    payload = framing.encode(m.Stop(), b"long")
    wire += struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    for trial in range(200):
        # trial 0 feeds the first 3,000 bytes one at a time (every prefix split), then the rest
        cuts = list(range(1, 3000)) if trial == 0 else sorted(rng.sample(range(1, len(wire)), rng.randrange(1, 12)))
        reader = framing.FrameReader()
        got = []
        for a, b in itertools.pairwise([0, *cuts, len(wire)]):
            got.extend(bytes(framing.decode(f)[1]) for f in reader.feed(wire[a:b]))
        assert got == [*bodies, b"long"], cuts
        assert reader.pending == 0


def test_out_of_band_buffers_round_trip_writable() -> None:
    from procqueue._protocol.pickling import dumps_body, loads_body

    big = bytearray(range(256)) * 1024  # 256 KiB: out of band
    parts = dumps_body([pickle.PickleBuffer(big), "small", 3])
    assert any(isinstance(p, memoryview) and p.nbytes == len(big) for p in parts)  # not copied
    body = b"".join(bytes(p) for p in parts)  # as a reader sees it: read-only
    back = loads_body(body)
    assert bytes(back[0]) == bytes(big) and back[1:] == ["small", 3]
    memoryview(back[0])[0] = 7  # writable, as a numpy array from a pool should be


def test_state_machine_accepts_a_full_life_and_rejects_skips() -> None:
    S = states.TaskState
    ledger = states.Ledger()
    for to in (S.PENDING, S.DISPATCHED, S.CRASHED, S.RETRYING, S.PENDING, S.DISPATCHED, S.DONE):
        ledger.move(1, to)
    ledger.move(2, S.DROPPED)
    ledger.check_books()
    with pytest.raises(states.InvalidTransition, match="new -> done"):
        ledger.move(3, S.DONE)
    ledger.move(4, S.PENDING)
    with pytest.raises(states.InvalidTransition, match="never ended"):
        ledger.check_books()
    assert all(S.DONE not in TRANS for state, TRANS in states.TRANSITIONS.items() if state in states.FINAL)


def test_backoff_doubles_with_bounded_jitter_and_cap() -> None:
    rng = random.Random(1)
    for k, nominal in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8)]:
        samples = [backoff_delay(k, 0.1, 30.0, rng) for _ in range(2000)]
        assert min(samples) >= nominal * 0.75 - 1e-9
        assert max(samples) <= nominal * 1.25 + 1e-9
        assert statistics.median(samples) == pytest.approx(nominal, rel=0.05)
    assert backoff_delay(40, 0.1, 30.0, rng) <= 30.0
    assert should_retry(1, 1) and not should_retry(2, 1) and not should_retry(1, 0)


_ids = iter(range(1, 1_000_000, 1000))


def _run(d: Dispatcher, handlers: Handlers, n: int, priority: int) -> Run:
    run = Run(handlers.get(len), list(range(n)), m.Call.ONE, Chunk(Stream(), n), next(_ids), priority)
    d.push(run)
    return run


def test_heap_orders_by_priority_then_arrival() -> None:
    d, h = Dispatcher(capacity=100), Handlers()
    low1, low2 = _run(d, h, 1, 0), _run(d, h, 1, 0)
    high = _run(d, h, 1, 9)
    mid = _run(d, h, 1, 5)
    order = []
    while d.heap:
        segs = d.take(1, lambda *a: None)
        order.append(segs[0][0])
    assert order == [high, mid, low1, low2]
    assert d.pending == 0


def test_take_merges_runs_and_splits_by_measured_cost() -> None:
    d, h = Dispatcher(capacity=10_000, sizing=Sizing(long_ns=5_000_000)), Handlers()
    runs = [_run(d, h, 10, 0) for _ in range(3)]
    assert d.pending == 30
    segs = d.take(None, lambda *a: None)
    assert [(r, s, n) for r, s, n in segs] == [(runs[0], 0, 1)]  # cost unknown: one item
    runs[0].handler.measured(50_000, 1)  # 50 us per item -> 400 per 20 ms batch: all that waits
    segs = d.take(None, lambda *a: None)
    assert sum(n for _, _, n in segs) == 29
    assert segs[0] == (runs[0], 1, 9)  # merged across runs of the same handler
    assert segs[1] == (runs[1], 0, 10)
    assert segs[2] == (runs[2], 0, 10)
    more = [_run(d, h, 10, 0) for _ in range(2)]
    runs[0].handler.measured(1_000_000, 1)  # the estimate moves to ~0.6 ms: batches of ~5 ms for tasks this long
    assert 500_000 < (runs[0].handler.est_ns or 0) < 700_000
    segs = d.take(None, lambda *a: None)
    assert segs == [(more[0], 0, 8)]


def test_cancelled_runs_are_skipped_and_counted() -> None:
    d, h = Dispatcher(capacity=100), Handlers()
    run = _run(d, h, 5, 0)
    run.receiver.stream.cancelled = True  # type: ignore[union-attr]
    seen = []
    assert d.take(None, lambda r, s, n: seen.append(n)) == []
    assert seen == [5] and d.pending == 0


def test_retries_wait_out_their_backoff() -> None:
    d, h = Dispatcher(capacity=100), Handlers()
    run = _run(d, h, 1, 0)
    d.take(None, lambda *a: None)
    d.push_delayed(run.single(0, 2), due=10.0)
    d.promote(now=9.0)
    assert not d.heap and d.waiting == 1
    d.promote(now=10.0)
    assert d.heap and d.waiting == 0 and d.pending == 1


def test_items_of_one_run_requeued_alone_keep_their_place() -> None:
    d, h = Dispatcher(capacity=100), Handlers()
    run = _run(d, h, 3, 0)
    later = _run(d, h, 1, 0)
    run.chunksize = 3
    assert d.take(None, lambda *a: None) == [(run, 0, 3)]
    for j in (2, 0, 1):  # a worker died holding them: back in line, at the run's place
        d.push(run.single(j, 1, careful=True), fresh=False)
    order = []
    for _ in range(4):
        ((r, start, _),) = d.take(1, lambda *a: None)
        order.append(r.first_id + start)
    assert order == [run.first_id, run.first_id + 1, run.first_id + 2, later.first_id]
