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
from starlette.requests import HTTPConnection, Request

from bastion import current_request
from bastion.fastapi import WriteConnection, database_of, enter_for_route
from conversations.key_guard import KeyGuard
from conversations.models import ApiKey

__all__ = [
    "CurrentReadCaller",
    "CurrentWriteCaller",
    "CurrentWriter",
    "PresentedKey",
    "ReadCaller",
    "WriteCaller",
    "generate_api_key",
    "hash_api_key",
    "key_guard_of",
    "user_for_key",
]

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
    return await _user_for_hash(connection, hash_api_key(key))


async def _user_for_hash(connection: AsyncConnection, key_hash: str) -> uuid.UUID | None:
    return await connection.scalar(_USER_FOR_KEY, {"key_hash": key_hash})


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def key_guard_of(connection: HTTPConnection) -> KeyGuard:
    """The app's :class:`~conversations.key_guard.KeyGuard` (made on first use if the app was
    not built by ``create_app``, which sets its own)."""
    state = connection.app.state
    guard = getattr(state, "key_guard", None)
    if not isinstance(guard, KeyGuard):
        guard = state.key_guard = KeyGuard()
    return guard


class PresentedKey:
    """A request's well-formed API key, admitted by the app's key guard, not yet looked up.

    Make one with :meth:`admit`.
    """

    __slots__ = ("_guard", "_key_hash")

    def __init__(self, key_hash: str, guard: KeyGuard) -> None:
        self._key_hash = key_hash
        self._guard = guard

    def __repr__(self) -> str:
        return "PresentedKey(...)"  # never the key or its hash

    @classmethod
    async def admit(cls, key: str, client: str | None, guard: KeyGuard) -> PresentedKey:
        """``key``, presented from address ``client``, past ``guard``.

        Raises:
            HTTPException: 429, the address presented too many keys not known good lately.
        """
        key_hash = hash_api_key(key)
        await guard.admit(client, key_hash)
        return cls(key_hash, guard)

    async def authenticate(self, connection: AsyncConnection) -> uuid.UUID:
        """The key's user id, looked up on ``connection``; the guard is told how it went.

        Raises:
            HTTPException: 401, the key is unknown or revoked.
        """
        user_id = await _user_for_hash(connection, self._key_hash)
        if user_id is None:
            self._guard.refused(self._key_hash)
            raise _unauthorized("invalid API key")
        self._guard.accepted(self._key_hash)
        request = current_request()
        if request is not None:
            request.user = str(user_id)  # who the audit columns record
        return user_id


async def _presented_key(request: Request) -> PresentedKey:
    """The request's key, if well formed and its address may present one.

    Raises:
        HTTPException: 401, no bearer token or a malformed one; 429, the address presented
            too many keys not known good lately (:mod:`conversations.key_guard`).
    """
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <API key>'")
    if len(key) > MAX_KEY_LENGTH or not key.isascii():
        raise _unauthorized("invalid API key")
    client = request.client.host if request.client is not None else None
    return await PresentedKey.admit(key, client, key_guard_of(request))


class WriteCaller:
    """A write request's API key, checked in the write's own unit of work.

    A route that writes in a retried unit (``write_once``) authenticates there, as its first
    statement, rather than in a read unit of its own before it: one unit per request instead
    of two (a unit costs more than the statement; ``bench/README.md``, finding 17). Only the
    key's form is checked before (:func:`_presented_key`), so a request with no key or a
    malformed one never opens a unit. A well-formed but unknown key does open the write unit
    before it is refused: on SQLite it holds the process's write turn for one indexed lookup
    and a rollback, the price of not paying a second unit on every genuine write; an address
    that keeps presenting unknown keys is turned away before its write unit opens
    (:mod:`conversations.key_guard`). The body,
    the ids in the path and the ``Idempotency-Key`` header are validated before that lookup,
    so such a request gets their 422/404/400 before its 401 (they echo nothing stored).
    """

    __slots__ = ("_key", "_user_id")

    def __init__(self, key: PresentedKey) -> None:
        self._key = key
        self._user_id: uuid.UUID | None = None

    def __repr__(self) -> str:
        return f"WriteCaller(user_id={self._user_id})"  # never the key

    async def authenticate(self, connection: AsyncConnection) -> uuid.UUID:
        """The caller's user id, looked up on ``connection`` the first time only.

        Raises:
            HTTPException: 401, the key is unknown or revoked.
        """
        if self._user_id is None:
            self._user_id = await self._key.authenticate(connection)
        return self._user_id

    @property
    def user_id(self) -> uuid.UUID:
        """The id :meth:`authenticate` found.

        Raises:
            RuntimeError: not authenticated yet.
        """
        if self._user_id is None:
            raise RuntimeError("the caller is not authenticated yet")
        return self._user_id


class ReadCaller:
    """A read request's caller, authenticated, and the read unit it was authenticated in.

    The route runs its own queries on :attr:`connection`: one unit per read request.
    """

    __slots__ = ("connection", "user_id")

    def __init__(self, user_id: uuid.UUID, connection: AsyncConnection) -> None:
        self.user_id = user_id
        self.connection = connection

    def __repr__(self) -> str:
        return f"ReadCaller(user_id={self.user_id})"  # never the key


# The dependencies are `async def` (FastAPI runs a plain `def` dependency in its threadpool,
# a thread hop per request). Each takes the request itself rather
# than a shared key dependency where it can: every dependency FastAPI solves costs about as
# much as a short statement.
async def _read_caller(request: Request) -> ReadCaller:
    # One dependency that checks the key's form, opens the read unit and looks the key up:
    # FastAPI solves each dependency on every request, and a route that took the user id and
    # the connection as two (the second a cached sub-dependency of the first) paid 14-17 us
    # more per request for it (bench/README.md, fifteenth pass). A request without a usable
    # key is refused before the unit opens. A plain dependency, not a yield one: the unit
    # ends with the route all the same (enter_for_route), for less (finding 49).
    key = await _presented_key(request)
    connection = await enter_for_route(request, database_of(request).read_connection())
    return ReadCaller(await key.authenticate(connection), connection)


async def _write_caller(request: Request) -> WriteCaller:
    return WriteCaller(await _presented_key(request))


async def _well_formed_key(request: Request) -> PresentedKey:
    return await _presented_key(request)


async def _current_writer(
    key: Annotated[PresentedKey, Depends(_well_formed_key)], connection: WriteConnection
) -> uuid.UUID:
    # The key's form is checked first (declared first, solved first), so a request without a
    # usable key never opens a write unit; the lookup then runs in the route's own unit.
    return await key.authenticate(connection)


CurrentWriteCaller = Annotated[WriteCaller, Depends(_write_caller)]
"""The caller of a route that writes through ``write_once``, which authenticates it."""

CurrentWriter = Annotated[uuid.UUID, Depends(_current_writer, scope="function")]
"""The user id, looked up in the route's own ``WriteConnection`` (one unit per request)."""

CurrentReadCaller = Annotated[ReadCaller, Depends(_read_caller, scope="function")]
"""The caller of a read route, authenticated in the read unit it is given (one per request)."""
