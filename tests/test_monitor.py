"""The monitor: samples that move with a real batch, its sinks, the live view, and its end."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import procqueue as pq

import handlers as h
from conftest import balanced, leftover_threads

MB = 1024 * 1024


def wait_for(predicate, timeout: float = 30.0, every: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


def test_stats_move_as_a_cpu_bound_batch_runs() -> None:
    with pq.Pool(workers=2, monitor=0.1) as pool:
        futs = [pool.submit(h.spin, 40) for _ in range(150)]  # ~3 s of work on 2 cores
        first = wait_for(lambda: pool.stats().pending > 0 and pool.stats())
        seen_cpu = seen_task = 0.0
        later = first
        while not all(f.done() for f in futs):
            s = pool.stats()
            seen_cpu = max(seen_cpu, *(w.cpu_percent for w in s.workers))
            if any(w.state == "running" and w.task_id is not None for w in s.workers):
                seen_task += 1
            if s.completed > first.completed and s.throughput > 0 and s.throughput_ewma > 0:
                later = s
            time.sleep(0.1)
        end = pool.stats()
    assert later.pending < first.pending and later.completed > first.completed
    assert later.throughput > 0 and later.throughput_ewma > 0
    assert seen_cpu > 50, seen_cpu  # a spinning worker uses most of a core
    assert seen_task > 0  # tasks of 40 ms are marked one by one: the row names the task
    ids = {f.task_id for f in futs}
    assert all(w.task_id is None or w.task_id in ids for w in later.workers)
    assert end.completed == 150 and end.attempts == 150 and end.pending == 0 and balanced(end)
    assert end.collector is not None and end.collector.pid == pool._core.backend.collector.pid
    assert end.collector.rss > 0 and end.collector.tasks_done == 150
    assert sum(w.tasks_done for w in end.workers) == 150
    assert leftover_threads(0) == []


def test_a_worker_holding_200_mb_shows_it() -> None:
    with pq.Pool(workers=2, monitor=0.1) as pool:
        fut = pool.submit(h.allocate, 200, 3.0)

        def big_row():  # type: ignore[no-untyped-def]
            return next((w for w in pool.stats().workers if w.rss >= 200 * MB), None)

        row = wait_for(big_row)
        assert row.state == "running" and row.task_id == fut.task_id
        assert fut.result(timeout=60) == row.pid
        others = [w for w in pool.stats().workers if w.slot != row.slot]
        assert all(w.rss < 150 * MB for w in others)


def test_memory_recycling_reads_the_sampler_and_shows_in_stats() -> None:
    with pq.Pool(workers=1, max_worker_memory=150 * MB, monitor=0.1) as pool:
        fut = pool.submit(h.allocate, 200, 2.0)
        row = wait_for(lambda: next((w for w in pool.stats().workers if w.state == "recycling"), None))
        assert row.recycled == 1 and row.task_id == fut.task_id and row.rss > 150 * MB
        old = fut.result(timeout=60)  # the task it runs is not cut short
        assert row.pid == old
        new = pool.submit(h.pid).result(timeout=60)
        s = pool.stats()
    assert new != old and s.workers[0].recycled == 1 and s.failed == 0 and balanced(s)


def test_jsonl_log_has_one_parsable_line_per_sample(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    samples: list[pq.Stats] = []
    with pq.Pool(workers=2, monitor=pq.Monitor(interval=0.1, log=path, on_sample=samples.append)) as pool:
        list(pool.map(h.spin, [5] * 200))
        time.sleep(0.3)
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) >= 5 and samples
    # on_sample gets each sample, or the newest one when it falls behind; the log gets every one.
    assert {s.timestamp for s in samples} <= {r["timestamp"] for r in rows}
    assert samples[-1].timestamp == rows[-1]["timestamp"]
    assert rows[-1]["completed"] == 200 and rows[-1]["submitted"] == 200  # the last sample has the final counts
    assert {"pending", "in_flight", "throughput", "throughput_ewma", "workers", "collector"} <= rows[0].keys()
    assert {"pid", "cpu_percent", "rss", "state", "task_id", "tasks_done"} <= rows[0]["workers"][0].keys()
    assert max(r["throughput"] for r in rows) > 0
    # Appending: a second pool adds its lines after the first one's.
    with pq.Pool(workers=1, monitor=pq.Monitor(interval=0.1, log=str(path))):
        time.sleep(0.25)
    assert len(path.read_text().splitlines()) > len(lines)


def test_prometheus_endpoint_answers_over_loopback() -> None:
    pytest.importorskip("prometheus_client")
    before = set(leftover_threads(0))
    with pq.Pool(workers=2, monitor=pq.Monitor(interval=0.1, prometheus_port=0)) as pool:
        host, port = pool.prometheus_address  # type: ignore[misc]
        list(pool.map(h.square, range(500)))
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert reply.status == 200
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    for name in ("pending", "in_flight", "throughput", "throughput_ewma", "workers_alive"):
        assert f"procqueue_{name}" in metrics, name
    for name in ("submitted", "completed", "failed", "retried", "crashed", "timed_out", "dropped", "cancelled"):
        assert f"procqueue_tasks_{name}_total" in metrics, name
    assert metrics["procqueue_tasks_completed_total"] == 500 and metrics["procqueue_workers_alive"] == 2
    assert 'procqueue_worker_rss_bytes{slot="0"}' in metrics and 'procqueue_worker_cpu_percent{slot="1"}' in metrics
    assert "procqueue_collector_rss_bytes" in metrics
    # Stopped with the pool: the port is closed and no thread is left.
    with pytest.raises(OSError, match="refused"):
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2)
    assert set(leftover_threads(0)) <= before


def test_a_busy_prometheus_port_fails_fast_and_starts_nothing() -> None:
    pytest.importorskip("prometheus_client")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*pick another prometheus_port"):
            pq.Pool(workers=1, monitor=pq.Monitor(prometheus_port=port))


def test_on_sample_errors_are_logged_and_sampling_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def sink(stats: pq.Stats) -> None:
        calls.append(stats)
        raise RuntimeError("sink is broken")

    with (
        caplog.at_level(logging.ERROR, logger="procqueue"),
        pq.Pool(workers=1, monitor=pq.Monitor(0.05, on_sample=sink)),
    ):
        wait_for(lambda: len(calls) >= 3)
    assert "on_sample raised" in caplog.text and "sink is broken" in caplog.text


def test_monitor_off_still_answers_stats() -> None:
    with pq.Pool(workers=2, monitor=False) as pool:
        assert not [t for t in leftover_threads(0) if t == "procqueue-monitor"]
        list(pool.map(h.spin, [2] * 100))
        s = pool.stats()
    assert s.throughput > 0 and s.throughput == s.throughput_ewma  # the mean since the first submit
    assert all(w.rss > 0 for w in s.workers) and s.collector is None


def test_monitor_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="interval"):
        pq.Monitor(interval=0)
    with pytest.raises(TypeError, match="monitor must be"):
        pq.Pool(workers=1, monitor="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="monitor=False turns the monitor off"):
        pq.Pool(workers=1, monitor=0)
    with pytest.raises(ValueError, match="window"):
        pq.Monitor(window=float("inf"))
    with pytest.raises(ValueError, match="prometheus_port"):
        pq.Monitor(prometheus_port=True)
    with pytest.raises(TypeError, match="file path"):
        pq.Monitor(log=3)  # type: ignore[arg-type]
    with pytest.raises(OSError, match=r"monitor log '/nonexistent-dir/metrics\.jsonl' cannot be opened"):
        pq.Pool(workers=1, monitor=pq.Monitor(log="/nonexistent-dir/metrics.jsonl"))


LIVE_SCRIPT = textwrap.dedent(
    """
    import sys
    import procqueue as pq
    sys.path.insert(0, {tests!r})
    import handlers as h

    if __name__ == "__main__":
        with pq.Pool(workers=2, monitor=0.1) as pool:
            list(pool.map(h.square, range(100)))  # before the view: not counted by it
            with pool.live(total=60, interval={interval}):
                list(pool.map(h.spin, [25] * 60, progress=True))  # a row of the view
            list(pool.map(h.square, range(3000), progress=True))
        print("finished", file=sys.stderr)
    """
)


def _live_script(tmp_path: Path, interval: float) -> Path:
    script = tmp_path / "live.py"
    script.write_text(LIVE_SCRIPT.format(tests=str(Path(__file__).parent), interval=interval))
    return script


def test_live_view_redraws_in_a_pseudo_terminal(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable, [str(_live_script(tmp_path, 0.1))], env={**os.environ, "TERM": "xterm-256color"},
        dimensions=(40, 140), timeout=60, encoding="utf-8",
    )  # fmt: skip
    transcript = io.StringIO()
    child.logfile_read = transcript
    child.expect("finished")
    child.expect(pexpect.EOF)
    child.close()
    text = transcript.getvalue()
    assert child.exitstatus == 0, text[-2000:]
    assert "\x1b[" in text  # cursor moves: redrawn in place
    assert text.count("tasks/s") > 3  # several frames
    for word in ("worker", "collector", "pending", "in flight", "retried", "failed", "ETA", "60/60", "spin"):
        assert word in text, word
    assert "3,000/3,000" in text or "3000/3000" in text  # the map's progress bar ran to the end


def test_live_view_in_a_pipe_writes_plain_lines(tmp_path: Path) -> None:
    got = subprocess.run(
        [sys.executable, str(_live_script(tmp_path, 0.3))], capture_output=True, text=True, timeout=120
    )
    assert got.returncode == 0, got.stderr[-2000:]
    lines = got.stderr.splitlines()
    views = [line for line in lines if line.startswith("procqueue ")]
    assert len(views) >= 2 and "\x1b" not in got.stderr
    assert views[-1].startswith("procqueue 60/60 100%") and "w0 " in views[-1] and "w1 " in views[-1]
    assert any("| spin " in line for line in views)  # the map's bar, inside the view
    assert any(line.startswith("square 3,000/3,000 (100%)") for line in lines)
    assert lines[-1] == "finished"


def test_demo_runs_with_more_workers_than_retries() -> None:
    """Each injected failure happens once per block, whichever worker retries it."""
    got = subprocess.run(
        [sys.executable, "-m", "procqueue", "demo", "--blocks", "80", "--workers", "4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    assert "80 tasks done, 2 retried after injected failures, 0 failed" in got.stdout
    assert "demo 80/80 100%" in got.stderr
    assert "procqueue run mymodule:handle" in got.stdout and "procqueue bench --quick" in got.stdout  # what next


def test_a_live_view_counts_its_own_block() -> None:
    out = io.StringIO()  # not a terminal: plain lines
    with pq.Pool(workers=2, monitor=0.1) as pool:
        list(pool.map(h.square, range(500)))
        with pool.live(total=300, file=out, interval=60):
            list(pool.map(h.square, range(300)))
        with pool.live(file=out, interval=60, title="second"):
            list(pool.map(h.square, range(200)))
    first, second = out.getvalue().splitlines()
    assert first.startswith("procqueue 300/300 100% |") and "ETA 0:00:00" in first
    assert second.startswith("second 200/200 100% |") and "ETA" not in second  # no total: no ETA


def test_rates_count_tasks_that_ended_before_the_first_sample() -> None:
    with pq.Pool(workers=2, monitor=0.2) as pool:
        list(pool.map(h.square, range(1000)))
        wait_for(lambda: pool.stats().throughput > 0)
        s = pool.stats()
    assert s.throughput > 0 and s.throughput_ewma > 0


def test_rates_are_not_dragged_to_zero_by_a_slow_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks of 2 s on 2 workers: one finished task per second, reported in bursts."""
    from procqueue._monitor import sampler as _monitor

    clock = [100.0]
    monkeypatch.setattr(_monitor.time, "monotonic", lambda: clock[0])
    rates = _monitor.Rates(window=10.0)
    got = None
    for t in range(1, 9):
        clock[0] = 100.0 + t
        ran = 2 * (t // 2)  # two tasks end together every two seconds
        got = rates.update(pq.Stats(submitted=100, completed=ran, elapsed=float(t)))
    assert got is not None
    recent, ewma = got
    assert 0.9 < recent < 1.1 and 0.8 < ewma < 1.2, got


def test_a_slow_on_sample_does_not_hold_up_sampling(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    calls: list[float] = []

    def slow(_: pq.Stats) -> None:
        calls.append(time.monotonic())
        time.sleep(1.5)

    with pq.Pool(workers=1, monitor=pq.Monitor(0.05, log=path, on_sample=slow)):
        time.sleep(1.2)
        assert len(path.read_text().splitlines()) >= 8  # the log kept its pace while on_sample slept
    assert 1 <= len(calls) <= 3  # it got the newest sample each time it was free, not a backlog


def test_monitor_off_cpu_percent_stays_sane_under_many_callers() -> None:
    seen: list[float] = []
    with pq.Pool(workers=1, monitor=False) as pool:
        fut = pool.submit(h.spin, 1500)
        time.sleep(0.2)

        def poll() -> None:
            while not fut.done():
                seen.extend(w.cpu_percent for w in pool.stats().workers)

        threads = [threading.Thread(target=poll) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert max(seen) < 130 and max(seen) > 30  # one busy single-threaded worker


def test_a_pool_that_fails_to_start_leaves_nothing(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    lock = threading.Lock()
    monitor = pq.Monitor(prometheus_port=0, log=tmp_path / "m.jsonl")
    with pytest.raises(pq.SerializationError, match="initializer"):
        pq.Pool(workers=1, initializer=lambda: lock, monitor=monitor)
    # the fixtures check that no process and no thread (Prometheus server included) is left
