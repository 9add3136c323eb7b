"""Export / import: a database moves between backends with identical content, or not at all."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from bastion import Database, DatabaseSettings
from bastion.maintenance import (
    ImportFileError,
    ImportTargetError,
    export_database,
    import_database,
    table_digests,
)
from bastion.maintenance.errors import MaintenanceError
from conversations.models import Message, User
from tests.maintenance.data import ALICE, LIVE, NOW, seed


async def test_an_export_has_one_file_per_table_and_a_manifest_in_foreign_key_order(
    database: Database, tmp_path: Path
) -> None:
    await seed(database)

    manifest = await export_database(database, tmp_path / "export")

    names = [table.name for table in manifest.tables]
    assert names.index("users") < names.index("conversations") < names.index("messages")
    assert names.index("messages") < names.index("message_sources")
    assert listing(tmp_path / "export") == sorted(
        ["manifest.json", *(f"{name}.jsonl" for name in names)]
    )
    digests = await table_digests(database)
    assert {t.name: (t.rows, t.sha256) for t in manifest.tables} == {
        name: (digest.rows, digest.sha256) for name, digest in digests.items()
    }
    assert manifest.schema_revision
    assert manifest.source_backend == database.backend
    assert modes(tmp_path / "export") == {0o600}


async def test_an_export_never_writes_into_a_directory_that_is_not_empty(
    database: Database, tmp_path: Path
) -> None:
    target = tmp_path / "export"
    write(target / "keep.txt", "mine")

    with pytest.raises(MaintenanceError, match="is not empty"):
        await export_database(database, target)

    assert listing(target) == ["keep.txt"]


@pytest.mark.postgres
@pytest.mark.parametrize("direction", ["sqlite_to_postgresql", "postgresql_to_sqlite"])
async def test_a_database_moves_between_backends_with_identical_content(
    sqlite_db: Database, postgres_db: Database, tmp_path: Path, direction: str
) -> None:
    source, target = (sqlite_db, postgres_db)
    if direction == "postgresql_to_sqlite":
        source, target = target, source
    await seed(source)

    await export_database(source, tmp_path / "export")
    result = await import_database(target, tmp_path / "export")

    assert await table_digests(target) == await table_digests(source)
    assert result.tables["messages"] == 4


@pytest.mark.postgres
async def test_after_an_import_into_postgresql_new_ids_do_not_collide(
    sqlite_db: Database, postgres_db: Database, tmp_path: Path
) -> None:
    await seed(sqlite_db)
    await export_database(sqlite_db, tmp_path / "export")

    result = await import_database(postgres_db, tmp_path / "export")
    async with postgres_db.write_connection() as connection:
        new_id = (
            await connection.execute(
                insert(Message)
                .values(conversation_id=LIVE, role="user", content="new", metadata_={})
                .returning(Message.id)
            )
        ).scalar_one()

    assert result.sequences == ["public.messages_id_seq"]
    assert new_id == 5


async def test_a_non_empty_target_is_refused_unless_replaced(
    database: Database, tmp_path: Path
) -> None:
    await seed(database)
    await export_database(database, tmp_path / "export")
    before = await table_digests(database)

    with pytest.raises(ImportTargetError, match="the target is not empty"):
        await import_database(database, tmp_path / "export")
    result = await import_database(database, tmp_path / "export", replace=True)

    assert result.replaced
    assert await table_digests(database) == before


@pytest.fixture(scope="module")
async def seeded_export(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of the seeded data set from SQLite, made once for the module (read-only)."""
    source = tmp_path_factory.mktemp("seeded") / "source.db"
    shutil.copyfile(sqlite_template, source)
    async with Database(DatabaseSettings(DATABASE_URL=f"sqlite:///{source}")) as database:
        await seed(database)
        await export_database(database, source.parent / "export")
    return source.parent / "export"


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def modes(directory: Path) -> set[int]:
    return {stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()}


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def _rewrite(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _user_line(name: str, **extra: object) -> str:
    row = {"id": ALICE.hex, "name": name, "created_at": NOW.isoformat(), **extra}
    return json.dumps(row)


def damage_export(export: Path, damage: str) -> None:
    """Spoil the export in one way, named by ``damage``."""
    users = export / "users.jsonl"
    manifest_path = export / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    lines = users.read_text().splitlines()
    if damage == "unknown_table":
        manifest["tables"].append(
            {"name": "ghosts", "file": "ghosts.jsonl", "rows": 0, "sha256": "0" * 64}
        )
        (export / "ghosts.jsonl").write_text("")
    elif damage == "stray_file":
        (export / "ghosts.jsonl").write_text("{}\n")
    elif damage == "unknown_column":
        _rewrite(users, [_user_line("alice", colour="red"), *lines[1:]])
    elif damage == "malformed_line":
        _rewrite(users, ['{"id": ', *lines[1:]])
    elif damage == "wrong_type":
        _rewrite(users, [_user_line("alice", created_at="yesterday"), *lines[1:]])
    elif damage == "oversized_line":
        _rewrite(users, [_user_line("x" * 5000), *lines[1:]])
    elif damage == "edited_value":
        _rewrite(users, [line.replace('"alice"', '"mallory"') for line in lines])
    elif damage == "missing_row":
        _rewrite(users, lines[:1])
    elif damage == "bad_manifest":
        manifest["tables"][0]["file"] = "../../etc/passwd"
    elif damage == "other_revision":
        manifest["schema_revision"] = ["0000_elsewhere"]
    elif damage == "no_manifest":
        manifest_path.unlink()
    if manifest_path.exists():
        manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("unknown_table", "the export has tables the target does not: ghosts"),
        ("stray_file", "files not listed in manifest.json: ghosts.jsonl"),
        ("unknown_column", "users.jsonl line 1: table users has no column colour"),
        ("malformed_line", "users.jsonl line 1: not valid JSON"),
        ("wrong_type", "users.jsonl line 1: column created_at: expected an ISO-8601 timestamp"),
        ("oversized_line", "users.jsonl line 1: longer than 4096 bytes"),
        ("edited_value", "users.jsonl: content differs from the manifest's SHA-256"),
        ("missing_row", "users.jsonl: 1 rows, the manifest says 2"),
        ("bad_manifest", "not a valid export manifest: tables.0: table idempotency_keys must be"),
        ("no_manifest", "has no manifest.json"),
    ],
)
async def test_a_damaged_export_is_refused_before_anything_is_written(
    seeded_export: Path, database: Database, tmp_path: Path, damage: str, message: str
) -> None:
    export = copy_tree(seeded_export, tmp_path / "export")
    damage_export(export, damage)
    before = await table_digests(database)

    with pytest.raises(ImportFileError) as raised:
        await import_database(database, export, max_line_bytes=4096)

    assert message in raised.value.message
    assert await table_digests(database) == before


async def test_an_export_of_another_schema_revision_is_refused(
    database: Database, tmp_path: Path
) -> None:
    await export_database(database, tmp_path / "export")
    damage_export(tmp_path / "export", "other_revision")

    with pytest.raises(ImportTargetError, match="schema revision 0000_elsewhere"):
        await import_database(database, tmp_path / "export")


async def test_a_failure_midway_through_the_import_leaves_the_target_as_it_was(
    sqlite_db: Database, database: Database, tmp_path: Path
) -> None:
    await seed(sqlite_db)
    await export_database(sqlite_db, tmp_path / "export")
    async with database.write_connection() as connection:
        await connection.execute(insert(User).values(id=ALICE, name="alice", created_at=NOW))

    with pytest.raises(ImportTargetError):
        await import_database(database, tmp_path / "export")

    async with database.read_connection() as connection:
        names = (await connection.execute(select(User.name))).scalars().all()
    assert names == ["alice"]


class RecordingProgress:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []
        self.current = ("", "")

    def start(self, phase: str, table: str, rows: int) -> None:
        self.events.append((phase, table, rows))
        self.current = (phase, table)

    def advance(self, rows: int) -> None:
        phase, table = self.current
        self.events.append((f"{phase}+", table, rows))


async def test_progress_covers_every_row_of_every_phase(
    seeded_export: Path, sqlite_db: Database
) -> None:
    progress = RecordingProgress()

    await import_database(sqlite_db, seeded_export, progress=progress, batch_size=2)

    started = {(phase, table): rows for phase, table, rows in progress.events if "+" not in phase}
    advanced: dict[tuple[str, str], int] = {}
    for phase, table, rows in progress.events:
        if phase.endswith("+"):
            key = (phase[:-1], table)
            advanced[key] = advanced.get(key, 0) + rows
    assert started[("checking", "messages")] == started[("importing", "messages")] == 4
    assert advanced == {key: rows for key, rows in started.items() if rows}
    assert [phase for phase, _, _ in progress.events if "+" not in phase][:1] == ["checking"]


async def test_replace_is_refused_for_an_export_of_only_some_tables(
    database: Database, tmp_path: Path
) -> None:
    await seed(database)
    await export_database(database, tmp_path / "export", tables=["users"])
    before = await table_digests(database)

    with pytest.raises(ImportTargetError, match="the export does not hold") as refused:
        await import_database(database, tmp_path / "export", replace=True)

    named = refused.value.message.split("does not hold ")[1].split(":")[0].split(", ")
    assert "users" not in named  # only the tables the export lacks
    assert {"conversations", "messages", "message_sources"} <= set(named)
    assert await table_digests(database) == before
