"""FastAPI dependencies that hand a route a unit of work.

All are declared with ``scope="function"``: FastAPI runs their exit — the COMMIT of a write
unit — after the route returns but *before* the response is sent. A COMMIT that fails
therefore becomes an error response; the client never sees 2xx for a write that did not land.
(With the default request scope, teardown runs after the response has gone out.)

The unit dependencies find the Database on the app themselves (:func:`database_of`) instead of
depending on :func:`get_database`: a sub-dependency is one more for FastAPI to solve on every
request, 10-20 µs of CPU per unit on this machine (``bench.floors``'s ``unit_floor`` on
PostgreSQL: 157-164 µs above ``reference_floor`` without it, 167-189 µs with it). So an
override of ``get_database`` changes :data:`DatabaseDep` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from starlette.requests import HTTPConnection

from bastion.database import Database
from bastion.errors import DatabaseStateError

__all__ = [
    "DatabaseDep",
    "ReadConnection",
    "ReadSession",
    "WriteConnection",
    "WriteSession",
    "get_database",
]


async def get_database(connection: HTTPConnection) -> Database:
    """The Database the lifespan stored on the app (a dependency).

    Raises:
        DatabaseStateError: the app was not started with :func:`database_lifespan`.
    """
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, a hop per request.
    return database_of(connection)


def database_of(connection: HTTPConnection) -> Database:
    """The Database the lifespan stored on the app, for code outside dependencies.

    Raises:
        DatabaseStateError: the app was not started with :func:`database_lifespan`.
    """
    database = getattr(connection.app.state, "database", None)
    if not isinstance(database, Database):
        raise DatabaseStateError(
            "no Database on app.state; create the app with lifespan=database_lifespan(...)"
        )
    return database


async def _read_session(request: HTTPConnection) -> AsyncIterator[AsyncSession]:
    async with database_of(request).read() as session:
        yield session


async def _read_connection(request: HTTPConnection) -> AsyncIterator[AsyncConnection]:
    async with database_of(request).read_connection() as connection:
        yield connection


async def _write_connection(request: HTTPConnection) -> AsyncIterator[AsyncConnection]:
    async with database_of(request).write_connection() as connection:
        yield connection


async def _write_session(request: HTTPConnection) -> AsyncIterator[AsyncSession]:
    async with database_of(request).write() as session:
        yield session


DatabaseDep = Annotated[Database, Depends(get_database)]
"""The running :class:`~bastion.Database`, for routes that open units themselves."""

ReadSession = Annotated[AsyncSession, Depends(_read_session, scope="function")]
"""A session in a read unit (one round trip per SELECT on PostgreSQL)."""

ReadConnection = Annotated[AsyncConnection, Depends(_read_connection, scope="function")]
"""A Core connection in a read unit: no ORM session, the fastest way to serve reads."""

WriteSession = Annotated[AsyncSession, Depends(_write_session, scope="function")]
"""A session in a write unit, committed before the response is sent."""

WriteConnection = Annotated[AsyncConnection, Depends(_write_connection, scope="function")]
"""A Core connection in a write unit, committed before the response is sent."""
