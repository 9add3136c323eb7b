"""S20: a flipped byte, a truncated archive, an edited manifest, a wrong key, altered
contents: verify fails with the specific reason, restore refuses, and nothing changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyrage
import pytest

from bastion import Database
from bastion.backup import BackupIntegrityError, BackupManifest, BackupService, BackupSettings
from bastion.backup.manifest import manifest_name, sign
from tests.backup.conftest import SIGNING_KEY, digests, fill, make_backup_settings

# The checks before the scratch restore do not depend on the backend: SQLite only for those;
# a damaged archive and altered contents on both.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


def _archive(settings: BackupSettings, manifest: BackupManifest) -> Path:
    return settings.backup_dir / manifest.archive_name


def _manifest_file(settings: BackupSettings, manifest: BackupManifest) -> Path:
    return settings.backup_dir / manifest_name(manifest.id)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


async def _assert_refused(
    service: BackupService, database: Database, backup_id: str, reason: str
) -> None:
    before = await digests(database)
    with pytest.raises(BackupIntegrityError) as verified:
        await service.verify(backup_id)
    assert verified.value.reason == reason
    with pytest.raises(BackupIntegrityError) as restored:
        await service.restore(backup_id, confirm=backup_id)
    assert restored.value.reason == reason
    assert await digests(database) == before
    # Refused before the safety backup: no new backup appeared.
    assert [manifest.label for manifest in await service.list()].count("pre-restore") == 0


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
async def test_s20_a_damaged_archive_fails_its_checksum(
    database: Database,
    service: BackupService,
    backup_settings: BackupSettings,
    damage: Callable[[Path], None],
) -> None:
    await fill(database)
    manifest = await service.create()
    await fill(database, tag="after")
    damage(_archive(backup_settings, manifest))
    await _assert_refused(service, database, manifest.id, "checksum")


@sqlite_only
async def test_s20_an_edited_manifest_fails_its_signature_and_is_not_listed(
    database: Database, service: BackupService, backup_settings: BackupSettings
) -> None:
    await fill(database)
    manifest = await service.create()
    path = _manifest_file(backup_settings, manifest)
    path.write_bytes(path.read_bytes().replace(b'"rows": 400', b'"rows": 401'))
    assert await service.list() == []
    await _assert_refused(service, database, manifest.id, "signature")


@sqlite_only
async def test_s20_a_manifest_signed_with_another_key_is_refused(
    database: Database, service: BackupService, backup_settings: BackupSettings
) -> None:
    manifest = await service.create()
    forged = sign(manifest, b"another-key-of-an-attacker-0123456789")
    _manifest_file(backup_settings, manifest).write_bytes(forged.to_json())
    await _assert_refused(service, database, manifest.id, "signature")


@sqlite_only
async def test_s20_the_wrong_encryption_key_is_refused(
    database: Database, service: BackupService, tmp_path: Path
) -> None:
    await fill(database)
    manifest = await service.create()
    other = make_backup_settings(
        service.settings.backup_dir,
        BACKUP_ENCRYPTION_KEY=str(pyrage.x25519.Identity.generate()),
    )
    await _assert_refused(BackupService(database, other), database, manifest.id, "decrypt")


async def test_s20_contents_that_differ_from_the_manifest_are_refused(
    database: Database, service: BackupService, backup_settings: BackupSettings
) -> None:
    # Whoever holds the signing key could still not smuggle in other rows: the scratch
    # restore's digests are compared with the manifest's.
    await fill(database)
    manifest = await service.create()
    tables = dict(manifest.tables)
    tables["messages"] = tables["messages"].model_copy(update={"rows": 399})
    edited = sign(manifest.model_copy(update={"tables": tables}), SIGNING_KEY.encode())
    _manifest_file(backup_settings, manifest).write_bytes(edited.to_json())
    await _assert_refused(service, database, manifest.id, "contents")


@sqlite_only
async def test_s20_an_archive_larger_than_its_manifest_says_stops_at_the_bound(
    database: Database, service: BackupService, backup_settings: BackupSettings
) -> None:
    await fill(database)
    manifest = await service.create()
    edited = sign(manifest.model_copy(update={"dump_bytes": 4096}), SIGNING_KEY.encode())
    _manifest_file(backup_settings, manifest).write_bytes(edited.to_json())
    await _assert_refused(service, database, manifest.id, "decompress")


@sqlite_only
async def test_s20_ids_that_are_not_backup_ids_are_not_found(service: BackupService) -> None:
    from bastion.backup import BackupNotFoundError

    for bad in ("../../etc/passwd", "20261123T031500Z-1a2b3c4d/../x", "", "x" * 5000):
        with pytest.raises(BackupNotFoundError):
            await service.verify(bad)
    with pytest.raises(BackupNotFoundError):
        await service.get("20261123T031500Z-1a2b3c4d")
