"""pg_dump / pg_restore at the process edge: an old client tool is refused up front, and a
failing one reports its exit code and stderr without the password."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bastion import Database
from bastion.backup import BackupService, BackupSettings, BackupToolError
from bastion.backup.postgres_engine import tool_major_version
from tests.backup.conftest import make_backup_settings
from tests.conftest import make_settings

postgres_only = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)]
)


def _fake_tool(directory: Path, name: str, script: str) -> None:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_tool_versions_are_read_from_their_banner() -> None:
    assert tool_major_version("pg_dump (PostgreSQL) 15.14 (Debian 15.14-1.pgdg120+1)") == 15
    assert tool_major_version("pg_dump (PostgreSQL) 9.6.24") == 9
    assert tool_major_version("something else") is None


@postgres_only
async def test_a_client_older_than_the_server_is_refused(
    database: Database, backup_settings: BackupSettings, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "old-bin"
    _fake_tool(bin_dir, "pg_dump", 'echo "pg_dump (PostgreSQL) 9.6.24"\n')
    settings = make_backup_settings(backup_settings.backup_dir, BACKUP_PG_BIN_DIR=bin_dir)
    with pytest.raises(BackupToolError) as caught:
        await BackupService(database, settings).create()
    assert "pg_dump is version 9" in caught.value.message
    assert "install pg_dump" in caught.value.message
    assert not any(settings.backup_dir.glob("*.manifest.json"))


@postgres_only
async def test_a_failing_tool_reports_its_exit_code_and_never_the_password(
    database_url: str, backup_settings: BackupSettings, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bad-bin"
    # Prints its version like a real pg_dump, then fails, echoing what it was given.
    _fake_tool(
        bin_dir,
        "pg_dump",
        'if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) 99.0"; exit 0; fi\n'
        'echo "pg_dump: error: connection failed for password $PGPASSWORD" >&2\n'
        "exit 7\n",
    )
    settings = make_backup_settings(backup_settings.backup_dir, BACKUP_PG_BIN_DIR=bin_dir)
    secret = "s3cret-pa55word"
    url = make_url(database_url).set(password=secret).render_as_string(hide_password=False)
    # Trust authentication ignores the password, so the Database still connects.
    async with Database(make_settings(url)) as database:
        with pytest.raises(BackupToolError) as caught:
            await BackupService(database, settings).create()
    assert caught.value.exit_code == 7
    assert "connection failed for password ***" in caught.value.stderr_excerpt
    assert secret not in caught.value.message
    assert secret not in caught.value.stderr_excerpt
