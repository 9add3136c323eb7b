"""A small model of the repository tests' own: parents and items with audit columns.

The tables are created for one test and dropped after it. Hypothesis tests are plain
functions that run each example in its own event loop and Database (fixtures are made once
per test, examples are many), emptying the tables first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import ForeignKey, Integer, String, delete
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from bastion import AuditMixin, Database, Repository
from tests.conftest import make_settings

ResultT = TypeVar("ResultT")


class RepoBase(DeclarativeBase):
    pass


class Shelf(RepoBase):
    __tablename__ = "repo_shelves"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(50))

    items: Mapped[list[Item]] = relationship(lazy="raise", back_populates="shelf")


class Item(AuditMixin, RepoBase):
    __tablename__ = "repo_items"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(10), default="x")
    score: Mapped[int] = mapped_column(Integer, default=0)
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("repo_shelves.id"))
    version: Mapped[int] = mapped_column(Integer, default=1)

    shelf: Mapped[Shelf | None] = relationship(lazy="raise", back_populates="items")


def items_repository(**overrides: Any) -> Repository[Item]:
    options: dict[str, Any] = {
        "name": "item",
        "scope": "owner",
        "filterable": ["kind", "score", "name", "created_at"],
        "sortable": ["score", "name", "created_at"],
    }
    options.update(overrides)
    return Repository(Item, **options)


async def create_tables(database: Database) -> None:
    async with database.engine.begin() as connection:
        await connection.run_sync(RepoBase.metadata.drop_all)
        await connection.run_sync(RepoBase.metadata.create_all)


async def drop_tables(database: Database) -> None:
    async with database.engine.begin() as connection:
        await connection.run_sync(RepoBase.metadata.drop_all)


async def empty_tables(database: Database) -> None:
    async with database.write_connection() as connection:
        await connection.execute(delete(Item))
        await connection.execute(delete(Shelf))


@pytest.fixture
async def db(database: Database) -> AsyncIterator[Database]:
    """A started Database with the repository tables, dropped afterwards."""
    await create_tables(database)
    yield database
    await drop_tables(database)


@pytest.fixture
def repo_url(database_url: str) -> Iterator[str]:
    """A database URL with the repository tables, for tests that start their own loops."""

    async def with_database(work: Callable[[Database], Awaitable[None]]) -> None:
        async with Database(make_settings(database_url)) as database:
            await work(database)

    asyncio.run(with_database(create_tables))
    yield database_url
    asyncio.run(with_database(drop_tables))


def run_example(url: str, work: Callable[[Database], Awaitable[ResultT]]) -> ResultT:
    """Run ``work`` on a fresh Database over emptied tables, in an event loop of its own."""

    async def example() -> ResultT:
        async with Database(make_settings(url)) as database:
            await empty_tables(database)
            result = await work(database)
            assert database.pool_status().checked_out == 0
            return result

    return asyncio.run(example())


class SteppingClock:
    """A clock that moves on only when told to."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
