"""``bastion init | integrity | optimize | stats | cleanup | reset | export | import``, run as a
user runs them: exact exit codes, JSON that parses, help that reads."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from bastion import Database, DatabaseSettings
from bastion.cli import app
from bastion.maintenance import TableDigest, table_digests
from tests.maintenance.data import corrupt_copy, empty_postgres, seed

BIN = Path(sys.executable).parent
COMMANDS = ("init", "integrity", "optimize", "stats", "cleanup", "reset", "export", "import")


def bastion(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}
    clean["COLUMNS"] = "200"  # Rich wraps at the terminal width; keep lines whole
    return subprocess.run(
        [str(BIN / "bastion"), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=cwd,
        input=stdin,
        timeout=60,
        check=False,
    )


def invoke(*args: str, env: dict[str, str]) -> Result:
    """Run a command in this process: for outcomes that need no real process (exit via
    typer), at a fraction of a process's start-up cost."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **env})


def digests(url: str) -> dict[str, TableDigest]:
    async def read() -> dict[str, TableDigest]:
        async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
            return await table_digests(database)

    return asyncio.run(read())


def seeded(url: str) -> str:
    async def write() -> None:
        async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
            await seed(database)

    asyncio.run(write())
    return url


@pytest.fixture
def db_file(sqlite_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "cli.db"
    shutil.copyfile(sqlite_template, path)
    return path


@pytest.fixture
def env(db_file: Path) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite:///{seeded(f'sqlite:///{db_file}').split('///')[1]}"}


@pytest.fixture
def postgres(postgres_test_url: str) -> Iterator[str]:
    asyncio.run(empty_postgres(postgres_test_url))  # the import needs an empty target
    yield postgres_test_url
    asyncio.run(empty_postgres(postgres_test_url))


def test_help_lists_every_command_and_each_help_reads() -> None:
    # In-process: help needs no database, and a process per command costs seconds here.
    runner = CliRunner()
    root = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    helps = {
        command: runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        for command in COMMANDS
    }

    assert root.exit_code == 0
    for command in COMMANDS:
        assert f" {command} " in root.output
    for command, result in helps.items():
        assert result.exit_code == 0, command
        assert f"Usage: bastion {command}" in result.output
    assert "--days-old" in helps["cleanup"].output
    assert "--replace" in helps["import"].output
    assert "--yes" in helps["reset"].output


def test_init_writes_a_private_env_once_that_the_commands_accept(tmp_path: Path) -> None:
    first = bastion("init", cwd=tmp_path)
    env_file = tmp_path / ".env"
    written = env_file.read_text()
    env_file.write_text(written + "# mine\n")
    second = bastion("init", cwd=tmp_path)
    upgraded = bastion("db", "upgrade", "-m", "conversations:migrations", cwd=tmp_path)
    checked = bastion("integrity", "--json", cwd=tmp_path)

    assert first.returncode == 0
    assert "wrote .env" in first.stdout
    assert "Next steps" in first.stdout
    assert "DATABASE_URL=sqlite:///./data/app.db" in written
    token = next(line for line in written.splitlines() if line.startswith("ADMIN_TOKEN="))
    assert len(token) > len("ADMIN_TOKEN=") + 32
    assert token.split("=", 1)[1] not in first.stdout
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert second.returncode == 0
    assert ".env exists: left as it is" in second.stdout
    assert env_file.read_text() == written + "# mine\n"
    assert upgraded.returncode == 0, upgraded.stderr
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["ok"] is True
    assert (tmp_path / "data" / "app.db").exists()


def test_integrity_exits_0_when_sound_and_1_on_a_damaged_file(
    env: dict[str, str], db_file: Path, tmp_path: Path
) -> None:
    damaged = tmp_path / "damaged.db"
    corrupt_copy(db_file, damaged, "messages")

    sound = bastion("integrity", "--json", env=env)
    broken = bastion("integrity", "--json", env={"DATABASE_URL": f"sqlite:///{damaged}"})

    assert sound.returncode == 0
    assert json.loads(sound.stdout)["ok"] is True
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert report["ok"] is False
    assert report["problems"][0]["check"] == "integrity_check"


def test_stats_optimize_and_cleanup_print_json(env: dict[str, str]) -> None:
    stats = invoke("stats", "--json", env=env)
    optimized = invoke("optimize", "--json", env=env)
    dry_run = invoke("cleanup", "--days-old", "30", "--dry-run", "--json", env=env)

    assert stats.exit_code == 0
    rows = {table["name"]: table["rows"] for table in json.loads(stats.stdout)["tables"]}
    assert rows["messages"] == 4
    assert optimized.exit_code == 0
    assert json.loads(optimized.stdout)["statements"] == ["PRAGMA optimize", "ANALYZE"]
    assert dry_run.exit_code == 0
    # The seed's conversations were deleted 1 and 90 days before 2026-11-01: only one is old.
    assert json.loads(dry_run.stdout) == {
        "days_old": 30,
        "dry_run": True,
        "rows": {"conversations": 1},
    }


def test_bad_usage_exits_2(env: dict[str, str]) -> None:
    no_days = invoke("cleanup", env=env)
    unknown_table = invoke("optimize", "--table", "nope", env=env)

    assert no_days.exit_code == 2
    assert "--days-old" in no_days.stderr
    assert unknown_table.exit_code == 2
    assert unknown_table.stderr.startswith(
        "usage error: no such table: nope (tables: api_keys, conversations, "
    )


def test_reset_needs_yes_and_the_database_name(env: dict[str, str]) -> None:
    before = digests(env["DATABASE_URL"])

    without_yes = invoke("reset", env=env)
    wrong_name = invoke("reset", "--yes", "--confirm", "other.db", env=env)
    unchanged = digests(env["DATABASE_URL"])
    typed = bastion("reset", "--yes", "--json", env=env, stdin="cli.db\n")

    assert without_yes.exit_code == 2
    assert without_yes.stderr == "usage error: reset deletes every row of every table; pass --yes\n"
    assert wrong_name.exit_code == 2
    assert "confirm with the database name 'cli.db'" in wrong_name.stderr
    assert unchanged == before
    assert typed.returncode == 0, typed.stderr
    assert json.loads(typed.stdout)["rows"]["messages"] == 4
    assert {digest.rows for digest in digests(env["DATABASE_URL"]).values()} == {0}


@pytest.mark.postgres
def test_export_from_sqlite_and_import_into_postgresql_gives_identical_content(
    env: dict[str, str], postgres: str, tmp_path: Path
) -> None:
    export_dir = tmp_path / "export"

    exported = bastion("export", str(export_dir), "--json", env=env)
    imported = bastion("import", str(export_dir), "--database-url", postgres, "--json")
    again = bastion("import", str(export_dir), "--database-url", postgres)

    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    assert manifest["source_backend"] == "sqlite"
    assert "exporting messages" in exported.stderr  # the progress bars, on stderr
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["tables"]["messages"] == 4
    assert digests(postgres) == digests(env["DATABASE_URL"])
    assert again.returncode == 1
    assert "the target is not empty" in again.stderr


def test_an_import_of_a_damaged_export_exits_1_and_writes_nothing(
    env: dict[str, str], sqlite_template: Path, tmp_path: Path
) -> None:
    export_dir = tmp_path / "export"
    assert invoke("export", str(export_dir), env=env).exit_code == 0
    (export_dir / "users.jsonl").write_text('{"id": "not json\n')
    target = tmp_path / "target.db"
    shutil.copyfile(sqlite_template, target)

    result = bastion("import", str(export_dir), "--database-url", f"sqlite:///{target}")

    assert result.returncode == 1
    assert "error: users.jsonl line 1: not valid JSON" in result.stderr
    assert {digest.rows for digest in digests(f"sqlite:///{target}").values()} == {0}
