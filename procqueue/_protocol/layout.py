"""Numbers the pool's processes agree on: shared-memory layouts, exit codes,
cache sizes. The parent and the worker/collector both import them from here,
so neither side imports the other's module for a constant."""

from __future__ import annotations

import struct

# The worker's marker: MARK_WORDS words per worker in one shared array.
MARK_WORDS = 3  # batch id + 1 (0: idle), item index, start (perf_counter_ns)
UNMARKED = -1  # index: inside a batch of tiny tasks, run without marking each item
LOADING = -2  # index: unpickling the batch's handler or arguments

HANDLER_CACHE = 256  # handlers a worker keeps (LRU); the parent mirrors it to know what a worker holds

# A worker's exit codes that mean something to the parent.
EXIT_INIT_FAILED = 3  # the initializer raised
EXIT_ORPHANED = 4  # it lost its collector (not its task's fault)
EXIT_UNGUARDED_MAIN = 5  # a child re-ran an unguarded main script and reached Pool()

# The collector's shared counters.
FORWARDED, WRITTEN = range(2)  # attempts forwarded; records a FileOutput wrote
COUNTERS = 2

LINK = struct.Struct("!qq")  # a links datagram to the collector: slot, pid; the descriptor rides along

# Large buffers (`procqueue/_local/shm.py`): shared memory instead of the pipes.
SHM_MIN = 1 << 20  # bytes: smaller buffers cost less through a pipe than a memfd's set-up
IN_SHM = 1 << 63  # in a frame's buffer table: this buffer is a segment, not in the body
