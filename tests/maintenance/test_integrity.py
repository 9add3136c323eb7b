"""Integrity checks: a sound database passes; orphans and a damaged file are reported."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bastion import Database, DatabaseSettings
from bastion.maintenance import IntegrityProblem, check_integrity
from tests.maintenance.data import corrupt_copy, seed


async def test_a_sound_database_is_ok(database: Database) -> None:
    await seed(database)

    report = await check_integrity(database)

    assert report.ok, report.problems
    assert [problem.severity for problem in report.problems] in ([], ["info"])
    assert report.to_dict()["ok"] is True


async def test_an_orphan_row_written_with_foreign_keys_off_is_reported_on_sqlite(
    sqlite_url: str,
) -> None:
    path = sqlite_url.removeprefix("sqlite:///")
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute(
        "INSERT INTO api_keys (id, user_id, key_hash, created_at) "
        "VALUES ('0' || hex(randomblob(15)) || '0', 'ffffffffffffffffffffffffffffffff', "
        "'h', '2026-01-01 00:00:00.000000')"
    )
    raw.commit()
    raw.close()

    async with Database(DatabaseSettings(DATABASE_URL=sqlite_url)) as database:
        report = await check_integrity(database)

    assert not report.ok
    assert report.problems == [
        IntegrityProblem("foreign_key_check", "api_keys", "1 row(s) refer to a missing users row")
    ]


@pytest.mark.postgres
async def test_an_orphan_row_written_with_triggers_off_is_reported_on_postgresql(
    postgres_db: Database,
) -> None:
    await seed(postgres_db)
    async with postgres_db.write_connection() as connection:
        # replica mode skips the foreign-key triggers, as a careless bulk load would.
        await connection.execute(text("SET LOCAL session_replication_role = replica"))
        await connection.execute(text("DELETE FROM users WHERE name = 'bob'"))

    report = await check_integrity(postgres_db)

    assert not report.ok
    errors = [problem for problem in report.problems if problem.severity == "error"]
    assert errors == [
        IntegrityProblem("orphan_rows", "api_keys", "1 row(s) refer to a missing users row"),
        IntegrityProblem("orphan_rows", "conversations", "1 row(s) refer to a missing users row"),
    ]


async def test_a_damaged_sqlite_file_is_reported_not_raised(
    sqlite_db: Database, sqlite_url: str, tmp_path: Path
) -> None:
    await seed(sqlite_db)
    damaged = tmp_path / "damaged.db"
    corrupt_copy(Path(sqlite_url.removeprefix("sqlite:///")), damaged, "messages")

    async with Database(DatabaseSettings(DATABASE_URL=f"sqlite:///{damaged}")) as database:
        report = await check_integrity(database)
        quick_report = await check_integrity(database, quick=True)

    assert not report.ok
    assert report.problems[0].check == "integrity_check"
    assert quick_report.problems[0].check == "quick_check"
    assert "messages" in report.problems[0].detail or "malformed" in report.problems[0].detail


@pytest.mark.postgres
async def test_amcheck_checks_every_btree_index_once_installed(postgres_db: Database) -> None:
    await seed(postgres_db)

    report = await check_integrity(postgres_db, install_amcheck=True)

    assert report.ok
    assert report.checks == ["amcheck", "invalid_indexes", "orphan_rows"]
    assert report.problems == []


@pytest.mark.postgres
async def test_an_index_left_invalid_by_a_failed_concurrent_build_is_reported(
    postgres_db: Database, postgres_url: str
) -> None:
    await seed(postgres_db)  # every conversation has status 'active': not unique
    dsn = make_url(postgres_url).set(drivername="postgresql").render_as_string(False)
    connection = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY ix_probe_status ON conversations (status)"
            )
        report = await check_integrity(postgres_db)
    finally:
        await connection.execute("DROP INDEX IF EXISTS ix_probe_status")
        await connection.close()

    assert not report.ok
    assert (
        IntegrityProblem(
            "invalid_indexes",
            "conversations",
            "index ix_probe_status is invalid: drop it and create it again",
        )
        in report.problems
    )
