"""HealthChecker on real SQLite and PostgreSQL: what each component reports, and what it costs.

The cost matters as much as the verdict: probes come from every load balancer and
orchestrator at once, so within the cache TTL a check must reach the database once, however
many callers ask.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from bastion import (
    BreakerState,
    ComponentHealth,
    Database,
    DatabaseSettings,
    DatabaseUnavailableError,
    HealthChecker,
    HealthReport,
    HealthStatus,
)
from bastion.migrations import head_revisions, upgrade
from conversations import MIGRATIONS
from tests.conftest import POSTGRES_URL, _asyncpg_dsn, make_settings

HEALTHY, DEGRADED, UNHEALTHY = HealthStatus.HEALTHY, HealthStatus.DEGRADED, HealthStatus.UNHEALTHY


@contextmanager
def statements_on(database: Database) -> Iterator[list[str]]:
    """Every statement the Database's primary engine sends while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement.strip())

    engine = database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def part(report: HealthReport, name: str) -> ComponentHealth:
    """The report's component called ``name`` (failing the test if it has none)."""
    component = report.component(name)
    assert component is not None, f"no {name!r} component in {report}"
    return component


def select_ones(statements: list[str]) -> int:
    return sum(1 for statement in statements if statement.upper() == "SELECT 1")


@pytest.fixture
async def url_at_0001(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A database of ``backend`` migrated only to revision 0001, behind the scripts' head."""
    name = f"bastion_health_{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/{name}.db"
    else:
        admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL))
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        await upgrade(database, MIGRATIONS, "0001")
    yield url
    if backend == "postgresql":
        admin = await asyncpg.connect(_asyncpg_dsn(POSTGRES_URL))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_a_running_migrated_database_is_healthy_in_every_component(
    database: Database,
) -> None:
    report = await HealthChecker(database, migrations=MIGRATIONS).check()

    assert (report.status, report.score) == (HEALTHY, 1.0)
    assert [c.name for c in report.components] == ["database", "pool", "breaker", "migrations"]
    assert all(c.status is HEALTHY and c.error is None for c in report.components)
    probe = part(report, "database")
    assert probe.latency_ms is not None
    assert 0 < probe.latency_ms < 1000
    assert probe.details["backend"] == database.backend
    assert probe.details["server_version"]
    assert probe.details["size_bytes"] > 0
    if database.backend == "postgresql":
        assert probe.details["connections"] >= 1  # the probe's own session at least
        assert probe.details["active_connections"] >= 1
    pool = part(report, "pool")
    assert pool.details["checked_out"] == 0
    assert (pool.details["capacity"], pool.details["pool_size"], pool.details["max_overflow"]) == (
        20,
        5,
        5,
    )
    breaker = part(report, "breaker")
    assert breaker.details["state"] == "closed"
    migrations = part(report, "migrations")
    heads = list(head_revisions(MIGRATIONS))
    assert migrations.details == {"current": heads, "head": heads}
    body = json.dumps(report.to_dict())  # JSON-ready as it is
    assert database.settings.database_url.get_secret_value() not in body
    assert database.settings.display_url not in body


async def test_the_pool_reads_degraded_when_most_of_it_is_lent_out(database_url: str) -> None:
    # Two pools (read, write) of 1 + 1: capacity 4, so two held connections reach 0.5.
    settings = make_settings(
        database_url,
        DB_POOL_SIZE=1,
        DB_MAX_OVERFLOW=1,
        HEALTH_POOL_DEGRADED=0.5,
        HEALTH_CACHE_TTL=0,
    )
    async with Database(settings) as database:
        checker = HealthChecker(database)
        idle = await checker.check()
        release = asyncio.Event()

        async def hold() -> None:
            async with database.read_connection() as connection:
                await connection.execute(text("SELECT 1"))
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        async with asyncio.timeout(5):
            while database.pool_status().checked_out < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        busy = await checker.check()
        release.set()
        await asyncio.gather(*holders)

    assert idle.status is HEALTHY
    pool = part(busy, "pool")
    assert (pool.status, pool.error) == (DEGRADED, "pool_busy")
    assert (pool.details["checked_out"], pool.details["capacity"], pool.details["usage"]) == (
        2,
        4,
        0.5,
    )
    assert busy.status is DEGRADED  # the primary's pool was free: the database still answers


async def test_an_open_breaker_reads_unhealthy_without_touching_the_database(
    database_url: str,
) -> None:
    settings = make_settings(database_url, BREAKER_FAILURE_THRESHOLD=3, BREAKER_RESET_TIMEOUT=30)
    async with Database(settings) as database:
        for _ in range(3):
            database._breaker.record(DatabaseUnavailableError("x"))
        with statements_on(database) as statements:
            report = await HealthChecker(database).check()

    assert statements == []
    probe, breaker = part(report, "database"), part(report, "breaker")
    assert (probe.status, probe.error, probe.latency_ms) == (UNHEALTHY, "circuit_open", None)
    assert (breaker.status, breaker.error) == (UNHEALTHY, "circuit_open")
    assert breaker.details["consecutive_failures"] == 3
    assert breaker.details["opened_count"] == 1
    assert 25 < breaker.details["retry_after_s"] <= 30
    assert report.status is UNHEALTHY


async def test_a_half_open_breaker_is_degraded_and_the_database_is_asked(
    database_url: str,
) -> None:
    settings = make_settings(database_url, BREAKER_FAILURE_THRESHOLD=1, BREAKER_RESET_TIMEOUT=0.1)
    async with Database(settings) as database:
        database._breaker.record(DatabaseUnavailableError("x"))
        await asyncio.sleep(0.15)
        with statements_on(database) as statements:
            report = await HealthChecker(database).check()
        # The check observes the breaker; it is not the probe that closes it.
        still = database.breaker.state

    probe, breaker = part(report, "database"), part(report, "breaker")
    assert select_ones(statements) == 1
    assert probe.status is HEALTHY
    assert (breaker.status, breaker.error) == (DEGRADED, "circuit_half_open")
    assert report.status is DEGRADED
    assert still is BreakerState.HALF_OPEN


async def test_a_schema_behind_the_code_is_unhealthy(url_at_0001: str) -> None:
    async with Database(make_settings(url_at_0001)) as database:
        report = await HealthChecker(database, migrations=MIGRATIONS).check()

    migrations = part(report, "migrations")
    assert (migrations.status, migrations.error) == (UNHEALTHY, "migrations_behind")
    assert migrations.details == {"current": ["0001"], "head": list(head_revisions(MIGRATIONS))}
    assert report.status is UNHEALTHY
    assert report.score == 0.75  # database, pool and breaker are fine


async def test_a_schema_ahead_of_the_code_is_only_degraded(url_at_0001: str) -> None:
    """A newer release migrated the database: old instances still serve during the rollout."""
    async with Database(make_settings(url_at_0001)) as database:
        async with database.write_connection() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
        report = await HealthChecker(database, migrations=MIGRATIONS).check()

    migrations = part(report, "migrations")
    assert (migrations.status, migrations.error) == (DEGRADED, "unknown_revision")
    assert migrations.details["current"] == ["f00d"]
    assert report.status is DEGRADED


async def test_a_slow_answer_reads_degraded(database_url: str) -> None:
    settings = make_settings(database_url, HEALTH_LATENCY_DEGRADED=0.000001)
    async with Database(settings) as database:
        report = await HealthChecker(database).check()

    probe = part(report, "database")
    assert (probe.status, probe.error) == (DEGRADED, "slow")
    assert probe.details["latency_degraded_ms"] == 0.0
    assert (report.status, report.score) == (DEGRADED, round(2.5 / 3, 3))


async def test_no_connection_within_the_deadline_is_unhealthy_and_prompt(
    database_url: str,
) -> None:
    # The write pool's only connection is held and the pool would wait 30 s for it.
    settings = make_settings(database_url, DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=30)
    async with Database(settings) as database:
        checker = HealthChecker(database, timeout_s=0.3)
        async with database.write_connection() as holder:
            await holder.execute(text("SELECT 1"))
            started = time.monotonic()
            report = await checker.check()
            elapsed_s = time.monotonic() - started

    probe = part(report, "database")
    assert (probe.status, probe.error) == (UNHEALTHY, "timeout")
    assert probe.details["waiting_for"] == "a connection"
    assert elapsed_s < 1.0
    assert report.status is UNHEALTHY


async def test_a_writer_holding_its_transaction_does_not_hold_up_the_check(
    database: Database,
) -> None:
    """On SQLite a write unit holds the file's write lock; the check must not queue for it."""
    async with database.write_connection() as writer:
        await writer.execute(text("UPDATE users SET name = name"))
        started = time.monotonic()
        report = await HealthChecker(database, migrations=MIGRATIONS).check()
        elapsed_s = time.monotonic() - started

    assert report.status is HEALTHY
    assert elapsed_s < 1.0


async def test_a_report_is_reused_within_the_ttl_and_renewed_after_it(database_url: str) -> None:
    settings = make_settings(database_url, HEALTH_CACHE_TTL=0.3)
    async with Database(settings) as database:
        checker = HealthChecker(database)
        with statements_on(database) as statements:
            first = await checker.check()
            second = await checker.check()
            within_ttl = select_ones(statements)
            await asyncio.sleep(0.35)
            third = await checker.check()
            after_ttl = select_ones(statements)

    assert second is first
    assert within_ttl == 1
    assert third is not first
    assert third.checked_at > first.checked_at
    assert after_ttl == 2


async def test_twenty_concurrent_callers_share_one_check(database: Database) -> None:
    checker = HealthChecker(database, migrations=MIGRATIONS)
    with statements_on(database) as statements:
        reports = await asyncio.gather(*(checker.check() for _ in range(20)))

    assert select_ones(statements) == 1
    assert all(report is reports[0] for report in reports)
    assert reports[0].status is HEALTHY


async def test_a_caller_that_gives_up_does_not_cancel_the_shared_check(
    database: Database,
) -> None:
    checker = HealthChecker(database)
    impatient = asyncio.create_task(checker.check())
    patient = asyncio.create_task(checker.check())
    await asyncio.sleep(0)  # both are now waiting on the one check
    impatient.cancel()

    report = await patient

    assert impatient.cancelled()
    assert report.status is HEALTHY


async def test_extra_checks_join_the_report_and_their_failures_stay_inside_it(
    database: Database,
) -> None:
    async def cache() -> ComponentHealth:
        return ComponentHealth("cache", DEGRADED, 1.5, {"hit_ratio": 0.2}, "cold")

    async def replica() -> ComponentHealth:
        raise DatabaseUnavailableError("the replica is unavailable")

    async def redis() -> ComponentHealth:
        raise ConnectionError("redis://:hunter2@cache.internal:6379 refused")

    async def backups() -> ComponentHealth:
        await asyncio.sleep(10)
        return ComponentHealth("backups", HEALTHY)

    checker = HealthChecker(database, checks=[cache, replica, redis, backups], timeout_s=0.3)
    report = await checker.check()

    verdicts = {c.name: (c.status, c.error) for c in report.components}
    assert verdicts == {
        "database": (HEALTHY, None),
        "pool": (HEALTHY, None),
        "breaker": (HEALTHY, None),
        "cache": (DEGRADED, "cold"),
        "replica": (UNHEALTHY, "database_unavailable"),
        "redis": (UNHEALTHY, "check_failed"),
        "backups": (UNHEALTHY, "timeout"),
    }
    assert report.status is UNHEALTHY
    assert report.score == round(3.5 / 7, 3)
    assert "hunter2" not in json.dumps(report.to_dict())


async def test_a_closed_database_is_reported_unhealthy_not_raised(
    settings: DatabaseSettings,
) -> None:
    database = Database(settings)
    await database.start()
    checker = HealthChecker(database)
    await database.close()

    report = await checker.check()

    assert report.status is UNHEALTHY
    assert {c.name: c.error for c in report.components if c.status is UNHEALTHY} == {
        "database": "database_not_running",
        "pool": "database_not_running",
    }


async def test_the_last_migrations_reading_stands_while_the_database_cannot_be_asked(
    database_url: str,
) -> None:
    async with Database(make_settings(database_url, HEALTH_CACHE_TTL=0)) as database:
        checker = HealthChecker(database, migrations=MIGRATIONS)
        first = await checker.check()
    after_close = await checker.check()
    never_read = await HealthChecker(database, migrations=MIGRATIONS).check()

    heads = list(head_revisions(MIGRATIONS))
    assert part(first, "migrations").details == {"current": heads, "head": heads}
    assert part(after_close, "database").error == "database_not_running"
    stale = part(after_close, "migrations")
    assert stale.status is HEALTHY
    assert stale.details == {"current": heads, "head": heads, "stale": True}
    unknown = part(never_read, "migrations")
    assert (unknown.status, unknown.error) == (UNHEALTHY, "database_not_running")
