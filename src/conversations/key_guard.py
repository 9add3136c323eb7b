"""Clients that keep presenting unknown API keys are turned away before their lookups run.

A request's API key is looked up in the unit that serves it (:mod:`conversations.auth`): for
a write, in the write unit itself, which on SQLite holds the process's one write turn. So an
unknown key costs a unit before its 401, and a client sending unknown keys in a loop would
queue genuine writes behind its lookups. :class:`KeyGuard` counts failed lookups per client
address in a moving window (the ``limits`` library, in process memory, so per worker); past
the limit that address gets 429, with ``Retry-After``, until the window frees a slot,
answered before the lookup (for a write, before its unit opens; a read's unit opens first, as
its key is checked in the read's own unit).

Keys that authenticated recently are let through all the same (the hashes of the last
:data:`REMEMBERED_GOOD_KEYS` good keys, for :data:`GOOD_KEY_MEMORY_S`), so users behind the
same address as the misbehaving client (a NAT, a proxy) keep working. A remembered key is
still looked up on every request: a revoked key is refused at once; the memory only lets it
past the gate.

The gate costs a dictionary lookup per request; the ``limits`` window is consulted only when
a lookup fails.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Final

from fastapi import HTTPException
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

__all__ = ["DEFAULT_FAILED_KEY_RATE", "GOOD_KEY_MEMORY_S", "REMEMBERED_GOOD_KEYS", "KeyGuard"]

DEFAULT_FAILED_KEY_RATE: Final = "30/minute"
"""Unknown or revoked keys one client address may present before it is turned away."""

REMEMBERED_GOOD_KEYS: Final = 10_000
GOOD_KEY_MEMORY_S: Final = 600.0
_MAX_BLOCKED_ADDRESSES: Final = 100_000


class KeyGuard:
    """Counts failed key lookups per client address; see the module docstring.

    Args:
        failed_key_rate: a ``limits`` rate such as ``"30/minute"``.

    Raises:
        ValueError: ``failed_key_rate`` is not a rate ``limits`` understands.
    """

    def __init__(self, failed_key_rate: str = DEFAULT_FAILED_KEY_RATE) -> None:
        self._item: RateLimitItem = parse(failed_key_rate)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._blocked_until: dict[str, float] = {}  # address -> time.time() its window frees
        self._good: OrderedDict[str, float] = OrderedDict()  # key hash -> time.time() seen good

    def __repr__(self) -> str:
        return f"KeyGuard({self._item}, {len(self._blocked_until)} addresses turned away)"

    def admit(self, client: str, key_hash: str) -> None:
        """Let a request from ``client`` presenting ``key_hash`` go on to its lookup.

        Raises:
            HTTPException: 429 with ``Retry-After``: ``client`` is past the limit and the
                key has not authenticated recently.
        """
        until = self._blocked_until.get(client)
        if until is None:
            return
        now = time.time()
        if now >= until:
            del self._blocked_until[client]
            return
        seen = self._good.get(key_hash)
        if seen is not None and now - seen < GOOD_KEY_MEMORY_S:
            return
        retry_after_s = max(1, math.ceil(until - now))
        raise HTTPException(
            429,
            f"too many unknown API keys from this address; try again in {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )

    async def refused(self, client: str) -> None:
        """Count a failed lookup by ``client``; at the limit, turn it away until a slot of the
        window frees up."""
        await self._limiter.hit(self._item, client)
        stats = await self._limiter.get_window_stats(self._item, client)
        if stats.remaining > 0:
            return
        if len(self._blocked_until) >= _MAX_BLOCKED_ADDRESSES:
            self._forget_expired()
        self._blocked_until[client] = stats.reset_time

    def accepted(self, key_hash: str) -> None:
        """Remember that ``key_hash`` authenticated just now."""
        self._good[key_hash] = time.time()
        self._good.move_to_end(key_hash)
        if len(self._good) > REMEMBERED_GOOD_KEYS:
            self._good.popitem(last=False)

    def _forget_expired(self) -> None:
        now = time.time()
        for client in [c for c, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[client]
        while len(self._blocked_until) >= _MAX_BLOCKED_ADDRESSES:  # all live: drop the oldest
            del self._blocked_until[next(iter(self._blocked_until))]
