"""``bastion backup``: create, list, verify, restore and prune backups.

Settings come from the environment (``DATABASE_URL``, ``BACKUP_DIR``, ``BACKUP_STORE_URL``,
``BACKUP_ENCRYPTION_KEY``, ``BACKUP_SIGNING_KEY``, ``BACKUP_RETENTION``…). Long work shows
Rich progress bars on a terminal and one plain line per step otherwise (logs, cron).
``--json`` prints one JSON document on stdout for scripts.

Exit codes: 0 done (``verify``: the backup passed every check); 1 the operation failed (a
backup that fails verification, a restore already running, an unreachable store or
database); 2 bad usage or configuration (a restore without ``--yes`` / ``--confirm ID``, a
missing encryption key).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from bastion.backup import (
    BackupIntegrityError,
    BackupManifest,
    BackupService,
    ConfirmationRequiredError,
    ProgressCallback,
    load_backup_settings,
)
from bastion.cli._cache import clear_service_cache
from bastion.cli._run import EXIT_CONFIGURATION, EXIT_FAILURE, fail
from bastion.database import Database
from bastion.settings import load_settings

__all__ = ["backup_app"]

T = TypeVar("T")

backup_app = typer.Typer(
    help="Backups: create, list, verify, restore and prune (BACKUP_* settings).",
    epilog="Exit codes: 0 done; 1 failed (a backup failing verification, a restore refused or "
    "already running, the store or database unreachable); 2 bad usage or configuration.",
    no_args_is_help=True,
)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="DATABASE_URL",
        show_envvar=True,
        help="Database to back up or restore into (default: DATABASE_URL).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
BackupIdArgument = Annotated[
    str, typer.Argument(help="A backup id, as `bastion backup list` shows it.", show_default=False)
]


def _run(
    database_url: str | None,
    operation: Callable[[BackupService, ProgressCallback], Awaitable[T]],
    *,
    quiet: bool = False,
) -> T:
    """Start the Database, build the service, run ``operation`` with a progress display."""
    overrides = {} if database_url is None else {"DATABASE_URL": database_url}
    settings = load_settings(**overrides)
    backup_settings = load_backup_settings()

    async def run() -> T:
        async with Database(settings) as database:
            service = BackupService(database, backup_settings)
            with _progress(quiet) as progress:
                return await operation(service, progress)

    return asyncio.run(run())


@contextmanager
def _progress(quiet: bool) -> Iterator[ProgressCallback]:
    console = Console(stderr=True, highlight=False)
    if quiet:
        yield lambda _stage, _done, _total: None
        return
    if not console.is_terminal:
        last: dict[str, tuple[int, int]] = {}

        def plain(stage: str, done: int, total: int) -> None:
            if last.get(stage) != (done, total):
                last[stage] = (done, total)
                console.print(f"{stage}: {done}/{total}")

        yield plain
        return
    with Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bars:
        tasks: dict[str, TaskID] = {}

        def rich(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=max(total, 1))
            bars.update(tasks[stage], completed=done, total=max(total, 1))

        yield rich


def _echo_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, default=str))


@backup_app.command()
def create(database_url: DatabaseUrlOption = None, as_json: JsonOption = False) -> None:
    """Back up the database now: dump, compress, encrypt, store, then the manifest."""
    manifest = _run(
        database_url, lambda service, progress: service.create(progress=progress), quiet=as_json
    )
    if as_json:
        _echo_json(manifest.to_dict())
        return
    typer.echo(
        f"created {manifest.id}: {len(manifest.tables)} tables, {manifest.total_rows} rows, "
        f"{manifest.archive_bytes} bytes ({manifest.encryption})"
    )


@backup_app.command("list")
def list_backups(
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    show_incomplete: Annotated[
        bool, typer.Option("--incomplete", help="Also show interrupted backups (never valid).")
    ] = False,
) -> None:
    """List valid backups, newest first."""

    async def listing(service: BackupService, _: ProgressCallback) -> tuple[Any, list[str]]:
        incomplete = await service.list_incomplete() if show_incomplete else []
        return await service.list(), incomplete

    manifests, incomplete = _run(database_url, listing, quiet=True)
    if as_json:
        document: dict[str, Any] = {"backups": [manifest.to_dict() for manifest in manifests]}
        if show_incomplete:
            document["incomplete"] = incomplete
        _echo_json(document)
        return
    _print_list(manifests, incomplete)


def _print_list(manifests: list[BackupManifest], incomplete: list[str]) -> None:
    console = Console(highlight=False, soft_wrap=True)
    if not manifests:
        console.print("no backups")
    else:
        # The id says when (UTC); the columns fit an 80-column terminal.
        table = Table("label", "backend", "rows", "bytes", "encryption")
        table.columns.insert(0, Column("id", no_wrap=True))
        for manifest in manifests:
            table.add_row(
                manifest.id,
                manifest.label,
                manifest.backend,
                str(manifest.total_rows),
                str(manifest.archive_bytes),
                manifest.encryption,
            )
        console.print(table)
    for backup_id in incomplete:
        console.print(f"[yellow]incomplete[/] {backup_id} (no manifest: not a valid backup)")


@backup_app.command()
def verify(
    backup_id: BackupIdArgument, database_url: DatabaseUrlOption = None, as_json: JsonOption = False
) -> None:
    """Check a backup end to end: checksum, signature, decryption, a scratch restore, contents."""
    try:
        report = _run(
            database_url,
            lambda service, progress: service.verify(backup_id, progress=progress),
            quiet=as_json,
        )
    except BackupIntegrityError as exc:
        if as_json:
            _echo_json(
                {"ok": False, "backup_id": backup_id, "reason": exc.reason, "error": exc.message}
            )
            raise typer.Exit(EXIT_FAILURE) from None
        fail(f"verify failed ({exc.reason}): {exc.message}", EXIT_FAILURE)
    if as_json:
        _echo_json(report.to_dict())
        return
    rows = sum(report.tables.values())
    typer.echo(
        f"ok {report.backup_id}: {len(report.tables)} tables, {rows} rows, all checks passed"
    )


@backup_app.command()
def restore(
    backup_id: BackupIdArgument,
    database_url: DatabaseUrlOption = None,
    confirm: Annotated[
        str | None,
        typer.Option("--confirm", help="The backup id again, to confirm replacing the database."),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm replacing the live database.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show what would be restored, and where; change nothing."),
    ] = False,
    allow_schema_change: Annotated[
        bool,
        typer.Option(
            "--allow-schema-change",
            help="Restore even though the backup is at another migration revision.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Replace the live database with a backup (after a full check and a safety backup)."""
    confirmation = backup_id if yes else confirm
    if not dry_run and confirmation is None:
        fail(
            "restore replaces the live database: pass --yes or --confirm <backup id> "
            "(or --dry-run to look first)",
            EXIT_CONFIGURATION,
        )
    try:
        report = _run(
            database_url,
            lambda service, progress: service.restore(
                backup_id,
                confirm=confirmation,
                dry_run=dry_run,
                allow_schema_change=allow_schema_change,
                progress=progress,
            ),
            quiet=as_json or dry_run,
        )
    except ConfirmationRequiredError as exc:
        fail(f"error: {exc.message}", EXIT_CONFIGURATION)
    except BackupIntegrityError as exc:
        fail(f"restore refused ({exc.reason}): {exc.message}", EXIT_FAILURE)
    if not dry_run:
        clear_service_cache()  # the service must not serve reads cached from the old data
    if as_json:
        _echo_json(report.to_dict())
        return
    if dry_run:
        console = Console(highlight=False, soft_wrap=True)
        console.print(f"dry run: would restore {report.backup_id} into {report.target}")
        console.print(f"revision: {', '.join(report.alembic_revisions) or '(none)'}")
        table = Table("table", "rows")
        for name, rows in sorted(report.tables.items()):
            table.add_row(name, str(rows))
        console.print(table)
        return
    typer.echo(
        f"restored {report.backup_id} into {report.target} "
        f"(safety backup {report.safety_backup_id})"
    )


@backup_app.command()
def prune(
    database_url: DatabaseUrlOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; delete nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete the backups BACKUP_RETENTION does not keep."""
    report = _run(database_url, lambda service, _: service.prune(dry_run=dry_run), quiet=True)
    if as_json:
        _echo_json(report.to_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {len(report.deleted)}, kept {len(report.kept)} ({report.policy})")
    for backup_id in report.deleted:
        typer.echo(f"  {backup_id}")
