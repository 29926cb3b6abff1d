"""The `procqueue` command line."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, ClassVar

import click

from procqueue._cli.demo import count_primes
from procqueue._pool import Pool


def _backend_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--backend and --address, for the commands that start a pool."""
    fn = click.option(
        "--address",
        metavar="URL",
        help="With --backend dask: the scheduler, e.g. tcp://host:8786 (default: a local cluster).",
    )(fn)
    return click.option(
        "--backend", type=click.Choice(["local", "dask"]), default="local", show_default=True,
        help="What runs the tasks: processes here, or a Dask cluster (pip install 'procqueue[dask]').",
    )(fn)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="procqueue")
def main() -> None:
    """procqueue: a crash-proof, bounded, prioritised process pool.

    \b
    Examples:
      procqueue demo                                          # a CPU-heavy batch on all cores, live
      procqueue run mymodule:handle -i in.jsonl -o out.jsonl  # your handler over a file of records
      procqueue bench --quick                                 # procqueue against the other pools
    """


@main.command()
@click.option(
    "--blocks",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="How many blocks of 10,000 integers to search for primes.",
)
@_backend_options
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes (default: usable CPUs).")
def demo(blocks: int, workers: int | None, backend: str, address: str | None) -> None:
    """Count primes below BLOCKS*10,000 on all cores, with a live view.

    A few blocks fail on their first attempt on purpose and are retried.

    Example: procqueue demo --blocks 200
    """
    t0 = time.perf_counter()
    total = 0
    if address is not None and backend != "dask":
        raise click.UsageError("--address needs --backend dask")
    where = {"backend": backend, "address": address} if backend == "dask" else {}
    with Pool(workers=workers, max_retries=2, backoff=0.05, **where) as pool:  # type: ignore[arg-type]
        on = "Dask worker threads" if backend == "dask" else "workers"
        click.echo(f"procqueue demo: {blocks} blocks on {pool.workers} {on}", err=True)
        busy_ms = 0.0
        with tempfile.TemporaryDirectory(prefix="procqueue-demo-") as flaky, pool.live(total=blocks, title="demo"):
            futures = [pool.submit(count_primes, b, flaky) for b in range(blocks)]
            for fut in futures:
                total += fut.result()[1]
                busy_ms += fut.duration_ms or 0.0
        stats = pool.stats()
    wall = time.perf_counter() - t0
    click.echo(
        f"{total} primes below {blocks * 10_000:,} in {wall:.2f} s; "
        f"{stats.completed} tasks done, {stats.retried} retried after injected failures, {stats.failed} failed; "
        f"on average {busy_ms / 1000 / wall:.2f} tasks ran at once"
    )
    click.echo(
        "Next: crunch a file of your own records, restartably:\n"
        "  procqueue run mymodule:handle -i records.jsonl -o out.jsonl   (see: procqueue run --help)\n"
        "or measure procqueue against the other pools on this machine:\n"
        "  procqueue bench --quick"
    )
    sys.exit(0 if stats.failed == 0 else 1)


class _Size(click.ParamType):  # type: ignore[type-arg]
    """A memory size: 2GB, 512M, 1.5GiB or plain bytes (K, M, G, T are powers of 1024)."""

    name = "SIZE"
    _UNITS: ClassVar[dict[str, int]] = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in "KMGT" else ""
        try:
            size = int(float(text[: len(text) - len(unit)]) * self._UNITS[unit])
        except (ValueError, OverflowError):
            self.fail(f"{value!r} is not a size; write it like 2GB, 512MB or 1073741824", param, ctx)
        if size <= 0:
            self.fail(f"{value!r} must be more than 0 bytes", param, ctx)
        return size


class _Counts(click.ParamType):  # type: ignore[type-arg]
    """Worker counts: N, or N,N,... one per stage."""

    name = "N[,N...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        counts = []
        for part in str(value).split(","):
            try:
                n = int(part.strip())
            except ValueError:
                self.fail(f"{part.strip()!r} is not a number of workers; give N, or N,N,... one per stage", param, ctx)
            if n < 1:
                self.fail(f"{n} is not in the range x>=1.", param, ctx)
            counts.append(n)
        return tuple(counts)


_RUN_EPILOG = """\b
Examples:
  procqueue run mymodule:handle -i records.jsonl -o out.jsonl
  procqueue run jobs:decode jobs:score jobs:write -i in.jsonl -o out.jsonl --workers 2,4,1   # 3 stages
  procqueue run mymodule:handle -i records.jsonl -o out.jsonl --resume   # after a kill: finish it
  procqueue run jobs/score.py:score --format csv -i rows.csv -o out.jsonl --errors failed.jsonl
  cat names.txt | procqueue run mymodule:greet --format lines > out.jsonl

\b
Each output line is {"line": N, "id": ..., "ok": true, "value": ...} or
{"line": N, "id": ..., "ok": false, "error": {"type", "message", "traceback", "attempts"}};
with several stages the error also has "stage": {"index": K, "function": NAME}, where
the record failed (K from 0).
Exit status: 0 every record ok, 1 some failed or the run stopped early (resume it),
2 usage error, 130 Ctrl-C, 143 SIGTERM, 141 stdout closed.
"""


@main.command(epilog=_RUN_EPILOG)
@click.argument("handlers", metavar="MODULE:FUNC...", nargs=-1, required=True)
@click.option("-i", "--input", "input_", metavar="FILE", help="Read records from FILE (default: stdin).")
@click.option("-o", "--output", metavar="FILE", help="Write one record per input to FILE (default: stdout).")
@click.option("--errors", metavar="FILE", help="Write the failed records here instead of to the output.")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv", "lines"]), default="jsonl", show_default=True,
    help="jsonl: a JSON value per line; csv: a dict per row, keys from the header; lines: a str per line.",
)  # fmt: skip
@click.option(
    "--workers", type=_Counts(),
    help="Worker processes (default: usable CPUs); with several stages, one number for all or one per stage: 2,4,1.",
)  # fmt: skip
@click.option(
    "--capacity", type=click.IntRange(min=1), default=1024, show_default=True,
    help="Tasks queued ahead (with several stages: waiting at each stage).",
)  # fmt: skip
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True, help="Retries per record.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=1e9), help="Seconds a record may run.")
@click.option("--priority-field", metavar="NAME", help="Run records with a larger integer in field NAME first.")
@click.option(
    "--ordered/--unordered", default=None,
    help="Write records in input order (the default), or as they finish (faster; default with --priority-field).",
)  # fmt: skip
@click.option("--chunksize", type=click.IntRange(min=1), help="Records per batch (default: sized automatically).")
@click.option("--max-tasks-per-worker", type=click.IntRange(min=1), help="Recycle a worker after N records.")
@click.option("--max-worker-memory", type=_Size(), help="Recycle a worker past this RSS, e.g. 2GB.")
@click.option("--initializer", metavar="MODULE:FUNC", help="Run once in each worker before its first record.")
@click.option("--resume", is_flag=True, help="Skip the records already in -o (and --errors); finish the rest.")
@click.option("--overwrite", is_flag=True, help="Start over, emptying -o and --errors first.")
@click.option(
    "--id-field", metavar="NAME", default="id", show_default=True, help="Copy this field of a record into its output."
)
@click.option("--live/--no-live", default=None, help="Show the live view on stderr (default: when it is a terminal).")
@_backend_options
def run(
    handlers: tuple[str, ...], input_: str | None, output: str | None, errors: str | None, fmt: str,
    workers: tuple[int, ...] | None,
    capacity: int, retries: int, timeout: float | None, priority_field: str | None, ordered: bool | None,
    chunksize: int | None, max_tasks_per_worker: int | None, max_worker_memory: int | None,
    initializer: str | None, resume: bool, overwrite: bool, id_field: str, live: bool | None, backend: str,
    address: str | None,
) -> None:  # fmt: skip
    """Run MODULE:FUNC (or path/to/file.py:FUNC) on every record of the input.

    FUNC gets one record (a dict for a JSON object or a CSV row) and returns a
    JSON-serialisable value. A bad input line, or a record whose handler
    raises, becomes an error record naming its line; the run goes on. Killed
    (even by SIGKILL), the same command with --resume finishes the job, with
    exactly one record per input.

    Several MODULE:FUNC chain stages, in order, each in worker processes of its
    own: the first gets the record, each next one the value of the one before,
    and the last one's value is the output. A record that fails at a stage
    ends there, with an error record naming the stage; the others go on.
    --workers takes a number per stage (2,4,1) or one for all; --retries,
    --timeout, --initializer, --chunksize, --max-tasks-per-worker and
    --max-worker-memory apply to every stage, each on its own (a record gets
    --retries at each stage). --priority-field takes a single MODULE:FUNC.
    """
    from procqueue._cli.records import UsageError
    from procqueue._cli.run import RunSettings
    from procqueue._cli.run import run as run_records

    if timeout is not None and timeout != timeout:
        raise click.BadParameter("must be a number of seconds, not nan", param_hint="--timeout")

    settings = RunSettings(
        handlers[0], None if input_ in (None, "-") else input_, None if output in (None, "-") else output, errors,
        fmt, None, capacity, retries, timeout, priority_field, ordered, chunksize, max_tasks_per_worker,
        max_worker_memory, initializer, resume, overwrite, id_field, live, backend, address,
    )  # fmt: skip
    try:
        if len(handlers) == 1:
            if workers is not None and len(workers) > 1:
                raise UsageError(
                    f"--workers {','.join(map(str, workers))} gives a number per stage, but there is one "
                    "MODULE:FUNC: give one number"
                )
            settings.workers = workers[0] if workers else None
            summary, status = run_records(settings)
        else:
            from procqueue._cli.chain import ChainSettings, run_chain, stage_workers

            summary, status = run_chain(ChainSettings(settings, list(handlers), stage_workers(workers, len(handlers))))
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(summary.report(), err=True)
    sys.exit(status)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Run the bench suite: procqueue against its peers (--help for its options).

    Example: procqueue bench --quick
    """
    try:
        from procqueue_bench.suite import main as suite
    except ImportError:
        raise click.ClickException(
            "the bench suite is not installed with this copy of procqueue; from a checkout, run: python -m bench"
        ) from None
    sys.exit(suite(list(args)))
