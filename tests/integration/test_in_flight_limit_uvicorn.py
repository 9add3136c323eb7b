"""InFlightLimitMiddleware behind a real uvicorn: a client that hangs up while its request
waits for a place is found gone when the place comes, and its request never runs.

The middleware asks the server without waiting: it steps the server's receive coroutine once
and closes it if it starts to wait. This checks that uvicorn's HTTP implementations answer
such a look at once with the disconnect, with nothing while the client is there, and that the
app can still receive afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from bastion.fastapi import InFlightLimitMiddleware
from tests.conftest import free_port


class HeldApp:
    """Answers 200 to each request; ``/held`` only once the test lets it go."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.received: dict[str, dict[str, object]] = {}
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.started.append(scope["path"])
        self.received[scope["path"]] = await receive()  # a GET's one message
        if scope["path"] == "/held":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def serving(middleware: InFlightLimitMiddleware, http: str) -> AsyncIterator[uvicorn.Server]:
    config = uvicorn.Config(
        middleware,
        host="127.0.0.1",
        port=free_port(),
        http=http,
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def send_get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def until(condition: object, what: str) -> None:
    """Wait (up to 5 s) until ``condition()`` holds."""
    for _ in range(500):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


class OneHeldOneWaiting:
    """A real uvicorn in front of a limit of one place: ``/held`` holds it, a second request
    (``second``) waits behind it."""

    def __init__(self, server: uvicorn.Server, app: HeldApp, middleware: InFlightLimitMiddleware):
        self.server = server
        self.app = app
        self.middleware = middleware
        self.writers: list[asyncio.StreamWriter] = []

    async def get(self, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await send_get(self.server.config.port, path)
        self.writers.append(writer)
        return reader, writer


@asynccontextmanager
async def one_held_one_waiting(
    http: str, second: str
) -> AsyncIterator[
    tuple[OneHeldOneWaiting, asyncio.StreamReader, asyncio.StreamReader, asyncio.StreamWriter]
]:
    """The set-up above; the held request's reader and the waiting request's reader and
    writer. Every connection still open is closed on the way out."""
    app = HeldApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    async with serving(middleware, http) as server:
        stack = OneHeldOneWaiting(server, app, middleware)
        held_reader, _ = await stack.get("/held")
        await until(lambda: app.started == ["/held"], "the first request runs")
        second_reader, second_writer = await stack.get(second)
        await until(lambda: middleware.waited == 1, "the second request waits")
        try:
            yield stack, held_reader, second_reader, second_writer
        finally:
            for writer in stack.writers:
                if not writer.is_closing():
                    writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_request_whose_client_hung_up_while_waiting_never_runs(http: str) -> None:
    async with one_held_one_waiting(http, "/gone") as (stack, held_reader, _, gone_writer):
        gone_writer.close()
        await gone_writer.wait_closed()
        await until(lambda: len(stack.server.server_state.connections) == 1, "uvicorn sees it go")
        stack.app.release.set()

        assert (await held_reader.readline()).startswith(b"HTTP/1.1 200")
        after_reader, _ = await stack.get("/after")
        assert (await after_reader.readline()).startswith(b"HTTP/1.1 200")

    assert stack.app.started == ["/held", "/after"]
    assert stack.middleware.abandoned == 1


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_client_still_there_after_its_wait_is_served(http: str) -> None:
    async with one_held_one_waiting(http, "/waiting") as (stack, held_reader, waiting_reader, _):
        stack.app.release.set()

        assert (await held_reader.readline()).startswith(b"HTTP/1.1 200")
        assert (await waiting_reader.readline()).startswith(b"HTTP/1.1 200")

    assert stack.app.started == ["/held", "/waiting"]
    request = {"type": "http.request", "body": b"", "more_body": False}
    assert stack.app.received["/waiting"] == request
    assert stack.middleware.abandoned == 0
