"""``bastion init``: start a new project's configuration — ``.env`` and ``data/``.

It never overwrites an existing ``.env``: settings someone chose (and secrets in them) are
worth more than defaults. The new ``.env`` is readable by its owner only, since it holds a
freshly generated ``ADMIN_TOKEN``, which is written to the file and never printed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

import typer

from bastion.cli._maintenance_run import console

__all__ = ["ENV_TEMPLATE", "init", "register"]

ENV_TEMPLATE = """\
# Bastion settings, read at start-up from the environment or this file (environment wins).
# Every setting is listed in the README's settings table.

# SQLite by default (nothing to install). For PostgreSQL:
#   DATABASE_URL=postgresql://user:password@localhost:5432/app
DATABASE_URL=sqlite:///./data/app.db

DB_POOL_SIZE=10
DB_MAX_OVERFLOW=10
DB_POOL_TIMEOUT=30
DB_STATEMENT_TIMEOUT=30
SLOW_QUERY_THRESHOLD=0.5
MAX_RETRY_ATTEMPTS=3

# Bearer token of the /admin/database API (generated; keep it secret, remove it to turn the
# admin API off).
ADMIN_TOKEN={admin_token}

BACKUP_DIR=./data/backups
BACKUP_RETENTION=last=7,daily=7,weekly=4,monthly=6
# Encrypt every backup with an age identity (AGE-SECRET-KEY-1...):
# BACKUP_ENCRYPTION_KEY=
# REDIS_URL=redis://localhost:6379/0
"""

NEXT_STEPS = """\
Next steps:
  1. Review .env (DATABASE_URL points at ./data/app.db).
  2. Create the schema:   bastion db upgrade --migrations <package>:migrations
  3. Check it:            bastion health
  4. Back it up:          bastion backup create"""


def register(app: typer.Typer) -> None:
    """Add ``init`` to the root ``bastion`` app."""
    app.command(rich_help_panel="Set up")(init)


def init(
    directory: Annotated[
        Path,
        typer.Argument(help="Project directory (default: the current one).", file_okay=False),
    ] = Path(),
) -> None:
    """Create .env with sensible defaults (never overwriting one) and data/, then say what next."""
    out = console()
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    env_path = directory / ".env"
    content = ENV_TEMPLATE.format(admin_token=secrets.token_urlsafe(32))
    try:
        # O_EXCL: never overwrite, even if a .env appears between a check and the write.
        descriptor = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        out.print(f"{env_path} exists: left as it is")
    else:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(content)
        out.print(f"wrote {env_path} (with a new ADMIN_TOKEN)")
    out.print(f"data directory: {data}")
    out.print(NEXT_STEPS)
