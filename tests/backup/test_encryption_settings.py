"""Encryption is never silently off, and settings never show a secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bastion import ConfigurationError, Database
from bastion.backup import BackupService, BackupSettings, load_backup_settings
from tests.backup.conftest import fill, make_backup_settings


def test_encryption_required_without_a_key_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_backup_settings(BACKUP_DIR=tmp_path, BACKUP_ENCRYPT=True)
    assert "BACKUP_ENCRYPT" in caught.value.message


def test_a_passphrase_or_garbage_key_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_backup_settings(BACKUP_DIR=tmp_path, BACKUP_ENCRYPTION_KEY="correct horse battery")
    assert "BACKUP_ENCRYPTION_KEY" in caught.value.message
    assert "horse" not in caught.value.message


def test_secrets_stay_out_of_repr_and_errors(tmp_path: Path, age_identity: str) -> None:
    settings = make_backup_settings(
        tmp_path, BACKUP_ENCRYPTION_KEY=age_identity, AWS_SECRET_ACCESS_KEY="aws-secret-value"
    )
    shown = repr(settings) + str(settings)
    assert age_identity not in shown
    assert "aws-secret-value" not in shown
    with pytest.raises(ConfigurationError) as caught:
        load_backup_settings(BACKUP_DIR=tmp_path, BACKUP_SIGNING_KEY="short-signing-key")
    assert "short-signing-key" not in caught.value.message


def test_bad_retention_and_store_urls_are_configuration_errors(tmp_path: Path) -> None:
    for variable, value in [
        ("BACKUP_RETENTION", "last=x"),
        ("BACKUP_RETENTION", "hourly=3"),
        ("BACKUP_RETENTION", "last=0"),
        ("BACKUP_STORE_URL", "file:///etc"),
        ("BACKUP_STORE_URL", "s3://"),
    ]:
        with pytest.raises(ConfigurationError) as caught:
            load_backup_settings(BACKUP_DIR=tmp_path, **{variable: value})
        assert variable in caught.value.message


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_an_encrypted_backup_holds_no_plaintext(
    database: Database, service: BackupService, backup_settings: BackupSettings
) -> None:
    await fill(database, tag="plaintext-marker")
    manifest = await service.create()
    assert manifest.encryption == "age-x25519"
    assert manifest.recipient is not None
    assert manifest.recipient.startswith("age1")
    stored = (backup_settings.backup_dir / manifest.archive_name).read_bytes()
    assert stored.startswith(b"age-encryption.org/v1")
    assert b"SQLite format 3" not in stored
    assert b"plaintext-marker" not in stored
    key = backup_settings.encryption_key
    assert key is not None
    manifest_text = (backup_settings.backup_dir / f"{manifest.id}.manifest.json").read_text()
    assert key.get_secret_value() not in manifest_text


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_an_encrypted_backup_needs_the_key_to_be_read(
    database: Database, service: BackupService
) -> None:
    manifest = await service.create()
    keyless = make_backup_settings(service.settings.backup_dir)
    with pytest.raises(ConfigurationError) as caught:
        await BackupService(database, keyless).verify(manifest.id)
    assert "BACKUP_ENCRYPTION_KEY" in caught.value.message


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_signing_key_is_generated_once_outside_the_backup_dir(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = BackupSettings(BACKUP_DIR=tmp_path / "store" / "backups")
    with caplog.at_level("WARNING", logger="bastion.backup"):
        first = BackupService(database, settings)
    manifest = await first.create()
    key_file = tmp_path / "store" / "backup-signing.key"
    assert key_file.exists()
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    assert "generated a backup signing key" in caplog.text
    assert key_file.read_text().strip() not in caplog.text
    assert not any(path.name.endswith(".key") for path in settings.backup_dir.iterdir())
    # A second service (another worker, a restart) reads the same key and trusts the backup.
    assert [item.id for item in await BackupService(database, settings).list()] == [manifest.id]


def test_an_in_memory_database_cannot_be_backed_up(tmp_path: Path) -> None:
    from tests.conftest import make_settings

    database = Database(make_settings("sqlite:///:memory:"))
    with pytest.raises(ConfigurationError) as caught:
        BackupService(database, make_backup_settings(tmp_path))
    assert "in-memory" in caught.value.message
