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
limit, not the CPU, sets the throughput (``max_in_flight`` / the time a request takes). Given
``min_in_flight`` as well, the limit moves between the two by how long requests take
(:mod:`bastion.fastapi._adaptive_places`): where more in flight only makes each take longer
it stays low, where it does not (requests that wait on the database) it grows. Only
responses below 500 count: errors come fast in an outage and would read as room to grow.

Under overload the queue is kept honest two ways:

* **A client that has gone is not served.** When a request's turn comes after a wait, the
  middleware asks the server, without waiting, whether the client disconnected (as
  Starlette's ``Request.is_disconnected`` does); if so the place passes on at once and the
  app never runs. (A request whose body was more than the read-ahead cannot be asked: the
  rest of its body comes first. A server that cannot answer at once is taken to mean the
  client is there.)
* **``max_wait_s``**: a request that waited that long for a place gets 503 with
  ``Retry-After`` and ``{"code": "overloaded"}`` instead, and the app never runs, so a
  backlog (say, every place held by requests waiting out a database restart) is answered
  rather than left to pile up. Without it the queue holds at most one request per open
  connection with HTTP/1.1 (uvicorn's ``--limit-concurrency`` caps those).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.errors import OverloadedError
from bastion.fastapi._adaptive_places import AdaptivePlaces
from bastion.fastapi._errors import error_response
from bastion.fastapi._held_requests import HeldRequests
from bastion.fastapi._replay import Replay

__all__ = ["InFlightLimitMiddleware"]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
"""How much of a body is read before the request waits for its place; the rest, if any, is
read by the app once it runs (and refused by a body size limit inside, if there is one)."""


class InFlightLimitMiddleware:
    """Run at most ``max_in_flight`` HTTP requests at once; the rest wait, first come, first
    served.

    >>> app.add_middleware(InFlightLimitMiddleware, max_in_flight=8)  # doctest: +SKIP
    >>> app.add_middleware(  # doctest: +SKIP
    ...     InFlightLimitMiddleware, min_in_flight=4, max_in_flight=64
    ... )

    Add it outermost (last), so that the ``receive`` it gets is the server's own: the look for
    a client gone steps that coroutine once by hand, which another middleware's wrapper (one
    that runs ``receive`` in a task group, say) may not survive without losing a message.

    With ``min_in_flight`` below ``max_in_flight``, the limit starts there and moves between
    the two by how long requests take (module docstring).

    ``max_wait_s``: how long a request may wait for a place before it is answered 503
    :class:`~bastion.OverloadedError` (``None``: as long as it takes). A request whose client
    is found gone when its place comes is dropped (module docstring). ``exempt_prefixes``:
    paths never limited (health probes and metrics scrapes, which must answer promptly exactly
    when the service is busy). Each event loop the app runs on has its own places. A route
    must not wait for another request of the same service while it runs: with every place
    taken, that request would never start.

    Raises:
        ValueError: ``max_in_flight`` or ``max_body_bytes`` is below 1, ``min_in_flight`` is
            below 1 or above ``max_in_flight``, or ``max_wait_s`` is not positive.
        TypeError: ``exempt_prefixes`` is a single string (it would exempt every path that
            starts with any one of its characters).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_in_flight: int,
        min_in_flight: int | None = None,
        exempt_prefixes: Iterable[str] = ("/health", "/metrics"),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_wait_s: float | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if min_in_flight is not None and not 1 <= min_in_flight <= max_in_flight:
            raise ValueError("min_in_flight must be between 1 and max_in_flight")
        if max_wait_s is not None and not max_wait_s > 0:
            raise ValueError("max_wait_s must be positive (or None: no limit)")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.min_in_flight = max_in_flight if min_in_flight is None else min_in_flight
        self.max_body_bytes = max_body_bytes
        self.max_wait_s = max_wait_s
        # asyncio's semaphores bind to the first loop that waits on them.
        self._places: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Places] = (
            weakref.WeakKeyDictionary()
        )
        self.limited = 0
        """HTTP requests that came through the limit (not exempt ones)."""
        self.waited = 0
        """Of those, how many found every place taken and waited (cancelled waits too)."""
        self.shed = 0
        """Of those, how many waited ``max_wait_s`` and were answered 503."""
        self.abandoned = 0
        """Of those, how many were dropped: their client had gone when their place came."""
        self._held = HeldRequests(exempt_prefixes, _LimitCollector(self))
        self.exempt_prefixes = self._held.exempt_prefixes
        self.registry = self._held.registry
        """``bastion_requests_limited_total``, ``bastion_requests_waited_total``,
        ``bastion_requests_shed_total`` and ``bastion_requests_abandoned_total``, which
        ``create_metrics_router``'s ``/metrics`` serves once the middleware has seen a
        request."""

    def _new_places(self) -> _Places:
        if self.min_in_flight < self.max_in_flight:
            return AdaptivePlaces(least=self.min_in_flight, most=self.max_in_flight)
        return asyncio.BoundedSemaphore(self.max_in_flight)

    def limits(self) -> list[int]:
        """The current limit of each event loop the middleware has served on."""
        return [
            places.limit if isinstance(places, AdaptivePlaces) else self.max_in_flight
            for places in list(self._places.values())
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._held.pass_straight(scope):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        places = self._places.get(loop)
        if places is None:
            places = self._places[loop] = self._new_places()
        self.limited += 1
        replay = Replay(receive)
        if _has_body(scope):
            await replay.read_body(self.max_body_bytes)
        waits = places.locked()
        if waits:
            self.waited += 1
            if not await _wait_for(places, self.max_wait_s):
                self.shed += 1
                # Not logged one by one: under overload that would be a line per request;
                # bastion_requests_shed_total counts them.
                await error_response(OverloadedError(_OVERLOADED))(scope, receive, send)
                return
        else:
            await places.acquire()  # at once: a place is free and no one waits
        holding = True
        adaptive = places if isinstance(places, AdaptivePlaces) else None
        started = time.perf_counter() if adaptive is not None else 0.0

        def give_it_back(answered: bool) -> None:
            nonlocal holding
            if holding:
                holding = False
                places.release()
                # Only answers say how long the work takes. Errors do not: during an outage
                # they come fast, which would read as room to grow, and the limit would
                # climb just before the database comes back (bench/README.md, finding 40).
                if adaptive is not None and answered:
                    adaptive.observe(time.perf_counter() - started)

        async def send_and_give_back(message: Message) -> None:
            if message["type"] == "http.response.start":
                give_it_back(answered=message["status"] < 500)
            await send(message)

        try:
            # Clients give up while they wait; one that did is not worth the work.
            if waits and replay.client_gone():
                self.abandoned += 1
                return
            # The server's own receive when nothing was read ahead: one call less per message.
            app_receive = replay if replay.holds_messages else receive
            await self.app(scope, app_receive, send_and_give_back)
        finally:
            give_it_back(answered=False)  # no response started: the app raised or was cancelled


async def _wait_for(places: _Places, max_wait_s: float | None) -> bool:
    """Take a place, waiting at most ``max_wait_s``; whether one was taken."""
    if max_wait_s is None:
        await places.acquire()
        return True
    try:
        async with asyncio.timeout(max_wait_s):
            await places.acquire()
    except TimeoutError:
        return False  # the semaphore gives back a place granted as the time ran out
    return True


_OVERLOADED: Final = "the service is busy: too many requests were ahead of this one; try again"


_Places = asyncio.BoundedSemaphore | AdaptivePlaces
"""A loop's places: a fixed number, or one that follows how long requests take."""


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

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
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
        limits = self._middleware.limits()
        yield GaugeMetricFamily(
            "bastion_requests_in_flight_limit",
            "How many limited requests may run at once now (summed over event loops).",
            value=sum(limits) if limits else self._middleware.min_in_flight,
        )
        yield CounterMetricFamily(
            "bastion_requests_shed",
            "Limited requests answered 503 after waiting the longest they may.",
            value=self._middleware.shed,
        )
        yield CounterMetricFamily(
            "bastion_requests_abandoned",
            "Limited requests dropped unserved: their client had gone when their place came.",
            value=self._middleware.abandoned,
        )
