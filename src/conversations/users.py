"""Creating users and issuing their API keys."""

from __future__ import annotations

from sqlalchemy import select

from bastion import Database, NotFoundError
from conversations.auth import generate_api_key, hash_api_key
from conversations.models import ApiKey, User

__all__ = ["create_user", "issue_key"]


async def create_user(database: Database, name: str) -> str:
    """Create user ``name`` and return their first API key.

    Raises:
        UniqueViolationError: a user with that name exists.
    """
    key = generate_api_key()
    async with database.write() as session:
        user = User(name=name)
        session.add(user)
        await session.flush()
        session.add(ApiKey(user_id=user.id, key_hash=hash_api_key(key)))
    return key


async def issue_key(database: Database, name: str, *, create: bool = False) -> str:
    """Issue a new API key for user ``name`` (created first if ``create`` and missing).

    Raises:
        NotFoundError: no such user and ``create`` is false.
    """
    key = generate_api_key()
    async with database.write() as session:
        user_id = await session.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            if not create:
                raise NotFoundError(f"no user named {name!r}")
            user = User(name=name)
            session.add(user)
            await session.flush()
            user_id = user.id
        session.add(ApiKey(user_id=user_id, key_hash=hash_api_key(key)))
    return key
