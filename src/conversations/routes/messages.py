"""``/v1/conversations/{id}/messages``: add a message, page through them in creation order.

Pages use a keyset cursor (the last message id), not an offset, so a page never repeats or
skips a message when new ones arrive. Adding a message first updates its conversation row,
which locks it: messages of one conversation get their ids in commit order, so a cursor can
never pass a message that commits later with a smaller id.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Query, Response
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from bastion import NotFoundError, StoredResponse, utcnow
from bastion.fastapi import DatabaseDep, ReadConnection
from conversations.auth import CurrentReader, CurrentUser
from conversations.models import Conversation, Message, MessageSource
from conversations.routes._ids import decode_cursor, encode_cursor, parse_conversation_id
from conversations.routes._scope import visible
from conversations.routes._writes import write_once
from conversations.schemas import MessageCreate, MessageOut, MessagePage, SourceOut

__all__ = ["router"]

router = APIRouter(prefix="/v1/conversations/{conversation_id}/messages", tags=["messages"])


_conversations = cast(Table, Conversation.__table__)
_messages = cast(Table, Message.__table__)
# Table-level (Core) statements built once: the hot write path skips the ORM unit of work.
_TOUCH_CONVERSATION = (
    update(_conversations)
    # Not "owner_id": in an UPDATE that name would mean the column's new value.
    .where(*visible(bindparam("owner"), bindparam("cid")))
    .values(message_count=_conversations.c.message_count + 1, updated_at=bindparam("now"))
    .returning(_conversations.c.id)
)
_INSERT_MESSAGE = insert(_messages).returning(_messages.c.id)
_INSERT_SOURCE = insert(cast(Table, MessageSource.__table__))


@router.post("", status_code=201, response_model=MessageOut)
async def create_message(
    conversation_id: str,
    body: MessageCreate,
    user_id: CurrentUser,
    database: DatabaseDep,
    request: Request,
) -> Response:
    cid = parse_conversation_id(conversation_id)

    async def add_message(connection: AsyncConnection) -> StoredResponse:
        now = utcnow()
        # The UPDATE comes first: it locks the conversation row, so this conversation's
        # messages get their ids in commit order (see the module docstring).
        touched = await connection.scalar(
            _TOUCH_CONVERSATION, {"cid": cid, "owner": user_id, "now": now}
        )
        if touched is None:
            raise NotFoundError("conversation not found")
        message_id = await connection.scalar(
            _INSERT_MESSAGE,
            {
                "conversation_id": cid,
                "role": body.role,
                "content": body.content,
                "metadata": body.metadata,
                "created_at": now,
            },
        )
        assert message_id is not None
        if body.sources:
            await connection.execute(
                _INSERT_SOURCE,
                [
                    {"message_id": message_id, "position": n, "url": s.url, "title": s.title}
                    for n, s in enumerate(body.sources)
                ],
            )
        message = MessageOut(
            id=message_id,
            conversation_id=cid,
            role=body.role,
            content=body.content,
            metadata=body.metadata,
            sources=[SourceOut(url=s.url, title=s.title) for s in body.sources],
            created_at=now,
        )
        location = f"/v1/conversations/{cid}/messages/{message_id}"
        return StoredResponse.json(message, status_code=201, headers={"Location": location})

    return await write_once(request, database, user_id, add_message)


# Built once: see the note on statements in routes/conversations.py.
_MESSAGE_COUNT = select(Conversation.message_count).where(
    *visible(bindparam("owner_id"), bindparam("cid"))
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
