"""Where an SQLite connection's calls ran: the count aiosqlite's thread was handed."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection


async def thread_calls(connection: AsyncConnection) -> int:
    """Calls this connection has sent to aiosqlite's thread so far (see bastion._sqlite_inline)."""
    raw = await connection.get_raw_connection()
    return int(raw.driver_connection._bastion_queued)
