"""The `procqueue` command line."""

from __future__ import annotations

import sys
import tempfile
import time

import click

from ._demo import count_primes
from ._pool import Pool


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="procqueue")
def main() -> None:
    """procqueue: a crash-proof, bounded, prioritised process pool."""


@main.command()
@click.option(
    "--blocks", default=300, show_default=True, help="How many blocks of 10,000 integers to search for primes."
)
@click.option("--workers", type=int, default=None, help="Worker processes (default: usable CPUs).")
def demo(blocks: int, workers: int | None) -> None:
    """Count primes below BLOCKS*10,000 on all cores, with a live view.

    A few blocks fail on their first attempt on purpose and are retried.

    Example: procqueue demo --blocks 200
    """
    t0 = time.perf_counter()
    total = 0
    with Pool(workers=workers, max_retries=2, backoff=0.05) as pool:
        click.echo(f"procqueue demo: {blocks} blocks on {pool.workers} workers", err=True)
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
    sys.exit(0 if stats.failed == 0 else 1)


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
