"""A client address may present only so many API keys that are not known good.

A request's API key is looked up in the unit that serves it (:mod:`conversations.auth`): for
a write, in the write unit itself, which on SQLite holds the process's one write turn. So an
unknown key costs a unit before its 401, and a client sending unknown keys in a loop would
queue genuine writes behind its lookups.

:class:`KeyGuard` lets a key that authenticated lately straight through (the hashes of the
last :data:`REMEMBERED_GOOD_KEYS` good keys, for :data:`GOOD_KEY_MEMORY_S`; a dictionary
lookup, the whole cost for a known client). Any other key counts, when it is presented,
against its client address in a moving window (the ``limits`` library, in process memory,
so per worker): past the limit, that address gets 429 with ``Retry-After`` until the window
frees a slot, before the lookup and, for a write, before its unit opens. Counting at
presentation, not at failure, also holds back a burst of requests sent in parallel, which
would all be looked up before the first of them failed.

So users behind the same address as a misbehaving client (a NAT, a proxy) keep working once
their key has authenticated; a remembered key is still looked up on every request (a revoked
key is refused at once, and forgotten). The address is the one the ASGI server reports: behind
a proxy, run uvicorn with ``--forwarded-allow-ips`` set to the proxy's address, or every
client shares the proxy's. IPv6 addresses count by their /64 network, which one client can
rotate through; requests with no address share one count.
"""

from __future__ import annotations

import ipaddress
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
"""Keys not known good that one client address may present (``API_FAILED_KEY_RATE``)."""

REMEMBERED_GOOD_KEYS: Final = 10_000
GOOD_KEY_MEMORY_S: Final = 600.0
_MAX_BLOCKED_ADDRESSES: Final = 100_000
_NO_ADDRESS: Final = "-"


class KeyGuard:
    """Counts the keys not known good that each client address presents; see the module
    docstring.

    Args:
        failed_key_rate: a ``limits`` rate such as ``"30/minute"``.

    Raises:
        ValueError: ``failed_key_rate`` is not a rate ``limits`` understands.
    """

    def __init__(self, failed_key_rate: str = DEFAULT_FAILED_KEY_RATE) -> None:
        self._item: RateLimitItem = parse(failed_key_rate)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._blocked_until: dict[str, float] = {}  # address -> time.time() a slot frees up
        self._good: OrderedDict[str, float] = OrderedDict()  # key hash -> time.time() seen good

    def __repr__(self) -> str:
        return f"KeyGuard({self._item}, {len(self._blocked_until)} addresses turned away)"

    async def admit(self, client: str | None, key_hash: str) -> None:
        """Let a request from address ``client`` presenting ``key_hash`` go on to its lookup,
        counting the key against the address unless it authenticated lately.

        Raises:
            HTTPException: 429 with ``Retry-After``: the address is past the limit.
        """
        now = time.time()
        seen = self._good.get(key_hash)
        if seen is not None and now - seen < GOOD_KEY_MEMORY_S:
            return
        address = _counted_address(client)
        until = self._blocked_until.get(address)
        if until is not None:
            if now < until:
                raise _too_many(until - now)
            del self._blocked_until[address]
        if await self._limiter.hit(self._item, address):
            return
        stats = await self._limiter.get_window_stats(self._item, address)
        if len(self._blocked_until) >= _MAX_BLOCKED_ADDRESSES:
            self._forget_expired(now)
        self._blocked_until[address] = stats.reset_time
        raise _too_many(stats.reset_time - now)

    def accepted(self, key_hash: str) -> None:
        """Remember that ``key_hash`` authenticated just now."""
        self._good[key_hash] = time.time()
        self._good.move_to_end(key_hash)
        if len(self._good) > REMEMBERED_GOOD_KEYS:
            self._good.popitem(last=False)

    def refused(self, key_hash: str) -> None:
        """Forget ``key_hash`` (revoked since it was remembered): it counts from now on."""
        self._good.pop(key_hash, None)

    def _forget_expired(self, now: float) -> None:
        for address in [a for a, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[address]
        while len(self._blocked_until) >= _MAX_BLOCKED_ADDRESSES:  # all live: drop the oldest
            del self._blocked_until[next(iter(self._blocked_until))]


def _counted_address(client: str | None) -> str:
    """What ``client``'s keys count against: the address, or its /64 network for IPv6."""
    if not client:
        return _NO_ADDRESS
    if ":" not in client:
        return client
    try:
        return str(ipaddress.IPv6Network(f"{client}/64", strict=False))
    except ValueError:  # not an IPv6 address after all (a hostname, a test transport's name)
        return client


def _too_many(wait_s: float) -> HTTPException:
    retry_after_s = max(1, math.ceil(wait_s))
    return HTTPException(
        429,
        f"too many unknown API keys from this address; try again in {retry_after_s} s",
        headers={"Retry-After": str(retry_after_s)},
    )
