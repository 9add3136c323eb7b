"""``bastion integrity | optimize | stats | cleanup | reset``: maintenance of the database.

The library is imported when a command runs, not when ``bastion`` starts: every other
command, and ``--help``, would pay for it.

Exit codes: 0 done (``integrity``: no problem found); 1 failed, or ``integrity`` found a
problem; 2 bad usage or configuration (an unknown ``--table``, a reset not confirmed).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from bastion.cli._maintenance_run import (
    DatabaseUrlOption,
    JsonOption,
    TablesOption,
    console,
    print_json,
    with_database,
)
from bastion.cli._run import EXIT_CONFIGURATION, EXIT_FAILURE, fail
from bastion.database import Database

__all__ = ["cleanup", "integrity", "optimize_command", "register", "reset", "stats"]

PANEL = "Maintenance"


def register(app: typer.Typer) -> None:
    """Add the maintenance commands to the root ``bastion`` app."""
    app.command(rich_help_panel=PANEL)(integrity)
    app.command("optimize", rich_help_panel=PANEL)(optimize_command)
    app.command(rich_help_panel=PANEL)(stats)
    app.command(rich_help_panel=PANEL)(cleanup)
    app.command(rich_help_panel=PANEL)(reset)


def integrity(
    database_url: DatabaseUrlOption = None,
    install_amcheck: Annotated[
        bool,
        typer.Option(
            "--install-amcheck",
            help="PostgreSQL: CREATE EXTENSION amcheck first if missing (needs the right to).",
        ),
    ] = False,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="SQLite: quick_check (no index-to-table comparison; much faster)."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check the database's integrity; exit 1 if a problem is found.

    SQLite: integrity_check and foreign_key_check. PostgreSQL: invalid indexes, amcheck on
    every B-tree index (when installed) and rows whose foreign-key parent is missing.
    """
    from bastion.maintenance import check_integrity

    report = with_database(
        database_url, lambda db: check_integrity(db, install_amcheck=install_amcheck, quick=quick)
    )
    if as_json:
        print_json(report.to_dict())
    else:
        out = console()
        verdict = "[green]ok[/]" if report.ok else "[bold red]problems found[/]"
        out.print(f"integrity ({report.backend}, {', '.join(report.checks)}): {verdict}")
        if report.problems:
            table = Table("severity", "check", "table", "detail")
            for problem in report.problems:
                table.add_row(problem.severity, problem.check, problem.table or "", problem.detail)
            out.print(table)
    raise typer.Exit(0 if report.ok else EXIT_FAILURE)


def optimize_command(
    database_url: DatabaseUrlOption = None,
    vacuum: Annotated[
        bool,
        typer.Option(
            "--vacuum",
            help="Also rewrite to reclaim space: SQLite VACUUM (the whole file), PostgreSQL "
            "VACUUM FULL (locks each table while it runs).",
        ),
    ] = False,
    tables: TablesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Refresh the planner's statistics (ANALYZE, PRAGMA optimize, VACUUM ANALYZE)."""
    from bastion.maintenance import optimize

    result = with_database(database_url, lambda db: optimize(db, vacuum=vacuum, tables=tables))
    if as_json:
        print_json(result.to_dict())
        return
    out = console()
    for statement in result.statements:
        out.print(f"  {statement}")
    out.print(f"optimized in {result.duration_s:.2f}s")


def stats(
    database_url: DatabaseUrlOption = None,
    exact_below: Annotated[
        int,
        typer.Option(
            min=0, help="Count rows exactly below this many; above, use the catalog's estimate."
        ),
    ] = 100_000,
    as_json: JsonOption = False,
) -> None:
    """Show rows, size, dead rows, last vacuum/analyze and index use per table."""
    from bastion.maintenance import collect_stats

    result = with_database(database_url, lambda db: collect_stats(db, exact_below=exact_below))
    if as_json:
        print_json(result.to_dict())
        return
    out = console()
    size = "?" if result.size_bytes is None else _bytes(result.size_bytes)
    out.print(f"{result.backend} database: {size} ({result.size_source})")
    postgres = result.backend == "postgresql"
    tables = Table("table", "rows", "size")
    indexes = Table("index", "table", "size")
    if postgres:  # SQLite keeps no dead-row, vacuum or index-use statistics
        for column in ("dead rows", "last vacuum", "last analyze"):
            tables.add_column(column)
        indexes.add_column("scans")
    for entry in result.tables:
        row = [
            entry.name,
            f"~{entry.rows:,}" if entry.rows_estimated else f"{entry.rows:,}",
            _bytes(entry.size_bytes) if entry.size_bytes is not None else "",
        ]
        if postgres:
            row += [
                f"{entry.dead_rows or 0:,}",
                _when(entry.last_vacuum),
                _when(entry.last_analyze),
            ]
        tables.add_row(*row)
        for index in entry.indexes:
            cells = [index.name, entry.name]
            cells.append(_bytes(index.size_bytes) if index.size_bytes is not None else "")
            if postgres:
                cells.append(f"{index.scans or 0:,}")
            indexes.add_row(*cells)
    out.print(tables)
    out.print(indexes)
    out.print("~ marks an estimate from the catalog (see --exact-below)")


def cleanup(
    days_old: Annotated[
        int,
        typer.Option(
            "--days-old", min=0, help="Purge rows soft-deleted more than this many days ago."
        ),
    ],
    database_url: DatabaseUrlOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be purged; delete nothing.")
    ] = False,
    tables: TablesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Purge rows whose deleted_at is older than --days-old days (children by CASCADE)."""
    from bastion.maintenance import purge_soft_deleted

    counts = with_database(
        database_url,
        lambda db: purge_soft_deleted(db, days_old, tables=tables, dry_run=dry_run),
    )
    if as_json:
        print_json({"days_old": days_old, "dry_run": dry_run, "rows": counts})
        return
    verb = "would purge" if dry_run else "purged"
    if not counts:
        console().print("no table has a deleted_at column: nothing to purge")
    for name, count in counts.items():
        console().print(f"{name}: {verb} {count:,} row(s)")


def reset(
    yes: Annotated[
        bool, typer.Option("--yes", help="Yes, delete every row of every table.")
    ] = False,
    confirm: Annotated[
        str | None,
        typer.Option(
            "--confirm",
            help="The database's name (file name on SQLite), instead of typing it when asked.",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete ALL data (every row of every table; the schema stays). Needs --yes and the name."""
    from bastion.cli._cache import clear_service_cache
    from bastion.maintenance import database_name, reset_database

    if not yes:
        fail("usage error: reset deletes every row of every table; pass --yes", EXIT_CONFIGURATION)

    async def run(database: Database) -> dict[str, int]:
        name = confirm
        if name is None:
            name = typer.prompt(
                f"Type the database name ({database_name(database)}) to confirm", err=True
            )
        return await reset_database(database, confirm=name)

    counts = with_database(database_url, run)
    clear_service_cache()
    if as_json:
        print_json({"rows": counts})
        return
    for name, count in counts.items():
        console().print(f"{name}: deleted {count:,} row(s)")


def _bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _when(moment: object) -> str:
    return "" if moment is None else str(moment)[:19]
