"""Bastion: an async database layer for FastAPI/ASGI services.

The core (this package) never imports FastAPI; the FastAPI glue is in :mod:`bastion.fastapi`.

>>> settings = load_settings()                      # DATABASE_URL, DB_POOL_SIZE, …
>>> async with Database(settings) as db:            # doctest: +SKIP
...     async with db.write() as session:           # commits when the block ends
...         session.add(Note(text="hello"))
"""

from bastion.breaker import BreakerSnapshot, BreakerState, CircuitBreaker, is_outage
from bastion.bulk import BulkResult, FailedRow, bulk_insert
from bastion.connection_leaks import HeldConnection, LeakDetector
from bastion.database import Database, DatabaseState, PoolStatus
from bastion.errors import (
    BastionError,
    CheckViolationError,
    CircuitOpenError,
    CommitOutcomeUnknownError,
    ConfigurationError,
    DatabaseStateError,
    DatabaseUnavailableError,
    ForeignKeyViolationError,
    IntegrityViolationError,
    NotFoundError,
    NotNullViolationError,
    PoolTimeoutError,
    QueryError,
    ReadOnlyViolationError,
    StaleVersionError,
    StatementTimeoutError,
    TransactionConflictError,
    UniqueViolationError,
)
from bastion.fingerprint import fingerprint
from bastion.health import (
    ComponentHealth,
    HealthCheck,
    HealthChecker,
    HealthReport,
    HealthStatus,
)
from bastion.idempotency import (
    IdempotencyKeyReusedError,
    IdempotencyStore,
    StoredResponse,
    idempotency_table,
    request_fingerprint,
)
from bastion.inspection import (
    DatabaseInfo,
    TableInfo,
    inspect_database,
    server_version,
    sqlite_file_sizes,
)
from bastion.loop_lag import LoopLag, LoopLagMonitor
from bastion.metrics import FingerprintStats, MetricsHistory, MetricsSnapshot, QueryMetrics
from bastion.request_context import RequestContext, current_request, install_request_id_logging
from bastion.settings import DatabaseSettings, load_settings
from bastion.tracing import instrument_tracing
from bastion.types import UTCDateTime, utcnow
from bastion.urls import Backend, normalise_database_url
from bastion.validation import (
    HttpUrlText,
    JSONObject,
    SafeText,
    UTCTimestamp,
    check_http_url,
    check_json_object,
    check_safe_text,
    to_utc,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BastionError",
    "BreakerSnapshot",
    "BreakerState",
    "BulkResult",
    "CheckViolationError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CommitOutcomeUnknownError",
    "ComponentHealth",
    "ConfigurationError",
    "Database",
    "DatabaseInfo",
    "DatabaseSettings",
    "DatabaseState",
    "DatabaseStateError",
    "DatabaseUnavailableError",
    "FailedRow",
    "FingerprintStats",
    "ForeignKeyViolationError",
    "HealthCheck",
    "HealthChecker",
    "HealthReport",
    "HealthStatus",
    "HeldConnection",
    "HttpUrlText",
    "IdempotencyKeyReusedError",
    "IdempotencyStore",
    "IntegrityViolationError",
    "JSONObject",
    "LeakDetector",
    "LoopLag",
    "LoopLagMonitor",
    "MetricsHistory",
    "MetricsSnapshot",
    "NotFoundError",
    "NotNullViolationError",
    "PoolStatus",
    "PoolTimeoutError",
    "QueryError",
    "QueryMetrics",
    "ReadOnlyViolationError",
    "RequestContext",
    "SafeText",
    "StaleVersionError",
    "StatementTimeoutError",
    "StoredResponse",
    "TableInfo",
    "TransactionConflictError",
    "UTCDateTime",
    "UTCTimestamp",
    "UniqueViolationError",
    "__version__",
    "bulk_insert",
    "check_http_url",
    "check_json_object",
    "check_safe_text",
    "current_request",
    "fingerprint",
    "idempotency_table",
    "inspect_database",
    "install_request_id_logging",
    "instrument_tracing",
    "is_outage",
    "load_settings",
    "normalise_database_url",
    "request_fingerprint",
    "server_version",
    "sqlite_file_sizes",
    "to_utc",
    "utcnow",
]
