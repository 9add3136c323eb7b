"""Alembic, driven programmatically on Bastion's async engine.

A service keeps its Alembic scripts in a package (``script_location`` such as
``"conversations:migrations"``) whose ``env.py`` is two lines::

    from bastion.migrations import run_env
    run_env(target_metadata=Base.metadata)

Bastion opens the connection itself — with the same URL normalisation and SQLite setup as the
service — and hands it to Alembic, so the same scripts run from ``bastion db upgrade``, from
an app at start-up, and from tests. ``env.py`` run by the plain ``alembic`` command works too:
it then reads ``DATABASE_URL`` itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.errors import ConfigurationError, IntegrityViolationError
from bastion.settings import DatabaseSettings, load_settings
from bastion.types import UTCDateTime

__all__ = [
    "current_revisions",
    "downgrade",
    "head_revisions",
    "is_at_head",
    "make_alembic_config",
    "new_revision",
    "run_env",
    "upgrade",
]

_CONNECTION_KEY = "connection"


def make_alembic_config(script_location: str) -> Config:
    """An Alembic ``Config`` for the scripts at ``script_location`` (a path or ``pkg:dir``).

    Raises:
        ConfigurationError: no Alembic scripts are found there.
    """
    config = Config()
    config.set_main_option("script_location", script_location)
    try:
        ScriptDirectory.from_config(config)
    except Exception as exc:  # alembic raises CommandError, or ImportError for a bad package
        raise ConfigurationError(f"no Alembic migrations at {script_location!r}: {exc}") from None
    return config


async def upgrade(database: Database, script_location: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` in one transaction."""
    await _run(database, script_location, command.upgrade, revision)


async def downgrade(database: Database, script_location: str, revision: str) -> None:
    """Revert migrations down to ``revision`` (``"-1"``, ``"base"``, or an id)."""
    await _run(database, script_location, command.downgrade, revision)


async def current_revisions(database: Database) -> tuple[str, ...]:
    """The revisions the database is at (empty before the first migration)."""
    async with database.engine.connect() as connection:
        return await connection.run_sync(_current_heads)


def head_revisions(script_location: str) -> tuple[str, ...]:
    """The newest revisions the scripts define."""
    scripts = ScriptDirectory.from_config(make_alembic_config(script_location))
    return tuple(scripts.get_heads())


async def is_at_head(database: Database, script_location: str) -> bool:
    """Whether every migration has been applied."""
    return set(await current_revisions(database)) == set(head_revisions(script_location))


async def new_revision(
    database: Database, script_location: str, message: str, *, autogenerate: bool = True
) -> list[str]:
    """Write a new revision script, compared against the database when ``autogenerate``.

    Returns the paths of the files written.
    """
    config = make_alembic_config(script_location)

    def run(connection: Connection) -> list[str]:
        config.attributes[_CONNECTION_KEY] = connection
        result = command.revision(config, message=message, autogenerate=autogenerate)
        scripts = result if isinstance(result, list) else [result]
        return [script.path for script in scripts if script is not None]

    async with database.engine.begin() as connection:
        return await connection.run_sync(run)


def run_env(target_metadata: MetaData) -> None:
    """The body of a service's Alembic ``env.py``.

    Uses the connection Bastion passed in; run by the ``alembic`` command instead, it builds
    its own from ``DATABASE_URL``.
    """
    connection = context.config.attributes.get(_CONNECTION_KEY)
    if connection is not None:
        _run_migrations(connection, target_metadata)
        return
    if context.is_offline_mode():
        raise ConfigurationError(
            "offline (--sql) migrations are not supported; run them against a database"
        )
    asyncio.run(_run_standalone(load_settings(), target_metadata))


def _run_migrations(connection: Connection, target_metadata: MetaData) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def _render_item(kind: str, item: Any, autogen_context: Any) -> str | Literal[False]:
    # Autogenerated scripts must not import Bastion's Python-side types: a UTCDateTime is a
    # timestamptz column to the database.
    if kind == "type" and isinstance(item, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


async def _run_standalone(settings: DatabaseSettings, target_metadata: MetaData) -> None:
    async with Database(settings) as database, database.engine.begin() as connection:
        await connection.run_sync(_run_migrations, target_metadata)


async def _run(
    database: Database,
    script_location: str,
    operation: Callable[[Config, str], Any],
    revision: str,
) -> None:
    config = make_alembic_config(script_location)

    def run(connection: Connection) -> None:
        config.attributes[_CONNECTION_KEY] = connection
        try:
            operation(config, revision)
        except CommandError as exc:
            raise ConfigurationError(f"migration {revision!r}: {exc}") from exc
        if connection.dialect.name == "sqlite":
            violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if violations:
                raise IntegrityViolationError(
                    f"the migration left {len(violations)} row(s) whose parent is missing "
                    f"(first in table {violations[0][0]!r}); nothing was applied"
                )

    async with database.engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Alembic rebuilds SQLite tables (batch mode): the DROP of the old table would act
            # as a DELETE and cascade into child rows. The pragma only takes effect outside a
            # transaction, so it goes straight to the driver, before BEGIN.
            await _set_sqlite_foreign_keys(connection, on=False)
        try:
            async with connection.begin():
                await connection.run_sync(run)
        finally:
            if sqlite:
                await _set_sqlite_foreign_keys(connection, on=True)


async def _set_sqlite_foreign_keys(connection: AsyncConnection, *, on: bool) -> None:
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection  # an aiosqlite.Connection
    cursor = await driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    await cursor.close()


def _current_heads(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())
