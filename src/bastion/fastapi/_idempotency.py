"""Idempotent, retried writes for FastAPI routes: the ``Idempotency-Key`` request header.

A route hands :func:`idempotent_write` a function that does its writes on a connection and
returns the response to send. Without the header, the write runs as
``database.run(database.write_connection, work)``: retried while that is safe, answered with
500 ``commit_outcome_unknown`` if COMMIT was lost. With the header, it runs at most once per
user and key (see :mod:`bastion.idempotency`): a repeat replays the first response, marked
``Idempotent-Replayed: true``, even after a lost COMMIT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from fastapi import HTTPException
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from bastion.database import Database
from bastion.idempotency import (
    MAX_KEY_LENGTH,
    IdempotencyScope,
    IdempotencyStore,
    StoredResponse,
    request_fingerprint,
)

__all__ = ["IDEMPOTENCY_KEY_HEADER", "REPLAYED_HEADER", "idempotent_write"]

IDEMPOTENCY_KEY_HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"


def _key_of(request: Request) -> str | None:
    values = request.headers.getlist(IDEMPOTENCY_KEY_HEADER)
    if not values:
        return None
    key = values[0].strip()
    if len(values) > 1 or not key or len(key) > MAX_KEY_LENGTH:
        raise HTTPException(
            400, f"{IDEMPOTENCY_KEY_HEADER} must be one value of 1 to {MAX_KEY_LENGTH} characters"
        )
    if not all(" " <= char <= "~" for char in key):
        raise HTTPException(400, f"{IDEMPOTENCY_KEY_HEADER} must be printable ASCII")
    return key


async def idempotent_write(
    request: Request,
    database: Database,
    work: Callable[[AsyncConnection], Awaitable[StoredResponse]],
    *,
    scope: IdempotencyScope,
    store: IdempotencyStore,
) -> Response:
    """Run ``work`` in a retried write unit, at most once per ``Idempotency-Key``.

    ``scope`` separates keys of different callers (use the authenticated user's id), so a
    key can only ever replay its own caller's response. It may be a function of a connection
    that authenticates the caller: it is then called (once), first in the write unit that looks
    the key up and writes, and not at all without the header, where ``work`` can authenticate
    in its own unit.

    Raises:
        HTTPException: 400 for a malformed ``Idempotency-Key``.
        IdempotencyKeyReusedError: the key was used for a different request (422).
        Whatever ``scope``, ``work`` and the units raise (see :meth:`Database.run`).
    """
    key = _key_of(request)
    if key is None:
        answer = await database.run(database.write_connection, work)
        return _response(answer, replayed=False)
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    fingerprint = request_fingerprint(request.method, path, await request.body())
    answer, replayed = await store.run(
        database, scope=scope, key=key, request_hash=fingerprint, work=work
    )
    return _response(answer, replayed=replayed)


def _response(answer: StoredResponse, *, replayed: bool) -> Response:
    headers = dict(answer.headers)
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return Response(answer.body, answer.status_code, headers=headers, media_type="application/json")
