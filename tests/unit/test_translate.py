"""The classification tables: every driver code lands on the error the caller can act on.

The driver exceptions are built here (with the codes real servers send) because some of
them — a crash shutdown, a full disk — cannot be provoked on a shared test server; the
integration tests provoke the common ones for real.
"""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy.exc import DBAPIError, OperationalError

from bastion import (
    CheckViolationError,
    CommitOutcomeUnknownError,
    DatabaseUnavailableError,
    ForeignKeyViolationError,
    IntegrityViolationError,
    NotNullViolationError,
    QueryError,
    ReadOnlyViolationError,
    StatementTimeoutError,
    TransactionConflictError,
    UniqueViolationError,
)
from bastion._translate import POSTGRES_SQLSTATES, SQLITE_CODES, translate_error


class PostgresDriverError(Exception):
    """Stands in for asyncpg's adapted error: what matters is its ``sqlstate``."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"server error {sqlstate}")
        self.sqlstate = sqlstate


def wrapped(original: Exception, *, invalidated: bool = False) -> DBAPIError:
    return DBAPIError(
        "SELECT 1", {"secret": "hunter2"}, original, connection_invalidated=invalidated
    )


def sqlite_error(code: int) -> sqlite3.Error:
    error = sqlite3.OperationalError(f"sqlite error {code}")
    error.sqlite_errorcode = code
    error.sqlite_errorname = f"CODE_{code}"
    return error


@pytest.mark.parametrize(("sqlstate", "expected"), sorted(POSTGRES_SQLSTATES.items()))
def test_every_listed_sqlstate_maps_to_its_error(sqlstate: str, expected: type[Exception]) -> None:
    translated = translate_error(wrapped(PostgresDriverError(sqlstate)))
    assert type(translated) is expected
    assert translated.sqlstate == sqlstate  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        ("08006", DatabaseUnavailableError),  # connection_failure: class 08
        ("23000", IntegrityViolationError),  # integrity class, no exact entry
        ("40002", TransactionConflictError),  # class 40
        ("53100", DatabaseUnavailableError),  # disk_full: class 53
        ("42601", QueryError),  # syntax_error: never retried
        ("22003", QueryError),  # numeric_value_out_of_range
    ],
)
def test_unlisted_sqlstates_fall_back_to_their_class(
    sqlstate: str, expected: type[Exception]
) -> None:
    assert type(translate_error(wrapped(PostgresDriverError(sqlstate)))) is expected


@pytest.mark.parametrize(("code", "expected"), sorted(SQLITE_CODES.items()))
def test_every_listed_sqlite_code_maps_to_its_error(code: int, expected: type[Exception]) -> None:
    assert type(translate_error(wrapped(sqlite_error(code)))) is expected


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (517, TransactionConflictError),
        (261, TransactionConflictError),
        (2835, IntegrityViolationError),
    ],
)
def test_extended_sqlite_codes_fall_back_to_their_primary_code(
    code: int, expected: type[Exception]
) -> None:
    # 517 BUSY_SNAPSHOT and 261 BUSY_RECOVERY are BUSY; 2835 (CONSTRAINT_ROWID) is CONSTRAINT.
    assert type(translate_error(wrapped(sqlite_error(code)))) is expected


def test_a_lost_connection_during_commit_is_an_unknown_outcome() -> None:
    lost = wrapped(PostgresDriverError("08003"), invalidated=True)
    assert type(translate_error(lost)) is DatabaseUnavailableError
    assert type(translate_error(lost, during_commit=True)) is CommitOutcomeUnknownError


def test_a_constraint_error_during_commit_stays_a_constraint_error() -> None:
    deferred = wrapped(PostgresDriverError("23503"))
    assert type(translate_error(deferred, during_commit=True)) is ForeignKeyViolationError


@pytest.mark.parametrize(
    "foreign", [FileNotFoundError("config.yaml"), TimeoutError(), ValueError("x"), KeyError("k")]
)
def test_errors_that_are_not_the_databases_are_left_alone(foreign: Exception) -> None:
    assert translate_error(foreign) is None


def test_messages_never_carry_statement_parameters() -> None:
    for error in (PostgresDriverError("23505"), sqlite_error(2067)):
        translated = translate_error(wrapped(error))
        assert translated is not None
        assert "hunter2" not in translated.message


def test_the_tables_only_name_errors_a_caller_can_act_on() -> None:
    allowed = {
        UniqueViolationError,
        ForeignKeyViolationError,
        NotNullViolationError,
        CheckViolationError,
        IntegrityViolationError,
        TransactionConflictError,
        DatabaseUnavailableError,
        ReadOnlyViolationError,
        StatementTimeoutError,
        QueryError,
    }
    assert set(POSTGRES_SQLSTATES.values()) | set(SQLITE_CODES.values()) <= allowed
    assert isinstance(
        translate_error(OperationalError("x", {}, sqlite3.Error("no code"))), QueryError
    )


# The retry policy of the resilience issue: which codes re-run the unit and which never do.
RETRIED_SQLSTATES = [
    "40001",
    "40P01",
    "08000",
    "08003",
    "08006",
    "57P01",
    "57P02",
    "57P03",
    "53300",
]
NEVER_RETRIED_SQLSTATES = [
    "23505", "23503", "23502", "23514", "23P01", "42601", "42P01", "42703",
    "28P01", "3D000", "25006", "57014", "22001", "XX000",
]  # fmt: skip


@pytest.mark.parametrize("sqlstate", RETRIED_SQLSTATES)
def test_conflicts_and_lost_connections_are_retryable(sqlstate: str) -> None:
    translated = translate_error(wrapped(PostgresDriverError(sqlstate)))
    assert translated is not None
    assert translated.retryable


@pytest.mark.parametrize("sqlstate", NEVER_RETRIED_SQLSTATES)
def test_data_syntax_auth_and_timeouts_are_never_retried(sqlstate: str) -> None:
    translated = translate_error(wrapped(PostgresDriverError(sqlstate)))
    assert translated is not None
    assert not translated.retryable


SQLITE_RETRYABLE = [(5, True), (6, True), (517, True), (9, False), (2067, False), (13, False)]


@pytest.mark.parametrize(("code", "retryable"), SQLITE_RETRYABLE)
def test_sqlite_busy_and_locked_are_retryable_and_nothing_else_is(
    code: int, retryable: bool
) -> None:
    translated = translate_error(wrapped(sqlite_error(code)))
    assert translated is not None
    assert translated.retryable is retryable


def test_a_lost_connection_is_retryable_before_commit_and_ambiguous_during_it() -> None:
    lost = wrapped(PostgresDriverError("08006"), invalidated=True)
    before = translate_error(lost)
    during = translate_error(lost, during_commit=True)
    assert isinstance(before, DatabaseUnavailableError)
    assert before.retryable
    assert isinstance(during, CommitOutcomeUnknownError)
    assert not during.retryable


def test_a_client_side_timeout_during_commit_is_ambiguous() -> None:
    timeout = StatementTimeoutError("no answer")
    assert isinstance(translate_error(timeout, during_commit=True), CommitOutcomeUnknownError)
    assert translate_error(timeout) is timeout


@pytest.mark.parametrize(
    "original", [sqlite_error(13), sqlite_error(13 | 256), PostgresDriverError("53100")]
)
def test_a_full_disk_is_named_as_such(original: Exception) -> None:
    translated = translate_error(wrapped(original))
    assert type(translated) is DatabaseUnavailableError
    assert "disk is full" in str(translated)
    assert "hunter2" not in str(translated)


def test_other_unavailability_keeps_the_general_message() -> None:
    for original in (sqlite_error(10), PostgresDriverError("53200")):  # IOERR, out of memory
        assert "disk" not in str(translate_error(wrapped(original)))
