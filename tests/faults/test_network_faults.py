"""S4 to S7 — a bad network between the service and PostgreSQL (the fault proxy's toxics).

* S4, black hole mid-query: the request fails within the statement timeout + 2 s with a clear
  error; closing the dead connection does not hang; afterwards the pool works; leak check.
* S5, latency 200 ms ± 50 ms at 50 requests/s (5 s instead of 60): 0 errors; p99 ≤ 200 ms +
  the baseline p99 + 100 ms; no pool timeout at the configured pool size; breaker closed.
* S6, reset in the middle of a multi-statement transaction: none of its rows visible; the
  error is a retryable connection error; a whole-unit retry succeeds once; 0 duplicates.
* S7, fragmented and truncated protocol: under the slicer every query is correct; a reply
  cut short (limit_data) is a clean error, the connection is discarded, no partial row.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import (
    BreakerState,
    Database,
    DatabaseUnavailableError,
    StatementTimeoutError,
)
from tests.faults.leaks import assert_no_leaks, leak_guard
from tests.faults.stack import FaultStack


async def _create_probe_table(database: Database) -> None:
    async with database.write_connection() as connection:
        await connection.execute(
            text("CREATE TABLE probe (id uuid PRIMARY KEY, tag text NOT NULL, body text)")
        )


async def _count(database: Database, tag: str) -> int:
    async with database.read_connection() as connection:
        query = text("SELECT count(*) FROM probe WHERE tag = :tag")
        return int(await connection.scalar(query, {"tag": tag}) or 0)


@pytest.mark.parametrize("unit", ["read_connection", "write_connection"])
async def test_s4_a_black_hole_mid_query_fails_within_the_timeout_and_closes(
    fault_stack: FaultStack, unit: str
) -> None:
    stack = fault_stack
    statement_timeout_s = 1.0
    with leak_guard():
        async with Database(stack.settings(DB_STATEMENT_TIMEOUT=statement_timeout_s)) as database:
            open_unit = getattr(database, unit)

            async def query() -> None:
                async with open_unit() as connection:
                    await connection.execute(text("SELECT pg_sleep(0.3)"))

            started = time.monotonic()
            task = asyncio.create_task(query())
            await asyncio.sleep(0.1)  # the query is on the wire
            stack.proxy.blackhole()
            with pytest.raises(StatementTimeoutError) as raised:
                await task
            elapsed = time.monotonic() - started
            stack.proxy.clear()

            print(f"S4 figures: {{'unit': {unit!r}, 'failed_after_s': {elapsed:.2f}}}")
            assert elapsed <= statement_timeout_s + 2.0
            assert "did not answer" in raised.value.message
            async with database.read_connection() as connection:
                assert await connection.scalar(text("SELECT 1")) == 1
            await assert_no_leaks(database, admin_url=stack.admin_url)


async def _p99_ms(database: Database, seconds: float, rate: float) -> tuple[float, int]:
    """Run single-statement reads at ``rate`` per second; return (p99 ms, errors)."""
    latencies: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        started = time.monotonic()
        try:
            async with database.read_connection() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception:
            errors += 1
        else:
            latencies.append((time.monotonic() - started) * 1000)

    tasks = []
    begin = time.monotonic()
    for n in range(int(seconds * rate)):
        await asyncio.sleep(max(0.0, begin + n / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return statistics.quantiles(latencies, n=100)[98], errors


async def test_s5_latency_slows_requests_down_but_fails_none(fault_stack: FaultStack) -> None:
    stack = fault_stack
    with leak_guard():
        async with Database(stack.settings(DB_POOL_SIZE=20, DB_MAX_OVERFLOW=5)) as database:
            # Open the pool's connections first: under 200 ms per round trip a new connection
            # costs seconds, which is a different scenario (connection storms).
            # The statement too: its first run on a connection costs a prepare round trip.
            async def hold() -> None:
                async with database.read_connection() as connection:
                    await connection.execute(text("SELECT 1"))
                    await connection.execute(text("SELECT pg_sleep(0.2)"))

            await asyncio.gather(*(hold() for _ in range(20)))
            baseline_p99, baseline_errors = await _p99_ms(database, 2, 50)
            stack.proxy.latency(200, jitter_ms=50, direction="downstream")
            slow_p99, slow_errors = await _p99_ms(database, 5, 50)
            stack.proxy.clear()
            breaker = database.breaker.state
            await assert_no_leaks(database, admin_url=stack.admin_url)

    print(f"S5 figures: {{'baseline_p99_ms': {baseline_p99:.1f}, 'p99_ms': {slow_p99:.1f}}}")
    assert baseline_errors == slow_errors == 0
    assert slow_p99 >= 150  # the latency really applied
    assert slow_p99 <= 200 + baseline_p99 + 100
    assert breaker is BreakerState.CLOSED


async def test_s6_a_reset_mid_transaction_leaves_nothing_and_one_retry_lands_it(
    fault_stack: FaultStack,
) -> None:
    stack = fault_stack
    with leak_guard():
        async with Database(stack.settings()) as database:
            await _create_probe_table(database)
            batch = str(uuid.uuid4())
            attempts = 0
            errors: list[BaseException] = []

            # The marker is in the SQL text, so the proxy can reset on the second statement.
            statements = [
                text("INSERT INTO probe VALUES (:id, :batch, 's6-first')"),
                text("INSERT INTO probe VALUES (:id, :batch, 's6-second')"),
                text("INSERT INTO probe VALUES (:id, :batch, 's6-third')"),
            ]

            async def three_inserts(connection: AsyncConnection) -> None:
                nonlocal attempts
                attempts += 1
                for statement in statements:
                    await connection.execute(statement, {"id": uuid.uuid4(), "batch": batch})

            # Alone first, to see the error and that nothing of the transaction remains.
            stack.proxy.reset_on(b"s6-second", forward_first=False)
            with pytest.raises(DatabaseUnavailableError) as raised:
                async with database.write_connection() as connection:
                    await three_inserts(connection)
            errors.append(raised.value)
            assert raised.value.retryable
            assert await _count(database, batch) == 0

            # Then through Database.run: the whole unit is retried, once.
            attempts = 0
            stack.proxy.reset_on(b"s6-second", forward_first=False)
            await database.run(database.write_connection, three_inserts)
            assert stack.proxy.resets_done == 2
            assert attempts == 2
            assert await _count(database, batch) == 3  # 0 duplicates
            await assert_no_leaks(database, admin_url=stack.admin_url)


async def test_s7_a_sliced_protocol_still_gives_exact_results(fault_stack: FaultStack) -> None:
    stack = fault_stack
    bodies = {str(uuid.uuid4()): f"{n}:" + "é∑🙂x" * (n * 97 % 2000) for n in range(20)}
    with leak_guard():
        async with Database(stack.settings()) as database:
            await _create_probe_table(database)
            stack.proxy.slicer(average_size=10, size_variation=5, delay_us=50)
            for row_id, body in bodies.items():
                async with database.write_connection() as connection:
                    await connection.execute(
                        text("INSERT INTO probe VALUES (:id, 's7', :body)"),
                        {"id": row_id, "body": body},
                    )
            async with database.read_connection() as connection:
                rows = dict(
                    (await connection.execute(text("SELECT id::text, body FROM probe"))).all()
                )
            stack.proxy.clear()
            assert rows == bodies
            await assert_no_leaks(database, admin_url=stack.admin_url)


async def test_s7_a_truncated_reply_is_a_clean_error_and_leaves_no_partial_row(
    fault_stack: FaultStack,
) -> None:
    stack = fault_stack
    with leak_guard():
        async with Database(stack.settings()) as database:
            await _create_probe_table(database)
            stack.proxy.limit_data(200, direction="downstream")
            with pytest.raises(DatabaseUnavailableError):
                async with database.write_connection() as connection:
                    await connection.execute(
                        text("INSERT INTO probe VALUES (:id, 's7-cut', :body) RETURNING body"),
                        {"id": uuid.uuid4(), "body": "x" * 10_000},
                    )
            stack.proxy.clear()

            assert await _count(database, "s7-cut") == 0
            async with database.read_connection() as connection:
                assert await connection.scalar(text("SELECT 2")) == 2
            await assert_no_leaks(database, admin_url=stack.admin_url)
