"""Places for requests on one event loop whose number follows how long requests take.

A fixed limit suits one kind of work. Eight places suit the reference service's
sub-millisecond statements (bench/README.md, finding 35), but a route whose statement takes
20 ms then runs at most 8 / 22 ms, about 360 requests a second, with the CPU idle. Where the
CPU is the bottleneck, more requests in flight only make each take longer; where the database
is, they do not. So the limit follows the ratio of the shortest time a request took lately to
the typical time now (a gradient, as in Netflix's concurrency-limits, "Gradient2"):

* Every :data:`WINDOW` requests, ``gradient = shortest / median`` over that window (between
  0.5 and 1), and the limit moves a fifth of the way to ``limit * gradient + sqrt(limit)``.
  Requests that take no longer than the shortest lately (gradient 1) let it grow by about
  the square root; requests slowed by their number pull it down.
* The shortest time is forgotten every :data:`MIN_WINDOW_S` seconds, so that a limit held
  down by a fast spell can find out that requests got slower for good (a new query plan, a
  database further away).

The limit starts at the range's low end and stays within it. Measured (bench/README.md,
finding 40): on the reference service's point read it settled at 6-9 (the fixed limit is 8);
on a route that waits 20 ms in the database, at 33-35, and served 1,365 requests a second
where 8 places served 355.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Final

__all__ = ["AdaptivePlaces"]

WINDOW: Final = 20
"""Requests per adjustment of the limit."""
MIN_WINDOW_S: Final = 5.0
"""How long the shortest request time lately is kept before it is measured afresh."""
_SMOOTHING: Final = 0.2
_MIN_GRADIENT: Final = 0.5


class AdaptivePlaces:
    """At most ``limit`` requests at once on one event loop, the rest waiting in arrival
    order, with ``limit`` between ``least`` and ``most`` set by how long requests take
    (module docstring). The same calls as an :class:`asyncio.BoundedSemaphore`, plus
    :meth:`observe`.

    Raises:
        ValueError: not ``1 <= least <= most``.
    """

    def __init__(
        self, *, least: int, most: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not 1 <= least <= most:
            raise ValueError("the in-flight range must satisfy 1 <= min_in_flight <= max_in_flight")
        self.least = least
        self.most = most
        self._clock = clock
        self._limit = float(least)
        self.taken = 0
        """How many requests hold a place now (more than the limit for a while after it
        dropped)."""
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._times: list[float] = []
        self._shortest = math.inf
        self._shortest_until = clock() + MIN_WINDOW_S

    @property
    def limit(self) -> int:
        """How many requests may hold a place at once now."""
        return int(self._limit)

    @property
    def waiting(self) -> int:
        """How many requests wait for a place."""
        return len(self._waiters)

    def locked(self) -> bool:
        """Whether a request would wait (every place taken, or others already waiting)."""
        return self.taken >= self.limit or bool(self._waiters)

    async def acquire(self) -> None:
        """Take a place, waiting in arrival order.

        Raises:
            asyncio.CancelledError: cancelled while waiting; no place is kept.
        """
        if not self.locked():
            self.taken += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted as the cancellation came: the next in line gets it
            else:
                with contextlib.suppress(ValueError):  # _start_waiters may have dropped it
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a place back; the longest waiter gets it if the limit allows."""
        self.taken -= 1
        self._start_waiters()

    def observe(self, seconds: float) -> None:
        """Record how long a request held its place; every :data:`WINDOW` of them the limit
        moves (module docstring)."""
        now = self._clock()
        if now >= self._shortest_until:
            self._shortest = math.inf
            self._shortest_until = now + MIN_WINDOW_S
        self._shortest = min(self._shortest, seconds)
        self._times.append(seconds)
        if len(self._times) < WINDOW:
            return
        typical = statistics.median(self._times)
        self._times.clear()
        gradient = 1.0 if typical <= 0 else max(_MIN_GRADIENT, min(1.0, self._shortest / typical))
        target = self._limit * gradient + math.sqrt(self._limit)
        self._limit += _SMOOTHING * (target - self._limit)
        self._limit = max(float(self.least), min(float(self.most), self._limit))
        self._start_waiters()

    def _start_waiters(self) -> None:
        while self._waiters and self.taken < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter removes itself, later
                self.taken += 1
                waiter.set_result(None)
