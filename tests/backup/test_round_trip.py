"""S19: backup → verify → restore on every backend: row counts and content hashes equal, the
schema identical, the migration revision at head, and the integrity check clean."""

from __future__ import annotations

from sqlalchemy import text

from bastion import Database
from bastion.backup import BackupService
from bastion.maintenance.integrity import check_integrity
from bastion.migrations import head_revisions
from conversations import MIGRATIONS
from tests.backup.conftest import digests, fill

_POSTGRES_SCHEMA = [
    "SELECT table_name, column_name, data_type, is_nullable, column_default "
    "FROM information_schema.columns WHERE table_schema = current_schema() ORDER BY 1, 2",
    # CHECK bodies by name only: PostgreSQL re-deparses an IN list over varchar differently
    # once it went through pg_dump's text (ARRAY[...]::text[] vs ARRAY[...::text]), the same
    # constraint spelt two ways; every other definition is compared in full.
    "SELECT c.conrelid::regclass::text, c.conname, c.contype, "
    "CASE WHEN c.contype = 'c' THEN '' ELSE pg_get_constraintdef(c.oid, true) END "
    "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
    "WHERE n.nspname = current_schema() ORDER BY 1, 2",
    "SELECT tablename, indexname, indexdef FROM pg_indexes "
    "WHERE schemaname = current_schema() ORDER BY 1, 2",
]


async def _schema(database: Database) -> list[tuple[object, ...]]:
    """The schema as the catalogs describe it (SQLite: sqlite_master's SQL)."""
    statements = (
        ["SELECT type, name, sql FROM sqlite_master ORDER BY type, name"]
        if database.backend == "sqlite"
        else _POSTGRES_SCHEMA
    )
    rows: list[tuple[object, ...]] = []
    async with database.read_connection() as connection:
        for statement in statements:
            rows += [tuple(row) for row in await connection.execute(text(statement))]
    return rows


async def test_s19_round_trip_restores_identical_content(
    database: Database, service: BackupService
) -> None:
    await fill(database)
    before = await digests(database)
    schema = await _schema(database)
    manifest = await service.create()
    assert {name: table.rows for name, table in manifest.tables.items()} == {
        name: digest.rows for name, digest in before.items()
    }
    assert manifest.tables["messages"].rows == 400
    assert list(manifest.alembic_revisions) == list(head_revisions(MIGRATIONS))

    report = await service.verify(manifest.id)
    assert report.tables["messages"] == 400

    await fill(database, tag="later")
    assert (await digests(database)) != before

    restored = await service.restore(manifest.id, confirm=manifest.id)
    assert (await digests(database)) == before
    assert await _schema(database) == schema
    assert (await check_integrity(database)).ok
    async with database.read_connection() as connection:
        revisions = (
            await connection.execute(text("SELECT version_num FROM alembic_version"))
        ).scalars()
        assert list(revisions) == list(head_revisions(MIGRATIONS))
    assert restored.safety_backup_id is not None
    safety = await service.get(restored.safety_backup_id)
    assert safety.label == "pre-restore"
    assert safety.tables["messages"].rows == 800
