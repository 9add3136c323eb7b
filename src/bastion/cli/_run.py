"""Running a Typer app with Bastion's error → exit-code contract."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from bastion.errors import BastionError, ConfigurationError

__all__ = ["EXIT_CONFIGURATION", "EXIT_FAILURE", "fail", "run_cli"]

EXIT_FAILURE = 1
EXIT_CONFIGURATION = 2


def run_cli(app: typer.Typer) -> None:
    """Run ``app``; a Bastion error becomes one line on stderr and its exit code."""
    try:
        app(standalone_mode=True)
    except ConfigurationError as exc:
        fail(f"configuration error: {exc.message}", EXIT_CONFIGURATION)
    except BastionError as exc:
        fail(f"error: {exc.message}", EXIT_FAILURE)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``message`` on stderr and exit with ``code``."""
    print(message, file=sys.stderr)
    raise SystemExit(code)
