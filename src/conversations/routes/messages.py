"""``/v1/conversations/{id}/messages``: add messages (one, or a batch), page through them.

Pages use a keyset cursor (the last message id), not an offset, so a page never repeats or
skips a message when new ones arrive. Adding messages first updates their conversation row,
which locks it: messages of one conversation get their ids in commit order, so a cursor can
never pass a message that commits later with a smaller id.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Final, cast

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import Table, bindparam, insert
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from bastion import NotFoundError, StoredResponse, returning_rows
from bastion.fastapi import DatabaseDep
from conversations.auth import CurrentReadCaller, CurrentWriteCaller
from conversations.cache_keys import cache_message_page
from conversations.live_events import message_created, messages_created
from conversations.models import Message, MessageSource
from conversations.routes._ids import parse_conversation_id
from conversations.routes._repositories import CONVERSATIONS, MESSAGES
from conversations.routes._writes import write_once
from conversations.schemas import (
    BatchItemResult,
    MessageBatch,
    MessageBatchResult,
    MessageCreate,
    MessageOut,
    MessagePage,
    SourceOut,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1/conversations/{conversation_id}/messages", tags=["messages"])

# Sources are rows of a child table with a composite key: written with one Core statement,
# whose RETURNING gives the stored values the answer shows (and lets one row take the lean path).
_SOURCE_TABLE: Final = cast(Table, MessageSource.__table__)
_INSERT_SOURCES: Final = insert(_SOURCE_TABLE).returning(
    _SOURCE_TABLE.c.message_id,
    _SOURCE_TABLE.c.url,
    _SOURCE_TABLE.c.title,
    sort_by_parameter_order=True,
)
# Built once: the hot read path binds values into the same statements on every request.
_PAGES: Final = MESSAGES.keyset_query(None, Message.conversation_id == bindparam("cid"))
_SOURCES_OF: Final = MESSAGES.children_query("sources", order_by=MessageSource.position)

PageLimit = Annotated[int, Query(ge=1, le=100)]
"""Messages per page: 1 to 100."""
PageCursor = Annotated[str | None, Query(max_length=64)]
"""Where a page starts: the ``next_cursor`` of the page before (opaque to clients)."""


async def _add(
    connection: AsyncConnection, user_id: uuid.UUID, cid: uuid.UUID, bodies: list[MessageCreate]
) -> list[MessageOut]:
    """Store ``bodies`` in conversation ``cid`` and return them as stored.

    Raises:
        NotFoundError: no such conversation of this user (checked first: never a foreign-key
            error).
    """
    # The UPDATE comes first: it locks the conversation row, so this conversation's
    # messages get their ids in commit order (see the module docstring).
    await CONVERSATIONS.update(
        connection,
        cid,
        {},
        scope=user_id,
        increment={"message_count": len(bodies)},
        bump_version=False,
        returning=["id"],
    )
    rows = [
        {"conversation_id": cid, "role": b.role, "content": b.content, "metadata": b.metadata}
        for b in bodies
    ]
    stored = await MESSAGES.create_many(connection, rows)
    sources = [
        {"message_id": row["id"], "position": n, "url": s.url, "title": s.title}
        for row, body in zip(stored, bodies, strict=True)
        for n, s in enumerate(body.sources)
    ]
    sources_of: dict[int, list[SourceOut]] = {row["id"]: [] for row in stored}
    if sources:
        for source in await returning_rows(connection, _INSERT_SOURCES, sources):
            sources_of[source.message_id].append(SourceOut(url=source.url, title=source.title))
    return [MessageOut.model_validate({**row, "sources": sources_of[row["id"]]}) for row in stored]


@router.post("", status_code=201, response_model=MessageOut)
async def create_message(
    conversation_id: str,
    body: MessageCreate,
    caller: CurrentWriteCaller,
    database: DatabaseDep,
    request: Request,
) -> Response:
    cid = parse_conversation_id(conversation_id)

    async def add_message(connection: AsyncConnection, user_id: uuid.UUID) -> StoredResponse:
        (message,) = await _add(connection, user_id, cid, [body])
        location = f"/v1/conversations/{cid}/messages/{message.id}"
        return StoredResponse.json(message, status_code=201, headers={"Location": location})

    response = await write_once(request, database, caller, add_message)
    # Committed: invalidate the conversation's cached reads, then tell its streams.
    await message_created(request, caller.user_id, cid, response)
    return response


@router.post(
    ":batch",
    status_code=201,
    response_model=MessageBatchResult,
    responses={207: {"model": MessageBatchResult, "description": "some messages were refused"}},
)
async def create_messages(
    conversation_id: str,
    body: MessageBatch,
    caller: CurrentWriteCaller,
    database: DatabaseDep,
    request: Request,
) -> Response:
    """Add up to 1,000 messages at once; each is checked on its own.

    201 when every message was stored, 207 when some were refused (each result says which
    and why; the others are stored), 422 when none could be. Like every POST, it is retried
    when safe and idempotent with an ``Idempotency-Key``.
    """
    cid = parse_conversation_id(conversation_id)
    valid, refused = _validate_each(body.messages)
    if not valid:
        raise RequestValidationError([error for _, errors in refused for error in errors])

    async def add_messages(connection: AsyncConnection, user_id: uuid.UUID) -> StoredResponse:
        stored = await _add(connection, user_id, cid, [message for _, message in valid])
        results = [
            BatchItemResult(index=index, status=201, message=message)
            for (index, _), message in zip(valid, stored, strict=True)
        ]
        results += [
            BatchItemResult(index=index, status=422, errors=errors) for index, errors in refused
        ]
        results.sort(key=lambda result: result.index)
        answer = MessageBatchResult(created=len(stored), failed=len(refused), results=results)
        return StoredResponse.json(answer, status_code=207 if refused else 201)

    response = await write_once(request, database, caller, add_messages)
    await messages_created(request, caller.user_id, cid, response)
    return response


def _validate_each(
    items: Sequence[Any],
) -> tuple[list[tuple[int, MessageCreate]], list[tuple[int, list[dict[str, Any]]]]]:
    valid: list[tuple[int, MessageCreate]] = []
    refused: list[tuple[int, list[dict[str, Any]]]] = []
    for index, item in enumerate(items):
        try:
            valid.append((index, MessageCreate.model_validate(item)))
        except ValidationError as exc:
            # Like every 422 of the API: where and what, never the input itself.
            errors = [
                {"loc": ["body", "messages", index, *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_input=False, include_context=False, include_url=False)
            ]
            refused.append((index, errors))
    return valid, refused


@router.get("")
async def list_messages(
    conversation_id: str,
    caller: CurrentReadCaller,
    limit: PageLimit = 20,
    cursor: PageCursor = None,
) -> MessagePage:
    cid = parse_conversation_id(conversation_id)
    return await load_message_page(caller.connection, caller.user_id, cid, limit, cursor or None)


@cache_message_page
async def load_message_page(
    connection: AsyncConnection,
    owner_id: uuid.UUID,
    conversation_id: uuid.UUID,
    limit: int,
    cursor: str | None,
) -> MessagePage:
    """A page of the owner's conversation's messages, cached per owner (with ``REDIS_URL``),
    else read on ``connection``.

    Raises:
        NotFoundError: no such conversation for this owner.
        InvalidQueryError: the cursor is not one this API made.
    """
    conversation = await CONVERSATIONS.values(
        connection, conversation_id, "message_count", scope=owner_id
    )
    if conversation is None:
        raise NotFoundError("conversation not found")
    page = await _PAGES.page(connection, {"cid": conversation_id}, limit=limit, cursor=cursor)
    sources: dict[int, list[SourceOut]] = {row["id"]: [] for row in page.items}
    if sources:
        for source in await connection.execute(_SOURCES_OF, {"parent_ids": list(sources)}):
            sources[source.message_id].append(SourceOut(url=source.url, title=source.title))
    items = [
        MessageOut.model_validate({**row, "sources": sources[row["id"]]}) for row in page.items
    ]
    return MessagePage(
        items=items, next_cursor=page.next_cursor, total=conversation["message_count"]
    )
