"""The exception an attempt's failure becomes: what a worker reported
(`ErrorInfo`) or how its worker ended. Built lazily, in the thread that asks
for it, since unpickling a handler's exception runs user code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from procqueue._errors import SerializationError, TaskFailed, TaskTimeout, WorkerCrashed, describe_exitcode
from procqueue._protocol import messages as m
from procqueue._protocol.pickling import loads, pack_exception


def remote_error(info: m.ErrorInfo, task_id: int, attempts: int, pid: int, materialize: bool = True) -> BaseException:
    """Rebuild what a worker reported for one failed attempt as the exception to raise
    (in the thread that asks for it: unpickling the exception runs user code). With
    `materialize=False` the exception is not unpickled: a `TaskFailed` stands for it,
    its `type_name` naming the handler's exception type."""
    fault = info.fault
    if fault in (m.Fault.RAISED, m.Fault.REJECTED):
        exc: BaseException | None = None
        if info.blob is not None and materialize:
            try:
                exc = loads(info.blob)
            except BaseException:  # an exception whose unpickling raises (even SystemExit)
                exc = None
            if exc is not None and not isinstance(exc, BaseException):
                exc = None
        lost = exc is None and materialize
        note = " (the exception itself could not be sent back: it does not pickle or unpickle)" if lost else ""
        failed = TaskFailed(
            f"task {task_id} raised {info.type_name}: {info.message} "
            f"(attempt {attempts}, worker pid {pid}){note}\n\nRemote traceback:\n{info.traceback}",
            task_id=task_id,
            attempts=attempts,
            exception=exc,
            remote_traceback=info.traceback,
            type_name=info.type_name,
            remote_message=info.message,
        )
        if exc is None:
            return failed
        try:
            exc.__cause__ = failed
        except BaseException:  # a type that will not take a cause: the TaskFailed carries it
            return failed
        return exc
    stage, advice = {
        m.Fault.RESULT_PICKLE: ("result", "return a value plain pickle or cloudpickle can handle"),
        m.Fault.ARGS_UNPICKLE: ("argument", "make sure the worker can import what the arguments refer to"),
        m.Fault.HANDLER_UNPICKLE: ("handler", "make sure the worker can import the handler's module"),
    }[m.Fault(fault)]
    text = info.message
    name = (info.type_name or "").removeprefix("builtins.")
    if name and name not in ("SerializationError", "procqueue.SerializationError") and not text.startswith(name):
        text = f"{name}: {text}"  # "SystemExit: 9", not a bare "9"
    return SerializationError(
        f"task {task_id}: {text} (in worker pid {pid}); {advice}",
        stage=stage,
        what=info.type_name,
        task_id=task_id,
    )


def crash_error(
    fault: int,
    task_id: int,
    attempts: int,
    pid: int,
    exitcode: int | None,
    timeout: float | None,
    fault_text: str,
    forwarded: bool = False,
) -> BaseException:
    """The error for an attempt that ended with its worker: a crash or a timeout.
    `forwarded`: it ended while unpickling a batch of values a pipeline's stage
    before made (`relay.py`), which is charged, and retried, whole."""
    whole = (
        "; it was unpickling the values the stage before made, which load together and cannot be told "
        "apart, so every task of that batch was charged this attempt (and retried, within its retry budget, "
        "as one batch): one of the values may kill or hang the process that unpickles it"
        if forwarded
        else ""
    )
    if fault == m.Fault.TIMED_OUT:
        return TaskTimeout(
            f"task {task_id} ran past its timeout of {timeout} s (attempt {attempts}); its worker pid {pid} "
            f"was killed{whole}",
            task_id=task_id,
            attempts=attempts,
            timeout=timeout,
            pid=pid,
        )
    sig = -exitcode if exitcode is not None and exitcode < 0 else None
    advice = (
        f"{whole}."
        if forwarded
        else ". A signal from outside, a crash in C code (segfault), os._exit or running out of memory does "
        "this; a retry budget (retries=) lets the task run again."
    )
    text = f"worker pid {pid} died with {describe_exitcode(exitcode)} while running task {task_id} (attempt {attempts}){advice}"
    if fault_text.strip():
        text += f"\n\nfaulthandler in the worker wrote:\n{fault_text.strip()}"
    return WorkerCrashed(
        text, task_id=task_id, attempts=attempts, pid=pid, exitcode=exitcode, signal=sig, fault_traceback=fault_text
    )


def fault_of(exc: BaseException) -> m.Fault:
    """RAISED, or REJECTED for an error its class marks final (`procqueue_final = True`);
    ARGS_UNPICKLE for a forwarded value that did not unpickle (`relay.unforwardable`)."""
    if type(exc) is SerializationError and exc.__dict__.get("unforwardable") is True:
        return m.Fault.ARGS_UNPICKLE
    try:
        final = getattr(exc, "procqueue_final", False) is True
    except BaseException:  # a hostile __getattr__: an ordinary failure
        final = False
    return m.Fault.REJECTED if final else m.Fault.RAISED


def call_item(fn: Callable[..., Any], call: m.Call, item: Any, i: int, errors: list[m.ErrorInfo]) -> Any:
    """Item `i` of a batch, called as `call` says (on a worker, local or Dask). Whatever
    it raises, even SystemExit, is its outcome: an `ErrorInfo` in `errors`, and None."""
    try:
        if call is m.Call.ONE:
            return fn(item)
        if call is m.Call.STAR:
            return fn(*item)
        return fn(*item[0], **item[1])
    except BaseException as exc:
        errors.append(m.ErrorInfo(i, fault_of(exc), *pack_exception(exc)))
        return None
