"""OpenTelemetry: a span per statement, with the SQL's placeholders and never its values."""

from __future__ import annotations

from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from bastion import Database
from bastion.tracing import instrument_tracing


async def test_every_statement_gets_a_span_without_its_parameters(database: Database) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument_tracing(database, tracer_provider=provider)
    try:
        async with database.read_connection() as connection:
            await connection.execute(text("SELECT :secret AS echoed"), {"secret": "hunter2"})
        async with database.write_connection() as connection:
            await connection.execute(text("SELECT 1"))
    finally:
        SQLAlchemyInstrumentor().uninstrument()  # process-wide: leave other tests untraced

    spans = exporter.get_finished_spans()
    statements = [str(span.attributes.get("db.statement", "")) for span in spans]
    assert any("AS echoed" in statement for statement in statements)
    assert any(statement.strip() == "SELECT 1" for statement in statements)
    for span in spans:
        assert "hunter2" not in str(dict(span.attributes or {}))
