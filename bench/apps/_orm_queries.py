"""The ORM statements the ``naive`` and ``sync`` baselines share (as tutorials write them)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from fastapi import HTTPException, Request
from sqlalchemy import Select, select, update
from sqlalchemy.orm import selectinload

from bastion import utcnow
from conversations.models import ApiKey, Conversation, Message, MessageSource


def key_hash(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        raise HTTPException(401)
    return hashlib.sha256(header[7:].encode()).hexdigest()


def user_query(request: Request) -> Select[tuple[uuid.UUID]]:
    return select(ApiKey.user_id).where(
        ApiKey.key_hash == key_hash(request), ApiKey.revoked_at.is_(None)
    )


def conversation_query(cid: uuid.UUID, owner: uuid.UUID) -> Select[tuple[Conversation]]:
    return select(Conversation).where(
        Conversation.id == cid, Conversation.owner_id == owner, Conversation.deleted_at.is_(None)
    )


def messages_query(cid: uuid.UUID, limit: int) -> Select[tuple[Message]]:
    return (
        select(Message)
        .where(Message.conversation_id == cid)
        .order_by(Message.id)
        .limit(limit + 1)
        .options(selectinload(Message.sources))
    )


def touch_conversation(cid: uuid.UUID, owner: uuid.UUID) -> Any:
    return (
        update(Conversation)
        .where(
            Conversation.id == cid,
            Conversation.owner_id == owner,
            Conversation.deleted_at.is_(None),
        )
        .values(
            {
                Conversation.message_count: Conversation.message_count + 1,
                Conversation.updated_at: utcnow(),
            }
        )
        .returning(Conversation.id)
    )


def new_message(cid: uuid.UUID, body: Any) -> Message:
    return Message(
        conversation_id=cid,
        role=body.role,
        content=body.content,
        metadata_=body.metadata,
        created_at=utcnow(),
        sources=[
            MessageSource(position=n, url=s.url, title=s.title) for n, s in enumerate(body.sources)
        ],
    )
