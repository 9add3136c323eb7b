"""Fixtures of the maintenance tests: one migrated database of each backend at once."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bastion import Database, DatabaseSettings
from tests.maintenance.data import empty_postgres


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated, empty SQLite database, whatever the ``backend`` of the test."""
    path = tmp_path / "sqlite.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(autouse=True)
def _postgres_starts_empty(request: pytest.FixtureRequest) -> None:
    """Empty the session's PostgreSQL database before a test that uses it.

    These tests compare whole databases, so a row another test left behind (in a table the
    shared cleanup does not know, say) would fail them for nothing they did.
    """
    uses_postgres = {"postgres_url", "postgres_db"} & set(request.fixturenames) or (
        "backend" in request.fixturenames and request.getfixturevalue("backend") == "postgresql"
    )
    if uses_postgres:
        asyncio.run(empty_postgres(request.getfixturevalue("postgres_test_url")))


@pytest.fixture
def postgres_url(postgres_test_url: str) -> Iterator[str]:
    """The session's migrated PostgreSQL database, emptied after the test."""
    yield postgres_test_url
    asyncio.run(empty_postgres(postgres_test_url))


@pytest.fixture
async def sqlite_db(sqlite_url: str) -> AsyncIterator[Database]:
    async with Database(DatabaseSettings(DATABASE_URL=sqlite_url)) as database:
        yield database


@pytest.fixture
async def postgres_db(postgres_url: str) -> AsyncIterator[Database]:
    async with Database(DatabaseSettings(DATABASE_URL=postgres_url)) as database:
        yield database
