"""Tables of the integration tests' own, created for one test and dropped after it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import pytest
from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bastion import Database, UTCDateTime


class ProbeBase(DeclarativeBase):
    pass


class Parent(ProbeBase):
    __tablename__ = "probe_parents"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    note: Mapped[str | None] = mapped_column(String(50))
    at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (CheckConstraint("length(name) < 20", name="probe_name_short"),)


class Child(ProbeBase):
    __tablename__ = "probe_children"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("probe_parents.id"))


@pytest.fixture
async def probe_tables(database: Database) -> AsyncIterator[Database]:
    async with database.engine.begin() as connection:
        await connection.run_sync(ProbeBase.metadata.create_all)
    yield database
    async with database.engine.begin() as connection:
        await connection.run_sync(ProbeBase.metadata.drop_all)
