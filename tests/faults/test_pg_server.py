"""The throwaway PostgreSQL server starts, stops, crashes and recovers as the fault tests need.

And, through FaultProxy, that ``reset_on(b"COMMIT")`` (or the exact ``ASYNCPG_COMMIT``
message) catches the COMMIT that asyncpg and SQLAlchemy's asyncpg dialect send, with the
outcome each ``forward_first`` promises: forwarded, the row is committed although the client
got an error; dropped, it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.faults.pg_server import PostgresServer, migrated_database
from tests.faults.proxy import ASYNCPG_COMMIT, FaultProxy

# What closing a connection that the server dropped may raise.
DROPPED = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection, closed (or, if the server dropped it, terminated) on the way out."""
    connection = await asyncpg.connect(url, timeout=10)
    try:
        yield connection
    finally:
        try:
            await connection.close(timeout=5)
        except DROPPED:
            connection.terminate()


@pytest.fixture
async def probe(fresh_postgres_server: PostgresServer) -> PostgresServer:
    """The server, with an empty table ``probe (id int)`` in its postgres database."""
    async with connect(fresh_postgres_server.url()) as connection:
        await connection.execute("DROP TABLE IF EXISTS probe; CREATE TABLE probe (id int)")
    return fresh_postgres_server


async def assert_dropped(*connections: asyncpg.Connection) -> None:
    """The server closed these connections: asyncpg notices, and using one raises.

    The wait matters: the control methods block the event loop, and a query sent before
    asyncpg has processed the loss of its connection can fail with asyncpg's
    InternalClientError ("cannot switch to state ...") instead.
    """
    deadline = time.monotonic() + 5
    while not all(connection.is_closed() for connection in connections):
        assert time.monotonic() < deadline, "asyncpg did not see its connection dropped"
        await asyncio.sleep(0.01)
    for connection in connections:
        with pytest.raises(asyncpg.InterfaceError, match="connection is closed"):
            await connection.fetchval("SELECT 1")


async def probe_ids(server: PostgresServer) -> list[int]:
    async with connect(server.url()) as connection:
        return [row["id"] for row in await connection.fetch("SELECT id FROM probe ORDER BY id")]


async def test_it_is_a_separate_server_configured_for_the_fault_tests(
    fresh_postgres_server: PostgresServer,
) -> None:
    server = fresh_postgres_server
    assert server.port != 5432
    assert server.is_running()
    async with connect(server.url()) as connection:
        settings = {
            name: await connection.fetchval(f"SHOW {name}")
            for name in (
                "port",
                "data_directory",
                "listen_addresses",
                "unix_socket_directories",
                "fsync",
                "synchronous_commit",
                "max_connections",
            )
        }
    assert settings == {
        "port": str(server.port),
        "data_directory": str(server.datadir),
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(server.root),
        "fsync": "on",
        "synchronous_commit": "on",
        "max_connections": "200",
    }
    assert "database system is ready to accept connections" in server.log_text()


async def test_restart_fast_drops_sessions_and_keeps_committed_data(
    probe: PostgresServer,
) -> None:
    server = probe
    async with connect(server.url()) as old:
        await old.execute("INSERT INTO probe VALUES (1)")
        server.restart("fast")
        assert server.is_running()
        await assert_dropped(old)
    assert await probe_ids(server) == [1]


async def test_kill_crashes_the_server_and_start_recovers_what_was_committed(
    probe: PostgresServer,
) -> None:
    server = probe
    recoveries = server.log_text().count("automatic recovery in progress")
    async with connect(server.url()) as committed, connect(server.url()) as open_transaction:
        await committed.execute("INSERT INTO probe VALUES (1)")
        await open_transaction.execute("BEGIN; INSERT INTO probe VALUES (2)")
        started = time.monotonic()
        server.kill()
        assert time.monotonic() - started < 5
        assert not server.is_running()
        await assert_dropped(committed, open_transaction)
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(server.url(), timeout=5)
    server.start()
    assert server.log_text().count("automatic recovery in progress") == recoveries + 1
    assert await probe_ids(server) == [1]  # committed survives, uncommitted is gone


async def test_stop_immediate_refuses_connections_until_started_again(
    fresh_postgres_server: PostgresServer,
) -> None:
    server = fresh_postgres_server
    server.stop("immediate")
    assert not server.is_running()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(server.url(), timeout=5)
    server.stop("immediate")  # stopping a stopped server is a no-op
    # The fixture starts it again after the test; here it is started by hand to check
    # that it comes back from an immediate stop through recovery.
    recoveries = server.log_text().count("automatic recovery in progress")
    server.start()
    assert server.log_text().count("automatic recovery in progress") == recoveries + 1
    async with connect(server.url()) as connection:
        assert await connection.fetchval("SELECT 1") == 1


async def test_create_database_and_terminate_its_backends(
    fresh_postgres_server: PostgresServer,
) -> None:
    server = fresh_postgres_server
    name = f"db_{uuid.uuid4().hex[:10]}"
    url = await server.create_database(name)
    assert url == f"postgresql://postgres@127.0.0.1:{server.port}/{name}"
    async with connect(url) as first, connect(url) as second, connect(server.url()) as other:
        assert await server.terminate_backends(name) == 2
        await assert_dropped(first, second)
        assert await other.fetchval("SELECT 1") == 1  # other databases are left alone
    assert await server.terminate_backends(name) == 0


async def test_migrated_database_is_at_the_head_revision(
    fresh_postgres_server: PostgresServer,
) -> None:
    name = f"db_{uuid.uuid4().hex[:10]}"
    url = await migrated_database(fresh_postgres_server, name)
    async with connect(url) as connection:
        revision = await connection.fetchval("SELECT version_num FROM alembic_version")
        assert revision
        for table in ("users", "conversations", "messages"):
            assert await connection.fetchval("SELECT to_regclass($1)", table) == table


@pytest.mark.parametrize("forward_first", [True, False], ids=["forwarded", "dropped"])
async def test_reset_on_commit_with_asyncpg(probe: PostgresServer, forward_first: bool) -> None:
    """asyncpg sends COMMIT as a simple query, ``Q...COMMIT;``, which reset_on matches."""
    server = probe
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        async with connect(f"postgresql://postgres@{proxy.host}:{proxy.port}/postgres") as client:
            transaction = client.transaction()
            await transaction.start()
            await client.execute("INSERT INTO probe VALUES (1)")
            proxy.reset_on(b"COMMIT", forward_first=forward_first)
            with pytest.raises(asyncpg.ConnectionDoesNotExistError) as raised:
                await transaction.commit()
            assert isinstance(raised.value.__cause__, ConnectionResetError)
        assert proxy.resets_done == 1
    # Forwarded: committed although the client got an error. Dropped: never committed.
    assert await probe_ids(server) == ([1] if forward_first else [])


@pytest.mark.parametrize("forward_first", [True, False], ids=["forwarded", "dropped"])
async def test_reset_on_commit_with_sqlalchemy(probe: PostgresServer, forward_first: bool) -> None:
    """SQLAlchemy's asyncpg dialect commits through asyncpg's transaction: the same message."""
    server = probe
    async with FaultProxy("127.0.0.1", server.port) as proxy:
        engine = create_async_engine(
            f"postgresql+asyncpg://postgres@{proxy.host}:{proxy.port}/postgres"
        )
        try:
            with pytest.raises(exc.DBAPIError, match="closed in the middle of operation"):
                async with engine.begin() as connection:
                    await connection.execute(text("INSERT INTO probe VALUES (1)"))
                    proxy.reset_on(ASYNCPG_COMMIT, forward_first=forward_first)
        finally:
            await engine.dispose()
        assert proxy.resets_done == 1
    assert await probe_ids(server) == ([1] if forward_first else [])


async def test_control_methods_can_run_in_a_thread_while_the_loop_goes_on(
    fresh_postgres_server: PostgresServer,
) -> None:
    """With asyncio.to_thread the event loop keeps serving (a proxy, say) during a restart."""
    server = fresh_postgres_server
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.ensure_future(tick())
    try:
        await asyncio.to_thread(server.restart, "fast")
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    assert ticks >= 3
    assert server.is_running()
