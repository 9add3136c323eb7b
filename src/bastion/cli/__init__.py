"""The ``bastion`` command: a thin shell over the library.

Exit codes: 0 success; 1 the operation failed (database unreachable, migration error);
2 bad usage or configuration (the message names the variable or option to fix).
``bastion health`` reports the check's outcome the same way: 0 healthy, 1 degraded,
2 unhealthy.
"""

from __future__ import annotations

import typer

from bastion.cli import init, maintenance, transfer
from bastion.cli._run import run_cli
from bastion.cli.backup import backup_app
from bastion.cli.db import db_app
from bastion.cli.health import health

__all__ = ["app", "main"]

app = typer.Typer(
    name="bastion",
    help="Bastion: database operations for your service.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(db_app, name="db")
app.add_typer(backup_app, name="backup")
app.command()(health)
init.register(app)
maintenance.register(app)
transfer.register(app)


def main() -> None:
    """Entry point of the ``bastion`` console script."""
    run_cli(app)
