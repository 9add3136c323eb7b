"""Baseline ``raw``: the endpoints written directly on the driver (asyncpg pool / sqlite3).

The ceiling Bastion is measured against: same framework, same queries, no layer in between.
Run with ``uvicorn bench.apps.raw:app``; the database comes from ``BENCH_DATABASE_URL``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from bastion.loop_lag import LoopLagMonitor

URL = os.environ["BENCH_DATABASE_URL"]
POSTGRES = URL.startswith("postgresql")

CONVERSATION_COLUMNS = "id, title, status, metadata, created_at, updated_at, deleted_at, version"


def _key_hash(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise HTTPException(401)
    return hashlib.sha256(header[7:].encode()).hexdigest()


def _sqlite_time(value: str | None) -> str | None:
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC).isoformat()


class Postgres:
    pool: asyncpg.Pool

    async def start(self) -> None:
        async def init(connection: asyncpg.Connection) -> None:
            await connection.set_type_codec(
                "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )

        self.pool = await asyncpg.create_pool(URL, min_size=8, max_size=16, init=init)

    async def close(self) -> None:
        await self.pool.close()

    async def user(self, key_hash: str) -> Any:
        return await self.pool.fetchval(
            "SELECT user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
        )

    async def conversation(self, cid: uuid.UUID, owner: Any) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations "
            "WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
            cid,
            owner,
        )
        return dict(row) if row else None

    async def messages(self, cid: uuid.UUID, owner: Any, limit: int) -> dict[str, Any] | None:
        async with self.pool.acquire() as connection:
            total = await connection.fetchval(
                "SELECT message_count FROM conversations "
                "WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL",
                cid,
                owner,
            )
            if total is None:
                return None
            rows = await connection.fetch(
                "SELECT id, conversation_id, role, content, metadata, created_at FROM messages "
                "WHERE conversation_id = $1 AND id > 0 ORDER BY id LIMIT $2",
                cid,
                limit + 1,
            )
            page = [dict(row) for row in rows[:limit]]
            sources = await connection.fetch(
                "SELECT message_id, url, title FROM message_sources "
                "WHERE message_id = ANY($1::bigint[]) ORDER BY message_id, position",
                [row["id"] for row in page],
            )
        return _page(page, sources, total, limit, len(rows))

    async def add_message(self, cid: uuid.UUID, owner: Any, body: dict[str, Any]) -> Any:
        now = datetime.now(UTC)
        async with self.pool.acquire() as connection, connection.transaction():
            touched = await connection.fetchval(
                "UPDATE conversations SET message_count = message_count + 1, updated_at = $3 "
                "WHERE id = $1 AND owner_id = $2 AND deleted_at IS NULL RETURNING id",
                cid,
                owner,
                now,
            )
            if touched is None:
                return None
            message_id = await connection.fetchval(
                "INSERT INTO messages (conversation_id, role, content, metadata, created_at) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING id",
                cid,
                body["role"],
                body["content"],
                body.get("metadata", {}),
                now,
            )
            sources = body.get("sources", [])
            if sources:
                await connection.executemany(
                    "INSERT INTO message_sources (message_id, position, url, title) "
                    "VALUES ($1, $2, $3, $4)",
                    [(message_id, n, s["url"], s.get("title")) for n, s in enumerate(sources)],
                )
        return _message(message_id, cid, body, now)


class Sqlite:
    connection: sqlite3.Connection

    async def start(self) -> None:
        path = URL.split("///", 1)[1]
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA foreign_keys=ON")
        self.connection.execute("PRAGMA busy_timeout=5000")

    async def close(self) -> None:
        self.connection.close()

    async def user(self, key_hash: str) -> Any:
        row = self.connection.execute(
            "SELECT user_id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
        ).fetchone()
        return row[0] if row else None

    async def conversation(self, cid: uuid.UUID, owner: Any) -> dict[str, Any] | None:
        row = self.connection.execute(
            f"SELECT {CONVERSATION_COLUMNS} FROM conversations "
            "WHERE id = ? AND owner_id = ? AND deleted_at IS NULL",
            (cid.hex, owner),
        ).fetchone()
        if row is None:
            return None
        return {
            "id": str(uuid.UUID(row[0])),
            "title": row[1],
            "status": row[2],
            "metadata": json.loads(row[3]),
            "created_at": _sqlite_time(row[4]),
            "updated_at": _sqlite_time(row[5]),
            "deleted_at": _sqlite_time(row[6]),
            "version": row[7],
        }

    async def messages(self, cid: uuid.UUID, owner: Any, limit: int) -> dict[str, Any] | None:
        found = self.connection.execute(
            "SELECT message_count FROM conversations "
            "WHERE id = ? AND owner_id = ? AND deleted_at IS NULL",
            (cid.hex, owner),
        ).fetchone()
        if found is None:
            return None
        rows = self.connection.execute(
            "SELECT id, conversation_id, role, content, metadata, created_at FROM messages "
            "WHERE conversation_id = ? AND id > 0 ORDER BY id LIMIT ?",
            (cid.hex, limit + 1),
        ).fetchall()
        page = [
            {
                "id": row[0],
                "conversation_id": str(uuid.UUID(row[1])),
                "role": row[2],
                "content": row[3],
                "metadata": json.loads(row[4]),
                "created_at": _sqlite_time(row[5]),
            }
            for row in rows[:limit]
        ]
        marks = ",".join("?" * len(page))
        sources = self.connection.execute(
            f"SELECT message_id, url, title FROM message_sources WHERE message_id IN ({marks}) "
            "ORDER BY message_id, position",
            [row["id"] for row in page],
        ).fetchall()
        return _page(
            page,
            [dict(zip(("message_id", "url", "title"), s, strict=True)) for s in sources],
            found[0],
            limit,
            len(rows),
        )

    async def add_message(self, cid: uuid.UUID, owner: Any, body: dict[str, Any]) -> Any:
        now = datetime.now(UTC)
        stamp = now.replace(tzinfo=None).isoformat(sep=" ")
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            touched = connection.execute(
                "UPDATE conversations SET message_count = message_count + 1, updated_at = ? "
                "WHERE id = ? AND owner_id = ? AND deleted_at IS NULL RETURNING id",
                (stamp, cid.hex, owner),
            ).fetchone()
            if touched is None:
                connection.execute("ROLLBACK")
                return None
            message_id = connection.execute(
                "INSERT INTO messages (conversation_id, role, content, metadata, created_at) "
                "VALUES (?, ?, ?, ?, ?) RETURNING id",
                (
                    cid.hex,
                    body["role"],
                    body["content"],
                    json.dumps(body.get("metadata", {})),
                    stamp,
                ),
            ).fetchone()[0]
            connection.executemany(
                "INSERT INTO message_sources (message_id, position, url, title) "
                "VALUES (?, ?, ?, ?)",
                [
                    (message_id, n, s["url"], s.get("title"))
                    for n, s in enumerate(body.get("sources", []))
                ],
            )
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return _message(message_id, cid, body, now)


def _page(
    page: list[dict[str, Any]], sources: Any, total: int, limit: int, fetched: int
) -> dict[str, Any]:
    by_message: dict[int, list[dict[str, Any]]] = {row["id"]: [] for row in page}
    for source in sources:
        by_message[source["message_id"]].append({"url": source["url"], "title": source["title"]})
    for row in page:
        row["sources"] = by_message[row["id"]]
    next_cursor = str(page[-1]["id"]) if fetched > limit else None
    return {"items": page, "next_cursor": next_cursor, "total": total}


def _message(
    message_id: int, cid: uuid.UUID, body: dict[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "id": message_id,
        "conversation_id": str(cid),
        "role": body["role"],
        "content": body["content"],
        "metadata": body.get("metadata", {}),
        "sources": [{"url": s["url"], "title": s.get("title")} for s in body.get("sources", [])],
        "created_at": now.isoformat(),
    }


store: Postgres | Sqlite = Postgres() if POSTGRES else Sqlite()


# Not the driver's: the loop-lag monitor the reference service runs, so that ``make bench``
# can read raw's lag under the same load beside Bastion's (a 20 ms timer; no request waits
# for it).
lag_monitor = LoopLagMonitor()


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await store.start()
    await lag_monitor.start()
    yield
    await lag_monitor.stop()
    await store.close()


app = FastAPI(lifespan=lifespan)


async def _owner(request: Request) -> Any:
    owner = await store.user(_key_hash(request))
    if owner is None:
        raise HTTPException(401)
    return owner


@app.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: uuid.UUID, request: Request) -> Any:
    found = await store.conversation(conversation_id, await _owner(request))
    if found is None:
        raise HTTPException(404)
    return found


@app.get("/v1/conversations/{conversation_id}/messages")
async def list_messages(conversation_id: uuid.UUID, request: Request, limit: int = 20) -> Any:
    found = await store.messages(conversation_id, await _owner(request), limit)
    if found is None:
        raise HTTPException(404)
    return found


@app.post("/v1/conversations/{conversation_id}/messages", status_code=201)
async def create_message(conversation_id: uuid.UUID, request: Request) -> Any:
    owner = await _owner(request)
    created = await store.add_message(conversation_id, owner, await request.json())
    if created is None:
        raise HTTPException(404)
    return JSONResponse(created, status_code=201)


# After the API's routes: Starlette tries routes in order, and the measured requests come first.
@app.get("/health/ready")
async def ready() -> dict[str, Any]:
    """Only what ``make bench`` reads of the reference service's readiness: the loop lag."""
    lag = lag_monitor.snapshot()
    return {"status": "ready", "loop_lag_ms": {"p50": lag.p50_ms, "p99": lag.p99_ms}}
