"""What RequestContextMiddleware costs per request, around an ASGI app that does nothing.

Run: ``.venv/bin/python -m bench.middleware_cost``. It prints microseconds per request for the
bare app and for the app behind the middleware (request id, Server-Timing, N+1 counting).
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.fastapi import RequestContextMiddleware

CALLS = 100_000
SCOPE: Scope = {
    "type": "http",
    "method": "GET",
    "path": "/v1/conversations/x",
    "headers": [(b"authorization", b"Bearer x"), (b"x-request-id", b"abc-123")],
}


async def bare_app(_scope: Scope, _receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def receive() -> Message:
    return {"type": "http.request", "body": b""}


async def discard(_message: Message) -> None:
    return None


async def per_request_us(app: ASGIApp) -> float:
    for _ in range(2_000):  # warm up
        await app(dict(SCOPE), receive, discard)
    started = time.perf_counter()
    for _ in range(CALLS):
        await app(dict(SCOPE), receive, discard)
    return (time.perf_counter() - started) / CALLS * 1e6


async def main() -> None:
    bare = await per_request_us(bare_app)
    wrapped = await per_request_us(RequestContextMiddleware(bare_app))
    print(f"bare app:        {bare:6.2f} us per request")
    print(f"with middleware: {wrapped:6.2f} us per request ({wrapped - bare:+.2f} us)")


if __name__ == "__main__":
    asyncio.run(main())
