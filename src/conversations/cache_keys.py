"""What the conversation store caches, under which keys, and what a write invalidates.

Every key and tag starts with the owner's id: a cached value is only ever found by the user
it was loaded for, so no user can be served another's data, whatever the conversation id.
A conversation's reads (the conversation, its message pages) share one tag; a write to it
invalidates the tag before its response is sent, so a read after a write is never stale.

>>> @cache_message_page                             # on a function with these parameters
... async def message_page(connection, owner_id, conversation_id, limit, cursor) -> MessagePage:
...     ...
>>> await conversation_changed(cache_of(request), user_id, conversation_id)   # after COMMIT

Routes whose write unit is a ``WriteConnection``/``WriteSession`` dependency (committed after
the route returns) add the tags to ``bastion.fastapi.InvalidateAfterCommit`` instead, via
:func:`conversation_tags`.
"""

from __future__ import annotations

import uuid
from typing import Final

from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.cache import Cache, NullCache, cache_key, cached
from conversations.routes._repositories import CONVERSATIONS
from conversations.schemas import ConversationOut

__all__ = [
    "CONVERSATION_KEY",
    "CONVERSATION_TAG",
    "MESSAGE_PAGE_KEY",
    "OWNER_TAG",
    "TTL_S",
    "cache_conversation",
    "cache_message_page",
    "conversation_changed",
    "conversation_tags",
    "load_conversation",
]

TTL_S: Final = 60.0
CONVERSATION_KEY: Final = "conversation:{owner_id}:{conversation_id}"
MESSAGE_PAGE_KEY: Final = "messages:{owner_id}:{conversation_id}:{limit}:{cursor}"
CONVERSATION_TAG: Final = "conversation:{owner_id}:{conversation_id}"
"""Every cached read of one conversation (itself, its message pages)."""
OWNER_TAG: Final = "owner:{owner_id}"
"""Every cached read of one user (for list pages, which any of their writes changes)."""

cache_conversation = cached(CONVERSATION_KEY, ttl=TTL_S, tags=[CONVERSATION_TAG, OWNER_TAG])
"""Decorator for a function of ``(…, owner_id, conversation_id)`` returning one conversation."""

cache_message_page = cached(MESSAGE_PAGE_KEY, ttl=TTL_S, tags=[CONVERSATION_TAG, OWNER_TAG])
"""Decorator for a function of ``(…, owner_id, conversation_id, limit, cursor)`` returning a
page of messages."""


@cache_conversation
async def load_conversation(
    connection: AsyncConnection, owner_id: uuid.UUID, conversation_id: uuid.UUID
) -> ConversationOut:
    """The owner's conversation, from the cache or else read on ``connection``.

    The route passes the read connection its authentication already holds, so a miss costs
    no second checkout (and a request never waits for a second connection while holding one).

    Raises:
        NotFoundError: no such conversation for this owner (not cached: it is cheap to ask).
    """
    return ConversationOut.from_row(
        await CONVERSATIONS.require(connection, conversation_id, scope=owner_id)
    )


def conversation_tags(owner_id: uuid.UUID, conversation_id: uuid.UUID) -> list[str]:
    """The tags a change of this conversation invalidates."""
    return [
        cache_key(CONVERSATION_TAG, owner_id=owner_id, conversation_id=conversation_id),
        cache_key(OWNER_TAG, owner_id=owner_id),
    ]


async def conversation_changed(
    cache: Cache, owner_id: uuid.UUID, conversation_id: uuid.UUID
) -> None:
    """Invalidate every cached read the change of this conversation affects.

    Call it after the write committed and before the response is sent. Never raises because
    Redis is down (the invalidation is applied when it answers again).
    """
    if isinstance(cache, NullCache):
        return  # no cache (REDIS_URL unset): no keys to build for nothing (as ``@cached`` does)
    await cache.invalidate_tags(*conversation_tags(owner_id, conversation_id))
