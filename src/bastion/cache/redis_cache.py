"""``RedisCache``: the :class:`~bastion.cache.Cache` on Redis (redis-py's asyncio client).

A read is one round trip (``MGET`` of the value and of the key's and its tags' generation
counters). On a miss, one load per key runs in this process (:mod:`~bastion.cache.flights`)
and, across processes, the loader holds a short Redis lock that others wait on for up to
``CACHE_LOCK_WAIT_S`` before loading themselves. The loaded value is stored only if no
invalidation of the key or its tags happened since the read (a Lua script compares the
generations atomically), so a load that raced a write can never put the old value back.

Fail-open: a Redis command that fails or exceeds ``CACHE_SOCKET_TIMEOUT_S`` is counted
(``bastion_cache_errors``) and the read is served from the source
(``bastion_cache_bypassed``). After ``CACHE_BREAKER_THRESHOLD`` failures in a row the cache
circuit opens and Redis is not tried at all for ``CACHE_BREAKER_RESET_S`` — a dead Redis costs
no timeout per request — then one call probes it. Invalidations that could not reach Redis
are kept (bounded; past the bound the whole prefix is flushed instead) and applied before the
next command once Redis answers. (Other processes that can still reach Redis meanwhile may
serve the value such a write changed until then, or until its TTL: keep TTLs short.)

:meth:`RedisCache.clear` (after a database restore, import or reset) bumps a cache-wide
epoch that every store checks, then drops the prefix (``SCAN`` + ``UNLINK``, 1,000 keys at a time).

Cancellation: redis-py (≥ 4.5.4, CVE-2023-28858/28859) disconnects a connection whose command
was cancelled before its reply was read, so a pooled connection never hands one caller the
reply meant for another; ``tests/cache/test_cancellation.py`` holds it to that.

>>> cache = RedisCache(CacheSettings(REDIS_URL="redis://127.0.0.1:6379/0"))  # doctest: +SKIP
>>> await cache.get_or_load("conversation:42", load_conversation, ttl_s=60)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import LockError, RedisError

from bastion.breaker import BreakerState, CircuitBreaker
from bastion.cache.codec import CacheCodecError, decode, encode
from bastion.cache.flights import Outcome, SingleFlight
from bastion.cache.metrics import CacheMetrics
from bastion.cache.settings import CacheSettings
from bastion.errors import CircuitOpenError, ConfigurationError, DatabaseUnavailableError
from bastion.health import ComponentHealth, HealthStatus

__all__ = ["RedisCache"]

logger = logging.getLogger("bastion.cache")

T = TypeVar("T")
R = TypeVar("R")

_REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError)
_OUTAGE: Final = DatabaseUnavailableError("the cache (Redis) is unreachable")
_MAX_KEY: Final = 200  # longer keys are hashed: Redis keys cost memory per byte
_MAX_PENDING: Final = 10_000
_GENERATION_TTL_MS: Final = 3_600_000  # must outlive the slowest load (see _STORE)
_LOCK_POLL_S: Final = 0.002
_LOCK_POLL_MAX_S: Final = 0.02

# KEYS: value, key generation, tag generations…, cache epoch, tag sets…
# ARGV: blob, ttl ms, tag count, expected key generation, expected tag generations…, epoch
# The epoch is the cache-wide generation clear() bumps.
_STORE: Final = """
local n = tonumber(ARGV[3])
for i = 0, n + 1 do
  if (redis.call('GET', KEYS[2 + i]) or '0') ~= ARGV[4 + i] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 1, n do
  local set = KEYS[3 + n + i]
  redis.call('SADD', set, KEYS[1])
  if redis.call('PTTL', set) < tonumber(ARGV[2]) then redis.call('PEXPIRE', set, ARGV[2]) end
end
return 1
"""
# KEYS: values…, their generations…, their load locks…, tag sets…, tag generations…
# ARGV: key count, tag count, generation ttl ms
# A load under way when its key is invalidated will not be stored, so its lock is dropped
# too: processes waiting on it load at once instead of waiting out CACHE_LOCK_WAIT_S.
_INVALIDATE: Final = """
local nk, nt = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, nk do
  redis.call('DEL', KEYS[i], KEYS[2 * nk + i])
  redis.call('INCR', KEYS[nk + i])
  redis.call('PEXPIRE', KEYS[nk + i], ARGV[3])
end
for i = 1, nt do
  local set = KEYS[3 * nk + i]
  for _, member in ipairs(redis.call('SMEMBERS', set)) do redis.call('DEL', member) end
  redis.call('DEL', set)
  redis.call('INCR', KEYS[3 * nk + nt + i])
  redis.call('PEXPIRE', KEYS[3 * nk + nt + i], ARGV[3])
end
return 1
"""


class RedisCache:
    """A :class:`~bastion.cache.Cache` on Redis; see the module docstring for its guarantees.

    ``registry``: the Prometheus registry for its metrics (``database.metrics.registry``
    puts them on ``GET /metrics``); a registry of its own when omitted.

    Raises:
        ConfigurationError: ``REDIS_URL`` is not set.
    """

    def __init__(
        self, settings: CacheSettings, *, registry: CollectorRegistry | None = None
    ) -> None:
        if settings.redis_url is None:
            raise ConfigurationError("REDIS_URL is not set; use NullCache for no cache")
        self.settings = settings
        self._pool = BlockingConnectionPool.from_url(
            settings.redis_url.get_secret_value(),
            max_connections=settings.max_connections,
            timeout=settings.socket_timeout_s,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
            # No retries inside redis-py: a failed command falls back to the source at once.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.client: Redis = Redis(connection_pool=self._pool)
        """The Redis client (shared with the live-update hub)."""
        self._breaker = CircuitBreaker(
            failure_threshold=settings.breaker_threshold, reset_timeout_s=settings.breaker_reset_s
        )
        self.metrics = CacheMetrics(registry, breaker_state=lambda: self._breaker.state)
        self._flights = SingleFlight()
        self._store = self.client.register_script(_STORE)
        self._invalidate = self.client.register_script(_INVALIDATE)
        self._pending_keys: set[str] = set()
        self._pending_tags: set[str] = set()
        self._flush_all = False
        self._epoch_key = f"{settings.prefix}epoch"

    def __repr__(self) -> str:
        return f"<RedisCache {self.settings.display_url} {self._breaker.state.value}>"

    @property
    def breaker_state(self) -> BreakerState:
        """``closed`` while Redis answers; ``open`` while the cache is bypassed."""
        return self._breaker.state

    @property
    def pending_invalidations(self) -> int:
        """Invalidations waiting for Redis to answer again."""
        return len(self._pending_keys) + len(self._pending_tags) + int(self._flush_all)

    # -- reads -------------------------------------------------------------------------------

    async def get_or_load(
        self,
        key: str,
        load: Callable[[], Awaitable[T]],
        *,
        ttl_s: float | None = None,
        tags: Sequence[str] = (),
        dump: Callable[[T], Any] = lambda value: value,
        parse: Callable[[Any], T] = lambda raw: raw,
    ) -> T:
        """See :meth:`bastion.cache.Cache.get_or_load`. Raises what ``load`` raises."""
        value_key = self._value_key(key)
        generation_keys = [
            self._generation_key(key),
            *map(self._tag_generation_key, tags),
            self._epoch_key,
        ]
        ok, found = await self._call("get", lambda: self.client.mget([value_key, *generation_keys]))
        if not ok:
            self.metrics.bypass()
            return await self._flights.run((key, None), lambda: _load_only(load, dump), parse)
        raw = self._raw(found[0])
        if raw is not _MISSING:
            try:
                value = parse(raw)
            except ValueError:  # pydantic's ValidationError included: an older shape
                logger.warning("cache: a stored value no longer parses; loading it again")
            else:
                self.metrics.hit()
                return value
        self.metrics.miss()
        generations = [_text(generation) for generation in found[1:]]

        async def load_and_store() -> Outcome[T]:
            return await self._load_and_store(
                key, value_key, generation_keys, generations, tags, ttl_s, load, dump, parse
            )

        # Keyed by the generations too: see bastion.cache.flights.
        return await self._flights.run((key, tuple(generations)), load_and_store, parse)

    async def _load_and_store(
        self,
        key: str,
        value_key: str,
        generation_keys: list[str],
        generations: list[str],
        tags: Sequence[str],
        ttl_s: float | None,
        load: Callable[[], Awaitable[T]],
        dump: Callable[[T], Any],
        parse: Callable[[Any], T],
    ) -> Outcome[T]:
        settings = self.settings
        lock_key = f"{settings.prefix}l:{_bounded(key)}"
        lock = self.client.lock(
            lock_key, timeout=settings.lock_timeout_s, blocking=False, thread_local=False
        )
        ok, locked = await self._call("lock", lock.acquire)
        holds_lock = bool(ok and locked)
        if holds_lock:
            # Our read may have missed just before another loader stored the value and let go
            # of the lock: look once more before loading again.
            ok, blob = await self._call("get", lambda: self.client.get(value_key))
            raw = self._raw(blob, count=False) if ok else _MISSING
            if raw is not _MISSING:
                await self._call("unlock", lambda: _release(lock))
                return Outcome(parse(raw), raw, shareable=True)
        elif ok:
            # Another process is loading this key: wait a little for its value, until it lets
            # go of the lock (its load failed or went stale) or the wait is over.
            deadline = time.monotonic() + settings.lock_wait_s
            pause = _LOCK_POLL_S
            while time.monotonic() < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, _LOCK_POLL_MAX_S)
                ok, found = await self._call("get", lambda: self.client.mget([value_key, lock_key]))
                if not ok:
                    break
                raw = self._raw(found[0])
                if raw is not _MISSING:
                    return Outcome(parse(raw), raw, shareable=True)
                if found[1] is None:
                    break
        try:
            value = await load()
        except Exception:
            if holds_lock:  # let waiting processes load now rather than wait the lock out
                await self._call("unlock", lambda: _release(lock))
            raise
        raw = dump(value)
        blob = encode(raw, compress_min_bytes=settings.compress_min_bytes)
        shareable = True
        if len(blob) <= settings.max_value_bytes:
            ttl_ms = max(1, round((ttl_s or settings.default_ttl_s) * 1000))
            tag_sets = [f"{settings.prefix}t:{_bounded(tag)}" for tag in tags]
            ok, stored = await self._call(
                "set",
                lambda: self._store(
                    keys=[value_key, *generation_keys, *tag_sets],
                    args=[blob, ttl_ms, len(tags), *generations],
                ),
            )
            if ok and not stored:
                # Invalidated while loading: the value may predate the write. Serve it to
                # this caller (it started before the write finished) but not to followers.
                self.metrics.stale_load()
                shareable = False
        else:
            shareable = False
        if holds_lock:
            await self._call("unlock", lambda: _release(lock))
        return Outcome(value, raw, shareable=shareable)

    def _raw(self, blob: bytes | None, *, count: bool = True) -> Any:
        if blob is None:
            return _MISSING
        try:
            return decode(blob)
        except CacheCodecError:
            if count:  # the same bad value seen twice by one read is one error
                self.metrics.error("decode")
            return _MISSING

    # -- invalidation ------------------------------------------------------------------------

    async def invalidate(self, *keys: str) -> None:
        """See :meth:`bastion.cache.Cache.invalidate`. Never raises for Redis being down."""
        for key in keys:
            self._flights.forget(key)
        ok, _ = await self._call("invalidate", lambda: self._run_invalidate(keys, ()))
        if not ok:
            self._remember(keys, ())

    async def invalidate_tags(self, *tags: str) -> None:
        """See :meth:`bastion.cache.Cache.invalidate_tags`. Never raises for Redis being down."""
        self._flights.forget()  # flights do not record their tags; a few extra loads is cheap
        ok, _ = await self._call("invalidate", lambda: self._run_invalidate((), tags))
        if not ok:
            self._remember((), tags)

    async def _run_invalidate(self, keys: Sequence[str], tags: Sequence[str]) -> None:
        prefix = self.settings.prefix
        await self._invalidate(
            keys=[
                *map(self._value_key, keys),
                *map(self._generation_key, keys),
                *(f"{prefix}l:{_bounded(key)}" for key in keys),
                *(f"{prefix}t:{_bounded(tag)}" for tag in tags),
                *map(self._tag_generation_key, tags),
            ],
            args=[len(keys), len(tags), _GENERATION_TTL_MS],
        )

    async def clear(self) -> bool:
        """See :meth:`bastion.cache.Cache.clear`: ``SCAN`` + ``UNLINK`` of the prefix.

        Never raises for Redis being down: returns ``False``, logs one warning, and the prefix
        is flushed before the next command once Redis answers.
        """
        self._flights.forget()
        ok, _ = await self._call("clear", self._clear_all)
        if ok:
            return True
        self._pending_keys.clear()
        self._pending_tags.clear()
        self._flush_all = True
        logger.warning("cache: Redis unreachable; the cache will be cleared when it answers")
        return False

    async def _clear_all(self) -> None:
        # The epoch first: from here on, no load that read the old one can store its value.
        await self.client.incr(self._epoch_key)
        epoch = self._epoch_key.encode()
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.settings.prefix) + "*"
        batch: list[bytes] = []
        async for name in self.client.scan_iter(match=pattern, count=1000):
            if name == epoch:
                continue
            batch.append(name)
            if len(batch) >= 1000:
                await self.client.unlink(*batch)
                batch.clear()
        if batch:
            await self.client.unlink(*batch)
        self._pending_keys.clear()
        self._pending_tags.clear()
        self._flush_all = False

    def _remember(self, keys: Sequence[str], tags: Sequence[str]) -> None:
        self._pending_keys.update(keys)
        self._pending_tags.update(tags)
        if len(self._pending_keys) + len(self._pending_tags) > _MAX_PENDING:
            self._pending_keys.clear()
            self._pending_tags.clear()
            self._flush_all = True
        logger.warning("cache: Redis unreachable; %d invalidation(s) pending",
                       self.pending_invalidations)  # fmt: skip

    async def _apply_pending(self) -> None:
        if self._flush_all:
            await self._clear_all()
        if self._pending_keys or self._pending_tags:
            keys, tags = list(self._pending_keys), list(self._pending_tags)
            await self._run_invalidate(keys, tags)
            self._pending_keys.difference_update(keys)
            self._pending_tags.difference_update(tags)
        logger.warning("cache: Redis answers again; pending invalidations applied")

    # -- plumbing ----------------------------------------------------------------------------

    async def _call(self, operation: str, command: Callable[[], Awaitable[R]]) -> tuple[bool, Any]:
        """``(True, result)``, or ``(False, None)`` when Redis failed or the circuit is open."""
        try:
            probe = self._breaker.admit()
        except CircuitOpenError:
            return False, None
        try:
            if self.pending_invalidations:
                await self._apply_pending()
            result = await command()
        except asyncio.CancelledError:
            if probe:
                self._breaker.release()
            raise
        except _REDIS_ERRORS as exc:
            self._breaker.record(_OUTAGE, probe=probe)
            self.metrics.error(operation)
            logger.debug("cache: Redis %s failed: %s", operation, type(exc).__name__)
            return False, None
        self._breaker.record(None, probe=probe)
        return True, result

    def _value_key(self, key: str) -> str:
        return f"{self.settings.prefix}v:{_bounded(key)}"

    def _generation_key(self, key: str) -> str:
        return f"{self.settings.prefix}g:{_bounded(key)}"

    def _tag_generation_key(self, tag: str) -> str:
        return f"{self.settings.prefix}tg:{_bounded(tag)}"

    async def health(self) -> ComponentHealth:
        """``cache``: healthy when Redis answers PING; degraded (served around it) otherwise.

        Never raises; the details carry the counts, the circuit state and the masked URL.
        """
        started = time.perf_counter()
        ok, _ = await self._call("ping", self.client.ping)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        details = {
            "url": self.settings.display_url,
            "breaker": self._breaker.state.value,
            "pending_invalidations": self.pending_invalidations,
            **self.metrics.to_dict(),
        }
        if not ok:
            return ComponentHealth(
                "cache", HealthStatus.DEGRADED, latency_ms, details, "cache_unavailable"
            )
        return ComponentHealth("cache", HealthStatus.HEALTHY, latency_ms, details)

    async def close(self) -> None:
        """Close the client and its connections."""
        await self.client.aclose()
        await self._pool.disconnect()


_MISSING: Final = object()


async def _load_only(load: Callable[[], Awaitable[T]], dump: Callable[[T], Any]) -> Outcome[T]:
    value = await load()
    return Outcome(value, dump(value), shareable=True)


async def _release(lock: Any) -> None:
    # It may have expired while we loaded, and someone else may hold it now: that is fine.
    with contextlib.suppress(LockError):
        await lock.release()


def _text(value: bytes | None) -> str:
    return "0" if value is None else value.decode()


def _bounded(key: str) -> str:
    if len(key) <= _MAX_KEY:
        return key
    return key[:100] + "#" + hashlib.sha256(key.encode()).hexdigest()
