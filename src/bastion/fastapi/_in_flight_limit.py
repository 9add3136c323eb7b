"""A pure-ASGI middleware that lets a bounded number of HTTP requests run at once.

Why: on PostgreSQL a request yields at every statement, so under load each turn of the event
loop runs one step of every request in flight. With 64 in flight, turns grew to several
milliseconds and the loop-lag p99 to 6-15 ms; with 8 in flight at most, the same load gave
2-3 ms, the same or more requests per second, and a lower p99 (bench/README.md, finding 35).
The others wait in arrival order, which also keeps the latency of a saturated service fair.

A request takes its place once its body has arrived (at once when it has none), so a client
that sends its body slowly holds no place while it does; it gives the place back when its
response starts, so a streaming response holds none either. The price: no more than
``max_in_flight`` requests wait on the database at once, so with slow statements the limit,
not the CPU, sets the throughput (``max_in_flight`` / the time a request takes).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["InFlightLimitMiddleware"]


class InFlightLimitMiddleware:
    """Run at most ``max_in_flight`` HTTP requests at once; the rest wait in arrival order.

    >>> app.add_middleware(InFlightLimitMiddleware, max_in_flight=8)  # doctest: +SKIP

    ``exempt_prefixes``: paths never limited (health probes and metrics scrapes, which must
    answer promptly exactly when the service is busy). Each event loop the app runs on has
    its own places.

    Raises:
        ValueError: ``max_in_flight`` is below 1.
        TypeError: ``exempt_prefixes`` is a single string (it would exempt every path that
            starts with any one of its characters).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        exempt_prefixes: Iterable[str] = ("/health", "/metrics"),
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if isinstance(exempt_prefixes, str):
            raise TypeError("exempt_prefixes takes a collection of path prefixes, not a string")
        self.app = app
        self.max_in_flight = max_in_flight
        self.exempt_prefixes = tuple(exempt_prefixes)
        # asyncio.Semaphore binds to the first loop that waits on it.
        self._places: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self.limited = 0
        """HTTP requests that came through the limit (not exempt ones)."""
        self.waited = 0
        """Of those, how many found every place taken and waited."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        places = self._places.get(loop)
        if places is None:
            places = self._places[loop] = asyncio.Semaphore(self.max_in_flight)
        self.limited += 1
        holding = False

        async def take_a_place() -> None:
            nonlocal holding
            if not holding:
                if places.locked():
                    self.waited += 1
                await places.acquire()
                holding = True

        def give_it_back() -> None:
            nonlocal holding
            if holding:
                holding = False
                places.release()

        async def receive_then_take_a_place() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                await take_a_place()  # the whole body is here: the work starts now
            return message

        async def send_and_give_back(message: Message) -> None:
            if message["type"] == "http.response.start":
                give_it_back()
            await send(message)

        try:
            if _has_body(scope):
                await self.app(scope, receive_then_take_a_place, send_and_give_back)
            else:
                await take_a_place()
                await self.app(scope, receive, send_and_give_back)
        finally:
            give_it_back()


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero length, or a chunked one)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False
