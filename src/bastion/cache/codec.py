"""How cached values are stored: JSON (never pickle), zstd-compressed above a threshold.

A stored value is one marker byte and the body: ``j`` for JSON text, ``z`` for zstd-compressed
JSON. JSON cannot run code when read back, whoever wrote to Redis; a value that does not decode
is treated as a miss, never as an error of the request.
"""

from __future__ import annotations

import json
from typing import Any, Final

import zstandard

__all__ = ["CacheCodecError", "decode", "encode"]

_JSON: Final = b"j"
_ZSTD: Final = b"z"
_LEVEL: Final = 3  # zstd's default: most of the ratio for a fraction of the time
_MAX_DECODED: Final = 512 * 1024 * 1024


class CacheCodecError(ValueError):
    """A stored value is not one this codec wrote (corrupt, foreign or truncated)."""


def encode(value: Any, *, compress_min_bytes: int) -> bytes:
    """``value`` as stored bytes.

    Raises:
        TypeError, ValueError: ``value`` is not JSON (NaN included): the caller's bug.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    if len(text) >= compress_min_bytes:
        return _ZSTD + zstandard.ZstdCompressor(level=_LEVEL).compress(text)
    return _JSON + text


def decode(blob: bytes) -> Any:
    """The value stored as ``blob``.

    Raises:
        CacheCodecError: ``blob`` is not an encoded value.
    """
    marker, body = blob[:1], blob[1:]
    try:
        if marker == _ZSTD:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=_MAX_DECODED)
        elif marker != _JSON:
            raise CacheCodecError("unknown value marker")
        return json.loads(body)
    except (zstandard.ZstdError, ValueError) as exc:
        raise CacheCodecError("stored value does not decode") from exc
