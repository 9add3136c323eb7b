"""Integrity checks: is the database file / are the indexes sound, is every child's parent there?

* SQLite: ``PRAGMA integrity_check`` (pages, indexes, constraints) and
  ``PRAGMA foreign_key_check`` (child rows whose parent is missing — possible whenever
  ``foreign_keys`` was off while writing).
* PostgreSQL: indexes marked invalid (a failed ``CREATE INDEX CONCURRENTLY``), amcheck's
  ``bt_index_check`` on every B-tree index of the user tables, when the
  extension is installed (with ``install_amcheck=True`` it is created first, which needs the
  right to ``CREATE EXTENSION``; otherwise its absence is reported as *info*, not a failure),
  and, for every foreign key found by reflection, a count of child rows whose parent is missing
  (possible after constraints were disabled, e.g. ``session_replication_role = replica``).

A database that is too damaged to be read at all is reported, not raised: the check's job is
to say so.

>>> report = await check_integrity(db)  # doctest: +SKIP
>>> report.ok, [problem.detail for problem in report.problems]  # doctest: +SKIP
(True, ['amcheck is not installed: B-tree indexes not checked ...'])
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from sqlalchemy import ForeignKeyConstraint, and_, func, literal, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.database import Database
from bastion.maintenance.tables import reflect_tables, user_tables

__all__ = ["IntegrityProblem", "IntegrityReport", "check_integrity"]

Severity = Literal["error", "info"]

# Enough to show what is wrong without flooding a terminal with a whole corrupt file's list.
MAX_SQLITE_MESSAGES: Final = 100

_BTREE_INDEXES = text(
    "SELECT i.indexrelid::regclass::text AS index_name, t.relname AS table_name "
    "FROM pg_index i "
    "JOIN pg_class t ON t.oid = i.indrelid "
    "JOIN pg_namespace n ON n.oid = t.relnamespace "
    "JOIN pg_class ic ON ic.oid = i.indexrelid "
    "JOIN pg_am am ON am.oid = ic.relam "
    "WHERE n.nspname = current_schema() AND am.amname = 'btree' AND i.indisvalid "
    "AND t.relname <> 'alembic_version' ORDER BY t.relname, index_name"
)


_INVALID_INDEXES = text(
    "SELECT i.indexrelid::regclass::text AS index_name, t.relname AS table_name "
    "FROM pg_index i "
    "JOIN pg_class t ON t.oid = i.indrelid "
    "JOIN pg_namespace n ON n.oid = t.relnamespace "
    "WHERE n.nspname = current_schema() AND NOT i.indisvalid ORDER BY index_name"
)


@dataclass(frozen=True, slots=True)
class IntegrityProblem:
    """One finding: which check, on which table (if any), what it found, how bad it is."""

    check: str
    table: str | None
    detail: str
    severity: Severity = "error"


@dataclass(frozen=True, slots=True)
class IntegrityReport:
    """The outcome of :func:`check_integrity`: ``ok`` unless a finding is an error."""

    backend: str
    checks: list[str]
    problems: list[IntegrityProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No finding of severity ``error`` (informational findings do not count)."""
        return not any(problem.severity == "error" for problem in self.problems)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``ok``, ``backend``, ``checks`` and ``problems``."""
        return {"ok": self.ok, **asdict(self)}


async def check_integrity(
    target: AsyncConnection | Database, *, install_amcheck: bool = False, quick: bool = False
) -> IntegrityReport:
    """Check the database's integrity; findings are reported, not raised.

    ``quick`` runs SQLite's ``quick_check`` instead of ``integrity_check``: it skips checking
    that indexes match their tables, and is much faster on a big file.

    ``target`` is a connection or a running Database (on PostgreSQL checked in a write unit,
    since creating amcheck and the savepoint around each index check need a transaction; on
    SQLite in a read unit, so writers are not held up).

    Raises:
        DatabaseUnavailableError, QueryError: the database could not be reached or queried
            at all (a Database target raises them translated).
    """
    if isinstance(target, AsyncConnection):
        return await _check(target, install_amcheck=install_amcheck, quick=quick)
    unit = target.read_connection if target.backend == "sqlite" else target.write_connection
    async with unit() as connection:
        return await _check(connection, install_amcheck=install_amcheck, quick=quick)


async def _check(
    connection: AsyncConnection, *, install_amcheck: bool, quick: bool
) -> IntegrityReport:
    if connection.dialect.name == "sqlite":
        return await _check_sqlite(connection, quick=quick)
    return await _check_postgres(connection, install_amcheck=install_amcheck)


async def _check_sqlite(connection: AsyncConnection, *, quick: bool) -> IntegrityReport:
    pragma = "quick_check" if quick else "integrity_check"
    report = IntegrityReport("sqlite", [pragma, "foreign_key_check"])
    try:
        messages = (
            await connection.exec_driver_sql(f"PRAGMA {pragma}({MAX_SQLITE_MESSAGES})")
        ).scalars()
        for message in messages:
            if message != "ok":
                report.problems.append(IntegrityProblem(pragma, None, str(message)))
    except sa_exc.DBAPIError as exc:
        report.problems.append(IntegrityProblem(pragma, None, _driver_message(exc)))
        return report  # a file SQLite cannot read has no foreign keys worth checking
    try:
        orphans = (await connection.exec_driver_sql("PRAGMA foreign_key_check")).all()
    except sa_exc.DBAPIError as exc:
        report.problems.append(IntegrityProblem("foreign_key_check", None, _driver_message(exc)))
        return report
    # One finding per (child, parent) pair with its count, not one per orphaned row.
    counts = Counter((str(row.table), str(row.parent)) for row in orphans)
    for (child, parent), count in sorted(counts.items()):
        report.problems.append(
            IntegrityProblem(
                "foreign_key_check", child, f"{count} row(s) refer to a missing {parent} row"
            )
        )
    return report


async def _check_postgres(connection: AsyncConnection, *, install_amcheck: bool) -> IntegrityReport:
    report = IntegrityReport("postgresql", ["invalid_indexes", "orphan_rows"])
    for index_name, table_name in (await connection.execute(_INVALID_INDEXES)).all():
        # Left behind by a CREATE INDEX CONCURRENTLY that failed: never used, still updated.
        detail = f"index {index_name} is invalid: drop it and create it again"
        report.problems.append(IntegrityProblem("invalid_indexes", table_name, detail))
    if await _amcheck_ready(connection, install=install_amcheck):
        report.checks.insert(0, "amcheck")
        for index_name, table_name in (await connection.execute(_BTREE_INDEXES)).all():
            try:
                async with connection.begin_nested():
                    await connection.execute(
                        text("SELECT bt_index_check(CAST(:index AS regclass))"),
                        {"index": index_name},
                    )
            except sa_exc.DBAPIError as exc:
                detail = f"index {index_name}: {_driver_message(exc)}"
                report.problems.append(IntegrityProblem("amcheck", table_name, detail))
    else:
        report.problems.append(
            IntegrityProblem(
                "amcheck",
                None,
                "amcheck is not installed: B-tree indexes not checked "
                "(CREATE EXTENSION amcheck, or pass install_amcheck / --install-amcheck)",
                severity="info",
            )
        )
    await _check_orphans(connection, report)
    return report


async def _amcheck_ready(connection: AsyncConnection, *, install: bool) -> bool:
    installed = text("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'")
    if await connection.scalar(installed) is not None:
        return True
    if not install:
        return False
    try:
        async with connection.begin_nested():
            await connection.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS amcheck")
    except sa_exc.DBAPIError:
        return False  # not allowed, or not shipped with this server: reported as info
    return True


async def _check_orphans(connection: AsyncConnection, report: IntegrityReport) -> None:
    metadata = await reflect_tables(connection)
    for child in user_tables(metadata):
        for constraint in sorted(child.foreign_key_constraints, key=lambda fk: str(fk.name or "")):
            count = await connection.scalar(_orphan_count(constraint))
            if count:
                parent = constraint.referred_table.name
                report.problems.append(
                    IntegrityProblem(
                        "orphan_rows", child.name, f"{count} row(s) refer to a missing {parent} row"
                    )
                )


def _orphan_count(constraint: ForeignKeyConstraint) -> Any:
    """``SELECT count(*)`` of child rows with a full key that no parent row has."""
    child = constraint.table
    # Aliased so that a table referring to itself is compared with another copy of itself.
    parent = constraint.referred_table.alias("parent")
    pairs = [(element.parent, parent.c[element.column.name]) for element in constraint.elements]
    parent_row = (
        select(literal(1))
        .select_from(parent)
        .where(and_(*(theirs == ours for ours, theirs in pairs)))
        .correlate(child)
    )
    has_key = and_(*(ours.is_not(None) for ours, _ in pairs))
    return select(func.count()).select_from(child).where(has_key, ~parent_row.exists())


def _driver_message(exc: sa_exc.DBAPIError) -> str:
    # The driver's own words (e.g. "database disk image is malformed"), without SQL or
    # parameters, which SQLAlchemy appends to str(exc).
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
