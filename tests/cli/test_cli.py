"""The ``bastion`` and ``conversations`` commands, run as a user runs them."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.migrations import head_revisions
from tests.conftest import environment_without_database

BIN = Path(sys.executable).parent


def run(
    command: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = environment_without_database()
    full_env.update(env or {})
    # The timeout doubles as the check that the process exits (aiosqlite's exit hang).
    return subprocess.run(
        [str(BIN / command), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}


def test_db_upgrade_current_downgrade_round_trip(sqlite_env: dict[str, str]) -> None:
    migrations = ("--migrations", "conversations:migrations")
    (head,) = head_revisions("conversations:migrations")

    before = run("bastion", "db", "current", *migrations, env=sqlite_env)
    upgraded = run("bastion", "db", "upgrade", *migrations, env=sqlite_env)
    at_head = run("bastion", "db", "current", *migrations, env=sqlite_env)
    downgraded = run("bastion", "db", "downgrade", *migrations, "base", env=sqlite_env)

    assert (before.returncode, before.stdout) == (
        0,
        f"(none: no migration applied) [behind head {head}]\n",
    )
    assert (upgraded.returncode, upgraded.stdout) == (0, "upgraded to head\n")
    assert (at_head.returncode, at_head.stdout) == (0, f"{head} [head]\n")
    assert (downgraded.returncode, downgraded.stdout) == (0, "downgraded to base\n")


def test_migrations_location_comes_from_the_environment_too(sqlite_env: dict[str, str]) -> None:
    env = {**sqlite_env, "BASTION_MIGRATIONS": "conversations:migrations"}
    assert run("bastion", "db", "upgrade", env=env).returncode == 0


def test_a_wrong_migrations_location_is_a_configuration_error(
    sqlite_env: dict[str, str],
) -> None:
    result = run("bastion", "db", "upgrade", "-m", "nowhere:migrations", env=sqlite_env)
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: no Alembic migrations at")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DB_POOL_SIZE": "lots"}, "configuration error: DB_POOL_SIZE: "),
        ({"DATABASE_URL": "mysql://root@localhost/x"}, "configuration error: DATABASE_URL: "),
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_it(env: dict[str, str], expected: str) -> None:
    result = run("bastion", "db", "current", "-m", "conversations:migrations", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(expected)
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_exits_1_without_leaking_the_password() -> None:
    env = {"DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/app", "DB_CONNECT_TIMEOUT": "2"}
    result = run("bastion", "db", "current", "-m", "conversations:migrations", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to postgresql+asyncpg://app:***@")
    assert "hunter2" not in result.stderr + result.stdout


def test_create_user_prints_only_the_key(sqlite_env: dict[str, str]) -> None:
    assert (
        run("bastion", "db", "upgrade", "-m", "conversations:migrations", env=sqlite_env).returncode
        == 0
    )
    created = run("conversations", "create-user", "alice", env=sqlite_env)
    duplicate = run("conversations", "create-user", "alice", env=sqlite_env)
    another_key = run("conversations", "add-key", "alice", env=sqlite_env)
    nobody = run("conversations", "add-key", "nobody", env=sqlite_env)

    assert created.returncode == 0
    assert re.fullmatch(r"cv_[A-Za-z0-9_-]{43}\n", created.stdout)
    assert (duplicate.returncode, duplicate.stdout) == (1, "")
    assert "already exists" in duplicate.stderr
    assert re.fullmatch(r"cv_[A-Za-z0-9_-]{43}\n", another_key.stdout)
    assert another_key.stdout != created.stdout
    assert (nobody.returncode, nobody.stderr) == (1, "error: no user named 'nobody'\n")


def test_create_user_before_migrating_says_what_to_run(sqlite_env: dict[str, str]) -> None:
    result = run("conversations", "create-user", "alice", env=sqlite_env)
    assert result.returncode == 1
    assert "bastion db upgrade --migrations conversations:migrations" in result.stderr


def test_an_unknown_revision_is_one_line_not_a_traceback(sqlite_env: dict[str, str]) -> None:
    result = run(
        "bastion", "db", "upgrade", "-m", "conversations:migrations", "nonexistent", env=sqlite_env
    )
    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: migration 'nonexistent':")
    assert result.stderr.count("\n") == 1


def test_purge_idempotency_keys_deletes_only_old_answers(sqlite_env: dict[str, str]) -> None:
    assert (
        run("bastion", "db", "upgrade", "-m", "conversations:migrations", env=sqlite_env).returncode
        == 0
    )
    database_file = sqlite_env["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(database_file) as connection:
        connection.executemany(
            "INSERT INTO idempotency_keys VALUES ('u', ?, 'h', 201, '{}', x'7b7d', ?)",
            [("old", "2000-01-01 00:00:00.000000"), ("new", "2999-01-01 00:00:00.000000")],
        )

    purged = run(
        "conversations", "purge-idempotency-keys", "--older-than-hours", "24", env=sqlite_env
    )

    assert (purged.returncode, purged.stdout) == (0, "deleted 1 idempotency key(s)\n")
    with sqlite3.connect(database_file) as connection:
        left = [row[0] for row in connection.execute("SELECT key FROM idempotency_keys")]
    assert left == ["new"]
