"""Baseline ``naive``: the common tutorial pattern.

``async def`` endpoints, an ``AsyncSession`` per request from a ``yield`` dependency on a
default engine, ORM queries, commit inside the endpoint.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from bastion import normalise_database_url
from bench.apps import _orm_queries as q
from conversations.schemas import ConversationOut, MessageCreate, MessageOut, MessagePage

engine = create_async_engine(
    normalise_database_url(os.environ["BENCH_DATABASE_URL"]), pool_size=8, max_overflow=8
)
SessionLocal = async_sessionmaker(engine, expire_on_commit=False)
app = FastAPI()


async def get_session() -> AsyncIterator[AsyncSession]:
    async with SessionLocal() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


async def owner(request: Request, session: Session) -> uuid.UUID:
    user = await session.scalar(q.user_query(request))
    if user is None:
        raise HTTPException(401)
    return user


Owner = Annotated[uuid.UUID, Depends(owner)]


@app.get("/v1/conversations/{conversation_id}")
async def get_conversation(
    conversation_id: uuid.UUID, user: Owner, session: Session
) -> ConversationOut:
    found = await session.scalar(q.conversation_query(conversation_id, user))
    if found is None:
        raise HTTPException(404)
    return ConversationOut.model_validate(found)


@app.get("/v1/conversations/{conversation_id}/messages")
async def list_messages(
    conversation_id: uuid.UUID, user: Owner, session: Session, limit: int = 20
) -> MessagePage:
    found = await session.scalar(q.conversation_query(conversation_id, user))
    if found is None:
        raise HTTPException(404)
    rows = list(await session.scalars(q.messages_query(conversation_id, limit)))
    items = [MessageOut.model_validate(row) for row in rows[:limit]]
    cursor = str(items[-1].id) if len(rows) > limit else None
    return MessagePage(items=items, next_cursor=cursor, total=found.message_count)


@app.post("/v1/conversations/{conversation_id}/messages", status_code=201)
async def create_message(
    conversation_id: uuid.UUID, body: MessageCreate, user: Owner, session: Session
) -> MessageOut:
    if await session.scalar(q.touch_conversation(conversation_id, user)) is None:
        raise HTTPException(404)
    message = q.new_message(conversation_id, body)
    session.add(message)
    await session.commit()
    return MessageOut.model_validate(message)
