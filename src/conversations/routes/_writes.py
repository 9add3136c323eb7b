"""How the POST routes write: retried, and at most once per ``Idempotency-Key`` per user."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from bastion import Database, IdempotencyStore, StoredResponse
from bastion.fastapi import idempotent_write
from conversations.models import idempotency_keys

__all__ = ["purge_idempotency_keys", "write_once"]

_STORE = IdempotencyStore(idempotency_keys)


async def write_once(
    request: Request,
    database: Database,
    user_id: uuid.UUID,
    work: Callable[[AsyncConnection], Awaitable[StoredResponse]],
) -> Response:
    """Run ``work`` as the user's idempotent, retried write and return its response."""
    return await idempotent_write(request, database, work, scope=str(user_id), store=_STORE)


async def purge_idempotency_keys(database: Database, older_than: timedelta) -> int:
    """Delete the stored answers of keys older than ``older_than``; return how many."""
    return await _STORE.purge(database, older_than=older_than)
