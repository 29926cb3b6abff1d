"""The scheduler driven by events, no processes (issue 11).

Every test feeds `procqueue._scheduler.Scheduler` method calls and checks the
exact instructions it returns (as plain tuples: `sched_fakes.brief`), its books
and, through `validate=True`, every task's moves in the ledger.
"""

from __future__ import annotations

import pytest
from sched_fakes import (
    FIVE_MS,
    PID0,
    WHOLE,
    FakeFeed,
    Front,
    brief,
    error,
    error_of,
    fails,
    ids_of,
    make_run,
    make_scheduler,
    result,
    sends,
)

from procqueue import PoolBroken, TaskFailed, TaskTimeout, WorkerCrashed
from procqueue._protocol import layout
from procqueue._protocol import messages as m
from procqueue._scheduler import limits, sizing
from procqueue._scheduler.books import Death
from procqueue._scheduler.deaths import MAX_BARREN_DEATHS
from procqueue._scheduler.instructions import Kill, KillReason
from procqueue._scheduler.rate import Bucket, parse_rate
from procqueue._scheduler.scheduler import Scheduler
from procqueue._scheduler.states import InvalidTransition, Ledger
from procqueue._scheduler.states import TaskState as S
from procqueue._scheduler.tasks import Batch, Handler, Run

NOTIFY = ("notify",)
MS = 1_000_000  # ns


def state(s: Scheduler, task_id: int) -> S:
    assert s.ledger is not None
    return s.ledger.state_of(task_id)


def history(s: Scheduler, task_id: int) -> tuple[S, ...]:
    assert s.ledger is not None
    return s.ledger.history_of(task_id)


def balanced_at_rest(s: Scheduler) -> None:
    b = s.books
    assert b.submitted == b.completed + b.failed + b.dropped + b.cancelled, b
    assert b.in_flight == 0 and s.queue.pending == 0 and s.queue.waiting == 0, b
    assert s.ledger is not None
    s.ledger.check_books()
    assert s.ledger.accepted == b.submitted
    assert s.idle()


def submit(s: Scheduler, h: Handler, n: int = 1, now: float = 0.0, **kw: object) -> list[Run]:
    """`n` submits (one future each)."""
    runs = [make_run(s, h, [i], **kw) for i in range(n)]  # type: ignore[arg-type]
    for r in runs:
        s.accept(r, now)
    return runs


def submit_map(s: Scheduler, h: Handler, n: int, now: float = 0.0, **kw: object) -> Run:
    """One run of `n` items (a map chunk)."""
    run = make_run(s, h, list(range(n)), **kw)  # type: ignore[arg-type]
    s.accept(run, now)
    return run


def measure(h: Handler, ns: float) -> None:
    """The handler's items are known to take about `ns` each."""
    h.measured(int(ns), 1)
    assert h.est_ns == pytest.approx(ns)


def one_send(todo: list) -> Batch:  # type: ignore[type-arg]
    batches = sends(todo)
    assert len(batches) == 1, brief(todo)
    return batches[0]


def complete(s: Scheduler, batch: Batch, now: float = 1.0, ns: int = MS) -> list:  # type: ignore[type-arg]
    """The worker holding `batch` reports all of its items as done."""
    pid = s.seats[batch.seat].pid
    return s.batch_done(result(batch, batch.done, batch.count - batch.done, pid, ns=ns), None, now)


# --- dispatch and batch sizing -------------------------------------------------------------------


def test_submit_then_dispatch_sends_one_batch_per_worker() -> None:
    s = make_scheduler(2)
    h = s.handlers.get(len)
    submit(s, h, 3)
    assert s.books.submitted == 3 and s.queue.pending == 3 and s.room() == 1024 - 3
    out = s.dispatch(0.0)
    # Unmeasured: batches of one, and no worker gets a second (a long task must not be batched blindly).
    assert brief(out) == [("send", 0, [1]), ("send", 1, [2]), NOTIFY]
    assert [b.seat for b in sends(out)] == [0, 1]
    assert s.queue.pending == 1 and s.books.in_flight == 2
    assert [state(s, t) for t in (1, 2, 3)] == [S.DISPATCHED, S.DISPATCHED, S.PENDING]
    assert s.dispatch(0.0) == []  # nothing moves until a worker frees
    batch = sends(out)[0]
    assert s.holds(batch) and s.sent(batch) == []
    assert brief(complete(s, batch)) == [("resolve", [1]), NOTIFY]
    assert brief(s.dispatch(1.0)) == [("send", 0, [3]), NOTIFY]


def test_no_worker_no_send_and_a_started_worker_takes_work() -> None:
    s = make_scheduler(2, start=False)
    h = s.handlers.get(len)
    submit(s, h, 2)
    assert s.dispatch(0.0) == []
    s.worker_started(1, 77)
    assert brief(s.dispatch(0.0)) == [("send", 1, [1]), NOTIFY]


def test_a_measured_handler_gets_batches_that_grow() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    run = submit_map(s, h, 10_000)
    first = one_send(s.dispatch(0.0))
    assert first.count == 1  # unmeasured: one item
    # 1 us per item: ~20 ms batches would be 20 000 items, capped at MAX_BATCH.
    s.batch_done(result(first, 0, 1, PID0, ns=1_000), None, 0.1)
    assert h.est_ns == 1_000
    # The worker may prefetch (it holds ~4 ms of estimated work, under 40 ms), but never a third.
    second, third = sends(s.dispatch(0.1))
    assert second.count == third.count == sizing.MAX_BATCH == 4096
    assert ids_of(second) == list(range(run.first_id + 1, run.first_id + 1 + 4096))
    assert s.dispatch(0.1) == []


def test_batch_size_tracks_the_measured_cost() -> None:
    s = make_scheduler(1, sizing=FIVE_MS)
    h = s.handlers.get(len)
    submit_map(s, h, 100)
    first = one_send(s.dispatch(0.0))
    s.batch_done(result(first, 0, 1, PID0, ns=1 * MS), None, 0.1)  # 1 ms: over 100 us, so ~5 ms batches
    assert [b.count for b in sends(s.dispatch(0.1))] == [5, 5]  # and a prefetch: it holds 5 ms < 40 ms
    h2 = s.handlers.get(abs)
    submit_map(s, h2, 100)
    measure(h2, 40_000)  # 40 us: ~20 ms batches
    assert sizing.size_for(make_run(s, h2, [0])) == 500


def test_a_short_queue_is_spread_and_single_submits_gather() -> None:
    """Closed-loop submits (200 coroutines awaiting `arun`): what is outstanding is spread
    over the batches the workers may hold, and a busy worker's next batch waits until a
    full one has gathered, while an idle worker takes what there is."""
    s = make_scheduler(2)
    h = s.handlers.get(len)
    measure(h, 100_000)  # 0.1 ms: 200 would make one 20 ms batch
    submit(s, h, 40)
    first = sends(s.dispatch(0.0))
    assert [(b.seat, b.count) for b in first] == [(0, 10), (1, 10), (0, 10), (1, 10)]  # 40 over 4 batches
    complete(s, first[0], ns=100_000)  # worker 0 still holds one batch
    submit(s, h, 9)
    assert not s.wants_work() and s.dispatch(1.0) == []  # 9 < a batch of 10 (1 ms of work): they gather
    submit(s, h, 1)
    assert s.wants_work()
    assert [(b.seat, b.count) for b in sends(s.dispatch(1.0))] == [(0, 10)]
    complete(s, first[1], ns=100_000)
    complete(s, first[3], ns=100_000)  # worker 1 is idle: a single submit goes at once
    submit(s, h, 1)
    assert s.wants_work()
    assert [(b.seat, b.count) for b in sends(s.dispatch(1.0))] == [(1, 1)]


def test_chunksize_is_respected() -> None:
    s = make_scheduler(2)
    h = s.handlers.get(len)
    run = submit_map(s, h, 10, chunksize=3)
    out = s.dispatch(0.0)
    f = run.first_id
    # Unmeasured, yet chunksize says 3; no prefetch of an unmeasured handler.
    assert brief(out) == [("send", 0, [f, f + 1, f + 2]), ("send", 1, [f + 3, f + 4, f + 5]), NOTIFY]
    measure(h, 1_000)  # a chunksize wins over the measured size, too
    assert brief(s.dispatch(0.0)) == [("send", 0, [f + 6, f + 7, f + 8]), ("send", 1, [f + 9]), NOTIFY]


def test_submits_of_one_handler_merge_and_of_two_do_not() -> None:
    s = make_scheduler(1)
    h, other = s.handlers.get(len), s.handlers.get(abs)
    measure(h, 1_000)
    a = submit(s, h, 3)
    b = submit(s, other, 1)
    c = submit(s, h, 1)
    out = s.dispatch(0.0)
    # One batch: the first three (same handler); the other handler's run stops the merge, and
    # is not prefetched either (unmeasured), so what comes after it waits too.
    assert brief(out) == [("send", 0, [r.first_id for r in a]), NOTIFY]
    assert state(s, b[0].first_id) is S.PENDING and state(s, c[0].first_id) is S.PENDING
    complete(s, sends(out)[0])
    assert brief(s.dispatch(0.0)) == [("send", 0, [b[0].first_id]), NOTIFY]


@pytest.mark.parametrize(
    ("est_ms", "held"),
    [
        (30, 2),  # holds 30 ms < 40 ms: a second batch; then 60 ms, and never a third anyway
        (50, 1),  # holds 50 ms: no second batch
        (None, 1),  # unmeasured: no second batch
    ],
)
def test_prefetch_rule(est_ms: int | None, held: int) -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    if est_ms is not None:
        measure(h, est_ms * MS)
    submit(s, h, 5)
    out = s.dispatch(0.0)
    assert [b.count for b in sends(out)] == [1] * held
    assert len(s.seats[0].batches) == held
    assert s.dispatch(0.0) == []
    assert s.queue.pending == 5 - held


def test_prefetch_counts_only_what_is_not_reported_yet() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 10 * MS)  # ~5 ms batches would be 0 items: batches of 1
    run = submit_map(s, h, 10, chunksize=5)
    first = one_send(s.dispatch(0.0))
    assert first.count == 5
    assert s.dispatch(0.0) == []  # holds 50 ms
    s.batch_done(result(first, 0, 2, PID0, ns=10 * MS), None, 0.1)  # 30 ms left
    second = one_send(s.dispatch(0.1))
    assert ids_of(second) == list(range(run.first_id + 5, run.first_id + 10))


def test_task_limit_retires_the_worker() -> None:
    s = make_scheduler(1, max_tasks_per_worker=3, sizing=WHOLE)
    h = s.handlers.get(len)
    measure(h, 1_000)
    submit(s, h, 5)
    batch = one_send(s.dispatch(0.0))
    assert batch.count == 3  # cut to what the worker may still take
    assert brief(s.sent(batch)) == [("retire", 0)]
    assert s.seats[0].retiring and s.seats[0].recycled == 1
    assert s.dispatch(0.0) == []
    complete(s, batch)
    # It exits cleanly; its replacement takes the rest.
    assert brief(s.worker_died(Death(0, PID0, 0, None))) == [("start", 0)]
    assert brief(s.worker_gone(PID0, False, 1.0)) == [NOTIFY]
    s.worker_started(0, 2000)
    assert one_send(s.dispatch(1.0)).count == 2


# --- retries, backoff, final failures ---------------------------------------------------------------


def test_raised_failure_is_retried_with_backoff_then_final() -> None:
    backoff, cap = 1.0, 30.0
    s = make_scheduler(1, backoff=backoff, backoff_max=cap)
    h = s.handlers.get(len)
    (run,) = submit(s, h, 1, retries=2)
    tid = run.first_id
    now = 0.0
    for attempt in (1, 2):
        batch = one_send(s.dispatch(now))
        assert batch.head.attempt == attempt
        out = s.batch_done(result(batch, 0, 1, PID0, errors=[error(0)]), None, now)
        assert brief(out) == [NOTIFY]  # no Fail: it will run again
        assert s.books.retried == attempt and s.books.failed == 0
        assert state(s, tid) is S.RETRYING and s.queue.waiting == 1
        due = s.next_due()
        assert due is not None
        nominal = backoff * 2 ** (attempt - 1)
        assert nominal * 0.75 <= due - now <= nominal * 1.25
        assert s.dispatch(due - 0.001) == []  # still backing off
        assert state(s, tid) is S.RETRYING
        now = due
    batch = one_send(s.dispatch(now))
    assert batch.head.attempt == 3 and ids_of(batch) == [tid]  # same task id
    out = s.batch_done(result(batch, 0, 1, PID0, errors=[error(0)]), None, now)
    assert brief(out) == [("fail", tid, 3), NOTIFY]
    err = error_of(fails(out)[0])
    assert isinstance(err, TaskFailed) and err.task_id == tid and err.attempts == 3
    assert s.books.failed == 1 and s.books.retried == 2 and s.books.attempts == 3
    assert history(s, tid) == (S.NEW, S.FAILED)  # ended: its final state is kept
    balanced_at_rest(s)


def test_backoff_is_capped_by_backoff_max() -> None:
    s = make_scheduler(1, backoff=1.0, backoff_max=1.2, seed=3)
    h = s.handlers.get(len)
    submit(s, h, 1, retries=5)
    now = 0.0
    delays = []
    for _ in range(5):
        batch = one_send(s.dispatch(now))
        s.batch_done(result(batch, 0, 1, PID0, errors=[error(0)]), None, now)
        due = s.next_due()
        assert due is not None
        delays.append(due - now)
        now = due
    assert 0.75 <= delays[0] <= 1.2
    assert delays[2:] == [pytest.approx(1.2)] * 3  # 4, 8, 16 s nominal: capped


def test_retry_waits_in_the_delayed_queue_not_the_heap() -> None:
    s = make_scheduler(1, backoff=1.0)
    h = s.handlers.get(len)
    (run,) = submit(s, h, 1, retries=1)
    batch = one_send(s.dispatch(0.0))
    s.batch_done(result(batch, 0, 1, PID0, errors=[error(0)]), None, 0.0)
    assert not s.queue.heap and s.queue.pending == 0 and s.room() == 1024
    assert not s.idle()  # a retry waits
    submit(s, h, 1)  # something else runs meanwhile
    (other,) = sends(s.dispatch(0.1))
    assert ids_of(other) == [run.first_id + 1]


def test_rejected_fault_is_final_at_once() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    (run,) = submit(s, h, 1, retries=5)
    batch = one_send(s.dispatch(0.0))
    out = s.batch_done(result(batch, 0, 1, PID0, errors=[error(0, m.Fault.REJECTED)]), None, 0.0)
    assert brief(out) == [("fail", run.first_id, 1), NOTIFY]
    assert s.books.retried == 0 and s.books.failed == 1
    balanced_at_rest(s)


@pytest.mark.parametrize("fault", [m.Fault.RESULT_PICKLE, m.Fault.HANDLER_UNPICKLE])
def test_other_worker_side_faults_are_final(fault: m.Fault) -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    (run,) = submit(s, h, 1, retries=5)
    batch = one_send(s.dispatch(0.0))
    out = s.batch_done(result(batch, 0, 1, PID0, errors=[error(0, fault)]), None, 0.0)
    assert brief(out) == [("fail", run.first_id, 1), NOTIFY]
    balanced_at_rest(s)


def test_args_unpickle_in_a_batch_of_several_requeues_solo_then_by_value() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 1_000)
    run = submit_map(s, h, 3)
    f = run.first_id
    batch = one_send(s.dispatch(0.0))
    assert batch.count == 3
    everyone = [error(k, m.Fault.ARGS_UNPICKLE) for k in range(3)]
    out = s.batch_done(result(batch, 0, 3, PID0, errors=everyone), None, 0.0)
    assert brief(out) == [NOTIFY]  # uncharged: no retry counted, nothing failed
    assert s.books.retried == 0 and s.books.failed == 0 and s.queue.pending == 3
    requeued = [e[-1] for e in sorted(s.queue.heap)]
    assert [(r.first_id, r.attempt, r.solo, r.by_value) for r in requeued] == [
        (f, 1, True, False), (f + 1, 1, True, False), (f + 2, 1, True, False),
    ]  # fmt: skip
    # Solo: never merged with their neighbours (nor with each other).
    out = s.dispatch(0.0)
    assert brief(out) == [("send", 0, [f]), ("send", 0, [f + 1]), NOTIFY]
    first, second = sends(out)
    # Alone it fails again: now by value.
    s.batch_done(result(first, 0, 1, PID0, errors=[error(0, m.Fault.ARGS_UNPICKLE)]), None, 0.0)
    again = next(e[-1] for e in s.queue.heap if e[-1].first_id == f)
    assert (again.attempt, again.solo, again.by_value) == (1, True, True)
    s.batch_done(result(second, 0, 1, PID0), None, 0.0)  # f + 1 unpickled fine alone
    out = s.dispatch(0.0)
    assert brief(out) == [("send", 0, [f]), ("send", 0, [f + 2]), NOTIFY]
    by_value, last = sends(out)
    assert by_value.head.by_value
    # By value too: final, after one attempt (none of them was charged).
    out = s.batch_done(result(by_value, 0, 1, PID0, errors=[error(0, m.Fault.ARGS_UNPICKLE)]), None, 0.0)
    assert brief(out) == [("fail", f, 1), NOTIFY]
    complete(s, last)
    assert s.books.completed == 2 and s.books.failed == 1
    balanced_at_rest(s)


def test_args_unpickle_of_a_lone_submit_in_a_merged_batch_goes_by_value_at_once() -> None:
    # Documents the current rule: a run of one item needs no solo step by reference.
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 1_000)
    a, _b = submit(s, h, 2)
    batch = one_send(s.dispatch(0.0))
    assert batch.count == 2
    s.batch_done(result(batch, 0, 2, PID0, errors=[error(0, m.Fault.ARGS_UNPICKLE)]), None, 0.0)
    again = next(e[-1] for e in s.queue.heap if e[-1].first_id == a.first_id)
    assert (again.solo, again.by_value) == (True, True)


# --- crash attribution --------------------------------------------------------------------------------


def dying_batch_of_5(retries: int = 0, timeout: float | None = None) -> tuple[Scheduler, Front, Run, Batch]:
    """One worker holding a batch of five items of one map run, items 0 and 1 reported."""
    s = make_scheduler(1, sizing=WHOLE)
    front = Front(s)
    h = s.handlers.get(len)
    measure(h, 1_000)
    run = submit_map(s, h, 5, retries=retries, timeout=timeout)
    batch = one_send(s.dispatch(0.0))
    assert batch.count == 5
    front.apply(s.batch_done(result(batch, 0, 2, PID0), None, 0.5))
    return s, front, run, batch


def test_worker_death_inside_a_batch_charges_only_the_running_item() -> None:
    s, front, run, batch = dying_batch_of_5()
    f = run.first_id
    out = s.worker_died(Death(0, PID0, -11, (batch.batch_id, 2)))
    assert brief(out) == [("start", 0)]
    assert s.lost_running(PID0) == (batch.batch_id, 2) and s.lost_pids() == [PID0]
    assert not s.idle()
    out = s.worker_gone(PID0, False, 1.0)
    assert brief(out) == [("fail", f + 2, 1), NOTIFY]
    front.apply(out)
    err = error_of(fails(out)[0])
    assert isinstance(err, WorkerCrashed) and err.exitcode == -11 and err.signal == 11 and err.pid == PID0
    assert s.books.crashed == 1 and s.books.failed == 1 and s.books.attempts == 2 + 1
    assert history(s, f + 2) == (S.NEW, S.FAILED)
    # 3 and 4 never ran: back in line, uncharged, same ids, first attempt.
    assert [state(s, f + k) for k in range(5)] == [S.DONE, S.DONE, S.FAILED, S.PENDING, S.PENDING]
    (entry,) = s.queue.heap
    back = entry[-1]
    assert (back.first_id, len(back.items), back.attempt, back.base) == (f + 3, 2, 1, 3)
    assert s.books.in_flight == 0 and s.queue.pending == 2
    s.worker_started(0, 2000)
    again = one_send(s.dispatch(1.0))
    assert ids_of(again) == [f + 3, f + 4]
    front.apply(complete(s, again))
    assert {t: front.outcomes[t] for t in range(f, f + 5)} == {
        f: ["done"], f + 1: ["done"], f + 2: ["failed"], f + 3: ["done"], f + 4: ["done"],
    }  # fmt: skip
    balanced_at_rest(s)


def test_a_crash_with_retries_left_is_retried() -> None:
    s, _front, run, batch = dying_batch_of_5(retries=1)
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, 2)))
    assert brief(s.worker_gone(PID0, False, 1.0)) == [NOTIFY]
    assert s.books.crashed == 1 and s.books.retried == 1 and s.books.failed == 0
    assert history(s, run.first_id + 2)[-3:] == (S.DISPATCHED, S.CRASHED, S.RETRYING)
    assert s.queue.waiting == 1 and s.queue.pending == 2


def test_reported_running_item_charges_nobody() -> None:
    s, _front, run, batch = dying_batch_of_5()
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, 2)))
    assert brief(s.worker_gone(PID0, True, 1.0)) == [NOTIFY]
    assert s.books.crashed == 0 and s.books.failed == 0
    assert [state(s, run.first_id + k) for k in (2, 3, 4)] == [S.PENDING] * 3


def test_the_running_items_outcome_arriving_late_is_not_charged() -> None:
    s, front, run, batch = dying_batch_of_5()
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, 2)))
    # The collector forwards what the worker sent before it died: item 2's outcome among it.
    front.apply(s.batch_done(result(batch, 2, 1, PID0), None, 0.9))
    assert brief(s.worker_gone(PID0, True, 1.0)) == [NOTIFY]
    assert s.books.crashed == 0 and s.books.completed == 3
    assert [state(s, run.first_id + k) for k in (2, 3, 4)] == [S.DONE, S.PENDING, S.PENDING]


@pytest.mark.parametrize(
    ("exitcode", "reason"),
    [
        (-9, KillReason.STALLED),
        (-9, KillReason.COLLECTOR),
        (-9, KillReason.SHUTDOWN),
        (layout.EXIT_ORPHANED, None),
    ],
)
def test_deaths_not_the_tasks_fault_charge_nobody(exitcode: int, reason: KillReason | None) -> None:
    s, _front, run, batch = dying_batch_of_5()
    s.worker_died(Death(0, PID0, exitcode, (batch.batch_id, 2), reason))
    assert brief(s.worker_gone(PID0, False, 1.0)) == [NOTIFY]
    assert s.books.crashed == 0 and s.books.timed_out == 0 and s.books.failed == 0
    assert [state(s, run.first_id + k) for k in (2, 3, 4)] == [S.PENDING] * 3
    assert s.books.attempts == 2  # the interrupted one is not an attempt


def test_timeout_kill_is_charged_as_a_timeout() -> None:
    s, _front, run, batch = dying_batch_of_5(timeout=1.0)
    s.worker_died(Death(0, PID0, -9, (batch.batch_id, 2), KillReason.TIMEOUT))
    out = s.worker_gone(PID0, False, 1.0)
    assert brief(out) == [("fail", run.first_id + 2, 1), NOTIFY]
    err = error_of(fails(out)[0])
    assert isinstance(err, TaskTimeout) and err.timeout == 1.0 and err.task_id == run.first_id + 2
    assert s.books.timed_out == 1 and s.books.crashed == 0
    assert history(s, run.first_id + 2) == (S.NEW, S.FAILED)


def test_timeout_with_retries_moves_through_timed_out() -> None:
    s, _front, run, batch = dying_batch_of_5(retries=1, timeout=1.0)
    s.worker_died(Death(0, PID0, -9, (batch.batch_id, 2), KillReason.TIMEOUT))
    s.worker_gone(PID0, False, 1.0)
    assert history(s, run.first_id + 2)[-2:] == (S.TIMED_OUT, S.RETRYING)


def test_death_while_loading_a_batch_of_one_charges_that_task() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    (run,) = submit(s, h, 1)
    batch = one_send(s.dispatch(0.0))
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, layout.LOADING)))
    assert s.lost_running(PID0) == (batch.batch_id, layout.LOADING)
    out = s.worker_gone(PID0, False, 1.0)
    assert brief(out) == [("fail", run.first_id, 1), NOTIFY]
    assert s.books.crashed == 1
    balanced_at_rest(s)


def test_death_while_loading_a_batch_of_several_requeues_each_alone() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 1_000)
    run = submit_map(s, h, 3)
    f = run.first_id
    batch = one_send(s.dispatch(0.0))
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, layout.LOADING)))
    assert brief(s.worker_gone(PID0, False, 1.0)) == [NOTIFY]
    assert s.books.crashed == 0 and s.books.failed == 0
    back = sorted((e[-1].first_id, e[-1].solo, e[-1].careful, e[-1].attempt) for e in s.queue.heap)
    assert back == [(f, True, True, 1), (f + 1, True, True, 1), (f + 2, True, True, 1)]
    s.worker_started(0, 2000)
    out = s.dispatch(1.0)
    assert brief(out) == [("send", 0, [f]), ("send", 0, [f + 1]), NOTIFY]  # one by one, to find the poison
    assert all(sizing.careful(b.head) for b in sends(out))


def test_death_in_an_unmarked_batch_requeues_it_careful() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 1_000)  # 1 us: unmarked
    run = submit_map(s, h, 4)
    batch = one_send(s.dispatch(0.0))
    assert not sizing.careful(batch.head)
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, layout.UNMARKED)))
    assert s.lost_running(PID0) is None  # no marked item to charge
    assert brief(s.worker_gone(PID0, False, 1.0)) == [NOTIFY]
    assert s.books.crashed == 0
    (entry,) = s.queue.heap
    back = entry[-1]
    assert (back.first_id, len(back.items), back.careful, back.solo) == (run.first_id, 4, True, False)
    s.worker_started(0, 2000)
    again = one_send(s.dispatch(1.0))
    assert sizing.careful(again.head) and ids_of(again) == ids_of(batch)


def test_death_holding_two_batches_charges_the_running_one_only() -> None:
    s = make_scheduler(1, sizing=FIVE_MS)
    h = s.handlers.get(len)
    measure(h, 1 * MS)
    a = submit_map(s, h, 5)
    b = submit_map(s, h, 5)
    first, second = sends(s.dispatch(0.0))
    assert ids_of(first) == list(range(a.first_id, a.first_id + 5))
    assert ids_of(second) == list(range(b.first_id, b.first_id + 5))
    s.worker_died(Death(0, PID0, -11, (first.batch_id, 0)))
    out = s.worker_gone(PID0, False, 1.0)
    assert brief(out) == [("fail", a.first_id, 1), NOTIFY]
    assert s.queue.pending == 9 and s.books.in_flight == 0


def test_worker_gone_twice_or_for_a_stranger_does_nothing() -> None:
    s, _front, _run, batch = dying_batch_of_5()
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, 2)))
    s.worker_gone(PID0, False, 1.0)
    assert s.worker_gone(PID0, False, 1.0) == []
    assert s.worker_gone(4242, False, 1.0) == []


def test_task_at_names_the_marked_item() -> None:
    s = make_scheduler(1, sizing=WHOLE)
    h = s.handlers.get(len)
    measure(h, 1 * MS)
    run = submit_map(s, h, 5)
    batch = one_send(s.dispatch(0.0))
    assert s.task_at(0, (batch.batch_id, 3)) == run.first_id + 3
    assert s.task_at(0, (batch.batch_id, layout.UNMARKED)) is None
    assert s.task_at(0, None) is None
    assert s.task_at(0, (batch.batch_id + 1, 0)) is None


# --- requeue keeps ids and place -----------------------------------------------------------------------


def test_requeued_items_keep_their_ids_and_place_in_line() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 1 * MS)
    early = submit_map(s, h, 5, chunksize=5)
    batch = one_send(s.dispatch(0.0))
    s.batch_done(result(batch, 0, 1, PID0), None, 0.1)
    later = submit(s, h, 3)  # same priority, submitted after
    urgent = submit(s, h, 1, priority=5)  # higher priority, submitted after too
    s.worker_died(Death(0, PID0, -9, None))  # SIGKILL between items: nobody charged
    s.worker_gone(PID0, False, 1.0)
    (back,) = [e[-1] for e in s.queue.heap if e[-1].receiver is early.receiver]
    assert (back.priority, back.seq, back.first_id, back.base) == (early.priority, early.seq, early.first_id + 1, 1)
    s.worker_started(0, 2000)
    order = []
    for _ in range(10):
        out = s.dispatch(1.0)
        if not sends(out):
            break
        for b in sends(out):
            order += ids_of(b)
            complete(s, b)
    f = early.first_id
    assert order == [urgent[0].first_id, f + 1, f + 2, f + 3, f + 4] + [r.first_id for r in later]
    balanced_at_rest(s)


# --- cancellation ---------------------------------------------------------------------------------------


def test_cancel_pending_cancels_queued_first_attempts_only() -> None:
    s = make_scheduler(1, backoff=1.0)
    front = Front(s)
    h = s.handlers.get(len)
    (retrying,) = submit(s, h, 1, retries=1)
    batch = one_send(s.dispatch(0.0))
    s.batch_done(result(batch, 0, 1, PID0, errors=[error(0)]), None, 0.0)  # now waiting out a backoff
    (running,) = submit(s, h, 1)
    sent = one_send(s.dispatch(0.0))
    assert ids_of(sent) == [running.first_id]
    queued = submit(s, h, 2)
    chunk = submit_map(s, h, 3)
    out = front.apply(s.cancel_pending())
    assert out == []
    # Futures are cancelled silently (the front cancelled them); a map's chunk says so per place.
    c = chunk.first_id
    assert front.outcomes == {c: ["cancelled"], c + 1: ["cancelled"], c + 2: ["cancelled"]}
    assert all(r.receiver.cancelled for r in queued)
    assert s.books.cancelled == 5
    assert state(s, retrying.first_id) is S.RETRYING and state(s, running.first_id) is S.DISPATCHED
    # The retry and the running task still end normally.
    front.apply(complete(s, sent))
    due = s.next_due()
    assert due is not None
    again = one_send(s.dispatch(due))
    front.apply(complete(s, again, now=due))
    assert s.books.completed == 2
    balanced_at_rest(s)


def test_a_future_cancelled_before_dispatch_is_dropped_at_dispatch() -> None:
    s = make_scheduler(1)
    front = Front(s)
    h = s.handlers.get(len)
    a, b = submit(s, h, 2)
    assert a.receiver.user_cancel()  # type: ignore[attr-defined]
    out = front.apply(s.dispatch(0.0))
    assert brief(out) == [("send", 0, [b.first_id])]
    assert s.books.cancelled == 1 and state(s, a.first_id) is S.CANCELLED
    assert a.first_id not in front.outcomes  # the front already settled a cancelled future
    assert s.queue.pending == 0


def test_a_lone_cancelled_future_still_notifies() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    (a,) = submit(s, h, 1)
    a.receiver.user_cancel()  # type: ignore[attr-defined]
    assert brief(s.dispatch(0.0)) == [NOTIFY]  # room freed in the queue
    balanced_at_rest(s)


def test_cancelling_after_dispatch_does_nothing() -> None:
    s = make_scheduler(1)
    front = Front(s)
    h = s.handlers.get(len)
    (a,) = submit(s, h, 1)
    batch = one_send(s.dispatch(0.0))
    assert not a.receiver.user_cancel()  # type: ignore[attr-defined]
    assert front.apply(s.cancel_pending()) == []
    assert s.books.cancelled == 0
    front.apply(complete(s, batch))
    assert front.outcomes == {a.first_id: ["done"]}
    balanced_at_rest(s)


def test_a_map_chunk_cancelled_partly() -> None:
    s = make_scheduler(2)
    front = Front(s)
    h = s.handlers.get(len)
    run = submit_map(s, h, 10, chunksize=3)
    f = run.first_id
    b0, b1 = sends(s.dispatch(0.0))
    assert run.pos == 6
    # shutdown(cancel_futures=True): the rest of the chunk is cancelled; its reader sees CancelledError.
    out = front.apply(s.cancel_pending())
    assert out == []
    assert {t: front.outcomes[t] for t in range(f + 6, f + 10)} == {t: ["cancelled"] for t in range(f + 6, f + 10)}
    assert s.books.cancelled == 4 and s.queue.pending == 0
    front.apply(complete(s, b0))
    front.apply(complete(s, b1))
    assert all(front.outcomes[t] == ["done"] for t in range(f, f + 6))
    balanced_at_rest(s)


def test_an_abandoned_map_chunk_is_dropped_at_dispatch_without_a_word() -> None:
    s = make_scheduler(1)
    front = Front(s)
    h = s.handlers.get(len)
    run = submit_map(s, h, 10, chunksize=3)
    batch = one_send(s.dispatch(0.0))
    run.receiver.stream.cancelled = True  # type: ignore[attr-defined]
    front.apply(complete(s, batch))
    out = front.apply(s.dispatch(1.0))
    assert out == []
    assert s.books.cancelled == 7 and all(state(s, run.first_id + k) is S.CANCELLED for k in range(3, 10))
    assert set(front.outcomes) == set(range(run.first_id, run.first_id + 3))  # no one reads the rest
    balanced_at_rest(s)


def test_a_retry_of_an_abandoned_map_is_cancelled_when_due() -> None:
    s = make_scheduler(1, backoff=1.0)
    front = Front(s)
    h = s.handlers.get(len)
    run = submit_map(s, h, 2, chunksize=2, retries=3)
    batch = one_send(s.dispatch(0.0))
    front.apply(s.batch_done(result(batch, 0, 2, PID0, errors=[error(1)]), None, 0.0))
    run.receiver.stream.cancelled = True  # type: ignore[attr-defined]
    due = s.next_due()
    assert due is not None
    assert brief(front.apply(s.dispatch(due))) == []
    assert state(s, run.first_id + 1) is S.CANCELLED and s.books.cancelled == 1
    balanced_at_rest(s)


# --- priorities ------------------------------------------------------------------------------------------


def test_a_higher_priority_run_goes_in_the_next_send() -> None:
    s = make_scheduler(2, capacity=10_000)
    h = s.handlers.get(len)
    low = submit(s, h, 5000)
    held = sends(s.dispatch(0.0))
    assert [ids_of(b) for b in held] == [[low[0].first_id], [low[1].first_id]]
    (urgent,) = submit(s, h, 1, priority=1)
    complete(s, held[0], ns=30 * MS)  # measured: batches of one, and one prefetch each
    out = s.dispatch(1.0)
    assert brief(out) == [
        ("send", 0, [urgent.first_id]), ("send", 1, [low[2].first_id]), ("send", 0, [low[3].first_id]), NOTIFY,
    ]  # fmt: skip


def test_higher_priority_batches_go_first_and_equal_ones_in_order() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 20 * MS)  # batches of one, prefetch of one
    a = submit(s, h, 2, priority=0)
    b = submit(s, h, 2, priority=3)
    c = submit(s, h, 2, priority=0)
    d = submit(s, h, 1, priority=3)
    order = []
    for _ in range(20):
        out = s.dispatch(1.0)
        for batch in sends(out):
            order += ids_of(batch)
        for batch in list(s.seats[0].batches.values())[:1]:
            complete(s, batch)
        if s.idle():
            break
    assert order == [r.first_id for r in (*b, *d, *a, *c)]
    balanced_at_rest(s)


# --- maps fed from their input ---------------------------------------------------------------------------


def test_a_feed_is_cut_into_batches_and_counted_as_it_goes() -> None:
    s = make_scheduler(2)
    front = Front(s)
    h = s.handlers.get(len)
    feed = FakeFeed(h, range(4))
    s.add_feed(feed)
    assert s.books.submitted == 0 and not s.idle()
    out = front.apply(s.dispatch(0.0))
    assert [b.count for b in sends(out)] == [1, 1]  # unmeasured
    assert s.books.submitted == 2 and feed.pos == 2 and feed.stream.outstanding == 2
    for b in sends(out):
        front.apply(complete(s, b))
    while not s.idle():
        for b in sends(front.apply(s.dispatch(1.0))):
            front.apply(complete(s, b))
    assert feed.exhausted and s.feeds.feeds == []
    assert sorted(t for r in feed.runs for t in range(r.first_id, r.first_id + len(r.items))) == sorted(front.outcomes)
    balanced_at_rest(s)


def test_a_cancelled_feed_is_dropped_at_the_next_dispatch() -> None:
    s = make_scheduler(1)
    front = Front(s)
    h = s.handlers.get(len)
    feed = FakeFeed(h, range(100))
    s.add_feed(feed)
    batch = one_send(front.apply(s.dispatch(0.0)))
    feed.stream.cancelled = True  # its reader went away
    out = s.dispatch(0.1)
    assert brief(out) == [NOTIFY]  # its reader may be waiting for the end
    assert feed.exhausted and s.feeds.feeds == []
    front.apply(complete(s, batch))
    assert s.idle() and s.books.submitted == 1  # the other 99 were never submitted
    balanced_at_rest(s)


def test_a_parked_reader_does_not_block_another_feed() -> None:
    s = make_scheduler(2)
    h = s.handlers.get(len)
    parked = FakeFeed(h, range(100), priority=1, limit=4)
    other = FakeFeed(h, range(100), limit=4)
    s.add_feed(parked)
    s.add_feed(other)
    parked.stream.outstanding = 4  # its window (max(limit, 2 * workers * batch) = 4) is full: not reading
    out = s.dispatch(0.0)
    assert [b.head.receiver.stream for b in sends(out)] == [other.stream, other.stream]  # type: ignore[attr-defined]
    assert parked.pos == 0 and not parked.exhausted and parked in s.feeds.feeds
    parked.stream.outstanding = 0  # it reads again: it outranks the other
    for b in sends(out):
        complete(s, b)
    again = sends(s.dispatch(1.0))
    assert again and all(b.head.receiver.stream is parked.stream for b in again)  # type: ignore[attr-defined]


def test_the_heap_outranks_a_feed_of_lower_priority() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    feed = FakeFeed(h, range(10))
    s.add_feed(feed)
    (urgent,) = submit(s, h, 1, priority=2)
    assert brief(s.dispatch(0.0)) == [("send", 0, [urgent.first_id]), NOTIFY]
    assert feed.pos == 0


def test_an_iterator_feed_waits_for_input_and_notifies_its_reader() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    feed = FakeFeed(h, [], managed=False)
    s.add_feed(feed)
    assert s.dispatch(0.0) == []  # nothing read yet, input not done: it waits
    assert s.feeds.want(feed) == feed.limit  # capacity's worth, but within its window of unread results
    feed.seq.extend(range(3))
    out = s.dispatch(0.0)
    first_id = sends(out)[0].head.first_id if sends(out) else None
    assert brief(out) == [NOTIFY, ("send", 0, [first_id])]  # its reader may pull more input
    feed.input_done = True
    feed.pos = len(feed.seq)  # (as if cut)
    s.dispatch(0.0)
    assert feed.exhausted


# --- worker deaths ---------------------------------------------------------------------------------------


def test_a_dead_worker_is_replaced_while_accepting() -> None:
    s = make_scheduler(2)
    assert brief(s.worker_died(Death(1, PID0 + 1, -9, None))) == [("start", 1)]
    assert not s.seats[1].open
    s.worker_gone(PID0 + 1, False, 0.0)
    s.worker_started(1, 3000)
    assert s.seats[1].takes_work and s.seats[1].pid == 3000


def test_no_start_while_stopping_or_broken() -> None:
    s = make_scheduler(2)
    s.stopping = True
    assert s.worker_died(Death(0, PID0, 0, None)) == []
    s = make_scheduler(2)
    s.break_pool(PoolBroken("x"))
    assert s.worker_died(Death(0, PID0, -9, None)) == []


def test_five_barren_deaths_in_a_row_break_the_pool() -> None:
    s = make_scheduler(1)
    pid = PID0
    for _ in range(MAX_BARREN_DEATHS - 1):
        assert brief(s.worker_died(Death(0, pid, 1, None))) == [("start", 0)]
        s.worker_gone(pid, False, 0.0)
        pid += 1
        s.worker_started(0, pid)
    out = s.worker_died(Death(0, pid, 1, None, fault_text="Fatal Python error"))
    assert brief(out) == [("break", "PoolBroken")]
    assert "5 workers in a row" in str(out[0].error) and "Fatal Python error" in str(out[0].error)  # type: ignore[union-attr]


def test_an_outcome_resets_the_barren_count() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 1)
    pid = PID0
    for _ in range(MAX_BARREN_DEATHS - 1):
        s.worker_died(Death(0, pid, 1, None))
        s.worker_gone(pid, False, 0.0)
        pid += 1
        s.worker_started(0, pid)
    batch = one_send(s.dispatch(0.0))
    complete(s, batch)
    for _ in range(MAX_BARREN_DEATHS - 1):
        assert brief(s.worker_died(Death(0, pid, 1, None))) == [("start", 0)]
        s.worker_gone(pid, False, 0.0)
        pid += 1
        s.worker_started(0, pid)


@pytest.mark.parametrize(
    ("exitcode", "running", "reason", "productive"),
    [
        (-9, None, None, False),  # SIGKILL: someone else's doing
        (0, None, None, False),  # a clean exit
        (1, "item", None, False),  # a task killed it: the task is charged
        (1, None, KillReason.STALLED, False),  # we killed it
        (1, None, None, True),  # it had reported outcomes
    ],
)
def test_deaths_that_are_not_barren(
    exitcode: int, running: str | None, reason: KillReason | None, productive: bool
) -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 20)
    pid = PID0
    for _ in range(MAX_BARREN_DEATHS + 1):
        at = None
        if running or productive:
            batch = sends(s.dispatch(0.0))[0]
            at = (batch.batch_id, 0) if running else None
            if productive:
                s.batch_done(result(batch, 0, 1, pid), None, 0.0)
        assert brief(s.worker_died(Death(0, pid, exitcode, at, reason))) == [("start", 0)]
        s.worker_gone(pid, False, 0.0)
        pid += 1
        s.worker_started(0, pid)


def test_unguarded_main_breaks_the_pool() -> None:
    s = make_scheduler(2)
    out = s.worker_died(Death(0, PID0, layout.EXIT_UNGUARDED_MAIN, None))
    assert brief(out) == [("break", "PoolBroken")]
    assert "__main__" in str(out[0].error)  # type: ignore[union-attr]


def test_init_failure_starts_no_worker() -> None:
    s = make_scheduler(1)
    assert s.worker_died(Death(0, PID0, layout.EXIT_INIT_FAILED, None)) == []
    # With tasks sent it is not an init failure of a fresh worker: it is replaced.
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 1)
    one_send(s.dispatch(0.0))
    assert brief(s.worker_died(Death(0, PID0, layout.EXIT_INIT_FAILED, None))) == [("start", 0)]


def test_a_dead_workers_seat_takes_no_work_until_restarted() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 2)
    batch = one_send(s.dispatch(0.0))
    s.worker_died(Death(0, PID0, -11, (batch.batch_id, 0)))
    assert s.dispatch(0.0) == []
    assert not s.holds(batch)  # the backend must not send it any more
    assert s.batches.get(batch.batch_id) is batch  # but it is booked until worker_gone settles it
    s.worker_gone(PID0, False, 0.0)
    assert batch.batch_id not in s.batches and s.books.crashed == 1 and s.queue.pending == 1


# --- limits ----------------------------------------------------------------------------------------------


def test_a_task_past_its_timeout_is_killed() -> None:
    s = make_scheduler(2)
    h = s.handlers.get(len)
    submit(s, h, 1, timeout=1.0)
    batch = one_send(s.dispatch(0.0))
    clock = 500.0  # the reading's clock need not be the monotonic one
    kills, nearest = s.check_limits(lambda seat: (batch.batch_id, 0, clock - 0.25) if seat == 0 else None, 10.0, clock)
    assert kills == [] and nearest == pytest.approx(0.75)
    kills, nearest = s.check_limits(lambda seat: (batch.batch_id, 0, clock - 2.0) if seat == 0 else None, 10.0, clock)
    assert kills == [Kill(0, KillReason.TIMEOUT)] and nearest is None
    assert not s.seats[0].open
    # No second kill while its death is on the way.
    assert s.check_limits(lambda seat: (batch.batch_id, 0, clock - 3.0), 11.0, clock) == ([], None)


def test_a_worker_holding_work_and_running_none_is_stalled() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 1)
    one_send(s.dispatch(0.0))
    kills, nearest = s.check_limits(lambda seat: None, 100.0, 0.0)
    assert kills == [] and nearest == limits.STALL_LIMIT  # its stall clock starts now
    kills, nearest = s.check_limits(lambda seat: None, 100.0 + limits.STALL_LIMIT - 1, 0.0)
    assert kills == [] and nearest == pytest.approx(1.0)
    kills, nearest = s.check_limits(lambda seat: None, 100.0 + limits.STALL_LIMIT + 1, 0.0)
    assert kills == [Kill(0, KillReason.STALLED)]


def test_an_outcome_restarts_the_stall_clock() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    measure(h, 30 * MS)
    submit(s, h, 2)
    first, _second = sends(s.dispatch(0.0))
    s.check_limits(lambda seat: None, 0.0, 0.0)
    complete(s, first, now=50.0)
    kills, nearest = s.check_limits(lambda seat: None, 70.0, 0.0)
    assert kills == [] and nearest == limits.STALL_LIMIT


def test_timed_work_not_started_is_polled_and_stalls_after_its_timeout() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 1, timeout=2.0)
    one_send(s.dispatch(0.0))
    assert s.check_limits(lambda seat: None, 0.0, 0.0) == ([], limits.POLL_UNSTARTED)
    assert s.check_limits(lambda seat: None, 2.5, 0.0) == ([Kill(0, KillReason.STALLED)], None)


def test_nearest_deadline_over_all_workers() -> None:
    s = make_scheduler(3)
    h = s.handlers.get(len)
    submit(s, h, 1, timeout=1.0)
    submit(s, h, 1)
    submit(s, h, 1, timeout=5.0)
    b0, _b1, b2 = sends(s.dispatch(0.0))
    readings = {0: (b0.batch_id, 0, 9.7), 1: None, 2: (b2.batch_id, 0, 9.0)}
    kills, nearest = s.check_limits(readings.__getitem__, 10.0, 10.0)
    assert kills == [] and nearest == pytest.approx(0.7)  # not 60 (stall of seat 1) nor 4 (seat 2)
    # Seat 2's timed batch not started yet: looked at again soon.
    assert s.check_limits(lambda seat: None if seat else (b0.batch_id, 0, 9.7), 10.0, 10.0)[1] == pytest.approx(0.05)


def test_idle_workers_have_no_limit() -> None:
    s = make_scheduler(2)
    assert s.check_limits(lambda seat: None, 0.0, 0.0) == ([], None)


# --- breaking the pool -----------------------------------------------------------------------------------


def test_break_pool_fails_everything_outstanding_exactly_once() -> None:
    s = make_scheduler(2, backoff=1.0, sizing=sizing.Sizing(long_ns=5_000_000, min_ns=5_000_000))
    front = Front(s)
    h = s.handlers.get(len)
    (retrying,) = submit(s, h, 1, retries=1)
    batch = one_send(s.dispatch(0.0))
    front.apply(s.batch_done(result(batch, 0, 1, PID0, errors=[error(0)]), None, 0.0))  # backing off
    measure(h, 1 * MS)
    lost_run = submit_map(s, h, 3)
    held_run = submit_map(s, h, 3)
    lost_batch, held_batch = sends(s.dispatch(0.0))
    front.apply(s.batch_done(result(lost_batch, 0, 1, PID0), None, 0.0))
    s.worker_died(Death(0, PID0, -11, (lost_batch.batch_id, 1)))  # lost, not settled yet
    queued = submit(s, h, 2)
    cancelled = submit(s, h, 1)
    cancelled[0].receiver.user_cancel()  # type: ignore[attr-defined]
    err = PoolBroken("gone")
    rest = front.apply([*s.worker_died(Death(1, PID0 + 1, layout.EXIT_UNGUARDED_MAIN, None))])
    assert brief(rest) == [("break", "PoolBroken")]
    expected_failed = [retrying.first_id, *(lost_run.first_id + k for k in (1, 2))]
    expected_failed += [held_run.first_id + k for k in range(3)] + [r.first_id for r in queued]
    assert sorted(t for t, o in front.outcomes.items() if o == ["failed"]) == sorted(expected_failed)
    assert all(len(o) == 1 for o in front.outcomes.values())
    assert state(s, cancelled[0].first_id) is S.CANCELLED
    # Late news changes nothing.
    assert front.apply(s.break_pool(err)) == []
    assert front.apply(s.batch_done(result(held_batch, 0, 3, PID0 + 1), None, 1.0)) == []
    assert front.apply(s.worker_gone(PID0, False, 1.0)) == []
    assert s.dispatch(5.0) == []
    assert s.books.failed == len(expected_failed) and s.books.cancelled == 1
    assert all(len(o) == 1 for o in front.outcomes.values())
    balanced_at_rest(s)


def test_break_pool_fails_with_the_first_error() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 1)
    first = PoolBroken("first")
    out = s.break_pool(first)
    assert [f.error for f in fails(out)] == [first]
    submit(s, h, 1)  # (the front refuses this; the scheduler fails it with the first error)
    assert [f.error for f in fails(s.break_pool(PoolBroken("second")))] == [first]


# --- what else the front sends ---------------------------------------------------------------------------


def test_drop_fails_at_once_and_counts_dropped() -> None:
    s = make_scheduler(1, capacity=1)
    h = s.handlers.get(len)
    submit(s, h, 1)
    assert s.room() == 0
    run = make_run(s, h, [0, 1])
    out = s.drop(run, RuntimeError("full"), 0.0)
    assert brief(out) == [("fail", run.first_id, 0), ("fail", run.first_id + 1, 0), NOTIFY]
    assert s.books.dropped == 2 and state(s, run.first_id) is S.DROPPED


def test_reject_fails_tasks_that_would_not_pickle() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    run = make_run(s, h, [0])
    exc = ValueError("unpicklable")
    out = s.reject(run, exc, 0.0)
    assert brief(out) == [("fail", run.first_id, 0)] and fails(out)[0].error is exc
    assert history(s, run.first_id) == (S.NEW, S.FAILED)
    balanced_at_rest(s)


def test_unsendable_items_fail_and_the_rest_go_back() -> None:
    s = make_scheduler(1, sizing=WHOLE)
    h = s.handlers.get(len)
    measure(h, 1 * MS)
    run = submit_map(s, h, 3)
    batch = one_send(s.dispatch(0.0))
    exc = ValueError("no pickle")
    out = s.unsendable(batch, [(run, 1, exc)])
    assert brief(out) == [("fail", run.first_id + 1, 0), NOTIFY]
    assert not s.holds(batch) and s.seats[0].tasks_sent == 0 and s.books.in_flight == 0
    assert sorted(e[-1].first_id for e in s.queue.heap) == [run.first_id, run.first_id + 2]  # split around it
    assert brief(s.dispatch(0.0)) == [("send", 0, [run.first_id, run.first_id + 2]), NOTIFY]  # and merged again


def test_values_unloadable_moves_completed_to_failed() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    submit(s, h, 1)
    complete(s, one_send(s.dispatch(0.0)))
    s.values_unloadable(1)
    assert (s.books.completed, s.books.failed) == (0, 1)
    balanced_at_rest(s)


def test_timed_each_receivers_get_a_duration_each_from_an_unmarked_total() -> None:
    s = make_scheduler(1)
    front = Front(s)
    h = s.handlers.get(len)
    measure(h, 1_000)
    runs = submit(s, h, 4)
    batch = one_send(s.dispatch(0.0))
    assert batch.count == 4
    front.apply(s.batch_done(result(batch, 0, 4, PID0, ns=2_000, total=True), None, 0.0))
    metas = [r.receiver.oks[0][3] for r in runs]  # type: ignore[attr-defined]
    assert [meta[2][meta[3]] for meta in metas] == [2_000] * 4


# --- the ledger --------------------------------------------------------------------------------------------


def test_invalid_transition_carries_the_task_and_its_history() -> None:
    ledger = Ledger()
    for to in (S.PENDING, S.DISPATCHED, S.CRASHED):
        ledger.move(7, to)
    with pytest.raises(InvalidTransition) as info:
        ledger.move(7, S.DONE)
    exc = info.value
    assert (exc.task_id, exc.state, exc.to) == (7, S.CRASHED, S.DONE)
    assert exc.history == (S.NEW, S.PENDING, S.DISPATCHED, S.CRASHED)
    assert "task 7" in str(exc) and "crashed -> done" in str(exc)
    # A second outcome of an ended task is named too.
    for to in (S.RETRYING, S.FAILED):
        ledger.move(7, to)
    with pytest.raises(InvalidTransition) as info:
        ledger.move(7, S.DONE)
    assert (info.value.task_id, info.value.state, info.value.to) == (7, S.FAILED, S.DONE)
    assert info.value.history == (S.NEW, S.FAILED)
    # At rest, a task that never ended.
    ledger.move(8, S.PENDING)
    with pytest.raises(InvalidTransition) as info:
        ledger.check_books()
    assert (info.value.task_id, info.value.state, info.value.to) == (8, S.PENDING, None)
    assert info.value.history == (S.NEW, S.PENDING)


def test_the_scheduler_refuses_an_outcome_reported_twice() -> None:
    s = make_scheduler(1, sizing=WHOLE)
    h = s.handlers.get(len)
    measure(h, 1 * MS)
    run = submit_map(s, h, 3)
    batch = one_send(s.dispatch(0.0))
    s.batch_done(result(batch, 0, 2, PID0), None, 0.0)
    with pytest.raises(InvalidTransition) as info:
        s.batch_done(result(batch, 1, 1, PID0), None, 0.0)  # item 1 again
    assert (info.value.task_id, info.value.state, info.value.to) == (run.first_id + 1, S.DONE, S.DONE)


# --- scheduler bugs these tests found (fixed) ---------------------------------------------------------------


def test_task_limit_retire_comes_after_the_last_batch_booked_in_one_dispatch() -> None:
    s = make_scheduler(1, max_tasks_per_worker=2)
    h = s.handlers.get(len)
    measure(h, 1 * MS)
    run = submit_map(s, h, 4, chunksize=1)
    out = s.dispatch(0.0)
    # Two batches of one booked to seat 0 in one dispatch (a prefetch): together they reach its limit of 2.
    assert brief(out) == [("send", 0, [run.first_id]), ("send", 0, [run.first_id + 1]), NOTIFY]
    # The backend sends them in order, asking sent() after each; the local backend writes Stop on Retire,
    # and a worker exits at Stop: a RunBatch written after it is never run (its tasks come back only via
    # worker_died/worker_gone, on a needlessly replaced worker).
    assert [brief(s.sent(b)) for b in sends(out)] == [[], [("retire", 0)]]


def test_break_pool_lets_go_of_the_maps_being_fed() -> None:
    s = make_scheduler(1)
    h = s.handlers.get(len)
    feed = FakeFeed(h, range(10))
    s.add_feed(feed)
    s.dispatch(0.0)
    broken = PoolBroken("gone")
    s.break_pool(broken)
    s.dispatch(1.0)
    assert s.books.in_flight == 0 and s.queue.pending == 0
    assert s.idle()
    assert feed.exhausted and s.feeds.feeds == []
    # Items never cut must not vanish: the reader ends with the pool's error.
    assert 0 < feed.pos < 10 and feed.error is broken


def test_break_pool_does_not_fail_a_map_whose_input_was_all_cut() -> None:
    s = make_scheduler(1)
    feed = FakeFeed(s.handlers.get(len), range(3), size=3)
    s.add_feed(feed)
    s.dispatch(0.0)
    assert feed.pos == 3
    s.break_pool(PoolBroken("gone"))
    assert feed.exhausted and feed.error is None  # its tasks fail one by one instead


@pytest.mark.parametrize("urgent", ["submit", "map"])
def test_an_urgent_run_that_may_not_be_prefetched_is_not_overtaken(urgent: str) -> None:
    s = make_scheduler(1, sizing=FIVE_MS)
    low, fast = s.handlers.get(abs), s.handlers.get(len)
    measure(low, 1 * MS)
    submit(s, low, 20)
    first = sends(s.dispatch(0.0))[0]
    complete(s, first)  # the worker holds one batch (5 ms): room for a prefetch of measured work
    if urgent == "map":
        s.add_feed(FakeFeed(fast, range(10), priority=5))
    else:
        submit(s, fast, 1, priority=5)
    assert brief(s.dispatch(0.0)) == []  # nothing of priority 0 goes ahead of it


# --- rate limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "per_s"), [("100/s", 100.0), ("20/m", 20 / 60), (" 500 / h ", 500 / 3600), (2.5, 2.5), ("0.5/s", 0.5)]
)
def test_rates_parse(rate: str | float, per_s: float) -> None:
    assert parse_rate(rate) == pytest.approx(per_s)


@pytest.mark.parametrize("rate", ["100", "10/d", "fast", "-1/s", "0/s", 0, -3.0, float("nan"), float("inf"), True])
def test_a_malformed_rate_names_itself(rate: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(rate)  # type: ignore[arg-type]


def test_a_bucket_lets_a_seconds_worth_go_then_spaces_the_rest() -> None:
    b = Bucket(4.0)
    assert b.available(0.0) == 4
    b.spend(4)
    assert b.available(0.0) == 0 and b.due(0.0) == pytest.approx(0.25)
    assert b.available(0.25) == 1
    assert b.available(100.0) == 4  # never more than the burst


def run_with_rates(s: Scheduler, front: Front, step: float = 0.1) -> list[tuple[float, Batch]]:
    """Dispatch until idle; a worker finishes one batch per `step` seconds; between
    batches the clock jumps to the scheduler's next deadline (a token)."""
    sent: list[tuple[float, Batch]] = []
    now = 0.0
    while not s.idle() and now < 30:
        batches = sends(front.apply(s.dispatch(now)))
        sent += [(now, b) for b in batches]
        if batches:
            now += step
            for b in batches:
                front.apply(complete(s, b, now))
            continue
        due = s.next_due()
        assert due is not None and due > now, "work waits, but no deadline wakes the scheduler"
        now = due
    return sent


def test_a_throttled_run_holds_no_worker_and_priorities_hold_among_the_rest() -> None:
    """5 urgent tasks limited to 2/s ahead of 3 plain ones, on one worker: the burst goes
    first, the plain ones fill the gap (the urgent ones hold no worker meanwhile), then the
    urgent ones go as their tokens come, in their order."""
    s = make_scheduler(workers=1)
    front = Front(s)
    h = s.handlers.get(len)
    measure(h, 200 * MS)  # long tasks: one per batch
    bucket = Bucket(2.0)
    urgent = [make_run(s, h, [i], priority=9, bucket=bucket) for i in range(5)]
    plain = [make_run(s, h, [i], priority=0) for i in range(3)]
    for r in urgent + plain:
        s.accept(r, 0.0)
    sent = run_with_rates(s, front)
    order = [i for _, b in sent for i in ids_of(b)]
    u, p = [r.first_id for r in urgent], [r.first_id for r in plain]
    assert order == u[:2] + p + u[2:], order
    times = {ids_of(b)[0]: t for t, b in sent}
    assert [times[i] for i in u[2:]] == pytest.approx([0.5, 1.0, 1.5])  # 2 a second after the burst
    assert s.queue.throttles > 0
    balanced_at_rest(s)


def test_a_throttled_map_is_cut_no_faster_than_its_rate() -> None:
    s = make_scheduler(workers=2)
    front = Front(s)
    h = s.handlers.get(len)
    feed = FakeFeed(h, range(10), bucket=Bucket(4.0), limit=100)
    s.add_feed(feed)
    sent = run_with_rates(s, front, step=0.01)
    assert sum(b.count for _, b in sent) == 10
    done = 0
    for t, b in sent:
        done += b.count
        assert done <= 4 + 4 * t + 1e-9, f"{done} cut by {t:.2f} s at 4/s with a burst of 4"
    assert sent[-1][0] >= (10 - 4) / 4 - 1e-9
    assert s.queue.throttles > 0
    balanced_at_rest(s)


def test_many_throttled_runs_are_not_held_again_at_every_token() -> None:
    """200 submits at 10/s: each token lets one run back, not all 200 to be held again."""
    s = make_scheduler(workers=2)
    front = Front(s)
    h = s.handlers.get(len)
    measure(h, 50 * MS)
    bucket = Bucket(10.0)
    for i in range(200):
        s.accept(make_run(s, h, [i], bucket=bucket), 0.0)
    sent = run_with_rates(s, front, step=0.01)
    assert sum(b.count for _, b in sent) == 200
    assert s.queue.throttles <= 400, f"{s.queue.throttles} holds for 200 tasks"
    balanced_at_rest(s)


def test_a_throttled_urgent_submit_does_not_keep_a_map_waiting() -> None:
    """An urgent submit limited to 1/s on top of the heap, a plain map beside it, one worker:
    the map runs while the submit waits for its token, the worker is never idle meanwhile."""
    s = make_scheduler(workers=1)
    front = Front(s)
    h = s.handlers.get(len)
    measure(h, 100 * MS)
    bucket = Bucket(1.0)
    for i in range(3):
        s.accept(make_run(s, h, [i], priority=9, bucket=bucket), 0.0)
    feed = FakeFeed(h, range(20), limit=100)
    s.add_feed(feed)
    sent = run_with_rates(s, front, step=0.1)
    first_of_map = min(t for t, b in sent if b.segments[0][0] in feed.runs)
    assert first_of_map <= 0.2, f"the map's first batch went at {first_of_map:.2f} s"
    balanced_at_rest(s)


def test_no_deadline_in_the_past_once_no_worker_takes_work() -> None:
    """A throttled map passed over by one worker; then no worker takes work (the one that got
    the token is busy, the other retired): the scheduler must not ask to be woken at a moment
    already past (the manager would spin)."""
    s = make_scheduler(workers=2, max_tasks_per_worker=1)
    front = Front(s)
    h = s.handlers.get(len)
    feed = FakeFeed(h, range(10), bucket=Bucket(1.0), limit=100)
    s.add_feed(feed)
    assert len(sends(front.apply(s.dispatch(0.0)))) == 1  # one token: the other worker waits
    assert s.next_due() == pytest.approx(1.0)
    s.retire(1, recycle=False)
    front.apply(s.dispatch(5.0))
    due = s.next_due()
    assert due is None or due > 5.0, due
