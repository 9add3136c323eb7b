"""A pure-ASGI middleware that bounds how much request work starts in one event-loop turn.

Why: on SQLite, Bastion runs statements it knows to be fast on the event loop itself (no
thread hop), so a read request runs from start to finish without ever yielding. Under
saturation, one loop turn then runs every request that arrived during the turn before: at 64
connections, 64 requests and 35 ms of work. Every timer in the process (statement timeouts,
the loop-lag monitor), every health probe and, on uvloop, every connection waiting to be
accepted (one per turn) waits for that turn to end. bench/README.md, finding 34, measured the
reference service's point reads at a loop-lag p99 of 64-68 ms on uvloop (85 ms on asyncio's
loop), and on uvloop a client p99 of 0.8 s for a 40 ms median.

How: pacing begins at the first request after a quiet spell, or at the callback that runs
once per turn while requests wait. Requests start at once while less than ``budget_s`` has
passed since then and none waits; later ones wait, in arrival order, and the per-turn
callback starts as many of them as fit in a turn. How many fit is learnt from the turns
themselves (one more after a turn under half the budget, one fewer after a turn over it),
so it follows what requests cost without timing them one by one. Only the start is paced:
once started, a request runs as it would without the middleware, so a streaming response
holds nothing. The queue is as long as the requests in flight, at most one per open
connection with HTTP/1.1; uvicorn's ``--limit-concurrency`` caps those. A request whose client
hung up while it waited is dropped when its turn comes, unserved, as
:class:`~bastion.fastapi.InFlightLimitMiddleware` drops one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.fastapi._held_requests import HeldRequests
from bastion.fastapi._replay import Replay

__all__ = ["TurnBudgetMiddleware"]

DEFAULT_BUDGET_S = 0.001
"""1 ms: the loop-lag target of the performance issue is 5 ms, and a timer waits up to about
two turns (the rest of the turn it became due in, then the callbacks queued before it). Turns
this short also let uvloop, which accepts one connection per turn, take in a thousand new
connections faster: against 2 ms, the reference service's SQLite point read at 1,000
connections had a p99 of 0.65-1.09 s instead of 0.68-1.70 s (8 fresh servers each), at the
same req/s at 64 connections and a loop-lag p99 of 1-3 ms instead of 3-5 (bench/README.md,
finding 39)."""
_FIRST_PER_TURN = 4
_MAX_PER_TURN = 256
"""A ceiling on the learnt number of starts per turn, so that a long quiet spell of short
turns cannot grow it past what a burst could undo quickly."""


@dataclass
class _LoopPacing:
    """The pacing of one event loop: its queue, its turn, and how many start per turn."""

    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    paced_since: float = 0.0
    ticking: bool = False
    per_turn: int = _FIRST_PER_TURN


class TurnBudgetMiddleware:
    """Start HTTP requests at most ``budget_s`` of loop time per turn; the rest wait their turn.

    >>> app.add_middleware(TurnBudgetMiddleware)  # doctest: +SKIP

    ``exempt_prefixes``: paths that are never paced (health probes and metrics scrapes, which
    must answer promptly exactly when the service is busy). ``clock`` is the monotonic clock
    to measure turns with (a test may pass its own). Each event loop the app runs on is paced
    on its own. Its counters are in :attr:`registry`, which ``create_metrics_router``'s
    ``/metrics`` serves beside the Database's once the middleware has seen a request.

    Raises:
        ValueError: ``budget_s`` is not positive.
        TypeError: ``exempt_prefixes`` is a single string (it would exempt every path that
            starts with any one of its characters).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        budget_s: float = DEFAULT_BUDGET_S,
        exempt_prefixes: Iterable[str] = ("/health", "/metrics"),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not budget_s > 0:
            raise ValueError("budget_s must be positive")
        self.app = app
        self.budget_s = budget_s
        self._clock = clock
        # Per loop, and forgotten with it: two loops may serve the app at once (two threads).
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPacing] = (
            weakref.WeakKeyDictionary()
        )
        self.paced = 0
        """HTTP requests that came through the pacing (not exempt ones)."""
        self.deferred = 0
        """Of those, how many had to wait for a later turn."""
        self.abandoned = 0
        """Of those, how many were dropped: their client had gone when their turn came."""
        self._held = HeldRequests(exempt_prefixes, _PacingCollector(self))
        self.exempt_prefixes = self._held.exempt_prefixes
        self.registry = self._held.registry
        """``bastion_requests_paced_total``, ``bastion_requests_deferred_total`` and
        ``bastion_requests_paced_abandoned_total``."""

    @property
    def per_turn(self) -> int:
        """How many waiting requests the running loop's next turn starts (learnt)."""
        pacing = self._loops.get(asyncio.get_running_loop())
        return _FIRST_PER_TURN if pacing is None else pacing.per_turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._held.pass_straight(scope):
            await self.app(scope, receive, send)
            return
        waited_in = await self._admit()
        if waited_in is None:
            await self.app(scope, receive, send)
            return
        # It waited, and clients give up while they wait: one that did is not worth the
        # work (a point read's statements, a write's unit), which would delay the rest. Its
        # start goes to the next in line, so a turn still starts as many as fit in it.
        replay = Replay(receive)
        if replay.client_gone():
            self.abandoned += 1
            _start_next(waited_in)
            return
        await self.app(scope, replay if replay.holds_messages else receive, send)

    async def _admit(self) -> _LoopPacing | None:
        """Return when this request may start: at once while the turn has budget left and no
        one waits, else when a later turn starts it; the loop's pacing if it waited.

        Raises:
            asyncio.CancelledError: the request was cancelled while it waited. It leaves the
                queue; if it had already been started, the next waiting request starts in
                its place.
        """
        loop = asyncio.get_running_loop()
        pacing = self._loops.get(loop)
        if pacing is None:
            pacing = self._loops[loop] = _LoopPacing()
        self.paced += 1
        if not pacing.ticking:
            pacing.paced_since = self._clock()
            pacing.ticking = True
            loop.call_soon(self._next_turn, pacing)
            return None
        if not pacing.waiters and self._clock() - pacing.paced_since <= self.budget_s:
            return None
        self.deferred += 1
        waiter: asyncio.Future[None] = loop.create_future()
        pacing.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):  # the per-turn callback may have popped it
                    pacing.waiters.remove(waiter)
            else:  # started, then cancelled before it ran: its start goes to the next
                _start_next(pacing)
            raise
        return pacing

    def _next_turn(self, pacing: _LoopPacing) -> None:
        """Once per turn while requests wait: learn from the turn that ended, start the next
        ones."""
        now = self._clock()
        turn_s = now - pacing.paced_since
        if turn_s > self.budget_s:
            pacing.per_turn = max(1, pacing.per_turn - 1)
        elif turn_s < self.budget_s / 2:
            pacing.per_turn = min(_MAX_PER_TURN, pacing.per_turn + 1)
        pacing.paced_since = now
        if not pacing.waiters:
            pacing.ticking = False
            return
        # Scheduled before the wake-ups, so that next turn it runs before the requests woken
        # now, and measures the turn they run in.
        asyncio.get_running_loop().call_soon(self._next_turn, pacing)
        for _ in range(pacing.per_turn):
            if not _start_next(pacing):
                break


def _start_next(pacing: _LoopPacing) -> bool:
    """Start the first waiting request still waiting; whether there was one."""
    while pacing.waiters:
        waiter = pacing.waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False


class _PacingCollector(Collector):
    """The middleware's counters, read when scraped (no lock on the request path)."""

    def __init__(self, middleware: TurnBudgetMiddleware) -> None:
        self._middleware = middleware

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "bastion_requests_paced",
            "HTTP requests whose start went through the turn budget.",
            value=self._middleware.paced,
        )
        yield CounterMetricFamily(
            "bastion_requests_deferred",
            "Paced requests that waited for a later event-loop turn to start.",
            value=self._middleware.deferred,
        )
        yield CounterMetricFamily(
            "bastion_requests_paced_abandoned",
            "Paced requests dropped unserved: their client had gone when their turn came.",
            value=self._middleware.abandoned,
        )
