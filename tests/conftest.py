"""Shared fixtures: the backend matrix (real SQLite and real PostgreSQL), databases, apps.

Tests that take the ``backend`` fixture run once per backend. PostgreSQL comes from
``TEST_POSTGRES_URL`` (default: the local server); each test session gets its own throwaway
database on it, migrated once and emptied after every test. When no server answers, those
tests are skipped with one line saying so — except under ``CI=true``, where a missing
PostgreSQL stops the run with a failure.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import update
from sqlalchemy.engine import make_url

from bastion import Database, DatabaseSettings
from bastion.migrations import upgrade
from conversations import MIGRATIONS
from conversations.app import create_app
from conversations.auth import hash_api_key
from conversations.models import ApiKey
from conversations.users import create_user

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for want of what ``reason`` names; under ``CI=true`` fail it instead,
    so that CI cannot pass without it."""
    if IN_CI:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


TABLES = (
    "idempotency_keys",
    "message_sources",
    "messages",
    "conversations",
    "api_keys",
    "users",
)

_postgres_problem: str | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def environment_without_database() -> dict[str, str]:
    """This process's environment minus DATABASE_URL and DB_*, for a command a test runs."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _probe_postgres() -> str | None:
    try:
        connection = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL), timeout=3)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    await connection.close()
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    global _postgres_problem
    wanted = [item for item in items if item.get_closest_marker("postgres")]
    if not wanted:
        return
    problem = asyncio.run(_probe_postgres())
    if problem is None:
        return
    shown = make_url(POSTGRES_URL).render_as_string(hide_password=True)
    if IN_CI:
        pytest.exit(
            f"PostgreSQL is required under CI=true, but {shown} does not answer ({problem}). "
            "Start it, or point TEST_POSTGRES_URL at a server.",
            returncode=1,
        )
    _postgres_problem = (
        f"PostgreSQL tests skipped ({len(wanted)}): no server at {shown} ({problem}); "
        "start PostgreSQL or set TEST_POSTGRES_URL"
    )
    skip = pytest.mark.skip(reason="PostgreSQL not reachable (see the summary line)")
    for item in wanted:
        item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _postgres_problem:
        terminalreporter.write_line(_postgres_problem, yellow=True, bold=True)


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    return str(request.param)


@pytest.fixture(scope="session")
async def postgres_test_url() -> AsyncIterator[str]:
    """A migrated database of its own on the PostgreSQL server, for this test session."""
    name = f"bastion_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        await upgrade(database, MIGRATIONS)
    yield url
    admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    async with Database(DatabaseSettings(DATABASE_URL=f"sqlite:///{path}")) as database:
        await upgrade(database, MIGRATIONS)
    return path


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database of ``backend`` for one test."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "test.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    url: str = request.getfixturevalue("postgres_test_url")
    yield url
    asyncio.run(_empty_postgres_tables(url))


async def _empty_postgres_tables(url: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        await connection.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    finally:
        await connection.close()


def make_settings(url: str, **overrides: Any) -> DatabaseSettings:
    """Settings for tests: the given URL, small pool, and any overrides (by env name)."""
    values: dict[str, Any] = {"DATABASE_URL": url, "DB_POOL_SIZE": 5, "DB_MAX_OVERFLOW": 5}
    values.update(overrides)
    return DatabaseSettings(**values)


@pytest.fixture
def settings(database_url: str) -> DatabaseSettings:
    return make_settings(database_url)


@pytest.fixture
async def database(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A started Database; the test fails if it leaves a connection checked out."""
    db = Database(settings)
    await db.start()
    try:
        yield db
        assert db.pool_status().checked_out == 0, "a unit of work leaked its connection"
    finally:
        await db.close()


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``app`` with its lifespan run (ASGI transport, no sockets).

    On the way out the app's pool must have no connection checked out.
    """
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
        database: Database = app.state.database
        assert database.pool_status().checked_out == 0, "a request leaked its connection"


@pytest.fixture
async def app_client(settings: DatabaseSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the reference service on ``settings``."""
    async with serve(create_app(settings)) as client:
        yield client


def checkouts(app: FastAPI) -> float:
    """Connections the app's units have checked out so far (one per unit of work)."""
    database: Database = app.state.database
    value = database.metrics.registry.get_sample_value("bastion_pool_checkout_seconds_count")
    return float(value or 0.0)


async def revoke_key(settings: DatabaseSettings, headers: dict[str, str]) -> None:
    """Revoke the API key that ``headers`` present (as ``Users``' headers hold it)."""
    key = headers["Authorization"].removeprefix("Bearer ")
    async with Database(settings) as database, database.write_connection() as connection:
        await connection.execute(
            update(ApiKey)
            .where(ApiKey.key_hash == hash_api_key(key))
            .values(revoked_at=datetime.now(UTC))
        )


class Users:
    """API keys of two users, ``alice`` and ``bob``, and headers that authenticate them."""

    def __init__(self, alice: str, bob: str) -> None:
        self.alice = {"Authorization": f"Bearer {alice}"}
        self.bob = {"Authorization": f"Bearer {bob}"}


async def new_conversation(client: httpx.AsyncClient, users: Users) -> str:
    """The id of a new conversation of alice's, made through the API."""
    response = await client.post("/v1/conversations", json={"title": "t"}, headers=users.alice)
    assert response.status_code == 201
    return str(response.json()["id"])


@pytest.fixture
async def users(settings: DatabaseSettings) -> Users:
    async with Database(settings) as database:
        return Users(await create_user(database, "alice"), await create_user(database, "bob"))


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so an unclosed connection is blamed on the test that leaked it.

    What survives is then frozen (moved out of the collector's view): otherwise every full
    collection walks the whole session's heap again — hypothesis, SQLAlchemy and every module
    imported so far — which made these collections about a third of the suite's time. A test's
    own garbage is still collected at its end; only objects that outlived a test and die in a
    later one go uncollected (at the cost of some memory, never of a missed failure: such an
    object was not that later test's leak).
    """
    yield
    gc.collect()
    gc.freeze()
