"""The one error tree of Bastion, ordered by what the caller can do about it.

::

    BastionError
    ├── ConfigurationError          fix the settings; raised at start, never per request
    ├── DatabaseStateError          a Database used before start() or after close()
    ├── DatabaseUnavailableError    the database cannot be reached now: retry later (503)
    │   ├── PoolTimeoutError        no free connection within DB_POOL_TIMEOUT (503)
    │   └── CircuitOpenError        recent attempts all failed; refused at once (503)
    ├── OverloadedError             waited for a turn to run as long as it may; nothing ran (503)
    ├── TransactionConflictError    serialization failure, deadlock, busy: re-run the unit (503)
    ├── StatementTimeoutError       a statement ran past DB_STATEMENT_TIMEOUT; cancelled (503)
    ├── CommitOutcomeUnknownError   the connection died during COMMIT: the write may or may
    │                               not have happened; resolve it, do not blindly re-run (503)
    ├── IntegrityViolationError     the data breaks a rule the database enforces (422)
    │   ├── UniqueViolationError        a row with that key already exists (409)
    │   ├── ForeignKeyViolationError    the referenced parent does not exist (422)
    │   ├── NotNullViolationError       a required column is missing (422)
    │   └── CheckViolationError         a CHECK constraint failed (422)
    ├── NotFoundError               the thing asked for does not exist (or is not yours) (404)
    ├── StaleVersionError           optimistic lock: someone changed it first (412)
    ├── ConfirmationRequiredError   a destructive operation (restore, reset) was asked for
    │                               without its explicit confirmation (400)
    └── QueryError                  any other database error: a bug, not the caller's (500)
        └── ReadOnlyViolationError      a read unit tried to write (500)

``error.retryable`` says whether re-running the whole unit of work is safe *and* may succeed:
true for conflicts and for a connection lost before COMMIT; false for everything else,
including an unknown COMMIT outcome. :meth:`Database.run` retries on it.

Driver exceptions are translated into this tree at one seam (``bastion._translate``), from
machine-readable fields only (PostgreSQL SQLSTATE, SQLite extended result codes, SQLAlchemy's
``connection_invalidated``), and always chained with ``raise … from exc``. Messages never carry
SQL parameters, so they are safe to show to clients and to log.
"""

from __future__ import annotations

__all__ = [
    "BastionError",
    "CheckViolationError",
    "CircuitOpenError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConfirmationRequiredError",
    "DatabaseStateError",
    "DatabaseUnavailableError",
    "ForeignKeyViolationError",
    "IntegrityViolationError",
    "NotFoundError",
    "NotNullViolationError",
    "OverloadedError",
    "PoolTimeoutError",
    "QueryError",
    "ReadOnlyViolationError",
    "StaleVersionError",
    "StatementTimeoutError",
    "TransactionConflictError",
    "UniqueViolationError",
]


class BastionError(Exception):
    """Base of every error Bastion raises.

    Attributes:
        code: a stable machine-readable name (``"unique_violation"``), used in HTTP bodies.
        sqlstate: the driver's code when the error came from the database (PostgreSQL
            SQLSTATE such as ``"23505"``, or ``"SQLITE_CONSTRAINT_UNIQUE"``), else ``None``.
        constraint: the violated constraint's name when the driver reports it.
        retryable: whether re-running the whole unit of work is safe and may succeed (the
            class's default unless the translation knew better).
    """

    code = "database_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        constraint: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.constraint = constraint
        if retryable is not None:
            self.retryable = retryable


class ConfigurationError(BastionError):
    """Settings are invalid or incompatible; the message names the variable to fix."""

    code = "configuration_error"


class DatabaseStateError(BastionError):
    """The :class:`~bastion.Database` is not running (not started yet, or closed)."""

    code = "database_not_running"


class DatabaseUnavailableError(BastionError):
    """The database cannot be reached or refuses work right now; retrying later may succeed."""

    code = "database_unavailable"
    retryable = True


class PoolTimeoutError(DatabaseUnavailableError):
    """Every pooled connection stayed busy for the whole ``DB_POOL_TIMEOUT``.

    Not retried: the wait already used the caller's patience, and retrying adds load.
    """

    code = "pool_timeout"
    retryable = False


class CircuitOpenError(DatabaseUnavailableError):
    """The circuit breaker is open: recent attempts to reach the database all failed.

    Raised at once, without touching the pool, until the breaker lets a probe through.

    Attributes:
        retry_after_s: seconds until the breaker next lets a request try the database.
    """

    code = "circuit_open"
    retryable = False

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverloadedError(BastionError):
    """The request waited for its turn to run as long as it may, and did not run: too many
    were ahead of it (:class:`~bastion.fastapi.InFlightLimitMiddleware`'s ``max_wait_s``).

    Over HTTP it is a 503 with ``Retry-After``: nothing was done, so it is safe to repeat.
    """

    code = "overloaded"


class TransactionConflictError(BastionError):
    """The transaction lost a race (serialization failure, deadlock, SQLite busy).

    Nothing was written; re-running the whole unit of work is safe.
    """

    code = "transaction_conflict"
    retryable = True


class StatementTimeoutError(BastionError):
    """A statement ran longer than ``DB_STATEMENT_TIMEOUT`` and was cancelled.

    Its transaction was rolled back. Not retried automatically: a query that is slow now
    would most likely be slow again, and retrying multiplies the load that made it slow.
    """

    code = "statement_timeout"


class CommitOutcomeUnknownError(BastionError):
    """The connection was lost while COMMIT was in flight: the write may have been applied.

    Do not re-run the unit blindly; check whether it took effect (an idempotency key) first.
    Over HTTP it is a 500 *without* ``Retry-After``, so clients are not told to repeat it.
    """

    code = "commit_outcome_unknown"


class IntegrityViolationError(BastionError):
    """The data breaks a constraint the database enforces; nothing was written."""

    code = "integrity_violation"


class UniqueViolationError(IntegrityViolationError):
    """A row with the same unique key already exists."""

    code = "unique_violation"


class ForeignKeyViolationError(IntegrityViolationError):
    """A referenced row does not exist (or a referenced row is still in use)."""

    code = "foreign_key_violation"


class NotNullViolationError(IntegrityViolationError):
    """A required column was given no value."""

    code = "not_null_violation"


class CheckViolationError(IntegrityViolationError):
    """A CHECK constraint rejected the row."""

    code = "check_violation"


class NotFoundError(BastionError):
    """The requested row does not exist, or the caller may not know that it exists."""

    code = "not_found"


class ConfirmationRequiredError(BastionError):
    """A destructive operation (a restore, a reset) was asked for without its explicit
    confirmation; nothing was changed. The message says what confirms it."""

    code = "confirmation_required"


class StaleVersionError(BastionError):
    """An optimistic-lock update found a newer version than the caller had read."""

    code = "stale_version"


class QueryError(BastionError):
    """Any other database error, such as invalid SQL: a defect, not the caller's fault."""

    code = "query_error"


class ReadOnlyViolationError(QueryError):
    """A read unit tried to write; the database refused (or Bastion refused first)."""

    code = "read_only_violation"
