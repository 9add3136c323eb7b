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
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from bastion import current_request
from bastion.fastapi import DatabaseDep, ReadConnection
from conversations.models import ApiKey

__all__ = ["CurrentReader", "CurrentUser", "generate_api_key", "hash_api_key", "user_for_key"]

KEY_PREFIX: Final = "cv_"
MAX_KEY_LENGTH: Final = 100


def generate_api_key() -> str:
    """A new random API key (shown once; store only :func:`hash_api_key` of it)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The hex SHA-256 under which ``key`` is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


_USER_FOR_KEY = select(ApiKey.user_id).where(
    ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
)


async def user_for_key(connection: AsyncConnection, key: str) -> uuid.UUID | None:
    """The id of the user owning ``key``, or ``None`` if it is unknown or revoked."""
    return await connection.scalar(_USER_FOR_KEY, {"key_hash": hash_api_key(key)})


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def _presented_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <API key>'")
    if len(key) > MAX_KEY_LENGTH or not key.isascii():
        raise _unauthorized("invalid API key")
    return key


async def _authenticate(connection: AsyncConnection, key: str) -> uuid.UUID:
    user_id = await user_for_key(connection, key)
    if user_id is None:
        raise _unauthorized("invalid API key")
    request = current_request()
    if request is not None:
        request.user = str(user_id)  # who the audit columns record
    return user_id


async def _current_user(request: Request, database: DatabaseDep) -> uuid.UUID:
    key = _presented_key(request)
    # Its own short read unit: a route that writes must not hold a read connection while it
    # waits for a write connection (under load, that deadlocks the pool).
    async with database.read_connection() as connection:
        return await _authenticate(connection, key)


async def _current_reader(request: Request, connection: ReadConnection) -> uuid.UUID:
    # ReadConnection is cached per request, so the route's own queries reuse this connection.
    return await _authenticate(connection, _presented_key(request))


CurrentUser = Annotated[uuid.UUID, Depends(_current_user)]
"""The id of the user whose API key authenticated the request (for routes that write)."""

CurrentReader = Annotated[uuid.UUID, Depends(_current_reader, scope="function")]
"""The same, looked up in the route's own ``ReadConnection`` (one connection per read request)."""
