"""Baseline ``sync``: ``def`` endpoints with a synchronous SQLAlchemy session (threadpool)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy import create_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from bastion import normalise_database_url
from bench.apps import _orm_queries as q
from conversations.schemas import ConversationOut, MessageCreate, MessageOut, MessagePage

_url = normalise_database_url(os.environ["BENCH_DATABASE_URL"])
_url = _url.set(
    drivername="postgresql+psycopg" if _url.get_backend_name() == "postgresql" else "sqlite"
)
# Up to as many connections as the threadpool has threads (40): with fewer, threads blocked on
# a checkout starve the requests that hold connections and the server stalls under load. The
# overflow closes again after the run, leaving room for the other variants' pools.
engine = create_engine(_url, pool_size=16, max_overflow=24)
SessionLocal = sessionmaker(engine, expire_on_commit=False)
app = FastAPI()


def get_session() -> Iterator[OrmSession]:
    with SessionLocal() as session:
        yield session


Session = Annotated[OrmSession, Depends(get_session)]


def owner(request: Request, session: Session) -> uuid.UUID:
    user = session.scalar(q.user_query(request))
    if user is None:
        raise HTTPException(401)
    return user


Owner = Annotated[uuid.UUID, Depends(owner)]


@app.get("/v1/conversations/{conversation_id}")
def get_conversation(conversation_id: uuid.UUID, user: Owner, session: Session) -> ConversationOut:
    found = session.scalar(q.conversation_query(conversation_id, user))
    if found is None:
        raise HTTPException(404)
    return ConversationOut.model_validate(found)


@app.get("/v1/conversations/{conversation_id}/messages")
def list_messages(
    conversation_id: uuid.UUID, user: Owner, session: Session, limit: int = 20
) -> MessagePage:
    found = session.scalar(q.conversation_query(conversation_id, user))
    if found is None:
        raise HTTPException(404)
    rows = list(session.scalars(q.messages_query(conversation_id, limit)))
    items = [MessageOut.model_validate(row) for row in rows[:limit]]
    cursor = str(items[-1].id) if len(rows) > limit else None
    return MessagePage(items=items, next_cursor=cursor, total=found.message_count)


@app.post("/v1/conversations/{conversation_id}/messages", status_code=201)
def create_message(
    conversation_id: uuid.UUID, body: MessageCreate, user: Owner, session: Session
) -> MessageOut:
    if session.scalar(q.touch_conversation(conversation_id, user)) is None:
        raise HTTPException(404)
    message = q.new_message(conversation_id, body)
    session.add(message)
    session.commit()
    return MessageOut.model_validate(message)
