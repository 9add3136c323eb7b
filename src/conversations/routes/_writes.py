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
from conversations.auth import WriteCaller
from conversations.models import idempotency_keys

__all__ = ["purge_idempotency_keys", "write_once"]

_STORE = IdempotencyStore(idempotency_keys)


async def write_once(
    request: Request,
    database: Database,
    caller: WriteCaller,
    work: Callable[[AsyncConnection, uuid.UUID], Awaitable[StoredResponse]],
) -> Response:
    """Run ``work`` as the caller's idempotent, retried write and return its response.

    The caller is authenticated first, in the write unit, before the ``Idempotency-Key`` (if
    the request has one) is looked up there; ``work`` gets the user id after that (and
    ``caller.user_id`` holds it once this returns). One unit per request, replays included (a
    collision with a concurrent attempt adds a read unit, to fetch its answer).

    Raises:
        HTTPException: 401, the key is unknown or revoked (nothing ran).
        Whatever :func:`bastion.fastapi.idempotent_write` raises.
    """

    async def authenticated_work(connection: AsyncConnection) -> StoredResponse:
        return await work(connection, await caller.authenticate(connection))

    async def scope(connection: AsyncConnection) -> str:
        return str(await caller.authenticate(connection))

    return await idempotent_write(request, database, authenticated_work, scope=scope, store=_STORE)


async def purge_idempotency_keys(database: Database, older_than: timedelta) -> int:
    """Delete the stored answers of keys older than ``older_than``; return how many."""
    return await _STORE.purge(database, older_than=older_than)
