"""A pooled connection as a context that goes back to the pool in the caller's own step.

``async with engine.connect()`` closes the connection, on the way out, in a task of its own and
waits for that task (SQLAlchemy 2.1, so that a cancellation cannot cut a close short). The
task first runs on the event loop's next turn, which under load is tens of milliseconds away,
and all that time the connection stays checked out: measured with the reference service on a
16-connection pool under 64 concurrent point reads, pool waits averaged 45 ms and reached
seconds. :func:`checked_out` closes the connection directly when the block ends normally. On
SQLite's read pool that close does not even suspend (the rollback runs on the loop); if a
close that does suspend is cancelled, SQLAlchemy discards the connection instead of pooling
it. When the block raises (a cancellation included), the close is shielded as SQLAlchemy's
own exit does it.

With :class:`~bastion._warm_connections.WarmConnections`, a unit (``read_connection``,
``write_connection``) takes a connection kept started from an earlier unit of its kind
instead, and a connection fit for it goes back there rather than to the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection

from bastion._to_completion import run_to_completion
from bastion._warm_connections import WarmConnections

__all__ = ["checked_out"]


@asynccontextmanager
async def checked_out(
    connect: Callable[[], AsyncConnection],
    warm: WarmConnections | None = None,
    *,
    close_in_task: bool = False,
) -> AsyncIterator[AsyncConnection]:
    """A connection checked out for the block: one of ``warm``'s, else ``connect()``'s (made
    by ``engine.connect()`` or its like, not yet started); see the module docstring.

    ``close_in_task=True`` (PostgreSQL's read units, with ``warm``): a connection not kept is
    closed as ``async with engine.connect()`` closes it. On PostgreSQL, where a unit's
    statements suspend on the network while it holds its connection, the direct close
    measured slower (A/B, 64 concurrent point reads: 364 to 422 req/s against 466 to 741 with
    SQLAlchemy's own exit), so PostgreSQL units keep SQLAlchemy's.

    Raises:
        Whatever checking out or closing the connection raises (SQLAlchemy's errors).
    """
    connection = await warm.lend() if warm is not None else None
    if connection is None:
        connection = connect()
        await connection.start()
    try:
        yield connection
    except BaseException as exc:
        if close_in_task:
            await connection.__aexit__(type(exc), exc, exc.__traceback__)
        else:
            await _close_to_completion(connection)
        raise
    if warm is not None and warm.keep(connection):
        return
    if close_in_task:
        await connection.__aexit__(None, None, None)
    else:
        await connection.close()


async def _close_to_completion(connection: AsyncConnection) -> None:
    """Close ``connection`` in a task of its own; a cancellation waits for it, then re-raises."""
    await run_to_completion(connection.close(), name="bastion: close a cancelled unit's connection")
