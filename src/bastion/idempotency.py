"""Idempotency keys: a write sent twice lands once, and the second sender gets the first answer.

A client that did not hear back — a timeout, a dropped connection, a 500 saying the COMMIT's
outcome is unknown — cannot tell whether its write landed. If it sent an idempotency key, it
simply sends the same request again with the same key:

* the key is looked up first, in the write's own unit; if a response is stored under it,
  that response is replayed and nothing runs;
* otherwise the write runs, and the response is stored under the key **in the same
  transaction**, as its last statement. The key is the table's primary key, so at most one
  transaction carrying it can ever commit: an attempt running alongside one that commits
  first fails on the key (on PostgreSQL it waits for the first to finish), rolls back, and
  replays the stored answer.

That also resolves an unknown COMMIT outcome without guessing: the write is simply run again;
if the first COMMIT did land, the second attempt finds its key (or, if that COMMIT lands
meanwhile, collides with it) and replays it.

Keys are scoped (per user, typically), so one client can never replay another's response, and
a key reused for a *different* request (another body or path) is refused rather than replayed.
Only successful writes are stored: a request that failed wrote nothing and may run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, Final

from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    Column,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    bindparam,
    delete,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.errors import BastionError, CommitOutcomeUnknownError, UniqueViolationError
from bastion.types import UTCDateTime, utcnow

__all__ = [
    "IdempotencyKeyReusedError",
    "IdempotencyScope",
    "IdempotencyStore",
    "StoredResponse",
    "idempotency_table",
    "request_fingerprint",
]

logger = logging.getLogger("bastion.idempotency")

MAX_KEY_LENGTH: Final = 255
MAX_SCOPE_LENGTH: Final = 64

IdempotencyScope = str | Callable[[AsyncConnection], Awaitable[str]]
"""Whose keys these are: a string, or a function that finds it on a connection.

A function lets a route authenticate its caller in the write unit that looks the key up and
writes, rather than in a unit of its own before it (it raises to refuse the caller; nothing is
looked up then).
"""


class IdempotencyKeyReusedError(BastionError):
    """The idempotency key was already used for a different request (422)."""

    code = "idempotency_key_reused"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """What a write answered: replayed as-is to a request that repeats its key."""

    status_code: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, model: BaseModel, *, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> StoredResponse:
        """A JSON response with ``model`` as its body."""
        return cls(status_code, model.model_dump_json().encode(), dict(headers or {}))


def idempotency_table(metadata: MetaData, name: str = "idempotency_keys") -> Table:
    """The table idempotency keys live in, added to the application's ``metadata``.

    Add it to a migration like any other table of the application.
    """
    return Table(
        name,
        metadata,
        Column("scope", String(MAX_SCOPE_LENGTH), primary_key=True),
        Column("key", String(MAX_KEY_LENGTH), primary_key=True),
        Column("request_hash", String(64), nullable=False),
        Column("status_code", SmallInteger, nullable=False),
        Column("headers", JSON, nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("created_at", UTCDateTime, nullable=False, index=True),
    )


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """A hash of what makes two requests "the same request" for an idempotency key."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class _Replay(Exception):  # noqa: N818 - a signal that carries the answer, not an error
    """Raised inside a write unit that found its key's stored answer, to leave it by ROLLBACK.

    Not a :class:`~bastion.errors.BastionError`: the unit neither retries it nor counts it
    against the circuit breaker (the database answered).
    """

    def __init__(self, stored: StoredResponse) -> None:
        super().__init__("replay")
        self.stored = stored


class _ResolvedScope:
    """An :data:`IdempotencyScope`, resolved to its string once (its function, if it is one,
    runs in the first unit that needs it; a retried unit reuses the answer)."""

    __slots__ = ("_scope", "value")

    def __init__(self, scope: IdempotencyScope) -> None:
        self._scope = scope
        self.value: str | None = scope if isinstance(scope, str) else None

    async def resolve(self, connection: AsyncConnection) -> str:
        """The scope's string, finding it on ``connection`` the first time.

        Raises:
            TypeError: the scope's function returned something other than a string.
            Whatever the scope's function raises.
        """
        if self.value is None:
            assert not isinstance(self._scope, str)
            found = await self._scope(connection)
            if not isinstance(found, str):
                raise TypeError(f"an idempotency scope function returned {found!r}")
            self.value = found
        return self.value


class IdempotencyStore:
    """Runs writes at most once per (scope, key), and replays their stored responses."""

    def __init__(self, table: Table) -> None:
        self.table = table
        columns = table.c
        self._lookup = select(
            columns.request_hash, columns.status_code, columns.headers, columns.body
        ).where(columns.scope == bindparam("scope"), columns.key == bindparam("key"))
        self._insert = insert(table)

    async def run(
        self,
        database: Database,
        *,
        scope: IdempotencyScope,
        key: str,
        request_hash: str,
        work: Callable[[AsyncConnection], Awaitable[StoredResponse]],
    ) -> tuple[StoredResponse, bool]:
        """Run ``work`` in a write unit once for this key; return its response and whether
        it was replayed rather than run now.

        One write unit looks the key up, then replays what it stores or runs ``work`` and
        stores its response. ``work`` must write only through the connection it gets (that is
        what makes the key and the write commit together). Transient failures are retried as
        in :meth:`Database.run`; an unknown COMMIT outcome is resolved by running again.
        ``scope`` may be a function of a connection (see :data:`IdempotencyScope`): it is
        called once, in the unit, before the lookup. A replay takes a write unit too (on
        SQLite, the process's write turn, for one indexed lookup), which it leaves by ROLLBACK:
        the price of not paying a second unit on every first attempt.

        Raises:
            IdempotencyKeyReusedError: the key was used before for another request.
            CommitOutcomeUnknownError: COMMIT was lost on every attempt; the client may send
                the same request and key again later, safely.
            TypeError: ``scope``'s function returned something other than a string.
            Whatever ``scope`` (nothing is looked up or run then) or ``work`` raises
            (nothing is stored then).
        """
        resolved = _ResolvedScope(scope)
        attempts = database.settings.retry_attempts
        for attempt in range(1, attempts + 1):
            try:
                response = await database.run(
                    database.write_connection,
                    lambda connection: self._replay_or_run(
                        connection, resolved, key, request_hash, work
                    ),
                )
            except _Replay as replay:
                return replay.stored, True
            except CommitOutcomeUnknownError:
                if attempt == attempts:
                    raise
                # Safe to run again: if the lost COMMIT did land, the key is found this time
                # (or collides) and the stored response is replayed.
                logger.warning("COMMIT outcome unknown for an idempotent write; running it again")
                continue
            except UniqueViolationError:
                # Another attempt with this key committed after this one looked: its answer.
                owner = resolved.value
                if owner is None:
                    raise  # the scope was never resolved: not the key's violation
                stored = await database.run(
                    database.read_connection,
                    partial(self._lookup_stored, scope=owner, key=key, request_hash=request_hash),
                )
                if stored is None:
                    raise  # a violation of the work's own, not a repeated key
                return stored, True
            return response, False
        raise AssertionError("unreachable")  # pragma: no cover

    async def purge(self, database: Database, *, older_than: timedelta) -> int:
        """Delete keys stored more than ``older_than`` ago; return how many."""
        cutoff = utcnow() - older_than
        async with database.write_connection() as connection:
            result = await connection.execute(
                delete(self.table).where(self.table.c.created_at < cutoff)
            )
        return int(result.rowcount or 0)

    async def _replay_or_run(
        self,
        connection: AsyncConnection,
        scope: _ResolvedScope,
        key: str,
        request_hash: str,
        work: Callable[[AsyncConnection], Awaitable[StoredResponse]],
    ) -> StoredResponse:
        """In one write unit: ``work``'s response, stored under the key.

        Raises:
            _Replay: the key has a stored answer (raised so the unit rolls back: a replay
                wrote nothing, and needs no COMMIT).
        """
        owner = await scope.resolve(connection)
        stored = await self._lookup_stored(
            connection, scope=owner, key=key, request_hash=request_hash
        )
        if stored is not None:
            raise _Replay(stored)
        return await self._work_then_store(connection, owner, key, request_hash, work)

    async def _lookup_stored(
        self, connection: AsyncConnection, *, scope: str, key: str, request_hash: str
    ) -> StoredResponse | None:
        """The response stored under ``key`` in ``scope`` (``None``: none yet).

        Raises:
            IdempotencyKeyReusedError: the key was stored for a different request.
        """
        row = (await connection.execute(self._lookup, {"scope": scope, "key": key})).first()
        return self._stored(row, request_hash)

    @staticmethod
    def _stored(row: Any, request_hash: str) -> StoredResponse | None:
        """The response a looked-up key row stores (``None`` for no row).

        Raises:
            IdempotencyKeyReusedError: the row was stored for a different request.
        """
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise IdempotencyKeyReusedError(
                "this Idempotency-Key was already used for a different request; "
                "use a new key for a new request"
            )
        headers = row.headers if isinstance(row.headers, dict) else json.loads(row.headers)
        return StoredResponse(row.status_code, bytes(row.body), headers)

    async def _work_then_store(
        self,
        connection: AsyncConnection,
        scope: str,
        key: str,
        request_hash: str,
        work: Callable[[AsyncConnection], Awaitable[StoredResponse]],
    ) -> StoredResponse:
        response = await work(connection)
        # Last, so the row lock it may wait on is held for as short a time as possible.
        await connection.execute(
            self._insert,
            {
                "scope": scope,
                "key": key,
                "request_hash": request_hash,
                "status_code": response.status_code,
                "headers": dict(response.headers),
                "body": response.body,
                "created_at": utcnow(),
            },
        )
        return response
