"""Reusable pydantic field types for what a database can and must not hold.

They reject — never rewrite — input: text is stored as sent (escaping is an output concern),
so a value either passes unchanged or the request fails with 422. The one exception is
:data:`NormalizedText`, for names and keys that are compared for equality or searched: it
stores the Unicode NFC form, so "é" typed as one character or as "e" plus an accent is the
same name.

>>> class NoteIn(BaseModel):
...     title: Annotated[SafeText, Field(min_length=1, max_length=200)]
...     metadata: JSONObject = {}
...     link: HttpUrlText | None = None
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from pydantic import AfterValidator, AwareDatetime, BeforeValidator

__all__ = [
    "HttpUrlText",
    "IntId",
    "JSONObject",
    "NormalizedText",
    "SafeText",
    "UTCTimestamp",
    "UUIDText",
    "check_http_url",
    "check_int_id",
    "check_json_object",
    "check_safe_text",
    "check_uuid",
    "normalize_text",
    "to_utc",
]

ALLOWED_CONTROL_CHARACTERS: Final = frozenset("\t\n\r")
JSON_OBJECT_MAX_BYTES: Final = 16 * 1024
JSON_OBJECT_MAX_DEPTH: Final = 8
URL_MAX_LENGTH: Final = 2048
INT_ID_MAX: Final = 2**63 - 1  # a signed 64-bit key: BIGINT on PostgreSQL, INTEGER on SQLite
UUID_TEXT_MAX_LENGTH: Final = 36

# Unicode's control characters (general category Cc) are exactly U+0000-U+001F and
# U+007F-U+009F, and its surrogates (Cs) U+D800-U+DFFF: fixed ranges, so a character class
# finds them in C, where a loop over unicodedata.category() took about 10 ms for a 100,000-
# character message (holding the event loop that long). tests/unit/test_validation.py checks
# the classes against unicodedata over every code point.
_SURROGATES: Final = (0xD800, 0xDFFF)
_UNSAFE_TEXT: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters but tab, newline and CR, and surrogates: what :func:`check_safe_text`
refuses."""
_LONE_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")
_URL_UNSAFE: Final = re.compile(r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
"""Whitespace (``\\s`` matches what ``str.isspace`` accepts), control characters, surrogates."""


def check_safe_text(value: str) -> str:
    """Return ``value`` unchanged if it holds no control character but tab, newline and CR.

    Raises:
        ValueError: a NUL byte, another control character, or a lone surrogate (which cannot
            be stored as UTF-8) is present; the message gives its position.
    """
    found = _UNSAFE_TEXT.search(value)
    if found is None:
        return value
    position, code = found.start(), ord(found.group())
    if _SURROGATES[0] <= code <= _SURROGATES[1]:
        raise ValueError(f"lone surrogate U+{code:04X} at position {position}")
    raise ValueError(f"control character U+{code:04X} at position {position} is not allowed")


SafeText = Annotated[str, AfterValidator(check_safe_text)]
"""A ``str`` that passes :func:`check_safe_text`; add ``Field(max_length=…)`` for a limit."""


def normalize_text(value: str) -> str:
    """``value`` in Unicode normal form NFC, if it passes :func:`check_safe_text`.

    Raises:
        ValueError: as :func:`check_safe_text`.
    """
    return unicodedata.normalize("NFC", check_safe_text(value))


NormalizedText = Annotated[str, AfterValidator(normalize_text)]
"""A :data:`SafeText` stored in NFC form; put ``Field(max_length=…)`` before it for a limit."""


def check_uuid(value: str) -> uuid.UUID:
    """The UUID ``value`` spells, in its 36-character or 32-hex-digit form.

    Raises:
        ValueError: anything else (braces, ``urn:uuid:``, a wrong length, non-hex digits).
    """
    if len(value) not in (32, UUID_TEXT_MAX_LENGTH) or not value.isascii():
        raise ValueError("not a UUID")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueError("not a UUID") from None


def _uuid_from_text(value: Any) -> Any:
    return check_uuid(value) if isinstance(value, str) else value


UUIDText = Annotated[uuid.UUID, BeforeValidator(_uuid_from_text)]
"""A ``UUID`` field that accepts only the canonical text forms (see :func:`check_uuid`)."""


def check_int_id(value: int) -> int:
    """Return ``value`` unchanged if it can be a row id: 1 to 2**63 - 1.

    Raises:
        ValueError: zero, negative, or beyond a 64-bit key.
    """
    if not 1 <= value <= INT_ID_MAX:
        raise ValueError(f"an id is a whole number from 1 to {INT_ID_MAX}")
    return value


IntId = Annotated[int, AfterValidator(check_int_id)]
"""An integer id that a BIGINT key can hold (a larger one is refused, not an overflow 500)."""


def check_json_object(
    value: dict[str, Any],
    *,
    max_bytes: int = JSON_OBJECT_MAX_BYTES,
    max_depth: int = JSON_OBJECT_MAX_DEPTH,
) -> dict[str, Any]:
    """Return ``value`` unchanged if it is a JSON object within the size and depth limits.

    Depth counts nested objects and arrays: ``{}`` is 1, ``{"a": [1]}`` is 2. Strings
    (keys and values) may hold no NUL or lone surrogate — PostgreSQL's ``jsonb`` cannot store
    them — and numbers must be finite (``NaN`` is not JSON). Messages never quote the
    client's keys or values.

    Raises:
        ValueError: any of those rules is broken.
    """
    _check_json_value(value, depth=1, max_depth=max_depth)
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > max_bytes:
        raise ValueError(f"JSON object is {size} bytes; at most {max_bytes} are allowed")
    return value


def _check_json_value(value: Any, *, depth: int, max_depth: int) -> None:
    if isinstance(value, dict | list) and depth > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("JSON object keys must be strings")
            _check_json_string(key, depth)
            _check_json_value(item, depth=depth + 1, max_depth=max_depth)
    elif isinstance(value, list):
        for item in value:
            _check_json_value(item, depth=depth + 1, max_depth=max_depth)
    elif isinstance(value, str):
        _check_json_string(value, depth)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite number at depth {depth}")


def _check_json_string(value: str, depth: int) -> None:
    if "\x00" in value:
        raise ValueError(f"NUL character in a JSON string at depth {depth}")
    if _LONE_SURROGATE.search(value):
        raise ValueError(f"lone surrogate in a JSON string at depth {depth}")


JSONObject = Annotated[dict[str, Any], AfterValidator(check_json_object)]
"""A JSON object of at most 16 KiB, nested at most 8 deep, storable on every backend."""


def check_http_url(value: str, *, max_length: int = URL_MAX_LENGTH) -> str:
    """Return ``value`` unchanged if it is an absolute http(s) URL of at most ``max_length``.

    Raises:
        ValueError: another scheme (``javascript:``, ``file:``, …), no host, whitespace or
            control characters, or too long.
    """
    if len(value) > max_length:
        raise ValueError(f"URL is {len(value)} characters; at most {max_length} are allowed")
    if _URL_UNSAFE.search(value):
        raise ValueError("URL contains whitespace or control characters")
    try:
        parts = urlsplit(value)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise ValueError("URL is malformed") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("URL must start with http:// or https://")
    if not hostname:
        raise ValueError("URL has no host")
    return value


HttpUrlText = Annotated[str, AfterValidator(check_http_url)]
"""An http(s) URL of at most 2,048 characters, kept exactly as sent."""


def to_utc(value: datetime) -> datetime:
    """``value`` (aware) as UTC.

    Raises:
        ValueError: the instant has no UTC equivalent (``0001-01-01T00:00+05:00``).
    """
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date is out of range once converted to UTC") from None


UTCTimestamp = Annotated[AwareDatetime, AfterValidator(to_utc)]
"""An aware datetime (a naive one is refused), converted to UTC; out-of-range ones refused."""
