"""FastAPI dependencies that hand a route a unit of work.

Every unit ends after the route returns but *before* the response is sent: a write unit's
COMMIT that fails therefore becomes an error response, and the client never sees 2xx for a
write that did not land. (A ``yield`` dependency of FastAPI's default request scope would end
after the response has gone out.)

* Write units are ``yield`` dependencies declared with ``scope="function"``: their exit is the
  COMMIT, which the unit itself runs to its end once begun, even if the request is cancelled
  meanwhile (:meth:`Database.write_connection <bastion.Database.write_connection>`). FastAPI
  0.162.7 and later also shield a yield dependency's exit from anyio cancel scopes; Bastion
  does not rely on it.
* Read units are plain ``async`` dependencies that enter their unit on the route's own exit
  stack (:func:`enter_for_route`). Their exit needs no shield: a cancelled close still gives
  the connection back (``bastion._checkout`` shields it as SQLAlchemy's own exit does), and a
  ``yield`` dependency costs FastAPI an anyio cancel scope and two generator-based context
  managers per request: 6-10 % of the reference service's point read in instructions
  (``bench/README.md``, finding 49).

The unit dependencies find the Database on the app themselves (:func:`database_of`) instead of
depending on :func:`get_database`: a sub-dependency is one more for FastAPI to solve on every
request, 10-20 µs of CPU per unit on this machine (``bench.floors``'s ``unit_floor`` on
PostgreSQL: 157-164 µs above ``reference_floor`` without it, 167-189 µs with it). So an
override of ``get_database`` changes :data:`DatabaseDep` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Annotated, Final, TypeVar

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from starlette.requests import HTTPConnection
from starlette.types import Scope

from bastion.database import Database
from bastion.errors import DatabaseStateError

__all__ = [
    "DatabaseDep",
    "ReadConnection",
    "ReadSession",
    "WriteConnection",
    "WriteSession",
    "enter_for_route",
    "get_database",
]

EnteredT = TypeVar("EnteredT")

_ROUTE_EXIT_STACK: Final = "fastapi_function_astack"
"""Where FastAPI (0.121 on) keeps the exit stack of the route being solved: it exits it after
the route returns and its response is rendered, before the response is sent, and it runs its
``scope="function"`` yield dependencies' exits there. It leaves the stack in the scope once
closed."""

_WATCHED_STACK: Final = "bastion.watched_route_exit_stack"
_CLOSED_STACK: Final = "bastion.closed_route_exit_stack"
"""Scope keys: the route exit stack :func:`enter_for_route` has used, and the one it saw close.
A unit put on a stack that has already closed would never be exited, its connection never
given back."""


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


async def enter_for_route(
    connection: HTTPConnection, unit: AbstractAsyncContextManager[EnteredT]
) -> EnteredT:
    """Enter ``unit`` now and exit it when the route being solved returns, before its response
    is sent: what a ``yield`` dependency with ``scope="function"`` does, without its cost.

    Call it from the route or from a plain ``async`` dependency. Declare such a dependency
    with ``Depends(..., scope="function")``, as Bastion's read dependencies are: FastAPI then
    refuses, where the route is declared, a request-scoped ``yield`` dependency that depends
    on it and would use the unit after it ended. The exit gets the route's exception, if any,
    as ``async with`` would. It is not shielded from cancellation, so give it only units whose
    exit may be cancelled safely (Bastion's read units give their connection back all the
    same); keep write units, whose exit is their COMMIT, in ``yield`` dependencies.

    Never call it once the route has returned (in a background task, a streaming body, a
    request-scoped dependency's exit): the route's exit stack has closed, and a unit put on it
    would not end until garbage collection closed it. Open units there with ``async with``.
    Where the route itself used this (a read dependency, say), such a call is refused; where
    it did not, it cannot be told apart from a first call (FastAPI keeps no mark of a closed
    stack), and is not.

    Raises:
        DatabaseStateError: not called while FastAPI solves a route, or called after the
            route returned where the route had called it: ``unit`` is then not entered.
        Whatever entering ``unit`` raises.
    """
    scope = connection.scope
    stack = _open_route_exit_stack(scope)
    if scope.get(_WATCHED_STACK) is not stack:
        scope[_WATCHED_STACK] = stack
        # Pushed before the first unit, so it runs after the last unit's exit.
        stack.callback(scope.__setitem__, _CLOSED_STACK, stack)
    return await stack.enter_async_context(unit)


def _open_route_exit_stack(scope: Scope) -> AsyncExitStack:
    """The exit stack of the route being solved.

    Raises:
        DatabaseStateError: there is none, or :func:`enter_for_route` saw it close.
    """
    stack = scope.get(_ROUTE_EXIT_STACK)
    if not isinstance(stack, AsyncExitStack):
        raise DatabaseStateError(
            "enter_for_route() needs the exit stack FastAPI (0.121 or later) gives a route "
            "while it solves its dependencies; call it from a route or its dependencies"
        )
    if scope.get(_CLOSED_STACK) is stack:
        raise DatabaseStateError(
            "enter_for_route() called after the route returned (a background task, a "
            "streaming body or a dependency's exit); open the unit with 'async with' there"
        )
    return stack


async def _read_session(request: HTTPConnection) -> AsyncSession:
    return await enter_for_route(request, database_of(request).read())


async def _read_connection(request: HTTPConnection) -> AsyncConnection:
    return await enter_for_route(request, database_of(request).read_connection())


async def _write_connection(request: HTTPConnection) -> AsyncIterator[AsyncConnection]:
    async with database_of(request).write_connection() as connection:
        yield connection


async def _write_session(request: HTTPConnection) -> AsyncIterator[AsyncSession]:
    async with database_of(request).write() as session:
        yield session


DatabaseDep = Annotated[Database, Depends(get_database)]
"""The running :class:`~bastion.Database`, for routes that open units themselves."""

# scope="function" on the read units too, though plain dependencies have no exit of their own
# for FastAPI to place: it keeps FastAPI's check that a request-scoped yield dependency does
# not depend on them (DependencyScopeError at declaration), since their unit ends before such
# a dependency's exit would run.
ReadSession = Annotated[AsyncSession, Depends(_read_session, scope="function")]
"""A session in a read unit (one round trip per SELECT on PostgreSQL)."""

ReadConnection = Annotated[AsyncConnection, Depends(_read_connection, scope="function")]
"""A Core connection in a read unit: no ORM session, the fastest way to serve reads."""

WriteSession = Annotated[AsyncSession, Depends(_write_session, scope="function")]
"""A session in a write unit, committed before the response is sent."""

WriteConnection = Annotated[AsyncConnection, Depends(_write_connection, scope="function")]
"""A Core connection in a write unit, committed before the response is sent."""
