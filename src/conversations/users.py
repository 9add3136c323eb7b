"""Creating users and issuing their API keys."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bastion import Database, NotFoundError
from conversations.auth import generate_api_key, hash_api_key
from conversations.models import ApiKey, User

__all__ = ["create_user", "issue_key"]


async def create_user(database: Database, name: str) -> str:
    """Create user ``name`` and return their first API key.

    Raises:
        UniqueViolationError: a user with that name exists.
    """
    async with database.write() as session:
        return await _add_key(session, await _add_user(session, name))


async def issue_key(database: Database, name: str, *, create: bool = False) -> str:
    """Issue a new API key for user ``name`` (created first if ``create`` and missing).

    Raises:
        NotFoundError: no such user and ``create`` is false.
    """
    async with database.write() as session:
        user_id = await session.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            if not create:
                raise NotFoundError(f"no user named {name!r}")
            user_id = await _add_user(session, name)
        return await _add_key(session, user_id)


async def _add_user(session: AsyncSession, name: str) -> uuid.UUID:
    user = User(name=name)
    session.add(user)
    await session.flush()  # assigns the id, and raises here if the name is taken
    return user.id


async def _add_key(session: AsyncSession, user_id: uuid.UUID) -> str:
    """A new key for the user; only its hash is stored, the key itself is returned once."""
    key = generate_api_key()
    session.add(ApiKey(user_id=user_id, key_hash=hash_api_key(key)))
    return key
