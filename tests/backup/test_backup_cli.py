"""``bastion backup …`` run as an operator (or cron) runs it: output, JSON, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.cli import main
from tests.backup.conftest import SIGNING_KEY

BIN = Path(sys.executable).parent


def bastion(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_", "BACKUP_"))
    }
    return subprocess.run(
        [str(BIN / "bastion"), *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
        check=False,
    )


class InProcess:
    """``bastion`` run in this process through its real entry point (``main``): the same
    parsing, output and exit-code mapping as the console script, without a process start."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        self._monkeypatch = monkeypatch
        self._capsys = capsys

    def __call__(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        for name in list(os.environ):
            if name.startswith(("DATABASE_URL", "DB_", "BACKUP_")):
                self._monkeypatch.delenv(name)
        for name, value in env.items():
            self._monkeypatch.setenv(name, value)
        self._monkeypatch.setattr(sys, "argv", ["bastion", *args])
        self._capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        captured = self._capsys.readouterr()
        code = exited.value.code
        return subprocess.CompletedProcess(
            args, code if isinstance(code, int) else 0, captured.out, captured.err
        )


@pytest.fixture
def bastion_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> InProcess:
    return InProcess(monkeypatch, capsys)


@pytest.fixture
def cli_env(tmp_path: Path, sqlite_template: Path, age_identity: str) -> dict[str, str]:
    shutil.copyfile(sqlite_template, tmp_path / "app.db")
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/app.db",
        "BACKUP_DIR": str(tmp_path / "backups"),
        "BACKUP_SIGNING_KEY": SIGNING_KEY,
        "BACKUP_ENCRYPTION_KEY": age_identity,
    }


def test_help_lists_every_command_and_their_options(bastion_main: InProcess) -> None:
    top = bastion_main("backup", "--help", env={})
    assert top.returncode == 0
    for command in ("create", "list", "verify", "restore", "prune"):
        assert command in top.stdout
    restore = bastion("backup", "restore", "--help", env={})
    assert restore.returncode == 0
    for option in ("--yes", "--confirm", "--dry-run", "--json", "--database-url"):
        assert option in restore.stdout


def test_create_list_verify_restore_prune_damage_with_json_and_exit_codes(
    cli_env: dict[str, str], bastion_main: InProcess
) -> None:
    bastion = bastion_main
    created = bastion("backup", "create", "--json", env=cli_env)
    assert created.returncode == 0, created.stderr
    manifest = json.loads(created.stdout)
    backup_id = manifest["id"]
    assert manifest["encryption"] == "age-x25519"
    assert cli_env["BACKUP_ENCRYPTION_KEY"] not in created.stdout + created.stderr

    listed = bastion("backup", "list", "--json", env=cli_env)
    assert listed.returncode == 0
    assert [item["id"] for item in json.loads(listed.stdout)["backups"]] == [backup_id]
    table = bastion("backup", "list", env=cli_env)
    assert backup_id in table.stdout

    verified = bastion("backup", "verify", backup_id, "--json", env=cli_env)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True

    unconfirmed = bastion("backup", "restore", backup_id, env=cli_env)
    assert unconfirmed.returncode == 2
    assert "--yes" in unconfirmed.stderr
    dry = bastion("backup", "restore", backup_id, "--dry-run", "--json", env=cli_env)
    assert dry.returncode == 0
    assert json.loads(dry.stdout)["dry_run"] is True

    restored = bastion("backup", "restore", backup_id, "--yes", env=cli_env)
    assert restored.returncode == 0, restored.stderr
    assert f"restored {backup_id}" in restored.stdout
    assert "restore: " in restored.stderr  # plain progress lines when not on a terminal

    pruned = bastion("backup", "prune", "--dry-run", "--json", env=cli_env)
    assert pruned.returncode == 0
    assert json.loads(pruned.stdout)["deleted"] == []

    # A damaged archive: verify and restore fail with exit code 1 and say why.
    archive = Path(cli_env["BACKUP_DIR"]) / f"{backup_id}.archive"
    archive.write_bytes(archive.read_bytes()[:-10])
    damaged = bastion("backup", "verify", backup_id, "--json", env=cli_env)
    assert damaged.returncode == 1
    assert json.loads(damaged.stdout)["reason"] == "checksum"
    refused = bastion("backup", "restore", backup_id, "--yes", env=cli_env)
    assert refused.returncode == 1
    assert "checksum" in refused.stderr


def test_encryption_required_without_a_key_exits_2_before_any_work(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "BACKUP_ENCRYPT": "true"}
    del env["BACKUP_ENCRYPTION_KEY"]
    result = bastion("backup", "create", env=env)
    assert result.returncode == 2
    assert "BACKUP_ENCRYPT" in result.stderr
    assert SIGNING_KEY not in result.stderr
    assert not Path(cli_env["BACKUP_DIR"]).exists()
