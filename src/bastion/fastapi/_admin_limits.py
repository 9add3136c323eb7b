"""A rate limit for expensive admin operations: too many in a window answers 429.

Backups, restores, verifications and optimisations each cost minutes of I/O; a burst of them —
a script in a loop, a stolen token — would take the database down with it. The limit is a moving
window per client address and operation (the ``limits`` library, in process memory, so per
worker), and the 429 carries ``Retry-After`` with the seconds until a slot frees up.
"""

from __future__ import annotations

import math
import time

from fastapi import HTTPException
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.requests import Request

__all__ = ["DEFAULT_ADMIN_RATE", "AdminRateLimit"]

DEFAULT_ADMIN_RATE = "6/minute"
"""Expensive admin operations allowed per client address and operation kind."""


class AdminRateLimit:
    """Counts expensive admin calls per (client address, operation) in a moving window.

    Args:
        rate: a ``limits`` rate such as ``"6/minute"`` or ``"2/second"``.

    Raises:
        ValueError: ``rate`` is not a rate ``limits`` understands.
    """

    def __init__(self, rate: str = DEFAULT_ADMIN_RATE) -> None:
        self._item: RateLimitItem = parse(rate)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def check(self, request: Request, operation: str) -> None:
        """Count one call of ``operation`` by the request's client.

        Raises:
            HTTPException: 429 with ``Retry-After`` when the window is full.
        """
        client = request.client.host if request.client is not None else "unknown"
        if await self._limiter.hit(self._item, client, operation):
            return
        stats = await self._limiter.get_window_stats(self._item, client, operation)
        retry_after_s = max(1, math.ceil(stats.reset_time - time.time()))
        raise HTTPException(
            429,
            f"too many {operation} calls; try again in {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )
