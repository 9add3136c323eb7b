"""Live updates: publish small events after a commit; every process's subscribers get them.

* :class:`RedisHub` — Redis pub/sub, when ``REDIS_URL`` is set;
* :class:`PostgresHub` — PostgreSQL ``LISTEN``/``NOTIFY`` on a dedicated connection, when the
  database is PostgreSQL and there is no Redis;
* :class:`LocalHub` — this process only (SQLite, one worker).

Each subscriber has a bounded queue; one that falls behind is ended with
:class:`SlowConsumerError` rather than growing the process's memory. Publish *after* the
write's transaction committed, so no subscriber hears of a write that then rolled back.

>>> hub = create_hub(cache_settings, database)
>>> subscription = await hub.subscribe("conversation:42")
>>> await hub.publish("conversation:42", '{"id": 7}')   # after COMMIT
>>> await subscription.get()
'{"id": 7}'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bastion.database import Database
from bastion.live.base import DEFAULT_QUEUE_SIZE, Hub, LocalHub
from bastion.live.subscription import (
    HubClosedError,
    LiveError,
    LiveUnavailableError,
    SlowConsumerError,
    Subscription,
)

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "Hub",
    "HubClosedError",
    "LiveError",
    "LiveUnavailableError",
    "LocalHub",
    "PostgresHub",
    "RedisHub",
    "SlowConsumerError",
    "Subscription",
    "create_hub",
]

if TYPE_CHECKING:
    from bastion.live.postgres_hub import PostgresHub
    from bastion.live.redis_hub import RedisHub


def __getattr__(name: str) -> Any:
    # Imported on first use: they need redis / asyncpg, which are optional extras.
    if name == "RedisHub":
        from bastion.live.redis_hub import RedisHub

        return RedisHub
    if name == "PostgresHub":
        from bastion.live.postgres_hub import PostgresHub

        return PostgresHub
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_hub(
    database: Database,
    *,
    redis_url: str | None = None,
    prefix: str = "bastion:",
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> Hub:
    """The hub for this service: Redis if ``redis_url``, else PostgreSQL, else this process.

    Nothing connects here; a hub connects at its first use.
    """
    if redis_url is not None:
        from bastion.live.redis_hub import RedisHub

        return RedisHub(redis_url, prefix=prefix, queue_size=queue_size)
    if database.backend == "postgresql":
        from bastion.live.postgres_hub import PostgresHub

        channel = "".join(c if c.isalnum() else "_" for c in prefix).strip("_") or "bastion"
        return PostgresHub(database.settings.url, pg_channel=f"{channel}_live"[:63],
                           queue_size=queue_size)  # fmt: skip
    return LocalHub(queue_size=queue_size)
