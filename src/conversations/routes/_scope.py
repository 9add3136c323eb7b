"""Who may see a conversation: the one rule every statement of the API shares.

A conversation is *owned* by the user who made it and *visible* to them while it is not
deleted. Both helpers take values or ``bindparam``s, so the same rule serves statements built
per request and statements built once.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import ColumnElement

from conversations.models import Conversation

__all__ = ["owned", "visible"]


def owned(owner_id: uuid.UUID | Any, conversation_id: uuid.UUID | Any) -> list[ColumnElement[bool]]:
    """The conversation with this id, if this user owns it (deleted or not)."""
    return [Conversation.id == conversation_id, Conversation.owner_id == owner_id]


def visible(
    owner_id: uuid.UUID | Any, conversation_id: uuid.UUID | Any
) -> list[ColumnElement[bool]]:
    """The conversation with this id, if this user owns it and it is not deleted."""
    return [*owned(owner_id, conversation_id), Conversation.deleted_at.is_(None)]
