"""API keys: how they are made, stored, and checked on each request.

A key is 256 random bits; only its SHA-256 is stored. (A slow password hash buys nothing
for a key with that much entropy and would cost every request.) Requests present it as
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Annotated, Final

from fastapi import Depends, HTTPException
from sqlalchemy import select
from starlette.requests import Request

from bastion import Database
from bastion.fastapi import DatabaseDep
from conversations.models import ApiKey

__all__ = ["CurrentUser", "generate_api_key", "hash_api_key", "user_for_key"]

KEY_PREFIX: Final = "cv_"
MAX_KEY_LENGTH: Final = 100


def generate_api_key() -> str:
    """A new random API key (shown once; store only :func:`hash_api_key` of it)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The hex SHA-256 under which ``key`` is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


async def user_for_key(database: Database, key: str) -> uuid.UUID | None:
    """The id of the user owning ``key``, or ``None`` if it is unknown or revoked."""
    async with database.read() as session:
        return await session.scalar(
            select(ApiKey.user_id).where(
                ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None)
            )
        )


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def _current_user(request: Request, database: DatabaseDep) -> uuid.UUID:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <API key>'")
    if len(key) > MAX_KEY_LENGTH or not key.isascii():
        raise _unauthorized("invalid API key")
    # The lookup runs in its own short read unit, so no connection is held while the route
    # waits for one of its own.
    user_id = await user_for_key(database, key)
    if user_id is None:
        raise _unauthorized("invalid API key")
    return user_id


CurrentUser = Annotated[uuid.UUID, Depends(_current_user)]
"""The id of the user whose API key authenticated the request."""
