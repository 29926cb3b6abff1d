"""The `procqueue` command, written on the public API."""

from procqueue._cli.main import main

__all__ = ["main"]
