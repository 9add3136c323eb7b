"""``bastion export DIR`` and ``bastion import DIR``: the database as JSON Lines, and back.

An export from one backend imports into the other (SQLite → PostgreSQL is the usual move).
Progress bars go to stderr, so ``--json`` output on stdout stays parseable. The library and
Rich's progress module are imported when a command runs, not when ``bastion`` starts.

Exit codes: 0 done; 1 failed (a malformed export, a non-empty target without ``--replace``,
another schema revision — nothing was written); 2 bad usage or configuration.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Self

import typer

from bastion.cli._maintenance_run import (
    DatabaseUrlOption,
    JsonOption,
    TablesOption,
    console,
    print_json,
    with_database,
)

if TYPE_CHECKING:
    from rich.progress import TaskID

__all__ = ["export", "import_", "register"]

PANEL = "Move data"


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``import`` to the root ``bastion`` app."""
    app.command(rich_help_panel=PANEL)(export)
    app.command("import", rich_help_panel=PANEL)(import_)


def export(
    directory: Annotated[
        Path, typer.Argument(help="New or empty directory to write the files into.")
    ],
    database_url: DatabaseUrlOption = None,
    tables: TablesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export every table as JSON Lines (one file per table) plus manifest.json."""
    from bastion.maintenance import export_database

    with TableProgress() as progress:
        manifest = with_database(
            database_url,
            lambda db: export_database(db, directory, tables=tables, progress=progress),
        )
    if as_json:
        print_json({"directory": str(directory), **manifest.model_dump(mode="json")})
        return
    rows = sum(table.rows for table in manifest.tables)
    console().print(
        f"exported {len(manifest.tables)} table(s), {rows:,} row(s) to {directory} "
        f"(schema revision {', '.join(manifest.schema_revision) or 'none'})"
    )


def import_(
    directory: Annotated[
        Path,
        typer.Argument(help="Directory written by `bastion export`.", exists=True, file_okay=False),
    ],
    database_url: DatabaseUrlOption = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Delete every row of the target first, in the same transaction (needs an export "
            "of every table).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Import an export into an empty database at the same schema revision: all or nothing."""
    from bastion.cli._cache import clear_service_cache
    from bastion.maintenance import import_database

    with TableProgress() as progress:
        result = with_database(
            database_url,
            lambda db: import_database(db, directory, replace=replace, progress=progress),
        )
    clear_service_cache()
    if as_json:
        print_json(result.to_dict())
        return
    rows = sum(result.tables.values())
    replaced = " (replacing the previous content)" if result.replaced else ""
    console().print(f"imported {len(result.tables)} table(s), {rows:,} row(s){replaced}")


class TableProgress:
    """A Rich progress bar per table and phase, on stderr (a maintenance ``Progress``)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console(stderr=True),
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Self:
        self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._bars.stop()

    def start(self, phase: str, table: str, rows: int) -> None:
        self._task = self._bars.add_task(f"{phase} {table}", total=rows)

    def advance(self, rows: int) -> None:
        if self._task is not None:
            self._bars.advance(self._task, rows)
