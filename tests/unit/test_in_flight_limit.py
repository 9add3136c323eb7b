"""InFlightLimitMiddleware: at most N requests run at once, in arrival order, losing none;
a slow body, a streaming response, an error or a cancellation holds no place, announcing
a body a route never reads does not slip past the limit, a request whose client left while it
waited is dropped, and one that waited ``max_wait_s`` is answered 503."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from bastion.fastapi import InFlightLimitMiddleware
from tests.unit.leaving_client import Client


class GatedApp:
    """Records how many requests run at once and in what order they start. A request runs
    until the test opens its gate (``/free``, ``/health`` and ``/metrics`` paths run straight
    through); ``/stream``
    starts its response first; ``/boom`` raises; a request with a body reads it first."""

    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.started: list[str] = []
        self.received: dict[str, dict[str, Any]] = {}
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, path: str) -> asyncio.Event:
        return self.gates.setdefault(path, asyncio.Event())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if any(name == b"content-length" for name, _ in scope["headers"]):
            while (await receive()).get("more_body", False):
                pass
        else:
            self.received[path] = await receive()  # a bodiless request's one message
        self.started.append(path)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if path == "/boom":
                raise RuntimeError("the app failed")
            if path == "/stream":
                await send({"type": "http.response.start", "status": 200, "headers": []})
            if not path.startswith(("/free", "/health", "/metrics")):
                await self.gate(path).wait()
            else:
                await asyncio.sleep(0)  # yields, as real work does, so that requests overlap
            if path != "/stream":
                await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        finally:
            self.running -= 1


async def call(
    middleware: InFlightLimitMiddleware,
    path: str,
    body_chunks: asyncio.Queue[bytes | None] | None = None,
) -> int:
    """One request of ``path``; with ``body_chunks``, a body sent chunk by chunk as the test
    puts them in (``None`` ends it). Its status."""
    headers = [(b"content-length", b"10")] if body_chunks is not None else []
    scope: Scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if body_chunks is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        chunk = await body_chunks.get()
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return int(sent[0]["status"])


async def assert_exactly_one_place(app: GatedApp, middleware: InFlightLimitMiddleware) -> None:
    """Two requests at once: only one runs, then both are served (no place was lost, and none
    given back that was not held)."""
    app.most_at_once = 0
    both = [asyncio.ensure_future(call(middleware, path)) for path in ("/g1", "/g2")]
    await settle()
    assert app.running == 1
    app.gate("/g1").set()
    app.gate("/g2").set()
    assert await asyncio.wait_for(asyncio.gather(*both), 1) == [200, 200]
    assert app.most_at_once == 1


async def settle() -> None:
    """Let every runnable task run until it waits."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_at_most_the_limit_run_at_once_and_the_rest_start_in_arrival_order() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=3)
    paths = [f"/r{n}" for n in range(10)]
    calls = [asyncio.ensure_future(call(middleware, path)) for path in paths]
    await settle()
    assert app.started == paths[:3]
    for path in paths:
        app.gate(path).set()
        await settle()
    assert await asyncio.gather(*calls) == [200] * 10
    assert app.started == paths
    assert app.most_at_once == 3
    assert (middleware.limited, middleware.waited) == (10, 7)


async def test_a_slow_body_holds_no_place() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
    upload = asyncio.ensure_future(call(middleware, "/free/upload", chunks))
    await chunks.put(b"12345")  # half the body; the rest is slow to come
    await settle()
    # Served while the upload is still sending: the upload has not taken the only place.
    assert await asyncio.wait_for(call(middleware, "/free/other"), 1) == 200
    await chunks.put(b"67890")
    await chunks.put(None)
    assert await asyncio.wait_for(upload, 1) == 200
    assert app.started == ["/free/other", "/free/upload"]


async def test_a_streaming_response_gives_its_place_back_when_it_starts() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    stream = asyncio.ensure_future(call(middleware, "/stream"))
    await settle()
    assert await asyncio.wait_for(call(middleware, "/free/next"), 1) == 200
    app.gate("/stream").set()
    assert await stream == 200


async def test_health_probes_and_metrics_scrapes_pass_when_every_place_is_taken() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    busy = asyncio.ensure_future(call(middleware, "/busy"))
    await settle()
    assert await asyncio.wait_for(call(middleware, "/health/ready"), 1) == 200
    assert await asyncio.wait_for(call(middleware, "/metrics/free"), 1) == 200
    app.gate("/busy").set()
    assert await busy == 200
    assert middleware.limited == 1


async def test_a_failing_request_or_a_cancelled_wait_keeps_no_place() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    with pytest.raises(RuntimeError, match="the app failed"):
        await call(middleware, "/boom")

    busy = asyncio.ensure_future(call(middleware, "/busy"))
    await settle()
    waiting = asyncio.ensure_future(call(middleware, "/free/cancelled"))
    await settle()
    waiting.cancel()
    await settle()
    app.gate("/busy").set()
    assert await asyncio.wait_for(busy, 1) == 200
    # The only place is free again: both the failure and the cancelled wait gave it back...
    assert await asyncio.wait_for(call(middleware, "/free/after"), 1) == 200
    assert "/free/cancelled" not in app.started
    # ...and there is still only one: nothing gave back a place it did not hold.
    await assert_exactly_one_place(app, middleware)


def test_two_loops_at_once_have_their_own_places() -> None:
    barrier = threading.Barrier(2)
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=2)

    def serve(name: str) -> list[int]:
        async def burst() -> list[int]:
            barrier.wait(timeout=5)
            work = asyncio.gather(*(call(middleware, f"/free/{name}{n}") for n in range(20)))
            return await asyncio.wait_for(work, 5)

        return asyncio.run(burst())

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(serve, ["a", "b"])) == [[200] * 20, [200] * 20]


@pytest.mark.parametrize(
    ("headers", "has_body"),
    [
        ([], False),
        ([(b"content-length", b"0")], False),
        ([(b"content-length", b"5")], True),
        ([(b"transfer-encoding", b"chunked")], True),
    ],
)
async def test_a_body_is_read_before_the_wait_and_the_app_runs_only_with_a_place(
    headers: list[tuple[bytes, bytes]], has_body: bool
) -> None:
    entered: list[str] = []
    bodies: list[bytes] = []
    gate = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.append(scope["path"])
        if scope["path"] == "/busy":
            await gate.wait()
        else:
            bodies.append((await receive()).get("body", b""))  # replayed in full
        await send({"type": "http.response.start", "status": 200, "headers": []})

    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    received: list[str] = []

    async def receive() -> dict[str, Any]:
        received.append("body")
        return {"type": "http.request", "body": b"hello", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    def request(path: str, headers: list[tuple[bytes, bytes]]) -> asyncio.Future[None]:
        return asyncio.ensure_future(
            middleware({"type": "http", "path": path, "headers": headers}, receive, send)
        )

    busy = request("/busy", [])
    await settle()
    waiting = request("/x", headers)
    await settle()
    # With the only place taken, the app has not seen /x; its body, if any, is already read.
    assert entered == ["/busy"]
    assert received == (["body"] if has_body else [])
    gate.set()
    await asyncio.wait_for(asyncio.gather(busy, waiting), 1)
    assert entered == ["/busy", "/x"]
    assert bodies == [b"hello"]
    assert middleware.waited == 1


async def test_announcing_a_body_the_route_never_reads_does_not_slip_past_the_limit() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)

    async def announced_body(path: str) -> None:
        # GatedApp reads a body only with content-length; this one says chunked and is not read.
        scope: Scope = {"type": "http", "path": path, "headers": [(b"transfer-encoding", b"x")]}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"x", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            return None

        await middleware(scope, receive, send)

    calls = [asyncio.ensure_future(announced_body(f"/s{n}")) for n in range(3)]
    await settle()
    assert app.running == 1
    for n in range(3):
        app.gate(f"/s{n}").set()
    await asyncio.wait_for(asyncio.gather(*calls), 1)
    assert app.most_at_once == 1


async def test_a_body_over_the_read_ahead_is_passed_on_whole() -> None:
    chunks = [b"a" * 4, b"b" * 4, b"c" * 4, b"d" * 4]
    got: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            got.append(message["body"])
            if not message["more_body"]:
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})

    middleware = InFlightLimitMiddleware(app, max_in_flight=1, max_body_bytes=6)
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        return None

    await middleware(
        {"type": "http", "path": "/big", "headers": [(b"content-length", b"16")]}, receive, send
    )
    assert got == chunks  # nothing lost or repeated across the read-ahead's end


async def test_a_request_whose_client_left_while_it_waited_is_dropped_unserved() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    busy = asyncio.ensure_future(call(middleware, "/busy"))
    await settle()
    leaves, stays = Client("/leaves"), Client("/stays")
    waiting = [asyncio.ensure_future(client.request(middleware)) for client in (leaves, stays)]
    await settle()

    leaves.leave()
    app.gate("/busy").set()
    app.gate("/stays").set()
    await asyncio.wait_for(asyncio.gather(busy, *waiting), 1)

    assert app.started == ["/busy", "/stays"]
    assert leaves.sent == []
    assert stays.sent[0]["status"] == 200
    # The request the middleware looked at on the way is the app's, unchanged.
    assert app.received["/stays"] == {"type": "http.request", "body": b"", "more_body": False}
    assert (middleware.waited, middleware.abandoned) == (2, 1)
    assert await asyncio.wait_for(call(middleware, "/free/next"), 1) == 200  # the place is free


async def test_a_request_with_a_body_whose_client_left_while_it_waited_is_dropped_too() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1)
    busy = asyncio.ensure_future(call(middleware, "/busy"))
    await settle()
    leaves, stays = Client("/leaves", b"a body"), Client("/free/stays", b"a body")
    waiting = [asyncio.ensure_future(client.request(middleware)) for client in (leaves, stays)]
    await settle()

    leaves.leave()
    app.gate("/busy").set()
    await asyncio.wait_for(asyncio.gather(busy, *waiting), 1)

    assert app.started == ["/busy", "/free/stays"]  # the app read the body it was handed
    assert leaves.sent == []
    assert middleware.abandoned == 1


async def test_a_request_that_waited_max_wait_s_is_answered_503_and_never_runs() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, max_in_flight=1, max_wait_s=0.05)
    busy = asyncio.ensure_future(call(middleware, "/busy"))
    await settle()
    late = Client("/late")

    await asyncio.wait_for(late.request(middleware), 2)

    start, body = late.sent
    assert start["status"] == 503
    assert dict(start["headers"])[b"retry-after"] == b"1"
    assert json.loads(body["body"])["code"] == "overloaded"
    assert "/late" not in app.started
    assert middleware.shed == 1
    app.gate("/busy").set()
    assert await asyncio.wait_for(busy, 1) == 200
    # Shedding kept no place and gave back none it did not hold: still exactly one.
    await assert_exactly_one_place(app, middleware)


async def test_with_a_range_the_limit_starts_at_its_low_end() -> None:
    app = GatedApp()
    middleware = InFlightLimitMiddleware(app, min_in_flight=2, max_in_flight=8)
    paths = [f"/r{n}" for n in range(4)]
    calls = [asyncio.ensure_future(call(middleware, path)) for path in paths]
    await settle()

    assert app.started == paths[:2]
    assert middleware.limits() == [2]
    for path in paths:
        app.gate(path).set()
        await settle()
    assert await asyncio.gather(*calls) == [200] * 4
    assert app.most_at_once == 2


def answering(status: int) -> Any:
    """An app that answers every request with ``status`` after one yield."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize(("status", "grows"), [(200, True), (404, True), (503, False)])
async def test_with_a_range_only_answers_below_500_move_the_limit(status: int, grows: bool) -> None:
    """During an outage requests fail fast, which would read as room to grow: a range that
    counted them came back from a crash with 64 writers waiting (bench/README.md, finding
    40). Errors leave the limit where it was."""
    middleware = InFlightLimitMiddleware(answering(status), min_in_flight=2, max_in_flight=64)
    statuses = await asyncio.gather(*(call(middleware, f"/r{n}") for n in range(400)))

    assert set(statuses) == {status}
    assert (middleware.limits()[0] > 2) is grows


def test_bad_settings_are_refused() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    with pytest.raises(ValueError, match="max_in_flight must be at least 1"):
        InFlightLimitMiddleware(app, max_in_flight=0)
    with pytest.raises(ValueError, match="min_in_flight must be between 1 and max_in_flight"):
        InFlightLimitMiddleware(app, max_in_flight=4, min_in_flight=0)
    with pytest.raises(ValueError, match="min_in_flight must be between 1 and max_in_flight"):
        InFlightLimitMiddleware(app, max_in_flight=4, min_in_flight=5)
    with pytest.raises(ValueError, match="max_wait_s must be positive"):
        InFlightLimitMiddleware(app, max_in_flight=1, max_wait_s=0)
    with pytest.raises(ValueError, match="max_body_bytes must be at least 1"):
        InFlightLimitMiddleware(app, max_in_flight=1, max_body_bytes=0)
    with pytest.raises(TypeError, match="not a string"):
        InFlightLimitMiddleware(app, max_in_flight=1, exempt_prefixes="/health")
