"""The local backend: worker processes on this machine and a collector process.

This is the one diagram of how the pool's processes are wired; every other
module points here.

::

    parent process                             worker processes (N)          collector process
    ──────────────                             ────────────────────          ─────────────────
    submit()/map() ──► scheduler queue          loop: recv RunBatch,
      (priority, arrival), bounded by             run handler per item,      reads every worker's socket
      `capacity`; backpressure                    write marker per item,     (token first, then frames);
      (procqueue/_core.py, _scheduler/)           send BatchDone ──────────► forwards each outcome as bytes,
                                                  (own socket pair each) ──► never unpickled; counts what
    manager thread (manager.py, one selector loop):                          it forwarded; with a FileOutput
      Send ── own pipe per worker ──►                                        (procqueue run): values to the
      (~40 ms of work queued per worker,                                     output file (_file_writer.py)
       so priority holds at dispatch)                                              │
                                                                                   │
      results ◄──── BatchResult + the worker's value bytes, WorkerGone ◄───────────┘
      each becomes a scheduler event; the scheduler judges each failed attempt
        (retry after backoff, final, requeue uncharged) and keeps the books
      deaths (pidfds): a dead worker ──► WorkerLost ──► collector reads what it left ──► charge or not
      deadlines: task timeouts and stalled workers (kill), retry backoffs, respawns
      Resolve / Fail settle futures and map chunks, values still pickled; callbacks to the runner thread
      the collector's death (collector_watch.py): another collector, fresh workers, in-flight work
        again (uncharged)

Who does what:

- user threads: submit into the scheduler under the pool's lock
  (`procqueue/_core.py`), wait on its condition for room (backpressure
  "block") or for map chunks, and unpickle the values and errors they read
  (`procqueue/_results.py`), so user code in a result costs only its reader.
- the scheduler (`procqueue/_scheduler/`): every decision, no I/O. It gets
  events and returns instructions: send this batch to that worker, retire,
  kill or start one, settle these tasks, the pool is broken.
- manager thread (`manager.py`): owns the selector, every write to a task
  pipe, the outbox to the collector (`collector_link.py`) and every read of
  the results pipe (`collector_watch.py`); the supervisor (`supervisor.py`)
  starts, feeds, reads the markers of and reaps the workers. It sleeps in one
  `select()` until the nearest deadline, never a fixed tick, and runs no user
  code: pickling a batch (`__reduce__`) happens without the lock, and
  done-callbacks go to the callback runner (`procqueue/_callbacks.py`).
- workers (`worker.py`): each reads only its own pipe and writes only its
  own socket, so a worker killed mid-write tears nothing another process
  reads, and no lock is shared: there is no shared queue to poison (the
  failure mode of `multiprocessing.Queue`, pebble issue 163).
- collector (`collector.py`): forwards; decides nothing, so killing it loses
  no decision and no count.
- fork server and resource tracker (multiprocessing's own, under the default
  forkserver start method): every worker and collector is forked from the
  server. `fork_server.py` forks both from the parent while it has a single
  thread, instead of exec'ing fresh interpreters (most of a cold start).

No process listens: every channel is a pipe or a socket pair made here and
handed down; a worker's socket reaches the collector as a descriptor over the
links socket. Messages and framing: `procqueue/_protocol/`. See README's
Security section for the threat model.
"""
