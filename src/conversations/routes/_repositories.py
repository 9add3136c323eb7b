"""The repositories of the conversation store, and how their query errors become 422s.

Every conversation statement is scoped to its owner: another user's conversation is
indistinguishable from one that does not exist (404 either way).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

from bastion import Repository
from conversations.models import Conversation, Message

__all__ = ["CONVERSATIONS", "MESSAGES", "ConversationSort"]

ConversationSort = Literal[
    "created_at", "-created_at", "updated_at", "-updated_at", "title", "-title"
]

CONVERSATIONS: Final = Repository(
    Conversation,
    name="conversation",
    scope="owner_id",
    hidden=["created_by", "updated_by"],
    filterable=["status", "title", "created_at"],
    sortable={key.removeprefix("-") for key in get_args(ConversationSort)},
)
MESSAGES: Final = Repository(Message, name="message")
