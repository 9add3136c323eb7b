"""What a unit of work costs by itself, and what the lean write path saves (findings 13, 14).

``python -m bench.unit_costs [--backend sqlite|postgresql] [--requests N]`` opens a
``Database`` on a scratch database (PostgreSQL: one of its own, dropped after) and prints CPU
microseconds per unit, medians of interleaved rounds, with no HTTP and no FastAPI:

* ``read unit, empty``: ``async with db.read_connection(): pass``;
* ``read unit, 1 SELECT`` and ``2 SELECTs``: the same with ``SELECT 1`` run in it;
* ``SELECT in a long unit``: one ``SELECT 1`` of many run in one unit;
* ``driver SELECT``: the same statement on the bare driver (asyncpg ``fetchval``, sqlite3);
* ``write unit, lean`` / ``write unit, SQLAlchemy``: a ``Repository.create`` and an
  ``update`` with an increment in one write unit, with the lean write path on and off
  (SQLite write units always take SQLAlchemy's path, so both rows are the same there).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import asyncpg
import uvloop
from sqlalchemy import BigInteger, Integer, Text, literal, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bastion import Database, Repository, load_settings
from bench.layers import parse_options

ROUNDS: Final = 5
SELECT_ONE: Final = select(literal(1))


class _Base(DeclarativeBase):
    pass


class _Counter(_Base):
    __tablename__ = "bench_unit_counters"
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True
    )
    label: Mapped[str] = mapped_column(Text)
    hits: Mapped[int] = mapped_column(Integer)


COUNTERS: Final = Repository(_Counter, name="counter")


async def _per_unit(work: Callable[[], Awaitable[None]], units: int) -> float:
    started = time.process_time()
    for _ in range(units):
        await work()
    return (time.process_time() - started) / units * 1e6


async def measure(url: str, units: int) -> dict[str, float]:
    """CPU µs per unit for each case of the module docstring (medians of interleaved rounds)."""
    os.environ["DATABASE_URL"] = url
    async with Database(load_settings()) as db:
        async with db.write_connection() as connection:
            await connection.run_sync(_Base.metadata.drop_all)
            await connection.run_sync(_Base.metadata.create_all)
        lean_writes = db._lean_writes

        async def read_unit(statements: int) -> None:
            async with db.read_connection() as connection:
                for _ in range(statements):
                    await connection.scalar(SELECT_ONE)

        async def write_unit_with(lean: bool) -> None:
            db._lean_writes = lean_writes if lean else None
            async with db.write_connection() as connection:
                row = await COUNTERS.create(connection, {"label": "x", "hits": 0})
                await COUNTERS.update(connection, row["id"], {}, increment={"hits": 1})

        async def select_in_long_unit() -> float:
            async with db.read_connection() as connection:

                async def one_select() -> None:
                    await connection.scalar(SELECT_ONE)

                await _per_unit(one_select, 100)  # statements cached, connection warm
                return await _per_unit(one_select, units)

        cases: dict[str, Callable[[], Awaitable[None]]] = {
            "read unit, empty": lambda: read_unit(0),
            "read unit, 1 SELECT": lambda: read_unit(1),
            "read unit, 2 SELECTs": lambda: read_unit(2),
            "write unit, lean": lambda: write_unit_with(lean=True),
            "write unit, SQLAlchemy": lambda: write_unit_with(lean=False),
        }
        costs: dict[str, list[float]] = {name: [] for name in cases}
        long_unit: list[float] = []
        driver: list[float] = []
        async with _driver_select(url) as driver_select:
            for work in cases.values():  # warm up: pools filled, statements cached
                await _per_unit(work, 100)
            for _ in range(ROUNDS):
                for name, work in cases.items():
                    costs[name].append(await _per_unit(work, units))
                long_unit.append(await select_in_long_unit())
                driver.append(await _per_unit(driver_select, units))
        db._lean_writes = lean_writes
        async with db.write_connection() as connection:
            await connection.run_sync(_Base.metadata.drop_all)
    medians = {name: statistics.median(values) for name, values in costs.items()}
    medians["SELECT in a long unit"] = statistics.median(long_unit)
    medians["driver SELECT"] = statistics.median(driver)
    return medians


@asynccontextmanager
async def _driver_select(url: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """``SELECT 1`` on the bare driver (asyncpg, or sqlite3), on a connection of its own."""
    if url.startswith("postgresql"):
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))

        async def on_asyncpg() -> None:
            await connection.fetchval("SELECT 1")

        try:
            yield on_asyncpg
        finally:
            await connection.close()
        return
    bare = sqlite3.connect(url.split("///", 1)[1])

    async def on_sqlite3() -> None:
        bare.execute("SELECT 1").fetchone()

    try:
        yield on_sqlite3
    finally:
        bare.close()


def main() -> None:
    options = parse_options(__doc__, default_requests=2000)
    with tempfile.TemporaryDirectory(prefix="bastion_unit_costs-") as tmp:
        name = "bastion_unit_costs"
        if options.backend == "postgresql":
            from bench.run import create_postgres_database, drop_postgres_database

            url = asyncio.run(create_postgres_database(name))
            url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        else:
            url = f"sqlite+aiosqlite:///{Path(tmp) / name}.db"
        try:
            costs: dict[str, Any] = uvloop.run(measure(url, options.requests))
        finally:
            if options.backend == "postgresql":
                asyncio.run(drop_postgres_database(name))
    print(f"{options.backend}: CPU us per unit (per statement for the last two), medians")
    for case, cost in costs.items():
        print(f"  {case:24} {cost:8.1f}")


if __name__ == "__main__":
    main()
