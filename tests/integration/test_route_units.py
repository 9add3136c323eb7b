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

import anyio
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import DependencyScopeError
from sqlalchemy import text
from starlette.responses import PlainTextResponse
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

    @app.get("/late")
    async def late(request: Request, connection: ReadConnection, tasks: BackgroundTasks) -> str:
        await connection.scalar(text("SELECT 1"))

        async def after_the_response() -> None:
            try:
                await enter_for_route(request, _noted_unit(events))
            except DatabaseStateError as refused:
                events.append(f"refused: {refused}")

        tasks.add_task(after_the_response)
        return "answered"

    @app.get("/bounded")
    async def bounded(connection: ReadConnection) -> int:
        await connection.scalar(text("SELECT 1"))
        if holding is not None:
            holding.set()
        await asyncio.sleep(30)  # cut short by the /bounded deadline middleware
        return 1

    app.add_middleware(ResponseStartNotes, events=events, checked_out=checked_out)
    app.add_middleware(AnyioDeadline, path="/bounded", seconds=0.3)
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


class AnyioDeadline:
    """Cancels requests to ``path`` after ``seconds`` with an anyio cancel scope, which, unlike
    one ``Task.cancel()``, cancels every await inside it again until the scope is left (the
    unit's exit included), and answers 504 instead."""

    def __init__(self, app: ASGIApp, path: str, seconds: float) -> None:
        self.app = app
        self.path = path
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        with anyio.move_on_after(self.seconds) as deadline:
            await self.app(scope, receive, send)
        if deadline.cancelled_caught:
            await PlainTextResponse("deadline", status_code=504)(scope, receive, send)


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


async def test_a_route_s_error_gives_its_read_unit_s_connection_back_usable(
    settings: DatabaseSettings,
) -> None:
    # Only a leak check: on an error, FastAPI's request stack also ends before the error
    # response, so where the unit ends is pinned by the /unit?fail=1 test below.
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


async def test_enter_for_route_refuses_once_the_route_has_returned(
    settings: DatabaseSettings,
) -> None:
    events: Events = []
    async with serve(probe_app(settings, events)) as client:
        answered = await client.get("/late")
    assert (answered.status_code, answered.json()) == (200, "answered")
    # The background task ran after the response, and nothing was entered on the route's
    # stack, closed by then (where the route had used it before, as here).
    assert events[0] == "response 200: 0 out"
    assert events[1:] == [
        "refused: enter_for_route() called after the route returned (a background task, a "
        "streaming body or a dependency's exit); open the unit with 'async with' there"
    ]


async def test_an_anyio_deadline_cuts_a_request_short_and_its_connection_comes_back(
    settings: DatabaseSettings,
) -> None:
    events: Events = []
    holding = asyncio.Event()
    app = probe_app(settings, events, holding)
    async with serve(app) as client:
        cut = await client.get("/bounded")
        assert holding.is_set()
        assert cut.status_code == 504
        database: Database = app.state.database
        assert database.pool_status().checked_out == 0
        assert (await client.get("/connection")).status_code == 200
