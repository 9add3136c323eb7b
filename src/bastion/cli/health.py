"""``bastion health``: check the database once; the exit code says how it went.

Exit codes: 0 healthy, 1 degraded, 2 unhealthy — a database that cannot be reached at all is
unhealthy too, since that is the answer an operator (or a deploy script) is asking for. A bad
setting or migrations location is 2 with a one-line message, as for every command.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Final

import typer
from rich.console import Console
from rich.table import Table

from bastion.database import Database
from bastion.errors import DatabaseUnavailableError
from bastion.health import ComponentHealth, HealthChecker, HealthReport, HealthStatus
from bastion.settings import load_settings

__all__ = ["EXIT_CODES", "health"]

EXIT_CODES: Final = {
    HealthStatus.HEALTHY: 0,
    HealthStatus.DEGRADED: 1,
    HealthStatus.UNHEALTHY: 2,
}

_STYLES: Final = {
    HealthStatus.HEALTHY: "green",
    HealthStatus.DEGRADED: "yellow",
    HealthStatus.UNHEALTHY: "bold red",
}


def health(
    migrations_location: Annotated[
        str | None,
        typer.Option(
            "--migrations",
            "-m",
            envvar="BASTION_MIGRATIONS",
            help="Alembic script location; when given, the schema must be at its head.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check the database, pool, breaker (and migrations); exit 0 healthy, 1 degraded, 2 not."""
    report = asyncio.run(_check(migrations_location))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print(report)
    raise typer.Exit(EXIT_CODES[report.status])


async def _check(migrations_location: str | None) -> HealthReport:
    settings = load_settings()
    database = Database(settings)
    # Built first: a wrong location is a configuration error (exit 2), whatever the database.
    checker = HealthChecker(database, migrations=migrations_location)
    try:
        await database.start()
    except DatabaseUnavailableError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        unreachable = ComponentHealth(
            "database",
            HealthStatus.UNHEALTHY,
            details={"backend": settings.backend},
            error=exc.code,
        )
        return HealthReport.of([unreachable])
    try:
        return await checker.check()
    finally:
        await database.close()


def _print(report: HealthReport) -> None:
    console = Console(highlight=False, soft_wrap=True)
    status = report.status
    checked_at = report.checked_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    console.print(
        f"[{_STYLES[status]}]{status.value}[/] (score {report.score:.2f}), checked {checked_at}"
    )
    for component in report.components:
        table = Table(title=_title(component), title_justify="left", show_header=False)
        table.add_column("field", style="dim")
        table.add_column("value")
        if component.error is not None:
            table.add_row("error", component.error)
        for key, value in component.details.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            table.add_row(key, shown)
        console.print(table)


def _title(component: ComponentHealth) -> str:
    style = _STYLES[component.status]
    latency = "" if component.latency_ms is None else f" ({component.latency_ms:g} ms)"
    return f"{component.name}: [{style}]{component.status.value}[/]{latency}"
