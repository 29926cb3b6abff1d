"""The Dask backend: the same pool on a Dask distributed cluster.

procqueue's scheduler (`procqueue/_scheduler/`) keeps every decision, exactly
as with local processes: priorities, batch sizes, retries and their backoff,
attempts, timeouts, crash attribution, the books. Dask only runs attempts:

::

    parent process                                   Dask cluster
    ──────────────                                   ────────────
    submit()/map() ──► scheduler queue (priority)
    loop thread (loop.py):
      Send ── client.submit(run_batch, key=pq-<secret>-<id>,
              pure=False, retries=0, pinned to the seat's worker) ──► worker: run_batch (task.py)
      events ◄── future done: BatchResult + pickled values ◄──────── (never raises)
              ◄── KilledWorker: the seat's worker died ◄──────────── nanny restarts it
              ◄── "pq-start" topic: a batch began (plugin.py) ◄───── worker plugin
      deadlines: task timeouts ──► the worker is killed through its nanny

A seat is one thread of one Dask worker (by the worker's name, which survives
a nanny's restart). A seat holds two batches, the second chained after the
first as a Dask dependency, so Dask never runs two of a seat's batches at once
and the batch its `KilledWorker` names is the one that ran. Dask cannot say
which item of a batch runs, so timed tasks travel one per batch, and a batch
of several whose worker died runs again in halves, then item by item,
uncharged, until the item that kills its worker alone is charged.
Dask's own retries are off (the scheduler's `allowed-failures` is set to 0),
so a death is one attempt, retried by procqueue with its backoff.
"""
