"""Parsing the ids and cursors clients send: malformed means "not found", never 500."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Final

from fastapi.exceptions import RequestValidationError

from bastion import NotFoundError

__all__ = ["decode_cursor", "encode_cursor", "parse_conversation_id"]

_CURSOR_PREFIX: Final = "m:"
_MAX_CURSOR_LENGTH: Final = 64


def parse_conversation_id(raw: str) -> uuid.UUID:
    """The conversation id in ``raw``.

    Raises:
        NotFoundError: ``raw`` is not a UUID — no conversation can have that id.
    """
    if len(raw) > 64:
        raise NotFoundError("conversation not found")
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFoundError("conversation not found") from None


def encode_cursor(last_message_id: int) -> str:
    """An opaque cursor that resumes after message ``last_message_id``."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{last_message_id}".encode()).decode()


def decode_cursor(cursor: str) -> int:
    """The message id a cursor from :func:`encode_cursor` resumes after.

    Raises:
        RequestValidationError: the cursor was not made by this service (a 422).
    """
    invalid = RequestValidationError(
        [
            {
                "loc": ("query", "cursor"),
                "msg": "invalid cursor: pass next_cursor from the previous page",
                "type": "value_error",
            }
        ]
    )
    if len(cursor) > _MAX_CURSOR_LENGTH:
        raise invalid
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("ascii")
    except (UnicodeError, binascii.Error, ValueError):
        raise invalid from None
    digits = text.removeprefix(_CURSOR_PREFIX)
    if not text.startswith(_CURSOR_PREFIX) or not digits.isascii() or not digits.isdigit():
        raise invalid
    if len(digits) > 18:
        raise invalid
    return int(digits)
