"""``make soak-backup``: S24, backups taken and proven while the database is written to.

For ``SOAK_BACKUP_SECONDS`` (default 300) a writer adds messages at ``SOAK_BACKUP_RATE`` per
second (default 100) through Bastion's write units. Every ``SOAK_BACKUP_EVERY_S`` (default 30)
the soak counts the source's messages, makes a backup, verifies it (decrypt, restore into a
scratch database, integrity check, row counts and content hashes against the manifest) and
checks the live database's integrity.

It passes when every cycle verified, the restored message count was never 0, never shrank,
and was at least the source's count one cycle earlier, and the live integrity checks all
passed. Backend: ``SOAK_BACKUP_BACKEND=sqlite`` (default) or ``postgresql``. Writes
``bench/results/soak_backup.json``; exits 1 when a criterion fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyrage
from sqlalchemy import func, insert, select

from bastion import Database, DatabaseSettings
from bastion.backup import BackupService, BackupSettings
from bastion.maintenance import check_integrity
from bastion.migrations import upgrade
from bench.run import RESULTS, create_postgres_database, drop_postgres_database
from conversations import MIGRATIONS
from conversations.models import Conversation, Message, User

DURATION_S = float(os.environ.get("SOAK_BACKUP_SECONDS", "300"))
RATE = float(os.environ.get("SOAK_BACKUP_RATE", "100"))
EVERY_S = float(os.environ.get("SOAK_BACKUP_EVERY_S", "30"))
BACKEND = os.environ.get("SOAK_BACKUP_BACKEND", "sqlite")
DATABASE_NAME = "bastion_soak_backup"


async def count_messages(database: Database) -> int:
    async with database.read_connection() as connection:
        return int(await connection.scalar(select(func.count()).select_from(Message)) or 0)


async def write_steadily(
    database: Database, conversation_id: uuid.UUID, stop: asyncio.Event
) -> int:
    """Insert one message every 1/RATE seconds (on a fixed schedule) until ``stop``."""
    written, started = 0, time.monotonic()
    statement = insert(Message)
    while not stop.is_set():
        async with database.write_connection() as connection:
            await connection.execute(
                statement,
                {"conversation_id": conversation_id, "role": "user", "content": f"m{written}"},
            )
        written += 1
        delay = started + written / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    return written


async def soak(url: str, work_dir: Path) -> dict[str, Any]:
    settings = DatabaseSettings(DATABASE_URL=url, DB_POOL_SIZE=5, DB_MAX_OVERFLOW=5)
    backups = BackupSettings(
        BACKUP_DIR=work_dir / "backups",
        BACKUP_SIGNING_KEY=uuid.uuid4().hex * 2,
        BACKUP_ENCRYPTION_KEY=str(pyrage.x25519.Identity.generate()),
        BACKUP_ENCRYPT=True,
    )
    cycles: list[dict[str, Any]] = []
    async with Database(settings) as database:
        await upgrade(database, MIGRATIONS)
        async with database.write() as session:
            user = User(name=f"soak-{uuid.uuid4().hex[:8]}")
            session.add(user)
            await session.flush()
            conversation = Conversation(owner_id=user.id, title="soak")
            session.add(conversation)
            await session.flush()
            conversation_id = conversation.id
        service = BackupService(database, backups)
        stop = asyncio.Event()
        writer = asyncio.create_task(write_steadily(database, conversation_id, stop))
        started = time.monotonic()
        previous_source = 0
        try:
            while time.monotonic() - started < DURATION_S:
                await asyncio.sleep(EVERY_S)
                source_before = await count_messages(database)
                cycle_started = time.perf_counter()
                manifest = await service.create()
                verified = await service.verify(manifest.id)
                integrity = await check_integrity(database)
                restored = verified.tables["messages"]
                cycle = {
                    "at_s": round(time.monotonic() - started, 1),
                    "source_messages_before_backup": source_before,
                    "restored_messages": restored,
                    "verify_checks": verified.checks,
                    "live_integrity_ok": integrity.ok,
                    "backup_and_verify_s": round(time.perf_counter() - cycle_started, 2),
                    "archive_bytes": manifest.archive_bytes,
                    "ok": (
                        restored > 0
                        and restored >= previous_source
                        and (not cycles or restored >= cycles[-1]["restored_messages"])
                        and integrity.ok
                    ),
                }
                cycles.append(cycle)
                print(json.dumps(cycle), flush=True)
                previous_source = source_before
        finally:
            stop.set()
            written = await writer
    elapsed = time.monotonic() - started
    return {
        "scenario": "S24",
        "backend": BACKEND,
        "duration_s": round(elapsed, 1),
        "writes": written,
        "writes_per_s": round(written / elapsed, 1),
        "cycles": cycles,
        "passed": bool(cycles) and all(cycle["ok"] for cycle in cycles),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bastion-soak-backup-") as work:
        work_dir = Path(work)
        if BACKEND == "postgresql":
            url = asyncio.run(create_postgres_database(DATABASE_NAME))
        else:
            url = f"sqlite:///{work_dir}/soak.db"
        try:
            report = asyncio.run(soak(url, work_dir))
        finally:
            if BACKEND == "postgresql":
                asyncio.run(drop_postgres_database(DATABASE_NAME))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak_backup.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"S24 {report['backend']}: {len(report['cycles'])} cycles, "
        f"{report['writes_per_s']} writes/s, passed={report['passed']}"
    )
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
