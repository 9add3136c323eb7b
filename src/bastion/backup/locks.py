"""Locks that keep one backup (or one restore) at a time across processes.

On SQLite an ``fcntl.flock`` on a file beside the database (released by the kernel if the
process dies); on PostgreSQL a session-level ``pg_try_advisory_lock`` on a connection of its
own (released when that connection closes, however the process ends). Neither waits: a
second taker learns at once that someone else holds it.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

__all__ = ["advisory_lock", "file_lock"]


@asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[bool]:
    """Try to take an exclusive ``flock`` on ``path``; yields whether it was taken."""
    descriptor = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def advisory_key(url: URL, name: str) -> int:
    """A stable signed 64-bit key for lock ``name`` on the database at ``url``."""
    digest = hashlib.sha256(f"bastion.backup:{url.database}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@asynccontextmanager
async def advisory_lock(url: URL, name: str) -> AsyncIterator[bool]:
    """Try to take PostgreSQL advisory lock ``name``; yields whether it was taken.

    The lock lives on a connection of its own, outside any pool: it cannot be handed back to a
    pool still locked, and a crash releases it with the connection.
    """
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            key = advisory_key(url, name)
            taken = bool(
                await connection.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
            )
            try:
                yield taken
            finally:
                if taken:
                    await connection.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        await engine.dispose()
