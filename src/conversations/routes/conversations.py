"""``/v1/conversations``: create, read, list, update, soft-delete and restore.

Thin HTTP adapters over :data:`~conversations.routes._repositories.CONVERSATIONS`: each route
parses its input, makes one repository call in a unit of work and shapes the answer.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Final

from fastapi import APIRouter, Header, HTTPException, Query, Response
from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from bastion import Eq, Filter, Range, SafeText, Search, StoredResponse, UTCTimestamp
from bastion.fastapi import (
    DatabaseDep,
    InvalidateAfterCommit,
    WriteConnection,
    cache_of,
)
from conversations.auth import CurrentReadCaller, CurrentWriteCaller, CurrentWriter
from conversations.cache_keys import conversation_changed, conversation_tags, load_conversation
from conversations.routes._ids import parse_conversation_id
from conversations.routes._repositories import CONVERSATIONS, ConversationSort
from conversations.routes._writes import write_once
from conversations.schemas import (
    ConversationCreate,
    ConversationOut,
    ConversationPage,
    ConversationUpdate,
    Status,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

MAX_OFFSET: Final = 1_000_000
MAX_VERSION: Final = 2**31 - 1  # conversations.version is a 32-bit integer


def _out(row: RowMapping, response: Response | None = None) -> ConversationOut:
    conversation = ConversationOut.from_row(row)
    if response is not None:
        response.headers["ETag"] = _etag(conversation)
    return conversation


def _etag(conversation: ConversationOut) -> str:
    return f'"{conversation.version}"'


def _expected_version(if_match: str | None) -> int | None:
    """The version an ``If-Match`` header asks for (``None``: no precondition)."""
    if if_match is None or if_match.strip() == "*":
        return None
    tag = if_match.strip().removeprefix("W/").strip('"')
    if not (tag.isascii() and tag.isdigit()) or len(tag) > 18:
        raise HTTPException(400, 'If-Match must be a version number, such as "3"')
    # Beyond the column's range no version can match; clamping keeps the answer a 412.
    return min(int(tag), MAX_VERSION)


@router.post("", status_code=201, response_model=ConversationOut)
async def create_conversation(
    body: ConversationCreate, caller: CurrentWriteCaller, database: DatabaseDep, request: Request
) -> Response:
    async def create(connection: AsyncConnection, user_id: uuid.UUID) -> StoredResponse:
        values = {"title": body.title, "metadata": body.metadata}
        result = _out(await CONVERSATIONS.create(connection, values, scope=user_id))
        headers = {"Location": f"{router.prefix}/{result.id}", "ETag": _etag(result)}
        return StoredResponse.json(result, status_code=201, headers=headers)

    return await write_once(request, database, caller, create)


@router.get("/{conversation_id}")
async def get_conversation(
    conversation_id: str, caller: CurrentReadCaller, response: Response
) -> ConversationOut:
    cid = parse_conversation_id(conversation_id)
    # Cached per owner.
    conversation = await load_conversation(caller.connection, caller.user_id, cid)
    response.headers["ETag"] = _etag(conversation)
    return conversation


@router.get("")
async def list_conversations(
    caller: CurrentReadCaller,
    status: Status | None = None,
    q: Annotated[SafeText | None, Query(max_length=200)] = None,
    created_after: UTCTimestamp | None = None,
    created_before: UTCTimestamp | None = None,
    sort: ConversationSort = "-created_at",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    include_deleted: bool = False,
) -> ConversationPage:
    filters: list[Filter] = []
    if status is not None:
        filters.append(Eq("status", status))
    if q:
        filters.append(Search("title", q))
    if created_after is not None or created_before is not None:
        filters.append(Range("created_at", gt=created_after, lt=created_before))
    page = await CONVERSATIONS.page(
        caller.connection,
        filters=filters,
        sort=sort,
        limit=limit,
        offset=offset,
        scope=caller.user_id,
        include_deleted=include_deleted,
    )
    items = [_out(row) for row in page.items]
    return ConversationPage(items=items, total=page.total, limit=limit, offset=offset)


@router.patch("/{conversation_id}")
async def update_conversation(
    conversation_id: str,
    body: ConversationUpdate,
    stale: InvalidateAfterCommit,  # before the unit: its invalidation runs after COMMIT
    user_id: CurrentWriter,  # checked in the route's unit (after the key's form)
    connection: WriteConnection,
    response: Response,
    if_match: Annotated[str | None, Header()] = None,
) -> ConversationOut:
    cid = parse_conversation_id(conversation_id)
    expected = _expected_version(if_match)
    changes = body.model_dump(exclude_unset=True)
    stale.add(tags=conversation_tags(user_id, cid))
    row = await CONVERSATIONS.update(
        connection, cid, changes, scope=user_id, expected_version=expected
    )
    return _out(row, response)


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(
    conversation_id: str,
    stale: InvalidateAfterCommit,  # before the unit: its invalidation runs after COMMIT
    user_id: CurrentWriter,  # checked in the route's unit (after the key's form)
    connection: WriteConnection,
) -> Response:
    cid = parse_conversation_id(conversation_id)
    stale.add(tags=conversation_tags(user_id, cid))
    await CONVERSATIONS.soft_delete(connection, cid, scope=user_id)
    return Response(status_code=204)


@router.post("/{conversation_id}/restore", response_model=ConversationOut)
async def restore_conversation(
    conversation_id: str, caller: CurrentWriteCaller, database: DatabaseDep, request: Request
) -> Response:
    cid = parse_conversation_id(conversation_id)

    async def restore(connection: AsyncConnection, user_id: uuid.UUID) -> StoredResponse:
        # Restoring a conversation that is not deleted changes nothing and is not an error.
        result = _out(await CONVERSATIONS.restore(connection, cid, scope=user_id))
        return StoredResponse.json(result, headers={"ETag": _etag(result)})

    response = await write_once(request, database, caller, restore)
    await conversation_changed(cache_of(request), caller.user_id, cid)
    return response
