"""The archive pipeline alone: age's STREAM catches what a checksum would, chunk by chunk."""

from __future__ import annotations

import os
from pathlib import Path

import pyrage
import pytest

from bastion.backup import BackupIntegrityError
from bastion.backup.keys import Encryption
from bastion.backup.pipeline import seal, unseal

CHUNK = 64 * 1024 + 16  # one age STREAM chunk of ciphertext


@pytest.fixture
def encryption() -> Encryption:
    identity = pyrage.x25519.Identity.generate()
    return Encryption(identity=identity, recipient=identity.to_public())


@pytest.fixture
def sealed(tmp_path: Path, encryption: Encryption) -> tuple[Path, int]:
    source = tmp_path / "dump"
    # Incompressible, so the ciphertext spans several 64 KiB chunks.
    source.write_bytes(os.urandom(300_000))
    archive = tmp_path / "archive"
    seal(source, archive, encryption=encryption, level=3)
    return archive, source.stat().st_size


def _header_end(data: bytes) -> int:
    # The age header ends with "---" and a MAC line; then a 16-byte nonce; then the chunks.
    return data.index(b"\n", data.index(b"\n---")) + 1 + 16


def test_round_trip_and_the_archive_is_not_plaintext(
    tmp_path: Path, encryption: Encryption
) -> None:
    source = tmp_path / "dump"
    plaintext = b"SQLite format 3\x00" + b"secret conversation content " * 5000
    source.write_bytes(plaintext)
    seal(source, tmp_path / "archive", encryption=encryption, level=3)
    stored = (tmp_path / "archive").read_bytes()
    assert stored.startswith(b"age-encryption.org/v1")
    assert b"SQLite format 3" not in stored
    assert b"secret conversation" not in stored
    unseal(
        tmp_path / "archive", tmp_path / "out", encryption=encryption, expected_bytes=len(plaintext)
    )
    assert (tmp_path / "out").read_bytes() == plaintext


def test_a_truncated_ciphertext_fails_decryption(
    tmp_path: Path, sealed: tuple[Path, int], encryption: Encryption
) -> None:
    archive, size = sealed
    data = archive.read_bytes()
    body = _header_end(data)
    # Drop the last chunk exactly: every remaining chunk authenticates, but none is marked last.
    archive.write_bytes(data[: body + 4 * CHUNK])
    with pytest.raises(BackupIntegrityError) as caught:
        unseal(archive, tmp_path / "out", encryption=encryption, expected_bytes=size)
    assert caught.value.reason == "decrypt"


def test_reordered_chunks_fail_decryption(
    tmp_path: Path, sealed: tuple[Path, int], encryption: Encryption
) -> None:
    archive, size = sealed
    data = archive.read_bytes()
    body = _header_end(data)
    first, second = data[body : body + CHUNK], data[body + CHUNK : body + 2 * CHUNK]
    archive.write_bytes(data[:body] + second + first + data[body + 2 * CHUNK :])
    with pytest.raises(BackupIntegrityError) as caught:
        unseal(archive, tmp_path / "out", encryption=encryption, expected_bytes=size)
    assert caught.value.reason == "decrypt"


def test_a_wrong_identity_fails_decryption(tmp_path: Path, sealed: tuple[Path, int]) -> None:
    archive, size = sealed
    other = pyrage.x25519.Identity.generate()
    with pytest.raises(BackupIntegrityError) as caught:
        unseal(
            archive,
            tmp_path / "out",
            encryption=Encryption(other, other.to_public()),
            expected_bytes=size,
        )
    assert caught.value.reason == "decrypt"


def test_a_decompression_bomb_stops_at_the_expected_size(tmp_path: Path) -> None:
    source = tmp_path / "dump"
    source.write_bytes(bytes(20_000_000))  # 20 MB of zeros: a few KiB compressed
    seal(source, tmp_path / "archive", encryption=None, level=3)
    assert (tmp_path / "archive").stat().st_size < 100_000
    with pytest.raises(BackupIntegrityError) as caught:
        unseal(tmp_path / "archive", tmp_path / "out", encryption=None, expected_bytes=1_000_000)
    assert caught.value.reason == "decompress"
    assert (tmp_path / "out").stat().st_size <= 1_000_000
