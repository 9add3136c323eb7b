"""A pure-ASGI middleware that lets a bounded number of HTTP requests run at once.

Why: on PostgreSQL a request yields at every statement, so under load each turn of the event
loop runs one step of every request in flight. With 64 in flight, turns grew to several
milliseconds and the loop-lag p99 to 6-13 ms; with 8 in flight at most, the same load gave
2-4 ms, about the same requests per second, and a lower p99 (bench/README.md, finding 35).
The others wait first come, first served, which also keeps a saturated service's latency
fair.

A request announcing a body has it read first, up to ``max_body_bytes``, and replayed to the
app: so a client sending its body slowly holds no place while it does, and a client cannot
slip past the limit by announcing a body its route never reads. A request gives its place
back when its response starts, so a streaming response holds none; work the app does after
that (a ``yield`` dependency's teardown, background tasks) is not counted. The price: no more
than ``max_in_flight`` requests wait on the database at once, so with slow statements the
limit, not the CPU, sets the throughput (``max_in_flight`` / the time a request takes). The
queue has no bound of its own: it holds at most one request per open connection with HTTP/1.1
(uvicorn's ``--limit-concurrency`` caps those), and a request whose client has gone still
runs when its turn comes.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.fastapi._exempt_paths import exempt_prefixes_of, is_exempt
from bastion.fastapi._metrics import serve_metrics_of

__all__ = ["InFlightLimitMiddleware"]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""How much of a body is read before the request waits for its place; the rest, if any, is
read by the app once it runs (and refused by a body size limit inside, if there is one)."""


class InFlightLimitMiddleware:
    """Run at most ``max_in_flight`` HTTP requests at once; the rest wait, first come, first
    served.

    >>> app.add_middleware(InFlightLimitMiddleware, max_in_flight=8)  # doctest: +SKIP

    ``exempt_prefixes``: paths never limited (health probes and metrics scrapes, which must
    answer promptly exactly when the service is busy). Each event loop the app runs on has
    its own places. A route must not wait for another request of the same service while it
    runs: with every place taken, that request would never start.

    Raises:
        ValueError: ``max_in_flight`` or ``max_body_bytes`` is below 1.
        TypeError: ``exempt_prefixes`` is a single string (it would exempt every path that
            starts with any one of its characters).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        exempt_prefixes: Iterable[str] = ("/health", "/metrics"),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_body_bytes = max_body_bytes
        self.exempt_prefixes = exempt_prefixes_of(exempt_prefixes)
        # asyncio's semaphores bind to the first loop that waits on them.
        self._places: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.BoundedSemaphore
        ] = weakref.WeakKeyDictionary()
        self.limited = 0
        """HTTP requests that came through the limit (not exempt ones)."""
        self.waited = 0
        """Of those, how many found every place taken and waited (cancelled waits too)."""
        self._metrics_served = False
        self.registry = CollectorRegistry(auto_describe=True)
        """``bastion_requests_limited_total`` and ``bastion_requests_waited_total``, which
        ``create_metrics_router``'s ``/metrics`` serves once the middleware has seen a
        request."""
        self.registry.register(_LimitCollector(self))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._metrics_served and "app" in scope:
            # Starlette puts the app in the scope: its metrics route then serves the counters.
            serve_metrics_of(scope["app"], self.registry)
            self._metrics_served = True
        if is_exempt(scope, self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        places = self._places.get(loop)
        if places is None:
            places = self._places[loop] = asyncio.BoundedSemaphore(self.max_in_flight)
        self.limited += 1
        if _has_body(scope):
            receive = await _read_ahead(receive, self.max_body_bytes)
        if places.locked():
            self.waited += 1
        await places.acquire()
        holding = True

        def give_it_back() -> None:
            nonlocal holding
            if holding:
                holding = False
                places.release()

        async def send_and_give_back(message: Message) -> None:
            if message["type"] == "http.response.start":
                give_it_back()
            await send(message)

        try:
            await self.app(scope, receive, send_and_give_back)
        finally:
            give_it_back()


async def _read_ahead(receive: Receive, max_bytes: int) -> Receive:
    """Read the request's body (up to ``max_bytes``, or until the client goes) and return a
    ``receive`` that replays what was read, then goes on from ``receive``."""
    read: list[Message] = []
    size = 0
    while size <= max_bytes:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
        size += len(message.get("body", b""))

    async def replay() -> Message:
        if read:
            return read.pop(0)
        return await receive()

    return replay


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a non-zero length, or a chunked one)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False


class _LimitCollector(Collector):
    """The middleware's counters, read when scraped (no lock on the request path)."""

    def __init__(self, middleware: InFlightLimitMiddleware) -> None:
        self._middleware = middleware

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "bastion_requests_limited",
            "HTTP requests that went through the in-flight limit.",
            value=self._middleware.limited,
        )
        yield CounterMetricFamily(
            "bastion_requests_waited",
            "Limited requests that found every place taken and waited.",
            value=self._middleware.waited,
        )
