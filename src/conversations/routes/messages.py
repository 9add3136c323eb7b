"""``/v1/conversations/{id}/messages``: add a message, page through them in creation order.

Pages use a keyset cursor (the last message id), not an offset, so a page never repeats or
skips a message when new ones arrive. Adding a message first updates its conversation row,
which locks it: messages of one conversation get their ids in commit order, so a cursor can
never pass a message that commits later with a smaller id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import select, update
from sqlalchemy.orm import selectinload

from bastion import NotFoundError, utcnow
from bastion.fastapi import ReadSession, WriteSession
from conversations.auth import CurrentUser
from conversations.models import Conversation, Message, MessageSource
from conversations.routes._ids import decode_cursor, encode_cursor, parse_conversation_id
from conversations.schemas import MessageCreate, MessageOut, MessagePage

__all__ = ["router"]

router = APIRouter(prefix="/v1/conversations/{conversation_id}/messages", tags=["messages"])


@router.post("", status_code=201)
async def create_message(
    conversation_id: str,
    body: MessageCreate,
    user_id: CurrentUser,
    session: WriteSession,
    response: Response,
) -> MessageOut:
    cid = parse_conversation_id(conversation_id)
    now = utcnow()
    touched = await session.scalar(
        update(Conversation)
        .where(
            Conversation.id == cid,
            Conversation.owner_id == user_id,
            Conversation.deleted_at.is_(None),
        )
        .values(
            {
                Conversation.message_count: Conversation.message_count + 1,
                Conversation.updated_at: now,
            }
        )
        .returning(Conversation.id)
    )
    if touched is None:
        raise NotFoundError("conversation not found")
    message = Message(
        conversation_id=cid,
        role=body.role,
        content=body.content,
        metadata_=body.metadata,
        created_at=now,
        sources=[
            MessageSource(position=position, url=source.url, title=source.title)
            for position, source in enumerate(body.sources)
        ],
    )
    session.add(message)
    await session.flush()
    response.headers["Location"] = f"/v1/conversations/{cid}/messages/{message.id}"
    return MessageOut.model_validate(message)


@router.get("")
async def list_messages(
    conversation_id: str,
    user_id: CurrentUser,
    session: ReadSession,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> MessagePage:
    cid = parse_conversation_id(conversation_id)
    after = decode_cursor(cursor) if cursor else 0
    total = await session.scalar(
        select(Conversation.message_count).where(
            Conversation.id == cid,
            Conversation.owner_id == user_id,
            Conversation.deleted_at.is_(None),
        )
    )
    if total is None:
        raise NotFoundError("conversation not found")
    rows = list(
        await session.scalars(
            select(Message)
            .where(Message.conversation_id == cid, Message.id > after)
            .order_by(Message.id)
            .limit(limit + 1)
            .options(selectinload(Message.sources))
        )
    )
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
    return MessagePage(
        items=[MessageOut.model_validate(row) for row in page], next_cursor=next_cursor, total=total
    )
