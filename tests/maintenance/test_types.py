"""Every common column type gives the same digest on SQLite and PostgreSQL, and survives an
export from one and an import into the other (the reference schema lacks some of them)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    ARRAY,
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Time,
    Uuid,
    insert,
)

from bastion import Database, UTCDateTime
from bastion.maintenance import export_database, import_database, table_digests
from bastion.maintenance.codec import decode_value, encode_value

PLUS_3 = dt.timezone(dt.timedelta(hours=3))

probe = MetaData()
typed = Table(
    "maint_probe_types",
    probe,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("flag", Boolean),
    Column("amount", Numeric(12, 3)),
    Column("ratio", Float),
    Column("day", Date),
    Column("moment", Time),
    Column("naive", DateTime),
    Column("aware", UTCDateTime),
    Column("blob", LargeBinary),
    Column("doc", JSON),
    Column("uid", Uuid),
    Column("code", String(20)),
    Column("note", Text),
)
keyless = Table(
    "maint_probe_log",
    probe,
    Column("message", Text),
    Column("n", Integer),
)

ROWS: list[dict[str, Any]] = [
    {
        "id": 1,
        "flag": True,
        "amount": Decimal("1234.500"),
        "ratio": 0.1,
        "day": dt.date(2026, 2, 28),
        "moment": dt.time(23, 59, 58, 5),
        "naive": dt.datetime(2026, 1, 1, 0, 0, 0),
        "aware": dt.datetime(2026, 6, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "blob": b"\x00\xff\x10",
        "doc": {"z": [1, 2.5, None, "é"], "a": {"nested": True}},
        "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "code": "Zebra",
        "note": "line\nbreak",
    },
    {"id": 2, "flag": False, "amount": Decimal("0"), "ratio": -2.0, "code": "apple"},
    {"id": 3},
]
LOG: list[dict[str, Any]] = [
    {"message": "b", "n": 2},
    {"message": "a", "n": None},
    {"message": None, "n": 1},
    {"message": "a", "n": 1},
]


@pytest.fixture
async def probe_dbs(sqlite_db: Database, postgres_db: Database) -> AsyncIterator[list[Database]]:
    databases = [sqlite_db, postgres_db]
    for database in databases:
        async with database.engine.begin() as connection:
            await connection.run_sync(probe.create_all)
    try:
        yield databases
    finally:
        for database in databases:
            async with database.engine.begin() as connection:
                await connection.run_sync(probe.drop_all)


async def fill(database: Database) -> None:
    async with database.write_connection() as connection:
        every_column = dict.fromkeys(typed.columns.keys())
        await connection.execute(insert(typed), [{**every_column, **row} for row in ROWS])
        await connection.execute(insert(keyless), LOG)


@pytest.mark.postgres
async def test_every_type_digests_the_same_on_both_backends(probe_dbs: list[Database]) -> None:
    for database in probe_dbs:
        await fill(database)

    on_sqlite, on_postgres = [await table_digests(database) for database in probe_dbs]

    assert on_sqlite == on_postgres
    assert on_sqlite["maint_probe_types"].rows == 3
    assert on_sqlite["maint_probe_log"].rows == 4


@pytest.mark.postgres
@pytest.mark.parametrize(
    "source_index", [0, 1], ids=["sqlite_to_postgresql", "postgresql_to_sqlite"]
)
async def test_every_type_moves_between_backends(
    probe_dbs: list[Database], tmp_path: Path, source_index: int
) -> None:
    source, target = probe_dbs[source_index], probe_dbs[1 - source_index]
    await fill(source)

    await export_database(source, tmp_path / "export")
    await import_database(target, tmp_path / "export")

    assert await table_digests(target) == await table_digests(source)


@pytest.mark.parametrize(
    ("value", "column_type", "canonical"),
    [
        (uuid.UUID(int=255), Uuid(), "000000000000000000000000000000ff"),
        (
            dt.datetime(2026, 1, 1, 3, tzinfo=dt.timezone(dt.timedelta(hours=3))),
            DateTime(),
            "2026-01-01T00:00:00+00:00",
        ),
        (dt.datetime(2026, 1, 1), DateTime(), "2026-01-01T00:00:00+00:00"),
        (Decimal("1.500"), Numeric(), "1.5"),
        (Decimal("-0.000"), Numeric(), "0"),
        (Decimal("1E+3"), Numeric(), "1000"),
        (float("nan"), Float(), "NaN"),
        (float("-inf"), Float(), "-Infinity"),
        (1, Boolean(), True),
        (b"\x00\xff", LargeBinary(), "AP8="),
        ({"b": 1}, JSON(), {"b": 1}),
        ("x", JSON(), "x"),
        ([Decimal("1.0"), None], ARRAY(Numeric()), ["1", None]),
        (ipaddress.ip_network("10.0.0.0/8"), String(), "10.0.0.0/8"),
        (dt.timedelta(minutes=1, microseconds=5), Interval(), 60.000005),
    ],
)
def test_canonical_forms(value: Any, column_type: Any, canonical: Any) -> None:
    assert encode_value(value, column_type) == canonical


@pytest.mark.parametrize(
    ("value", "column_type", "expected"),
    [
        ("yes", Boolean(), "expected a boolean"),
        ("12345", Uuid(), "expected a UUID"),
        (1.5, Integer(), "expected an integer"),
        (True, Integer(), "expected an integer"),
        ("1,5", Numeric(), "expected a decimal number"),
        ("not base64!", LargeBinary(), "expected base64 bytes"),
        (7, String(), "expected text"),
        ("2026-13-01", Date(), "expected an ISO-8601 date"),
    ],
)
def test_values_that_do_not_fit_their_column_are_refused(
    value: Any, column_type: Any, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        decode_value(value, column_type, "postgresql")
