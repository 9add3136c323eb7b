"""The one seam where driver exceptions become Bastion errors.

Classification reads machine-readable fields only — PostgreSQL SQLSTATE, SQLite extended
result codes, SQLAlchemy's ``connection_invalidated`` — never message text, which changes with
server versions and locales. The tables are data so that tests can walk them.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from sqlalchemy import exc as sa_exc

from bastion.errors import (
    BastionError,
    CheckViolationError,
    CommitOutcomeUnknownError,
    DatabaseUnavailableError,
    ForeignKeyViolationError,
    IntegrityViolationError,
    NotNullViolationError,
    PoolTimeoutError,
    QueryError,
    ReadOnlyViolationError,
    StatementTimeoutError,
    TransactionConflictError,
    UniqueViolationError,
)

__all__ = ["POSTGRES_SQLSTATES", "SQLITE_CODES", "translate_error"]

# Exact SQLSTATEs first; a missing code falls back to its two-character class below.
POSTGRES_SQLSTATES: Final[dict[str, type[BastionError]]] = {
    "23505": UniqueViolationError,
    "23P01": UniqueViolationError,  # exclusion constraint: an overlapping row exists
    "23503": ForeignKeyViolationError,
    "23502": NotNullViolationError,
    "23514": CheckViolationError,
    "40001": TransactionConflictError,  # serialization_failure
    "40P01": TransactionConflictError,  # deadlock_detected
    "55P03": TransactionConflictError,  # lock_not_available (NOWAIT / lock_timeout)
    "57014": StatementTimeoutError,  # query_canceled: statement_timeout (or a cancel request)
    "57P01": DatabaseUnavailableError,  # admin_shutdown
    "57P02": DatabaseUnavailableError,  # crash_shutdown
    "57P03": DatabaseUnavailableError,  # cannot_connect_now (starting up / recovering)
    "53300": DatabaseUnavailableError,  # too_many_connections
    "28000": DatabaseUnavailableError,  # invalid_authorization_specification
    "28P01": DatabaseUnavailableError,  # invalid_password
    "3D000": DatabaseUnavailableError,  # invalid_catalog_name: the database does not exist
    "25006": ReadOnlyViolationError,  # read_only_sql_transaction: a write in a read unit
}
POSTGRES_SQLSTATE_CLASSES: Final[dict[str, type[BastionError]]] = {
    "08": DatabaseUnavailableError,  # connection exception
    "23": IntegrityViolationError,
    "40": TransactionConflictError,
    "53": DatabaseUnavailableError,  # insufficient resources
    "58": DatabaseUnavailableError,  # system error (I/O)
}

# SQLite extended result codes (https://sqlite.org/rescode.html), then primary codes.
SQLITE_CODES: Final[dict[int, type[BastionError]]] = {
    2067: UniqueViolationError,  # SQLITE_CONSTRAINT_UNIQUE
    1555: UniqueViolationError,  # SQLITE_CONSTRAINT_PRIMARYKEY
    787: ForeignKeyViolationError,  # SQLITE_CONSTRAINT_FOREIGNKEY
    1299: NotNullViolationError,  # SQLITE_CONSTRAINT_NOTNULL
    275: CheckViolationError,  # SQLITE_CONSTRAINT_CHECK
    19: IntegrityViolationError,  # SQLITE_CONSTRAINT
    5: TransactionConflictError,  # SQLITE_BUSY (and BUSY_SNAPSHOT, BUSY_RECOVERY)
    6: TransactionConflictError,  # SQLITE_LOCKED
    8: ReadOnlyViolationError,  # SQLITE_READONLY: query_only, on a read unit's connection
    9: StatementTimeoutError,  # SQLITE_INTERRUPT: the statement deadline's progress handler
    10: DatabaseUnavailableError,  # SQLITE_IOERR
    11: DatabaseUnavailableError,  # SQLITE_CORRUPT
    13: DatabaseUnavailableError,  # SQLITE_FULL
    14: DatabaseUnavailableError,  # SQLITE_CANTOPEN
    26: DatabaseUnavailableError,  # SQLITE_NOTADB
}

_DESCRIPTIONS: Final[dict[type[BastionError], str]] = {
    UniqueViolationError: "a row with the same unique key already exists",
    ForeignKeyViolationError: "a referenced row does not exist",
    NotNullViolationError: "a required value is missing",
    CheckViolationError: "a check constraint rejected the row",
    IntegrityViolationError: "the row violates a database constraint",
    TransactionConflictError: "the transaction conflicted with another one; retry it",
    DatabaseUnavailableError: "the database is unavailable",
    PoolTimeoutError: "no database connection became free in time",
    StatementTimeoutError: "the statement took too long and was cancelled",
    QueryError: "the database rejected the statement",
    ReadOnlyViolationError: "a read unit cannot write; use a write unit",
}


def translate_error(exc: BaseException, *, during_commit: bool = False) -> BastionError | None:
    """Return the Bastion error for a driver-level ``exc``, or ``None`` if it is not one.

    ``during_commit`` marks an error raised by COMMIT itself: a lost connection there makes
    the outcome unknown (:class:`CommitOutcomeUnknownError`) rather than merely unavailable.
    The caller raises the result ``from exc``.
    """
    if isinstance(exc, StatementTimeoutError) and during_commit:
        # The client gave up on COMMIT: the server may have committed meanwhile.
        return _commit_outcome_unknown(exc.sqlstate)
    if isinstance(exc, BastionError):
        return exc
    if isinstance(exc, sa_exc.TimeoutError):
        return PoolTimeoutError(_DESCRIPTIONS[PoolTimeoutError])
    if isinstance(exc, sa_exc.DBAPIError):
        return _translate_dbapi_error(exc, during_commit=during_commit)
    # Anything else (OSError, TimeoutError, …) is the application's own: connection failures
    # were already turned into DatabaseUnavailableError where the connection is opened.
    return None


def _translate_dbapi_error(exc: sa_exc.DBAPIError, *, during_commit: bool) -> BastionError:
    original = exc.orig
    sqlstate, error_type = _classify(original)
    if exc.connection_invalidated or (
        error_type is DatabaseUnavailableError
        and (sqlstate is None or sqlstate.startswith(("08", "57P")))
    ):
        if during_commit:
            return _commit_outcome_unknown(sqlstate)
        return DatabaseUnavailableError(_DESCRIPTIONS[DatabaseUnavailableError], sqlstate=sqlstate)
    if error_type is DatabaseUnavailableError:
        # Refused rather than lost (bad credentials, no such database, out of resources):
        # only the settings or the operator can fix that, not another attempt right away.
        retryable = sqlstate is not None and sqlstate.startswith("53")
        message = _DISK_FULL if _disk_full(original, sqlstate) else None
        return DatabaseUnavailableError(
            message or _DESCRIPTIONS[DatabaseUnavailableError],
            sqlstate=sqlstate,
            retryable=retryable,
        )
    if error_type is None:
        error_type = QueryError
    constraint = getattr(getattr(original, "__cause__", None), "constraint_name", None)
    message = _DESCRIPTIONS.get(error_type, _DESCRIPTIONS[QueryError])
    if constraint:
        message = f"{message} ({constraint})"
    return error_type(message, sqlstate=sqlstate, constraint=constraint)


_DISK_FULL: Final = "the database's disk is full: the write was not made; free space, then retry"
_SQLITE_FULL: Final = 13
_POSTGRES_DISK_FULL: Final = "53100"


def _disk_full(original: BaseException | None, sqlstate: str | None) -> bool:
    """Whether the server refused for want of disk space (SQLite's ``SQLITE_FULL``,
    PostgreSQL's ``disk_full``): a cause the operator must be told by name."""
    if isinstance(original, sqlite3.Error):
        return (getattr(original, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_FULL
    return sqlstate == _POSTGRES_DISK_FULL


def _commit_outcome_unknown(sqlstate: str | None) -> CommitOutcomeUnknownError:
    return CommitOutcomeUnknownError(
        "the connection was lost during COMMIT; the write may or may not have been applied",
        sqlstate=sqlstate,
    )


def _classify(original: BaseException | None) -> tuple[str | None, type[BastionError] | None]:
    """The driver code of ``original`` and the Bastion error type it maps to."""
    if isinstance(original, sqlite3.Error):
        code = getattr(original, "sqlite_errorcode", None)
        name = getattr(original, "sqlite_errorname", None)
        if code is None:
            # Errors raised by the sqlite3 module itself (closed connection, misuse) carry no
            # result code.
            return None, None
        error_type = SQLITE_CODES.get(code) or SQLITE_CODES.get(code & 0xFF)
        return name, error_type
    sqlstate = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    if not isinstance(sqlstate, str):
        return None, None
    error_type = POSTGRES_SQLSTATES.get(sqlstate) or POSTGRES_SQLSTATE_CLASSES.get(sqlstate[:2])
    return sqlstate, error_type
