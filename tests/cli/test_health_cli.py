"""``bastion health``: the report on stdout, and an exit code a script can act on.

0 healthy, 1 degraded, 2 unhealthy — an unreachable database included — and 2 with one line
for a configuration error, as every ``bastion`` command.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.cli.test_cli import run
from tests.faults.test_sqlite_faults import assert_exited_cleanly, child_env, run_and_time

MIGRATIONS = ("-m", "conversations:migrations")
TITLE = re.compile(r"^(\w+): (healthy|degraded|unhealthy)\b")
UNREACHABLE = {"DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/x", "DB_CONNECT_TIMEOUT": "2"}


@pytest.fixture
def sqlite_env(tmp_path: Path) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}


@pytest.fixture
def migrated_env(sqlite_env: dict[str, str]) -> dict[str, str]:
    upgraded = run("bastion", "db", "upgrade", *MIGRATIONS, env=sqlite_env)
    assert upgraded.returncode == 0, upgraded.stderr
    return sqlite_env


@pytest.fixture
def behind_env(sqlite_env: dict[str, str]) -> dict[str, str]:
    upgraded = run("bastion", "db", "upgrade", *MIGRATIONS, "0001", env=sqlite_env)
    assert upgraded.returncode == 0, upgraded.stderr
    return sqlite_env


def test_a_healthy_migrated_database_exits_0_with_a_table_per_component(
    migrated_env: dict[str, str],
) -> None:
    result = run("bastion", "health", *MIGRATIONS, env=migrated_env)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("healthy (score 1.00), checked ")
    titles = [m.groups() for m in map(TITLE.match, lines) if m is not None]
    assert titles == [
        ("database", "healthy"),
        ("pool", "healthy"),
        ("breaker", "healthy"),
        ("migrations", "healthy"),
    ]
    assert result.stderr == ""


def test_json_output_parses_and_names_every_component(migrated_env: dict[str, str]) -> None:
    result = run("bastion", "health", *MIGRATIONS, "--json", env=migrated_env)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["status"], report["score"]) == ("healthy", 1.0)
    assert list(report["components"]) == ["database", "pool", "breaker", "migrations"]
    assert report["components"]["database"]["details"]["backend"] == "sqlite"


def test_a_slow_database_is_degraded_and_exits_1(migrated_env: dict[str, str]) -> None:
    env = {**migrated_env, "HEALTH_LATENCY_DEGRADED": "0.000001"}  # any SELECT 1 is slow
    result = run("bastion", "health", "--json", env=env)

    assert result.returncode == 1, result.stderr
    database = json.loads(result.stdout)["components"]["database"]
    assert (database["status"], database["error"]) == ("degraded", "slow")


def test_a_schema_behind_the_code_exits_2(behind_env: dict[str, str]) -> None:
    result = run("bastion", "health", *MIGRATIONS, "--json", env=behind_env)

    assert result.returncode == 2, result.stderr
    migrations = json.loads(result.stdout)["components"]["migrations"]
    assert (migrations["status"], migrations["error"]) == ("unhealthy", "migrations_behind")
    assert migrations["details"]["current"] == ["0001"]


def test_the_migrations_location_comes_from_the_environment_too(
    behind_env: dict[str, str],
) -> None:
    without = run("bastion", "health", env=behind_env)
    with_env = run(
        "bastion", "health", env={**behind_env, "BASTION_MIGRATIONS": "conversations:migrations"}
    )

    assert (without.returncode, with_env.returncode) == (0, 2)


def test_an_unreachable_database_is_unhealthy_exits_2_and_keeps_the_password() -> None:
    table = run("bastion", "health", env=UNREACHABLE)
    as_json = run("bastion", "health", "--json", env=UNREACHABLE)

    assert (table.returncode, as_json.returncode) == (2, 2)
    assert table.stderr.startswith("error: cannot connect to postgresql+asyncpg://app:***@")
    assert table.stderr.count("\n") == 1
    database = json.loads(as_json.stdout)["components"]["database"]
    assert (database["status"], database["error"]) == ("unhealthy", "database_unavailable")
    for output in (table.stdout, table.stderr, as_json.stdout, as_json.stderr):
        assert "hunter2" not in output


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {"DB_POOL_SIZE": "lots"}, "configuration error: DB_POOL_SIZE: "),
        (("-m", "nowhere:migrations"), {}, "configuration error: no Alembic migrations at"),
    ],
    ids=["bad-setting", "bad-migrations-location"],
)
def test_a_configuration_error_exits_2_with_one_line(
    sqlite_env: dict[str, str], args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    result = run("bastion", "health", *args, env={**sqlite_env, **env})

    assert result.returncode == 2
    assert result.stderr.startswith(expected)
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_the_command_exits_promptly(migrated_env: dict[str, str], tmp_path: Path) -> None:
    """S18 for this command: no exit hang after the report (aiosqlite's thread, the pool)."""
    bastion = str(Path(sys.executable).parent / "bastion")
    result = run_and_time([bastion, "health", *MIGRATIONS], child_env(**migrated_env), tmp_path)

    assert_exited_cleanly(result, "bastion health")  # < 1 s after the output
    assert result.stdout.startswith("healthy")
