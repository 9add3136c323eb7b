"""``/v1/conversations/{id}/messages``: add a message, page through them in creation order.

Pages use a keyset cursor (the last message id), not an offset, so a page never repeats or
skips a message when new ones arrive. Adding a message first updates its conversation row,
which locks it: messages of one conversation get their ids in commit order, so a cursor can
never pass a message that commits later with a smaller id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import bindparam, select, update

from bastion import NotFoundError, utcnow
from bastion.fastapi import ReadConnection, WriteSession
from conversations.auth import CurrentReader, CurrentUser
from conversations.models import Conversation, Message, MessageSource
from conversations.routes._ids import decode_cursor, encode_cursor, parse_conversation_id
from conversations.schemas import MessageCreate, MessageOut, MessagePage, SourceOut

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


# Built once: see the note on statements in routes/conversations.py.
_MESSAGE_COUNT = select(Conversation.message_count).where(
    Conversation.id == bindparam("cid"),
    Conversation.owner_id == bindparam("owner_id"),
    Conversation.deleted_at.is_(None),
)
_MESSAGES_AFTER = (
    select(*Message.__table__.c)
    .where(Message.conversation_id == bindparam("cid"), Message.id > bindparam("after"))
    .order_by(Message.id)
    .limit(bindparam("fetch"))
)
_SOURCES_OF = (
    select(MessageSource.message_id, MessageSource.url, MessageSource.title)
    .where(MessageSource.message_id.in_(bindparam("message_ids", expanding=True)))
    .order_by(MessageSource.message_id, MessageSource.position)
)


@router.get("")
async def list_messages(
    conversation_id: str,
    user_id: CurrentReader,
    connection: ReadConnection,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> MessagePage:
    cid = parse_conversation_id(conversation_id)
    after = decode_cursor(cursor) if cursor else 0
    total = await connection.scalar(_MESSAGE_COUNT, {"cid": cid, "owner_id": user_id})
    if total is None:
        raise NotFoundError("conversation not found")
    found = await connection.execute(
        _MESSAGES_AFTER, {"cid": cid, "after": after, "fetch": limit + 1}
    )
    rows = list(found.mappings())
    page = rows[:limit]
    sources: dict[int, list[SourceOut]] = {row["id"]: [] for row in page}
    if page:
        for source in await connection.execute(_SOURCES_OF, {"message_ids": list(sources)}):
            sources[source.message_id].append(SourceOut(url=source.url, title=source.title))
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    items = [MessageOut.model_validate({**row, "sources": sources[row["id"]]}) for row in page]
    return MessagePage(items=items, next_cursor=next_cursor, total=total)
