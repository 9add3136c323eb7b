"""A pure-ASGI middleware that bounds how much request work starts in one event-loop turn.

Why: on SQLite, Bastion runs statements it knows to be fast on the event loop itself (no
thread hop), so a read request runs from start to finish without ever yielding. Under
saturation, one loop turn then runs every request that arrived during the turn before: at 64
connections, 64 requests and 35 ms of work. Every timer in the process (statement timeouts,
the loop-lag monitor), every health probe and, on uvloop, every connection waiting to be
accepted (one per turn) waits for that turn to end. bench/README.md, finding 34, measured it:
loop-lag p99 55-85 ms, and on uvloop a client p99 of 0.8 s for a 40 ms median.

The middleware lets requests start while the current turn has run less than ``budget_s``;
later arrivals wait, in arrival order, and a callback scheduled once per turn starts as many
of them as fit in a turn. How many fit is learnt from the turns themselves (one more after a
turn under half the budget, one fewer after a turn over it), so it follows what requests
cost without measuring them one by one. Only the start is paced: once started, a request
runs as it would without the middleware, so a streaming response holds nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["TurnBudgetMiddleware"]

DEFAULT_BUDGET_S = 0.002
"""2 ms: the loop-lag target of the performance issue is 5 ms, and a timer waits up to about
two turns (the rest of the turn it became due in, then the callbacks queued before it)."""
_MOST_PER_TURN = 256
"""A ceiling on the learnt number of starts per turn, so that a long quiet spell of short
turns cannot grow it past what a burst could undo quickly."""


class TurnBudgetMiddleware:
    """Start HTTP requests at most ``budget_s`` of loop time per turn; the rest wait their turn.

    ``exempt_prefixes``: paths that are never paced (health probes, which must answer promptly
    exactly when the service is busy). ``clock`` is the monotonic clock to measure turns with
    (a test may pass its own).

    Raises:
        ValueError: ``budget_s`` is not positive.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        budget_s: float = DEFAULT_BUDGET_S,
        exempt_prefixes: Iterable[str] = ("/health",),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not budget_s > 0:
            raise ValueError("budget_s must be positive")
        self.app = app
        self.budget_s = budget_s
        self.exempt_prefixes = tuple(exempt_prefixes)
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._turn_started = 0.0
        self._ticking = False
        self.per_turn = 4
        """How many waiting requests the next turn starts (learnt; see the module docstring)."""
        self.started = 0
        """HTTP requests that came through the pacing (not exempt ones)."""
        self.deferred = 0
        """Of those, how many had to wait for a later turn."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        await self._admit()
        await self.app(scope, receive, send)

    async def _admit(self) -> None:
        """Return when this request may start: at once while the turn has budget left and no
        one waits, else when a later turn starts it.

        Raises:
            asyncio.CancelledError: the request was cancelled while it waited (it leaves the
                queue; its place goes to the next).
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (a test client's, a restarted server's): the old one's waiters and
            # turn are not this one's.
            self._loop = loop
            self._waiters.clear()
            self._ticking = False
        self.started += 1
        if not self._ticking:
            self._turn_started = self._clock()
            self._ticking = True
            loop.call_soon(self._next_turn)
        elif not self._waiters and self._clock() - self._turn_started <= self.budget_s:
            return
        else:
            self.deferred += 1
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            await waiter

    def _next_turn(self) -> None:
        """Once per turn while requests wait: learn from the turn that ended, start the next
        ones."""
        now = self._clock()
        turn_s = now - self._turn_started
        if turn_s > self.budget_s:
            self.per_turn = max(1, self.per_turn - 1)
        elif turn_s < self.budget_s / 2:
            self.per_turn = min(_MOST_PER_TURN, self.per_turn + 1)
        self._turn_started = now
        if not self._waiters:
            self._ticking = False
            return
        # Scheduled before the wake-ups, so that next turn it runs before the requests woken
        # now, and measures the turn they run in.
        asyncio.get_running_loop().call_soon(self._next_turn)
        woken = 0
        while self._waiters and woken < self.per_turn:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled request's place goes to the next
                waiter.set_result(None)
                woken += 1
