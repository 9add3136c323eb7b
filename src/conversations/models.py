"""Tables of the conversation store: users, their API keys, conversations, messages, sources.

Relationships load only when asked for (``lazy="raise"``): an implicit lazy load under
asyncio fails deep inside a response serialiser; here it fails at once, where it is written.
Every filter and sort the API offers has an index that starts with the owner, because every
query is scoped to one.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from bastion import AuditMixin, UTCDateTime, audit_now, idempotency_table, utcnow

__all__ = [
    "ApiKey",
    "Base",
    "Conversation",
    "Message",
    "MessageSource",
    "User",
    "idempotency_keys",
]

# Predictable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigIntegerKey = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """An API key, stored only as the SHA-256 of the key (keys are 256-bit random)."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_api_keys_user_id", "user_id"),)


class Conversation(AuditMixin, Base):
    """A conversation; soft-deleted (``deleted_at``), versioned, audited (who and when)."""

    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="active")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONDocument, default=dict)
    message_count: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)

    __table_args__ = (
        CheckConstraint("status IN ('active', 'archived')", name="status"),
        Index("ix_conversations_owner_created", "owner_id", "created_at", "id"),
        Index("ix_conversations_owner_updated", "owner_id", "updated_at", "id"),
        Index("ix_conversations_owner_status_created", "owner_id", "status", "created_at"),
        Index("ix_conversations_owner_title", "owner_id", "title"),
        Index("ix_conversations_owner_deleted_created", "owner_id", "deleted_at", "created_at"),
    )


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigIntegerKey, primary_key=True, autoincrement=True)
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONDocument, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=audit_now)

    sources: Mapped[list[MessageSource]] = relationship(
        lazy="raise", order_by="MessageSource.position", cascade="all, delete-orphan"
    )

    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant', 'system')", name="role"),
        # Keyset pagination walks (conversation_id, id).
        Index("ix_messages_conversation_id", "conversation_id", "id"),
    )


class MessageSource(Base):
    __tablename__ = "message_sources"

    message_id: Mapped[int] = mapped_column(
        BigIntegerKey, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    title: Mapped[str | None] = mapped_column(String(500))


idempotency_keys = idempotency_table(Base.metadata)
"""Responses of POSTs sent with an ``Idempotency-Key``, per user (see bastion.idempotency)."""
