"""procqueue: a crash-proof, bounded, prioritised process pool for CPU-heavy batches.

    import procqueue as pq

    with pq.Pool() as pool:
        for y in pool.map(fn, huge_iterable):
            ...

See README.md; the wiring of the processes is drawn in `procqueue/_local/__init__.py`.
"""

from procqueue._errors import (
    Dropped,
    InitializerFailed,
    PoolBroken,
    PoolClosed,
    PoolStartError,
    ProcQueueError,
    QueueFull,
    SerializationError,
    TaskFailed,
    TaskTimeout,
    WorkerCrashed,
)
from procqueue._monitor.sampler import Monitor
from procqueue._monitor.view import LiveView
from procqueue._output import FileOutput, OutputHandle, OutputStatus
from procqueue._pool import Future, Options, Pool
from procqueue._scheduler.states import TaskState
from procqueue._stats import Stats, WorkerStats
from procqueue._taskqueue import Result, Task, TaskQueue

__version__ = "0.1.0"

__all__ = [
    "Dropped",
    "FileOutput",
    "Future",
    "InitializerFailed",
    "LiveView",
    "Monitor",
    "Options",
    "OutputHandle",
    "OutputStatus",
    "Pool",
    "PoolBroken",
    "PoolClosed",
    "PoolStartError",
    "ProcQueueError",
    "QueueFull",
    "Result",
    "SerializationError",
    "Stats",
    "Task",
    "TaskFailed",
    "TaskQueue",
    "TaskState",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStats",
    "__version__",
]

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = "procqueue"
del _name, _obj
