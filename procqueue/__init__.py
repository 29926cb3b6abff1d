"""procqueue: a crash-proof, bounded, prioritised process pool for CPU-heavy batches.

    import procqueue as pq

    with pq.Pool() as pool:
        for y in pool.map(fn, huge_iterable):
            ...

See README.md; the wiring of the processes is drawn in `procqueue/_local/__init__.py`.
"""

from typing import TYPE_CHECKING, Any

from procqueue._errors import (
    Dropped,
    InitializerFailed,
    PoolBroken,
    PoolClosed,
    PoolStartError,
    ProcQueueError,
    QueueFull,
    SerializationError,
    StageFailed,
    TaskFailed,
    TaskTimeout,
    WorkerCrashed,
)

if TYPE_CHECKING:
    from procqueue._monitor.sampler import Monitor
    from procqueue._monitor.view import LiveView
    from procqueue._output import FileOutput, OutputHandle, OutputStatus
    from procqueue._pipeline.pipeline import Pipeline
    from procqueue._pipeline.stage import Stage
    from procqueue._pool import Future, Options, Pool
    from procqueue._scheduler.states import TaskState
    from procqueue._stats import Stats, WorkerStats
    from procqueue._taskqueue import Result, Task, TaskQueue

# Loaded on first use (PEP 562), so `import procqueue` stays cheap, and so does the
# start of a worker or of the fork server, which import `procqueue._local.*`.
_LAZY = {
    "procqueue._monitor.sampler": ("Monitor",),
    "procqueue._monitor.view": ("LiveView",),
    "procqueue._output": ("FileOutput", "OutputHandle", "OutputStatus"),
    "procqueue._pool": ("Future", "Options", "Pool"),
    "procqueue._scheduler.states": ("TaskState",),
    "procqueue._stats": ("Stats", "WorkerStats"),
    "procqueue._taskqueue": ("Result", "Task", "TaskQueue"),
}
# Loaded apart, when first asked for: a Pool does not need them.
_APART = {
    "procqueue._pipeline.pipeline": ("Pipeline",),
    "procqueue._pipeline.stage": ("Stage",),
}
_HOME = {name for group in (_LAZY, _APART) for names in group.values() for name in names}


if not TYPE_CHECKING:  # mypy sees the names above, and still catches a misspelt one

    def __getattr__(name: str) -> Any:
        if name not in _HOME:
            raise AttributeError(f"module 'procqueue' has no attribute {name!r}")
        import importlib

        # All at once (a Pool needs most of them anyway), so every public class is named
        # `procqueue.X` from then on, whichever was asked for.
        apart = any(name in names for names in _APART.values())
        for module, names in (_APART if apart else _LAZY).items():
            loaded = importlib.import_module(module)
            for each in names:
                _publish(each, getattr(loaded, each))
        return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | _HOME)


def _publish(name: str, obj: Any) -> None:
    if isinstance(obj, type):
        obj.__module__ = "procqueue"  # as users spell it: pq.Pool, not procqueue._pool.Pool
    globals()[name] = obj


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
    "Pipeline",
    "Pool",
    "PoolBroken",
    "PoolClosed",
    "PoolStartError",
    "ProcQueueError",
    "QueueFull",
    "Result",
    "SerializationError",
    "Stage",
    "StageFailed",
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
    if _name in globals():  # the errors, loaded already
        _publish(_name, globals()[_name])
del _name
