"""S23: backups in S3-compatible storage (moto's server on loopback), and an upload cut off by
connection resets never appears as a valid backup."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion import Database
from bastion.backup import BackupService, BackupSettings, BackupStoreError, S3Store
from tests.backup.conftest import SIGNING_KEY, digests, fill
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.parametrize("backend", ["sqlite"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the whole session."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("moto's S3 server did not start")
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def _s3_settings(
    directory: Path, moto: str, identity: str, *, endpoint: str | None = None
) -> BackupSettings:
    """Settings for a new bucket on ``moto``, reached through ``endpoint`` (default: direct)."""
    bucket = f"backups-{uuid.uuid4().hex[:10]}"
    httpx.put(f"{moto}/{bucket}", timeout=5).raise_for_status()
    return BackupSettings(
        BACKUP_DIR=directory,
        BACKUP_STORE_URL=f"s3://{bucket}/nightly/app",
        BACKUP_S3_ENDPOINT=endpoint or moto,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        BACKUP_SIGNING_KEY=SIGNING_KEY,
        BACKUP_ENCRYPTION_KEY=identity,
    )


async def test_s23_backup_verify_restore_through_s3(
    database: Database, tmp_path: Path, moto_endpoint: str, age_identity: str
) -> None:
    settings = _s3_settings(tmp_path / "scratch", moto_endpoint, age_identity)
    service = BackupService(database, settings)
    assert isinstance(service.store, S3Store)
    await fill(database)
    before = await digests(database)
    manifest = await service.create()
    assert [item.id for item in await service.list()] == [manifest.id]
    assert sorted(await service.store.list_names()) == [
        f"{manifest.id}.archive",
        f"{manifest.id}.manifest.json",
    ]
    # Nothing is kept locally but the scratch space, which is emptied.
    assert not any(path.name.endswith(".archive") for path in settings.backup_dir.rglob("*"))
    await service.verify(manifest.id)
    await fill(database, tag="after")
    await service.restore(manifest.id, confirm=manifest.id)
    assert await digests(database) == before
    assert len(await service.list()) == 2  # and the safety backup


async def test_s23_an_upload_cut_off_by_resets_is_never_listed_as_valid(
    database: Database, tmp_path: Path, moto_endpoint: str, age_identity: str
) -> None:
    await fill(database, conversations=20)
    host, port = moto_endpoint.removeprefix("http://").split(":")
    async with FaultProxy(host, int(port)) as proxy:
        settings = _s3_settings(
            tmp_path / "scratch",
            moto_endpoint,
            age_identity,
            endpoint=f"http://{proxy.host}:{proxy.port}",
        )
        service = BackupService(database, settings)
        # Every connection is reset after 4 KiB towards S3: retries of the parts fail too.
        proxy.reset_peer(after_bytes=4096, direction="upstream")
        with pytest.raises(BackupStoreError):
            await service.create()
        proxy.clear()
        assert await service.list() == []
        assert await service.list_incomplete() == []
        # The store works again: the next backup is complete and valid.
        manifest = await service.create()
        assert manifest.archive_bytes > 4096  # so the resets did cut the archive's upload
        assert [item.id for item in await service.list()] == [manifest.id]
        await service.verify(manifest.id)
