"""OpenTelemetry spans for every statement, through the maintained SQLAlchemy instrumentation.

Optional: install the ``otel`` extra (``pip install 'bastion[otel]'``) and configure a tracer
provider and exporter as your service already does; then, once the Database has started::

    instrument_tracing(database)

Spans carry the statement text with its placeholders — never the parameter values — plus the
usual ``db.*`` attributes.
"""

from __future__ import annotations

from typing import Any

from bastion.database import Database
from bastion.errors import ConfigurationError

__all__ = ["instrument_tracing"]


def instrument_tracing(database: Database, *, tracer_provider: Any = None) -> None:
    """Emit a span per statement on every engine of the running ``database``.

    ``tracer_provider`` defaults to the global one. Call it once per process: the
    instrumentation is process-wide (it also traces engines created afterwards).

    Raises:
        ConfigurationError: the ``otel`` extra is not installed.
        DatabaseStateError: the Database is not running.
    """
    try:
        from opentelemetry.instrumentation.sqlalchemy import (
            SQLAlchemyInstrumentor,
        )
    except ImportError as exc:
        raise ConfigurationError(
            "tracing needs OpenTelemetry's SQLAlchemy instrumentation: pip install 'bastion[otel]'"
        ) from exc
    # One call for every engine: the instrumentor is a process-wide singleton that ignores
    # later calls. enable_commenter stays off: it appends trace ids to the SQL text, which
    # defeats statement caches and the fingerprints here. skip_dep_check: the instrumentation
    # (0.66b) declares "sqlalchemy < 2.1" although the engine events it uses are unchanged in
    # 2.1; tests/integration/test_tracing.py checks the spans.
    SQLAlchemyInstrumentor().instrument(
        engines=[engine.sync_engine for engine in database.engines],
        tracer_provider=tracer_provider,
        enable_commenter=False,
        skip_dep_check=True,
    )
