"""After a restore, the service serves the restored data, not reads cached from before it:
through the admin API (the app's own cache) and through ``bastion backup restore`` (the CLI
clears the service's Redis prefix)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

from bastion import DatabaseSettings
from bastion.backup import BackupSettings
from bastion.cache import CacheSettings
from bastion.cli import main
from conversations.app import create_app
from tests.api.test_admin_operations import ADMIN_TOKEN, AUTH, SIGNING_KEY, finished
from tests.conftest import Users, make_settings, serve


async def test_a_restore_over_the_admin_api_clears_the_cache(
    database_url: str, cache_settings: CacheSettings, users: Users, tmp_path: Path
) -> None:
    backups = BackupSettings(BACKUP_DIR=tmp_path / "backups", BACKUP_SIGNING_KEY=SIGNING_KEY)
    app = create_app(
        make_settings(database_url, ADMIN_TOKEN=ADMIN_TOKEN),
        cache_settings=cache_settings,
        backup_settings=backups,
    )
    async with serve(app) as client:
        created = await client.post("/v1/conversations", json={"title": "v0"}, headers=users.alice)
        path = f"/v1/conversations/{created.json()['id']}"
        backup = await finished(
            client, (await client.post("/admin/database/backup", headers=AUTH)).json()
        )
        backup_id = backup["result"]["id"]
        await client.patch(path, json={"title": "v1"}, headers=users.alice)
        cached = (await client.get(path, headers=users.alice)).json()["title"]  # v1, now cached

        restore = await client.post(
            "/admin/database/restore", json={"backup_id": backup_id, "confirm": backup_id},
            headers=AUTH,
        )  # fmt: skip
        restored = await finished(client, restore.json())
        after = (await client.get(path, headers=users.alice)).json()["title"]
    assert cached == "v1"
    assert restored["state"] == "succeeded", restored
    assert restored["result"]["cache_cleared"] is True
    assert after == "v0"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_bastion_backup_restore_clears_the_service_cache(
    settings: DatabaseSettings,
    cache_settings: CacheSettings,
    shared_redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Synchronous: the command runs its own event loop, as it does from a shell.
    client = redis.Redis.from_url(shared_redis_url)
    key = f"{cache_settings.prefix}v:conversation:{uuid.uuid4()}"
    client.set(key, b"{}")
    env = {
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "BACKUP_DIR": str(tmp_path / "backups"),
        "BACKUP_SIGNING_KEY": SIGNING_KEY,
        "REDIS_URL": shared_redis_url,
        "CACHE_PREFIX": cache_settings.prefix,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def bastion(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["bastion", *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        code = exited.value.code
        captured = capsys.readouterr()
        return (code if isinstance(code, int) else 0), captured.out, captured.err

    assert bastion("backup", "create")[0] == 0
    listed = json.loads(bastion("backup", "list", "--json")[1])
    backup_id = (listed if isinstance(listed, list) else listed["backups"])[0]["id"]
    code, _, stderr = bastion("backup", "restore", backup_id, "--yes")
    try:
        assert code == 0, stderr
        assert f"cache cleared ({cache_settings.prefix}*)" in stderr
        assert client.exists(key) == 0
    finally:
        client.close()
