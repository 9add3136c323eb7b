"""Read units held by a route (``ReadConnection``, ``ReadSession``, ``enter_for_route``).

They are plain dependencies that put their unit on FastAPI's route exit stack instead of
``yield`` dependencies (``bench/README.md``, finding 49). What a ``scope="function"`` yield
dependency guaranteed must still hold: the unit is open while the route runs, ends before the
response starts, sees the route's exception, and gives its connection back when the request is
cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import DependencyScopeError
from sqlalchemy import text
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import Database, DatabaseSettings
from bastion.errors import DatabaseStateError
from bastion.fastapi import (
    ReadConnection,
    ReadSession,
    database_lifespan,
    enter_for_route,
    install_error_handlers,
)
from tests.conftest import serve

Events = list[str]


def probe_app(
    settings: DatabaseSettings, events: Events, holding: asyncio.Event | None = None
) -> FastAPI:
    """Routes that note, in ``events``, the connections checked out as they run (``holding``:
    set once ``/slow`` holds its unit)."""
    app = FastAPI(lifespan=database_lifespan(settings))
    install_error_handlers(app)

    def checked_out() -> int:
        database: Database = app.state.database
        return database.pool_status().checked_out

    @app.get("/connection")
    async def on_a_connection(connection: ReadConnection) -> int:
        events.append(f"route: {checked_out()} out")
        return int(await connection.scalar(text("SELECT 1")))

    @app.get("/session")
    async def on_a_session(session: ReadSession) -> int:
        answer = int(await session.scalar(text("SELECT 2")))  # a session checks out lazily
        events.append(f"route: {checked_out()} out")
        return answer

    @app.get("/missing")
    async def not_found(connection: ReadConnection) -> int:
        await connection.scalar(text("SELECT 1"))
        raise HTTPException(404, "no such thing")

    @app.get("/slow")
    async def slow(connection: ReadConnection) -> int:
        await connection.scalar(text("SELECT 1"))
        events.append(f"route: {checked_out()} out")
        if holding is not None:
            holding.set()
        await asyncio.sleep(30)
        return 1

    @app.get("/unit")
    async def with_a_unit(request: Request) -> str:
        value = await enter_for_route(request, _noted_unit(events))
        events.append("route")
        if request.query_params.get("fail"):
            raise HTTPException(409, "refused")
        return value

    app.add_middleware(ResponseStartNotes, events=events, checked_out=checked_out)
    return app


@asynccontextmanager
async def _noted_unit(events: Events) -> AsyncIterator[str]:
    events.append("enter")
    try:
        yield "entered"
    except BaseException as error:
        events.append(f"exit with {type(error).__name__}")
        raise
    events.append("exit")


class ResponseStartNotes:
    """Notes in ``events`` when a response starts, with the connections checked out then."""

    def __init__(self, app: ASGIApp, events: Events, checked_out: Callable[[], int]) -> None:
        self.app = app
        self.events = events
        self.checked_out = checked_out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.events.append(f"response {message['status']}: {self.checked_out()} out")
            await send(message)

        await self.app(scope, receive, noting)


async def test_a_read_unit_is_open_in_the_route_and_ends_before_the_response_starts(
    settings: DatabaseSettings,
) -> None:
    events: Events = []
    async with serve(probe_app(settings, events)) as client:
        for path, answer in (("/connection", 1), ("/session", 2)):
            events.clear()
            response = await client.get(path)
            assert (response.status_code, response.json()) == (200, answer)
            assert events == ["route: 1 out", "response 200: 0 out"], path


async def test_a_route_s_error_ends_its_read_unit_before_the_error_response(
    settings: DatabaseSettings,
) -> None:
    events: Events = []
    async with serve(probe_app(settings, events)) as client:
        missing = await client.get("/missing")
        again = await client.get("/connection")
    assert missing.status_code == 404
    assert events[0] == "response 404: 0 out"
    assert again.status_code == 200  # the unit's connection came back usable


async def test_enter_for_route_exits_with_the_route_s_exception_before_the_response(
    settings: DatabaseSettings,
) -> None:
    events: Events = []
    async with serve(probe_app(settings, events)) as client:
        done = await client.get("/unit")
        assert (done.status_code, done.json()) == (200, "entered")
        assert events == ["enter", "route", "exit", "response 200: 0 out"]
        events.clear()
        refused = await client.get("/unit", params={"fail": "1"})
    assert refused.status_code == 409
    assert events == ["enter", "route", "exit with HTTPException", "response 409: 0 out"]


async def test_a_cancelled_request_gives_its_read_unit_s_connection_back(
    settings: DatabaseSettings,
) -> None:
    events: Events = []
    holding = asyncio.Event()
    app = probe_app(settings, events, holding)
    async with serve(app) as client:
        request = asyncio.create_task(client.get("/slow"))
        await asyncio.wait_for(holding.wait(), timeout=10)
        assert events == ["route: 1 out"]
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        database: Database = app.state.database
        assert database.pool_status().checked_out == 0
        assert (await client.get("/connection")).status_code == 200
    # serve() asserts again that no connection is left checked out.


async def test_enter_for_route_outside_a_route_refuses_and_enters_nothing() -> None:
    events: Events = []
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with pytest.raises(DatabaseStateError, match="call it from a route or its dependencies"):
        await enter_for_route(request, _noted_unit(events))
    assert events == []


async def _audit_after_response(connection: ReadConnection) -> AsyncIterator[None]:
    yield
    await connection.execute(text("SELECT 1"))


def test_a_request_scoped_yield_dependency_may_not_hold_a_read_unit() -> None:
    # Its exit runs after the response, when the read unit has already ended: FastAPI refuses
    # it where the route is declared.
    app = FastAPI()
    with pytest.raises(DependencyScopeError, match="cannot depend on dependencies with scope"):

        @app.get("/audited")
        async def audited(_: Annotated[None, Depends(_audit_after_response)]) -> None:
            return None
