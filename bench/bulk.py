"""The ``bulk_insert`` scenario: 100,000 messages through Bastion vs the driver's fastest path.

PostgreSQL: ``bastion.bulk_insert`` (COPY in batches, values through the column types) vs
asyncpg ``copy_records_to_table`` with the values prepared by hand. SQLite:
``bulk_insert`` (executemany in batches via aiosqlite) vs ``sqlite3.executemany`` in one
transaction. Interleaved rounds; the table is emptied before each run. Returns result rows in
``bench.run``'s shape. Standalone: ``python -m bench.bulk --backend both --rounds 3`` makes
its own databases and prints bastion ÷ baseline per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
from sqlalchemy import Table, text

from bastion import Database, DatabaseSettings, bulk_insert
from conversations.models import Message

ROWS = 100_000
BATCH = 10_000
MESSAGES = cast(Table, Message.__table__)


def make_rows(conversation_ids: list[uuid.UUID], count: int = ROWS) -> list[dict[str, Any]]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        {
            "conversation_id": conversation_ids[n % len(conversation_ids)],
            "role": "user",
            "content": f"bulk message {n} with a sentence of text in it",
            "metadata": {"n": n},
            "created_at": base + timedelta(microseconds=n),
        }
        for n in range(count)
    ]


async def bastion_run(url: str, rows: list[dict[str, Any]]) -> float:
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        started = time.perf_counter()
        result = await bulk_insert(database, MESSAGES, rows, batch_size=BATCH)
        elapsed = time.perf_counter() - started
    assert result.inserted == len(rows)
    return len(rows) / elapsed


async def raw_postgres_run(url: str, rows: list[dict[str, Any]]) -> float:
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        records = [
            (
                r["conversation_id"],
                r["role"],
                r["content"],
                json.dumps(r["metadata"]),
                r["created_at"],
            )
            for r in rows
        ]
        await connection.set_type_codec(
            "jsonb",
            encoder=lambda value: b"\x01" + value.encode(),
            decoder=lambda data: data,
            schema="pg_catalog",
            format="binary",
        )
        async with connection.transaction():
            await connection.copy_records_to_table(
                "messages",
                records=records,
                columns=["conversation_id", "role", "content", "metadata", "created_at"],
            )
        return len(rows) / (time.perf_counter() - started)
    finally:
        await connection.close()


def raw_sqlite_run(path: str, rows: list[dict[str, Any]]) -> float:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        started = time.perf_counter()
        records = [
            (
                r["conversation_id"].hex,
                r["role"],
                r["content"],
                json.dumps(r["metadata"]),
                r["created_at"].replace(tzinfo=None).isoformat(sep=" "),
            )
            for r in rows
        ]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO messages (conversation_id, role, content, metadata, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            records,
        )
        connection.execute("COMMIT")
        return len(rows) / (time.perf_counter() - started)
    finally:
        connection.close()


async def empty_messages(url: str) -> list[uuid.UUID]:
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        async with database.write() as session:
            await session.execute(text("DELETE FROM message_sources"))
            await session.execute(text("DELETE FROM messages"))
        async with database.read() as session:
            ids = await session.scalars(text("SELECT id FROM conversations LIMIT 100"))
            return [value if isinstance(value, uuid.UUID) else uuid.UUID(value) for value in ids]


def bench_bulk(backend: str, url: str, rounds: int, count: int = ROWS) -> list[dict[str, Any]]:
    """Per-round results for the ``bastion`` and baseline variants (rows/s in ``rps``).

    Each run inserts ``count`` messages into an emptied table.
    """
    results: list[dict[str, Any]] = []
    conversation_ids = asyncio.run(empty_messages(url))
    rows = make_rows(conversation_ids, count)
    baseline = "copy" if backend == "postgresql" else "executemany"
    for rnd in range(rounds):
        order = ["bastion", baseline] if rnd % 2 == 0 else [baseline, "bastion"]
        for variant in order:
            asyncio.run(empty_messages(url))
            if variant == "bastion":
                rate = asyncio.run(bastion_run(url, rows))
            elif backend == "postgresql":
                rate = asyncio.run(raw_postgres_run(url.replace("+asyncpg", ""), rows))
            else:
                rate = raw_sqlite_run(url.split("///", 1)[1], rows)
            print(f"{backend:10} bulk_insert       {variant:11} round {rnd}: {rate:10.0f} rows/s")
            results.append(
                {
                    "backend": backend,
                    "scenario": "bulk_insert",
                    "variant": variant,
                    "round": rnd,
                    "rps": round(rate, 1),
                    "p50_ms": 0.0,
                    "p99_ms": 0.0,
                    "errors": 0,
                }
            )
    return results


async def _fresh_database(backend: str, workdir: str) -> str:
    """A migrated database with 100 conversations to attach messages to; its URL."""
    from bastion.migrations import upgrade
    from conversations import MIGRATIONS
    from conversations.models import Conversation
    from conversations.users import create_user

    if backend == "sqlite":
        url = f"sqlite:///{workdir}/bulk.db"
    else:
        admin_url = os.environ.get(
            "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        )
        name = f"bench_bulk_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        await upgrade(database, MIGRATIONS)
        await create_user(database, "bulk")
        async with database.write() as session:
            owner = await session.scalar(text("SELECT id FROM users"))
            owner_id = owner if isinstance(owner, uuid.UUID) else uuid.UUID(str(owner))
            session.add_all(Conversation(owner_id=owner_id, title=f"c{n}") for n in range(100))
    return url


async def _drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> None:
    """``python -m bench.bulk [--backend sqlite|postgresql|both] [--rounds N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    backends = ["sqlite", "postgresql"] if options.backend == "both" else [options.backend]
    for backend in backends:
        with tempfile.TemporaryDirectory() as workdir:
            url = asyncio.run(_fresh_database(backend, workdir))
            try:
                results = bench_bulk(backend, url, options.rounds)
            finally:
                if backend == "postgresql":
                    asyncio.run(_drop_database(url))
        baseline = "copy" if backend == "postgresql" else "executemany"
        ratios = [
            ours["rps"] / theirs["rps"]
            for ours in results
            for theirs in results
            if ours["variant"] == "bastion"
            and theirs["variant"] == baseline
            and ours["round"] == theirs["round"]
        ]
        print(
            f"{backend}: bastion / {baseline} per round: "
            + ", ".join(f"{ratio:.2f}" for ratio in ratios)
            + f" (median {statistics.median(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
