"""The archive pipeline: dump → zstd → age → SHA-256 → file, and back, in bounded memory.

Both directions stream through small buffers (age works in 64 KiB chunks, zstd in its
window), so a database of any size needs a few MiB of memory. Run them in a worker thread:
they block.

age's STREAM construction authenticates every 64 KiB chunk with a counter nonce and marks the
last one, so a flipped byte, a truncated archive and reordered chunks all fail decryption.
Decompression never writes more than the manifest's (authenticated) dump size: a bomb stops
at that bound.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Final, cast

import pyrage  # type: ignore[import-untyped]
import zstandard

from bastion.backup.errors import BackupIntegrityError
from bastion.backup.keys import Encryption

__all__ = ["CHUNK_BYTES", "SealedArchive", "file_sha256", "seal", "unseal"]

CHUNK_BYTES: Final = 1024 * 1024

Progress = Callable[[int, int], None]
"""Called with ``(bytes done, bytes in all)`` as a stage moves on."""


@dataclass(frozen=True, slots=True)
class SealedArchive:
    sha256: str
    size: int


class _CountingReader:
    """Reads ``file``, telling ``progress`` how far it got."""

    def __init__(self, file: BinaryIO, total: int, progress: Progress | None) -> None:
        self._file = file
        self._total = total
        self._done = 0
        self._progress = progress
        self._reported = 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._done += len(data)
        # Reported every CHUNK_BYTES (and at the end), not for every 8 KiB read.
        if self._progress and (self._done - self._reported >= CHUNK_BYTES or not data):
            self._reported = self._done
            self._progress(self._done, self._total)
        return data


class _HashingWriter:
    """Writes to ``file`` and hashes what it wrote."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._file.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()


class _BoundedWriter:
    """Writes to ``file`` until ``limit`` bytes; past it, refuses and remembers it did."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        self._file = file
        self._limit = limit
        self.size = 0
        self.exceeded = False

    def write(self, data: bytes) -> int:
        if self.size + len(data) > self._limit:
            self.exceeded = True
            raise OSError("decompressed output larger than the manifest says")
        self._file.write(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()


def seal(
    source: Path,
    destination: Path,
    *,
    encryption: Encryption | None,
    level: int,
    progress: Progress | None = None,
) -> SealedArchive:
    """Compress (and encrypt) ``source`` into ``destination``; return its SHA-256 and size.

    Raises:
        OSError: reading or writing failed.
    """
    total = source.stat().st_size
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    with source.open("rb") as raw, destination.open("wb") as out:
        reader = compressor.stream_reader(
            cast(IO[bytes], _CountingReader(raw, total, progress)),
            size=total,
            read_size=CHUNK_BYTES,
        )
        writer = _HashingWriter(out)
        if encryption is None:
            while chunk := reader.read(CHUNK_BYTES):
                writer.write(chunk)
        else:
            pyrage.encrypt_io(reader, writer, [encryption.recipient])
        out.flush()
    return SealedArchive(sha256=writer.hash.hexdigest(), size=writer.size)


def unseal(
    archive: Path,
    destination: Path,
    *,
    encryption: Encryption | None,
    expected_bytes: int,
    progress: Progress | None = None,
) -> None:
    """Decrypt (if ``encryption``) and decompress ``archive`` into ``destination``.

    ``expected_bytes`` is the dump size from the authenticated manifest: more output than that
    is refused (a decompression bomb), less means the stream ended early.

    Raises:
        BackupIntegrityError: ``reason="decrypt"`` (wrong key, truncated or altered
            ciphertext) or ``reason="decompress"`` (corrupt zstd stream, or a size other than
            ``expected_bytes``).
    """
    total = archive.stat().st_size
    decompressor = zstandard.ZstdDecompressor()
    with archive.open("rb") as raw, destination.open("wb") as out:
        bounded = _BoundedWriter(out, expected_bytes)
        source = _CountingReader(raw, total, progress)
        try:
            with decompressor.stream_writer(
                cast(IO[bytes], bounded),
                write_size=CHUNK_BYTES,
                write_return_read=True,
                closefd=False,
            ) as stream:
                writer = _WatchedWriter(stream)
                if encryption is None:
                    while chunk := source.read(CHUNK_BYTES):
                        writer.write(chunk)
                else:
                    _decrypt(source, writer, encryption)
        except (zstandard.ZstdError, OSError):
            reason = "larger than the manifest says" if bounded.exceeded else "corrupt"
            raise BackupIntegrityError(
                f"the archive does not decompress: {reason}", reason="decompress"
            ) from None
    if bounded.size != expected_bytes:
        raise BackupIntegrityError(
            "the archive decompresses to a size other than the manifest says", reason="decompress"
        )


class _WatchedWriter:
    """Passes writes on to the decompressor and remembers whether one failed."""

    def __init__(self, stream: zstandard.ZstdDecompressionWriter) -> None:
        self._stream = stream
        self.failed = False

    def write(self, data: bytes) -> int:
        try:
            return self._stream.write(data)
        except Exception:
            self.failed = True
            raise


def _decrypt(source: _CountingReader, writer: _WatchedWriter, encryption: Encryption) -> None:
    # pyrage reports a bad header or wrong key as DecryptError and a bad STREAM chunk
    # (altered, truncated, reordered) as OSError; an error of our own writer comes back as
    # one of those too, so the writer says whether the fault was downstream.
    try:
        pyrage.decrypt_io(source, writer, [encryption.identity])
    except (pyrage.DecryptError, OSError):
        if writer.failed:
            raise OSError("decompression failed") from None
        raise BackupIntegrityError(
            "the archive does not decrypt with BACKUP_ENCRYPTION_KEY (wrong key, or a "
            "truncated or altered archive)",
            reason="decrypt",
        ) from None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
