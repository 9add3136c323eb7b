"""``/v1/conversations``: create, read, list, update, soft-delete and restore.

Every statement is scoped to the caller (``owner_id``), so another user's conversation is
indistinguishable from one that does not exist: 404 either way.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Response
from sqlalchemy import Select, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from bastion import NotFoundError, SafeText, StaleVersionError, StoredResponse, UTCTimestamp, utcnow
from bastion.fastapi import DatabaseDep, ReadConnection, WriteSession
from conversations.auth import CurrentReader, CurrentUser
from conversations.models import Conversation
from conversations.routes._ids import parse_conversation_id
from conversations.routes._scope import owned, visible
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

SortKey = Literal["created_at", "-created_at", "updated_at", "-updated_at", "title", "-title"]
_SORT_COLUMNS: Final = {
    "created_at": Conversation.created_at,
    "updated_at": Conversation.updated_at,
    "title": Conversation.title,
}
MAX_OFFSET: Final = 1_000_000
MAX_VERSION: Final = 2**31 - 1  # conversations.version is a 32-bit integer


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
    body: ConversationCreate, user_id: CurrentUser, database: DatabaseDep, request: Request
) -> Response:
    async def create(connection: AsyncConnection) -> StoredResponse:
        now = utcnow()
        values = {
            "owner_id": user_id,
            "title": body.title,
            "metadata": body.metadata,
            "created_at": now,
            "updated_at": now,
        }
        row = (await connection.execute(_INSERT_CONVERSATION, values)).mappings().one()
        result = ConversationOut.model_validate(row)
        headers = {"Location": f"{router.prefix}/{result.id}", "ETag": _etag(result)}
        return StoredResponse.json(result, status_code=201, headers=headers)

    return await write_once(request, database, user_id, create)


# Hot read routes run Core statements built once: building a statement per request costs
# more than executing it (bench/README.md has the measurements). The list route builds its
# query per request, from the filters it was given.
_CONVERSATION_COLUMNS = [column for column in Conversation.__table__.c if column.key != "owner_id"]
_INSERT_CONVERSATION = insert(Conversation).returning(*_CONVERSATION_COLUMNS)
_GET_CONVERSATION = select(*_CONVERSATION_COLUMNS).where(
    *visible(bindparam("owner_id"), bindparam("cid"))
)


@router.get("/{conversation_id}")
async def get_conversation(
    conversation_id: str, user_id: CurrentReader, connection: ReadConnection, response: Response
) -> ConversationOut:
    cid = parse_conversation_id(conversation_id)
    result_row = await connection.execute(_GET_CONVERSATION, {"cid": cid, "owner_id": user_id})
    conversation = result_row.mappings().first()
    if conversation is None:
        raise NotFoundError("conversation not found")
    result = ConversationOut.model_validate(conversation)
    response.headers["ETag"] = _etag(result)
    return result


@router.get("")
async def list_conversations(
    user_id: CurrentReader,
    connection: ReadConnection,
    status: Status | None = None,
    q: Annotated[SafeText | None, Query(max_length=200)] = None,
    created_after: UTCTimestamp | None = None,
    created_before: UTCTimestamp | None = None,
    sort: SortKey = "-created_at",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    include_deleted: bool = False,
) -> ConversationPage:
    query: Select[Any] = select(*_CONVERSATION_COLUMNS).where(Conversation.owner_id == user_id)
    if not include_deleted:
        query = query.where(Conversation.deleted_at.is_(None))
    if status is not None:
        query = query.where(Conversation.status == status)
    if q:
        pattern = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(Conversation.title.ilike(pattern, escape="\\"))
    if created_after is not None:
        query = query.where(Conversation.created_at > created_after)
    if created_before is not None:
        query = query.where(Conversation.created_at < created_before)

    total = await connection.scalar(select(func.count()).select_from(query.subquery())) or 0
    column = _SORT_COLUMNS[sort.lstrip("-")]
    # The id breaks ties, so equal sort keys still page in one stable order.
    if sort.startswith("-"):
        query = query.order_by(column.desc(), Conversation.id.desc())
    else:
        query = query.order_by(column.asc(), Conversation.id.asc())
    rows = await connection.execute(query.limit(limit).offset(offset))
    return ConversationPage(
        items=[ConversationOut.model_validate(row) for row in rows.mappings()],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.patch("/{conversation_id}")
async def update_conversation(
    conversation_id: str,
    body: ConversationUpdate,
    user_id: CurrentUser,
    session: WriteSession,
    response: Response,
    if_match: Annotated[str | None, Header()] = None,
) -> ConversationOut:
    cid = parse_conversation_id(conversation_id)
    expected = _expected_version(if_match)
    changes = body.model_dump(exclude_unset=True)
    values: dict[object, object] = {
        Conversation.version: Conversation.version + 1,
        Conversation.updated_at: utcnow(),
    }
    if "title" in changes:
        values[Conversation.title] = changes["title"]
    if "status" in changes:
        values[Conversation.status] = changes["status"]
    if "metadata" in changes:
        values[Conversation.metadata_] = changes["metadata"]
    statement = update(Conversation).where(*visible(user_id, cid))
    if expected is not None:
        statement = statement.where(Conversation.version == expected)
    updated = await session.scalar(statement.values(values).returning(Conversation))
    if updated is None:
        current = await session.scalar(select(Conversation.version).where(*visible(user_id, cid)))
        if current is None:
            raise NotFoundError("conversation not found")
        raise StaleVersionError(
            f"conversation is at version {current}, not {expected}; re-read it and retry"
        )
    result = ConversationOut.model_validate(updated)
    response.headers["ETag"] = _etag(result)
    return result


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(
    conversation_id: str, user_id: CurrentUser, session: WriteSession
) -> Response:
    cid = parse_conversation_id(conversation_id)
    now = utcnow()
    deleted = await session.scalar(
        update(Conversation)
        .where(*visible(user_id, cid))
        .values(
            {
                Conversation.deleted_at: now,
                Conversation.updated_at: now,
                Conversation.version: Conversation.version + 1,
            }
        )
        .returning(Conversation.id)
    )
    if deleted is None:
        raise NotFoundError("conversation not found")
    return Response(status_code=204)


@router.post("/{conversation_id}/restore", response_model=ConversationOut)
async def restore_conversation(
    conversation_id: str, user_id: CurrentUser, database: DatabaseDep, request: Request
) -> Response:
    cid = parse_conversation_id(conversation_id)

    async def restore(connection: AsyncConnection) -> StoredResponse:
        restored = await connection.execute(
            update(Conversation)
            .where(*owned(user_id, cid), Conversation.deleted_at.is_not(None))
            .values(
                {
                    Conversation.deleted_at: None,
                    Conversation.updated_at: utcnow(),
                    Conversation.version: Conversation.version + 1,
                }
            )
            .returning(*_CONVERSATION_COLUMNS)
        )
        row = restored.mappings().first()
        if row is None:
            # Restoring a conversation that is not deleted changes nothing and is not an error.
            current = await connection.execute(
                select(*_CONVERSATION_COLUMNS).where(*owned(user_id, cid))
            )
            row = current.mappings().first()
            if row is None:
                raise NotFoundError("conversation not found")
        result = ConversationOut.model_validate(row)
        return StoredResponse.json(result, headers={"ETag": _etag(result)})

    return await write_once(request, database, user_id, restore)
