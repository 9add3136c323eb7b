"""A write unit's COMMIT, once begun, runs to its end when its task is cancelled.

Cut short, a COMMIT loses its connection half-way (SQLAlchemy invalidates it) and asyncpg asks
the server to cancel it: the write the unit had finished is rolled back. Bastion runs the COMMIT
where a cancellation does not reach it and raises the cancellation once the COMMIT is over,
whichever way the cancellation comes: once (``Task.cancel()``, ``asyncio.timeout``), or at every
await until its scope is left (an anyio cancel scope, as Starlette's and anyio-based
middlewares use). FastAPI 0.162.7 and later also shield a ``yield`` dependency's exit from anyio
cancel scopes, but not from ``Task.cancel()``, and older FastAPI not at all.

On PostgreSQL, a COMMIT is made slow by a deferred constraint trigger that sleeps at COMMIT;
the unit is cancelled once the server shows its session running that COMMIT. On SQLite,
aiosqlite's thread runs a queued COMMIT to its end whatever becomes of the task that queued it;
Bastion relies on that and raises the cancellation at once there.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import BastionError, Database, IntegrityViolationError
from bastion.breaker import is_outage
from bastion.errors import CircuitOpenError
from bastion.fastapi import WriteConnection, WriteSession, database_lifespan
from tests.conftest import _asyncpg_dsn, make_settings, serve

COMMIT_SLEEP_S = 1.0
"""How long the trigger holds each COMMIT: long enough to be seen running and cancelled."""


_DROP: Final = "DROP TABLE IF EXISTS slow_commits; DROP FUNCTION IF EXISTS slow_commits_sleep()"


@pytest.fixture
async def slow_commit_table(postgres_test_url: str) -> AsyncIterator[None]:
    """Table ``slow_commits``: every COMMIT after an insert sleeps ``COMMIT_SLEEP_S``, then
    refuses a negative id (a check violation, at COMMIT)."""
    connection = await asyncpg.connect(_asyncpg_dsn(postgres_test_url))
    try:
        await connection.execute(
            _DROP
            + f""";
            CREATE TABLE slow_commits (id int PRIMARY KEY);
            CREATE FUNCTION slow_commits_sleep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                PERFORM pg_sleep({COMMIT_SLEEP_S});
                IF NEW.id < 0 THEN
                    RAISE EXCEPTION 'refused at commit' USING ERRCODE = 'check_violation';
                END IF;
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER slow_commits_at_commit AFTER INSERT ON slow_commits
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commits_sleep();
            """
        )
        yield
    finally:
        await connection.execute(_DROP)
        await connection.close()


async def _commit_seen_running(url: str, sessions: list[int]) -> None:
    """Return once the server session whose pid the unit noted in ``sessions`` runs a COMMIT
    (the trigger holds it there)."""
    watcher = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        for _ in range(500):
            if sessions and await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE pid = $1 AND state = 'active' AND query LIKE 'COMMIT%'",
                sessions[0],
            ):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no COMMIT was seen running")
    finally:
        await watcher.close()


async def _stored(url: str) -> list[int]:
    reader = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        return [row["id"] for row in await reader.fetch("SELECT id FROM slow_commits ORDER BY id")]
    finally:
        await reader.close()


class AnyioCancelOnEvent:
    """Cancels every request with an anyio cancel scope once ``cancel`` is set (level-triggered:
    every await inside is cancelled again until the scope is left), and answers 504."""

    def __init__(self, app: ASGIApp, cancel: asyncio.Event) -> None:
        self.app = app
        self.cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started: list[bool] = []

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)

        async with anyio.create_task_group() as group:

            async def cancel_when_told() -> None:
                await self.cancel.wait()
                group.cancel_scope.cancel()

            group.start_soon(cancel_when_told)
            await self.app(scope, receive, noting)
            group.cancel_scope.cancel()
        if not started:
            await PlainTextResponse("cancelled", status_code=504)(scope, receive, send)


INSERT: Final = "INSERT INTO slow_commits (id) VALUES (:id) RETURNING pg_backend_pid()"


def slow_commit_app(url: str, cancel: asyncio.Event, sessions: list[int]) -> FastAPI:
    """Routes that insert a row in a write unit; each notes its server session's pid."""
    app = FastAPI(lifespan=database_lifespan(make_settings(url)))
    insert = text(INSERT)

    @app.post("/connection/{row}")
    async def on_a_connection(row: int, connection: WriteConnection) -> int:
        sessions.append(await connection.scalar(insert, {"id": row}))
        return row

    @app.post("/session/{row}")
    async def on_a_session(row: int, session: WriteSession) -> int:
        sessions.append(await session.scalar(insert, {"id": row}))
        return row

    app.add_middleware(AnyioCancelOnEvent, cancel=cancel)
    return app


@pytest.mark.postgres
@pytest.mark.usefixtures("slow_commit_table")
@pytest.mark.parametrize("unit", ["connection", "session"])
@pytest.mark.parametrize("cancellation", ["anyio_scope", "task_cancel"])
async def test_a_request_cancelled_mid_commit_still_commits_and_keeps_its_connection(
    postgres_test_url: str, unit: str, cancellation: str
) -> None:
    cancel = asyncio.Event()
    sessions: list[int] = []
    app = slow_commit_app(postgres_test_url, cancel, sessions)
    async with serve(app) as client:
        # The ASGI transport runs the app in the task that sends the request.
        request = asyncio.create_task(client.post(f"/{unit}/1"))
        await _commit_seen_running(postgres_test_url, sessions)
        # The route has returned; its unit's exit is running the COMMIT.
        if cancellation == "anyio_scope":
            cancel.set()
            assert (await request).status_code == 504  # the cancellation still ended it
            cancel.clear()
        else:
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        database: Database = app.state.database
        assert database.pool_status().checked_out == 0
        assert await _stored(postgres_test_url) == [1]  # it committed
        again = await client.post(f"/{unit}/2")
        assert (again.status_code, again.json()) == (200, 2)
    assert await _stored(postgres_test_url) == [1, 2]
    # The connection was not thrown away mid-COMMIT: the next unit, given the connection the
    # last one kept, ran in the same server session.
    assert sessions[0] == sessions[1]


async def _insert(handle: AsyncConnection | AsyncSession, row: int) -> None:
    await handle.execute(text(INSERT), {"id": row})


@pytest.mark.postgres
@pytest.mark.usefixtures("slow_commit_table")
@pytest.mark.parametrize("unit", ["write_connection", "write"])
async def test_a_timeout_during_commit_is_raised_after_the_commit_lands(
    postgres_test_url: str, unit: str
) -> None:
    async with Database(make_settings(postgres_test_url)) as database:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(COMMIT_SLEEP_S / 4):
                async with getattr(database, unit)() as handle:
                    await _insert(handle, 1)
        # Raised once the COMMIT was over, not at the deadline: the row is there already (at
        # the deadline the trigger still held the COMMIT for most of COMMIT_SLEEP_S).
        assert await _stored(postgres_test_url) == [1]
        assert database.pool_status().checked_out == 0


def _count_scheduled_callbacks(loop: asyncio.AbstractEventLoop) -> list[int]:
    """Count, from now until :func:`_stop_counting`, the callbacks ``loop.call_soon`` is given
    (a busy loop gives it one per turn); the count is the returned list's one element."""
    count = [0]
    call_soon = loop.call_soon

    def counting(*args: Any, **kwargs: Any) -> asyncio.Handle:
        count[0] += 1
        return call_soon(*args, **kwargs)

    loop.call_soon = counting  # type: ignore[method-assign]
    return count


def _stop_counting(loop: asyncio.AbstractEventLoop) -> None:
    vars(loop).pop("call_soon", None)


@pytest.mark.postgres
@pytest.mark.usefixtures("slow_commit_table")
@pytest.mark.parametrize("unit", ["write_connection", "write"])
async def test_an_anyio_deadline_during_commit_waits_for_it_without_spinning(
    postgres_test_url: str, unit: str
) -> None:
    # Outside FastAPI, whose shield would keep the scope's cancellations away: the scope
    # cancels every await until it is left, and the wait for the COMMIT must not turn into a
    # busy loop (it did: anyio re-delivered its cancellation on every turn of the loop, 0.7 s
    # of CPU for a COMMIT of 1 s). Counted as callbacks the loop was given while waiting.
    loop = asyncio.get_running_loop()
    async with Database(make_settings(postgres_test_url)) as database:
        try:
            with anyio.move_on_after(COMMIT_SLEEP_S / 4) as deadline:
                async with getattr(database, unit)() as handle:
                    await _insert(handle, 1)
                    scheduled = _count_scheduled_callbacks(loop)
        finally:
            _stop_counting(loop)
        # The deadline passed during the COMMIT; the scope ended once the COMMIT was over,
        # the row there already. (Whether the unit then raises depends on an await after the
        # COMMIT, where anyio delivers the cancellation: a session's close has one, a kept
        # connection none.)
        assert await _stored(postgres_test_url) == [1]
        assert deadline.cancel_called
        assert scheduled[0] < 100, f"{scheduled[0]} callbacks while waiting for the COMMIT"
        current = asyncio.current_task()
        assert current is not None
        assert current.cancelling() == 0
        assert database.pool_status().checked_out == 0


@pytest.mark.postgres
@pytest.mark.usefixtures("slow_commit_table")
async def test_a_commit_that_fails_while_its_unit_is_cancelled_is_told(
    postgres_test_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Database(make_settings(postgres_test_url)) as database:
        with pytest.raises(TimeoutError) as raised:
            async with asyncio.timeout(COMMIT_SLEEP_S / 4):
                async with database.write_connection() as connection:
                    await _insert(connection, -1)  # refused at COMMIT, after the deadline
        cancelled = raised.value.__cause__
        assert isinstance(cancelled, asyncio.CancelledError)
        assert isinstance(cancelled.__cause__, IntegrityViolationError)
        assert "a COMMIT failed while its unit was being cancelled: check_violation" in (
            caplog.text
        )
        assert await _stored(postgres_test_url) == []
        assert database.pool_status().checked_out == 0


@pytest.mark.postgres
@pytest.mark.usefixtures("slow_commit_table")
async def test_a_connection_lost_mid_commit_while_cancelled_counts_for_the_breaker(
    postgres_test_url: str,
) -> None:
    sessions: list[int] = []
    settings = make_settings(postgres_test_url, BREAKER_FAILURE_THRESHOLD=1)
    async with Database(settings) as database:

        async def write() -> None:
            async with asyncio.timeout(COMMIT_SLEEP_S / 4):
                async with database.write_connection() as connection:
                    sessions.append(await connection.scalar(text(INSERT), {"id": 1}))

        writing = asyncio.create_task(write())
        await _commit_seen_running(postgres_test_url, sessions)
        await asyncio.sleep(COMMIT_SLEEP_S / 2)  # past the deadline: the unit is cancelled
        assert not writing.done()  # ... and waits for its COMMIT
        killer = await asyncpg.connect(_asyncpg_dsn(postgres_test_url))
        try:
            await killer.execute("SELECT pg_terminate_backend($1)", sessions[0])
        finally:
            await killer.close()
        with pytest.raises(TimeoutError) as raised:
            await writing
        assert isinstance(raised.value.__cause__, asyncio.CancelledError)
        lost = raised.value.__cause__.__cause__
        assert isinstance(lost, BastionError)
        assert is_outage(lost), lost
        # The breaker heard of the outage (threshold 1): the next unit is refused.
        with pytest.raises(CircuitOpenError):
            async with database.read_connection():
                pass
        assert await _stored(postgres_test_url) == []


@pytest.mark.parametrize("unit", ["write_connection", "write"])
async def test_a_unit_cancelled_while_its_commit_is_on_sqlite_s_thread_still_commits(
    tmp_path: Path, unit: str
) -> None:
    path = tmp_path / "commits.db"
    async with Database(make_settings(f"sqlite:///{path}")) as database:
        async with database.write_connection() as connection:
            await connection.execute(text("CREATE TABLE commits (id integer PRIMARY KEY)"))
        this_task = asyncio.current_task()
        assert this_task is not None
        with pytest.raises(asyncio.CancelledError):
            async with getattr(database, unit)() as handle:
                await handle.execute(text("INSERT INTO commits (id) VALUES (1)"))
                # Runs at the loop's next turn: by then the block has ended and its COMMIT is
                # queued on the connection's thread, and this task waits for it.
                asyncio.get_running_loop().call_soon(this_task.cancel)
        this_task.uncancel()
        assert database.pool_status().checked_out == 0
        async with database.read_connection() as connection:
            assert (await connection.execute(text("SELECT id FROM commits"))).all() == [(1,)]
    with closing(sqlite3.connect(path)) as plain:  # and on disk, seen from outside
        assert plain.execute("SELECT id FROM commits").fetchall() == [(1,)]
