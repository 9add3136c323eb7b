"""Parsing the ids clients send: malformed means "not found", never 500."""

from __future__ import annotations

import uuid

from bastion import NotFoundError, check_uuid

__all__ = ["parse_conversation_id"]


def parse_conversation_id(raw: str) -> uuid.UUID:
    """The conversation id in ``raw``.

    Raises:
        NotFoundError: ``raw`` is not a UUID — no conversation can have that id.
    """
    try:
        return check_uuid(raw)
    except ValueError:
        raise NotFoundError("conversation not found") from None
