"""A full disk (ENOSPC, SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full``): a clear error,
nothing lost, and recovery once space is freed; and S21's restore onto a disk that fills,
which must leave the old database whole.

The disk is a real one: a tmpfs of a few MiB mounted for the test (Linux, root), filled with
a file until a page or two of room is left. Without the right to mount, the tests skip
(under ``CI=true`` they fail, so that CI cannot pass without them). On PostgreSQL the small
disk holds a tablespace of the throwaway server (``tests/faults/pg_server.py``), never the
shared one's: a full WAL disk would stop the server (PANIC), a full data disk fails the
statement that needed room, which is the case an application must survive.
"""

from __future__ import annotations

import base64
import os
import shutil
import sqlite3
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import asyncpg
import httpx
import pyrage
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import insert, select, text

from bastion import Database, DatabaseSettings, DatabaseUnavailableError
from bastion.backup import BackupService
from conversations.app import create_app
from conversations.models import Conversation, User
from conversations.users import create_user
from tests.backup.conftest import digests, fill, make_backup_settings
from tests.conftest import unavailable
from tests.faults.pg_server import PostgresServer, migrated_database, require_throwaway_server

CONVERSATIONS = Conversation.__table__
LEFT_BYTES = 48 * 1024


@contextmanager
def mounted_tmpfs(mount: Path, owner: str | None = None) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted at ``mount`` (made here), owned by ``owner`` if given, and
    unmounted after; the test skips (fails under ``CI=true``) without the right to mount."""
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        unavailable(f"needs to mount a tmpfs (root on Linux): {mounted.stderr.strip()}")
    try:
        if owner is not None:
            shutil.chown(mount, owner, owner)
        yield mount
    finally:
        unmounted = subprocess.run(["umount", str(mount)], capture_output=True, text=True)
        if unmounted.returncode != 0:
            # Something still holds a file there: detach it now, freed once let go.
            subprocess.run(["umount", "-l", str(mount)], check=False)
            warnings.warn(
                f"the test's tmpfs was busy when unmounted ({unmounted.stderr.strip()}); "
                "detached it lazily",
                stacklevel=1,
            )
        mount.rmdir()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, mounted for this test and unmounted after."""
    with mounted_tmpfs(tmp_path / "disk") as mount:
        yield mount


def fill_disk(mount: Path) -> Path:
    """Fill ``mount`` up to ``LEFT_BYTES`` of free space; the filler file, to free it."""
    filler = mount / "filler"
    stats = os.statvfs(mount)
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - LEFT_BYTES))
    return filler


@pytest.fixture
async def database_on_small_disk(
    small_disk: Path, sqlite_template: Path
) -> AsyncIterator[Database]:
    path = small_disk / "live.db"
    shutil.copyfile(sqlite_template, path)
    async with Database(DatabaseSettings(DATABASE_URL=f"sqlite:///{path}")) as database:
        yield database


async def _titles(database: Database) -> list[str]:
    async with database.read_connection() as connection:
        rows = await connection.execute(select(CONVERSATIONS.c.title).order_by("title"))
        return [row.title for row in rows]


async def _add_conversation(database: Database, owner: object, title: str) -> None:
    async with database.write_connection() as connection:
        await connection.execute(
            insert(CONVERSATIONS).values(
                owner_id=owner, title=title, metadata={"padding": "p" * 200_000}
            )
        )


def _integrity(path: Path) -> str:
    with closing(sqlite3.connect(path)) as connection:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])


async def test_a_write_on_a_full_disk_fails_clearly_loses_nothing_and_recovers(
    database_on_small_disk: Database, small_disk: Path
) -> None:
    database = database_on_small_disk
    async with database.write_connection() as connection:
        owner = await connection.scalar(
            insert(User.__table__).values(name="disk-full").returning(User.__table__.c.id)
        )
    await _add_conversation(database, owner, "before")
    filler = fill_disk(small_disk)

    for _ in range(2):  # the same answer each time: the connection is not left broken
        with pytest.raises(DatabaseUnavailableError, match="disk is full") as raised:
            await _add_conversation(database, owner, "too big")
        assert not raised.value.retryable  # retrying at once cannot help: space must be freed
    assert await _titles(database) == ["before"]  # no partial row, the earlier one intact

    filler.unlink()
    await _add_conversation(database, owner, "after")
    assert await _titles(database) == ["after", "before"]
    async with database.read_connection() as connection:
        assert (await connection.execute(text("PRAGMA integrity_check"))).scalar() == "ok"


async def test_the_api_answers_503_saying_so_and_counts_stay_true(
    database_on_small_disk: Database, small_disk: Path
) -> None:
    key = {"Authorization": f"Bearer {await create_user(database_on_small_disk, 'full')}"}
    app = create_app(database_on_small_disk.settings)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://test"
        ) as client,
    ):
        created = await client.post("/v1/conversations", json={"title": "t"}, headers=key)
        cid = created.json()["id"]
        message = {"role": "user", "content": "x" * 90_000}
        assert (
            await client.post(f"/v1/conversations/{cid}/messages", json=message, headers=key)
        ).status_code == 201
        filler = fill_disk(small_disk)

        refused = await client.post(f"/v1/conversations/{cid}/messages", json=message, headers=key)
        assert refused.status_code == 503
        assert refused.json()["code"] == "database_unavailable"
        assert "disk is full" in refused.json()["detail"]
        # Reads go on, and the count says what is stored: the refused message is not.
        page = await client.get(f"/v1/conversations/{cid}/messages", headers=key)
        assert page.status_code == 200
        assert page.json()["total"] == len(page.json()["items"]) == 1

        filler.unlink()
        again = await client.post(f"/v1/conversations/{cid}/messages", json=message, headers=key)
        assert again.status_code == 201
        assert (await client.get(f"/v1/conversations/{cid}/messages", headers=key)).json()[
            "total"
        ] == 2


async def test_s21_a_restore_onto_a_disk_that_fills_leaves_the_old_database(
    database_on_small_disk: Database, small_disk: Path, tmp_path: Path
) -> None:
    database = database_on_small_disk
    # Backups on another disk, as they should be: only the live database's disk fills.
    settings = make_backup_settings(
        tmp_path / "backups",
        BACKUP_ENCRYPTION_KEY=str(pyrage.x25519.Identity.generate()),
        BACKUP_ENCRYPT=True,
    )
    service = BackupService(database, settings)
    await fill(database, tag="old", conversations=2, messages=2)
    old_backup = await service.create()
    old = await digests(database)
    await fill(database, tag="new", conversations=60, messages=40)
    new_backup = await service.create()
    new = await digests(database)
    await service.restore(old_backup.id, confirm=old_backup.id)
    assert await digests(database) == old
    for engine in database.engines:  # shrink the file back to the old data's size
        await engine.dispose()
    live = small_disk / "live.db"
    with closing(sqlite3.connect(live)) as connection:
        connection.execute("VACUUM")
    filler = fill_disk(small_disk)

    with pytest.raises(DatabaseUnavailableError, match="disk is full"):
        await service.restore(new_backup.id, confirm=new_backup.id)
    assert await digests(database) == old
    for engine in database.engines:
        await engine.dispose()
    assert _integrity(live) == "ok"

    filler.unlink()  # and with room, the same restore goes through
    await service.restore(new_backup.id, confirm=new_backup.id)
    assert await digests(database) == new


@pytest.fixture
async def postgres_on_small_disk() -> AsyncIterator[tuple[Database, Path]]:
    """A migrated database on a throwaway server of its own, whose ``conversations`` table
    (and its TOAST table) lives in a tablespace on an 8 MiB tmpfs.

    Its own server, not the session's, and destroyed after: a tablespace left behind by a
    cleanup that failed midway would stop that server from starting again after a crash
    test's kill. The server is stopped before the disk is unmounted.
    """
    require_throwaway_server()
    server = PostgresServer()
    try:
        # Under the server's own directory: the postgres user must reach the tablespace.
        with mounted_tmpfs(server.root / "small_disk", owner=server_user()) as mount:
            try:
                server.init()
                server.start()
                url = await migrated_database(server, "disk_full")
                admin = await asyncpg.connect(url)
                try:
                    await admin.execute(f"CREATE TABLESPACE small_disk LOCATION '{mount}'")
                    await admin.execute("ALTER TABLE conversations SET TABLESPACE small_disk")
                finally:
                    await admin.close()
                async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
                    yield database, mount
            finally:
                server.halt()
    finally:
        server.destroy()


def server_user() -> str | None:
    """Who PostgreSQL runs as (``postgres`` under root; else this user, who owns the mount)."""
    return "postgres" if os.geteuid() == 0 else None


def _incompressible(size: int) -> str:
    # PostgreSQL compresses large values before storing them (TOAST): random text it cannot.
    return base64.b64encode(os.urandom(size)).decode()


async def test_postgres_a_write_on_a_full_disk_fails_clearly_loses_nothing_and_recovers(
    postgres_on_small_disk: tuple[Database, Path],
) -> None:
    database, disk = postgres_on_small_disk
    async with database.write_connection() as connection:
        owner = await connection.scalar(
            insert(User.__table__).values(name="disk-full").returning(User.__table__.c.id)
        )

    async def add(title: str) -> None:
        async with database.write_connection() as connection:
            await connection.execute(
                insert(CONVERSATIONS).values(
                    owner_id=owner, title=title, metadata={"padding": _incompressible(150_000)}
                )
            )

    await add("before")
    filler = fill_disk(disk)

    for _ in range(2):  # the same answer each time: the pool is not left broken
        with pytest.raises(DatabaseUnavailableError, match="disk is full") as raised:
            await add("too big")
        assert raised.value.sqlstate == "53100"
        # Retryable, as all of class 53: PostgreSQL itself may free room (a VACUUM, WAL
        # recycled), unlike SQLite's full disk.
        assert raised.value.retryable
    assert await _titles(database) == ["before"]  # no partial row, the earlier one intact

    filler.unlink()
    await add("after")
    assert await _titles(database) == ["after", "before"]
