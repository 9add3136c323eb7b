"""S11 for the cache: a read cancelled at any await point never leaves a pooled connection
that hands one key's reply to another caller (redis-py's CVE-2023-28858/28859 fix)."""

from __future__ import annotations

import asyncio
import random

from bastion.cache import CacheSettings, RedisCache

READS = 10_000
KEYS = 300
CONCURRENCY = 100


async def test_random_cancellations_over_10000_reads_never_return_another_keys_value(
    cache_settings: CacheSettings,
) -> None:
    # A small pool, so connections are reused by other keys right after a cancellation.
    settings = cache_settings.model_copy(update={"max_connections": 8, "socket_timeout_s": 2.0})
    cache = RedisCache(settings)
    rng = random.Random(11)
    wrong: list[tuple[str, object]] = []
    outcomes = {"completed": 0, "cancelled": 0}

    async def load(key: str) -> dict[str, str]:
        await asyncio.sleep(0)  # the source has await points too
        return {"key": key, "pad": key * rng.randint(1, 40)}

    async def read(key: str) -> None:
        value = await cache.get_or_load(key, lambda: load(key), ttl_s=60)
        if not (isinstance(value, dict) and value.get("key") == key):
            wrong.append((key, value))

    async def one(key: str, yields: int | None) -> None:
        task = asyncio.create_task(read(key))
        if yields is not None:
            for _ in range(yields):  # cancel at a random await point of the read
                await asyncio.sleep(0)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
        else:
            outcomes["completed"] += 1

    try:
        for start in range(0, READS, CONCURRENCY):
            batch = []
            for _ in range(min(CONCURRENCY, READS - start)):
                key = f"k{rng.randrange(KEYS)}"
                if rng.random() < 0.05:  # some misses, so the store path is cancelled too
                    await cache.invalidate(key)
                batch.append(one(key, rng.randrange(0, 30) if rng.random() < 0.5 else None))
            await asyncio.gather(*batch)
        # Afterwards every pooled connection still answers for the right key.
        for n in range(KEYS):
            await read(f"k{n}")
    finally:
        await cache.close()
    assert wrong == []
    assert outcomes["cancelled"] > READS // 10
    assert outcomes["completed"] > READS // 3
    assert cache.metrics.hits > READS // 10  # the reads did go to Redis
