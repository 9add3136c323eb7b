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
from bastion.repository import (
    AuditMixin,
    Clock,
    CursorCodec,
    CursorPage,
    Eq,
    Executor,
    Filter,
    In,
    InvalidQueryError,
    IsNull,
    Keyset,
    Page,
    Range,
    Repository,
    Search,
    SortKey,
    acting_as,
    audit_now,
    current_actor,
    escape_like,
    parse_sort,
    upsert_statement,
    use_clock,
)
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
    "AuditMixin",
    "Backend",
    "BastionError",
    "BreakerSnapshot",
    "BreakerState",
    "BulkResult",
    "CheckViolationError",
    "CircuitBreaker",
    "CircuitOpenError",
    "Clock",
    "CommitOutcomeUnknownError",
    "ComponentHealth",
    "ConfigurationError",
    "CursorCodec",
    "CursorPage",
    "Database",
    "DatabaseInfo",
    "DatabaseSettings",
    "DatabaseState",
    "DatabaseStateError",
    "DatabaseUnavailableError",
    "Eq",
    "Executor",
    "FailedRow",
    "Filter",
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
    "In",
    "IntegrityViolationError",
    "InvalidQueryError",
    "IsNull",
    "JSONObject",
    "Keyset",
    "LeakDetector",
    "LoopLag",
    "LoopLagMonitor",
    "MetricsHistory",
    "MetricsSnapshot",
    "NotFoundError",
    "NotNullViolationError",
    "Page",
    "PoolStatus",
    "PoolTimeoutError",
    "QueryError",
    "QueryMetrics",
    "Range",
    "ReadOnlyViolationError",
    "Repository",
    "RequestContext",
    "SafeText",
    "Search",
    "SortKey",
    "StaleVersionError",
    "StatementTimeoutError",
    "StoredResponse",
    "TableInfo",
    "TransactionConflictError",
    "UTCDateTime",
    "UTCTimestamp",
    "UniqueViolationError",
    "__version__",
    "acting_as",
    "audit_now",
    "bulk_insert",
    "check_http_url",
    "check_json_object",
    "check_safe_text",
    "current_actor",
    "current_request",
    "escape_like",
    "fingerprint",
    "idempotency_table",
    "inspect_database",
    "install_request_id_logging",
    "instrument_tracing",
    "is_outage",
    "load_settings",
    "normalise_database_url",
    "parse_sort",
    "request_fingerprint",
    "server_version",
    "sqlite_file_sizes",
    "to_utc",
    "upsert_statement",
    "use_clock",
    "utcnow",
]
