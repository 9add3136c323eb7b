"""What the maintenance commands share: the database option, one Database per command, output.

The database comes from ``DATABASE_URL`` (environment or ``.env``) unless ``--database-url``
names another; the option is for one-off moves (export here, import there), since a URL with a
password on a command line is visible to other users of the machine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from bastion.cli._run import EXIT_CONFIGURATION, fail
from bastion.database import Database
from bastion.settings import load_settings

__all__ = [
    "DatabaseUrlOption",
    "JsonOption",
    "TablesOption",
    "console",
    "print_json",
    "with_database",
]

T = TypeVar("T")

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Database to work on instead of DATABASE_URL (visible in the process list: "
        "prefer the environment when it holds a password).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON (for scripts).")]
TablesOption = Annotated[
    list[str] | None,
    typer.Option("--table", "-t", help="Only this table (repeat for more).", show_default=False),
]


def with_database(database_url: str | None, operation: Callable[[Database], Awaitable[T]]) -> T:
    """Start a Database (from the environment or ``database_url``), run ``operation``, close.

    A table name the database does not have, or a missing confirmation, is bad usage: exit 2.
    """
    # Imported when a command runs, so `bastion --help` and other commands start faster.
    from bastion.errors import ConfirmationRequiredError
    from bastion.maintenance.errors import UnknownTableError

    overrides: dict[str, Any] = {} if database_url is None else {"DATABASE_URL": database_url}
    settings = load_settings(**overrides)

    async def run() -> T:
        async with Database(settings) as database:
            return await operation(database)

    try:
        return asyncio.run(run())
    except (UnknownTableError, ConfirmationRequiredError) as exc:
        fail(f"usage error: {exc.message}", EXIT_CONFIGURATION)


def console(*, stderr: bool = False) -> Console:
    """A Rich console that leaves markup-looking data alone and does not wrap JSON."""
    return Console(highlight=False, soft_wrap=True, stderr=stderr)


def print_json(document: Any) -> None:
    """Print ``document`` as indented JSON on stdout (datetimes as ISO-8601)."""
    typer.echo(json.dumps(document, indent=2, default=str))
