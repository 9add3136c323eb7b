"""S1, S2, S3, S8, S14 — the database server restarts, crashes, drops connections, vanishes.

Each runs against the throwaway PostgreSQL server (never the shared one), durations shortened
for CI, counts not loosened:

* S1, clean restart under 200 concurrent writers: every acknowledged write stored, none
  twice, nothing stored that was not acknowledged; requests succeed again within 5 s of the
  server accepting connections, with no restart of the service; leak check.
* S2, crash (SIGKILL of the postmaster) under the same load, then crash recovery: zero
  acknowledged writes lost (``synchronous_commit=on``), none duplicated.
* S3, the server kills every pooled connection: with pre-ping, no request fails; without it,
  at most one failure per killed connection, and then the pool is whole again.
* S8, the database unreachable for a while (the proxy down): readiness turns 503 within 5 s;
  once the breaker is open requests fail in ≤ 100 ms with 503 and ``Retry-After`` instead of
  waiting for the 30 s pool timeout; recovery within 5 s of the database's return.
* S14, the retry budget while the database is down: attempts ≤ ``MAX_RETRY_ATTEMPTS``, sleeps
  jittered (spread across 100 clients), connection attempts per second ≤ clients ÷ minimum
  backoff, every retry logged and counted.

The figures each run measured are printed (``pytest -s``) as ``S<n> figures: {...}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import Database, DatabaseUnavailableError
from bastion._engines import _connect_or_unavailable
from conversations.app import create_app
from conversations.users import create_user
from tests.conftest import serve
from tests.faults.leaks import assert_no_leaks, leak_guard
from tests.faults.stack import FaultStack
from tests.faults.writers import WriterFleet

WRITERS = 200
RECOVERY_SLO_S = 5.0


async def _first_success_after(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> float:
    """Seconds until a GET of ``url`` (a new request every 100 ms) first succeeds."""
    started = time.monotonic()
    while time.monotonic() - started < 30:
        if (await client.get(url, headers=headers)).status_code == 200:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError("the service did not recover within 30 s")


async def _write_through(stack: FaultStack, fault: str) -> dict[str, Any]:
    """Run 200 writers, apply ``fault`` ("restart" or "crash") to the server, audit."""
    app = create_app(stack.settings(DB_POOL_SIZE=10, DB_MAX_OVERFLOW=10, DB_POOL_TIMEOUT=5))
    async with serve(app) as client:
        database: Database = app.state.database
        headers = {"Authorization": f"Bearer {await create_user(database, 'writer')}"}
        created = await client.post("/v1/conversations", json={"title": "load"}, headers=headers)
        conversation = f"/v1/conversations/{created.json()['id']}"
        fleet = WriterFleet(client, f"{conversation}/messages", headers, WRITERS)
        fleet.start()
        await asyncio.sleep(2.0)
        acknowledged_before = len(fleet.acknowledged)
        if fault == "restart":
            await asyncio.to_thread(stack.server.restart, "fast")
        else:
            await asyncio.to_thread(stack.server.kill)
            await asyncio.to_thread(stack.server.start)
        accepting_at = time.monotonic()  # pg_ctl -w returned: the server accepts connections
        recovery_s = await _first_success_after(client, conversation, headers)
        await asyncio.sleep(2.0)
        await fleet.stop()
        await fleet.resolve()
        audit = await fleet.audit(database)
        late = [
            attempt
            for attempt in fleet.attempts
            if attempt.started > accepting_at + RECOVERY_SLO_S and attempt.status != 201
        ]
        statuses = fleet.statuses()
        await assert_no_leaks(database, admin_url=stack.admin_url)
    return {
        "acknowledged_before_fault": acknowledged_before,
        "acknowledged": audit.acknowledged,
        "stored": audit.stored,
        "lost": audit.lost,
        "duplicated": audit.duplicated,
        "unexpected": audit.unexpected,
        "recovery_s": round(recovery_s, 2),
        "failed_after_slo": len(late),
        "statuses": dict(statuses),
    }


def _assert_every_write_accounted_for(figures: dict[str, Any]) -> None:
    assert figures["acknowledged_before_fault"] > 0, "the load was not running"
    assert figures["lost"] == [], "acknowledged writes were lost"
    assert figures["duplicated"] == [], "writes were stored twice"
    assert figures["unexpected"] == [], "writes were stored that nobody acknowledged"
    assert figures["stored"] == figures["acknowledged"]
    assert figures["recovery_s"] <= RECOVERY_SLO_S
    assert figures["failed_after_slo"] == 0


async def test_s1_a_fast_restart_under_200_writers_loses_and_duplicates_nothing(
    fault_stack: FaultStack,
) -> None:
    with leak_guard():
        figures = await _write_through(fault_stack, "restart")
    print(f"S1 figures: {figures}")
    _assert_every_write_accounted_for(figures)


async def test_s2_a_crash_under_200_writers_loses_no_acknowledged_write(
    fault_stack: FaultStack,
) -> None:
    with leak_guard():
        figures = await _write_through(fault_stack, "crash")
    print(f"S2 figures: {figures}")
    _assert_every_write_accounted_for(figures)


@pytest.mark.parametrize("pre_ping", [True, False], ids=["pre-ping", "no-pre-ping"])
async def test_s3_connections_killed_by_the_server_cost_at_most_one_error_each(
    fault_stack: FaultStack, pre_ping: bool
) -> None:
    stack = fault_stack
    app = create_app(stack.settings(DB_POOL_PRE_PING=pre_ping))
    with leak_guard():
        async with serve(app) as client:
            database: Database = app.state.database
            headers = {"Authorization": f"Bearer {await create_user(database, 'ann')}"}
            created = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)
            url = f"/v1/conversations/{created.json()['id']}"
            # Open several pooled connections, then have the server kill them all.
            await asyncio.gather(*(client.get(url, headers=headers) for _ in range(8)))
            killed = await stack.server.terminate_backends(stack.database_name)
            assert killed >= 2

            responses = [await client.get(url, headers=headers) for _ in range(20)]
            responses += await asyncio.gather(*(client.get(url, headers=headers) for _ in range(8)))
            errors = [response for response in responses if response.status_code != 200]

            if pre_ping:
                assert errors == []
            else:
                assert len(errors) <= killed
                assert {response.status_code for response in errors} <= {503}
            assert all(response.status_code == 200 for response in responses[-8:])
            await assert_no_leaks(database, admin_url=stack.admin_url)
    print(f"S3 figures: {{'pre_ping': {pre_ping}, 'killed': {killed}, 'errors': {len(errors)}}}")


async def test_s8_an_outage_fails_fast_behind_the_breaker_and_recovers_by_itself(
    fault_stack: FaultStack,
) -> None:
    stack = fault_stack
    outage_s = 8.0
    settings = stack.settings(
        DB_POOL_TIMEOUT=30,  # what requests would queue for without the breaker
        DB_CONNECT_TIMEOUT=2,
        BREAKER_FAILURE_THRESHOLD=5,
        BREAKER_RESET_TIMEOUT=2,
    )
    app = create_app(settings)
    with leak_guard():
        async with serve(app) as client:
            database: Database = app.state.database
            headers = {"Authorization": f"Bearer {await create_user(database, 'ann')}"}
            created = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)
            url = f"/v1/conversations/{created.json()['id']}"
            assert (await client.get("/health/ready")).status_code == 200

            stack.proxy.down()
            down_at = time.monotonic()
            unready_after: float | None = None
            timings: list[tuple[float, int, str]] = []  # (latency, status, code)
            while time.monotonic() - down_at < outage_s:
                if unready_after is None and (await client.get("/health/ready")).status_code == 503:
                    unready_after = time.monotonic() - down_at
                burst = await asyncio.gather(*(_timed_get(client, url, headers) for _ in range(10)))
                timings.extend(burst)
                await asyncio.sleep(0.05)
            opened = database.breaker.opened_count
            stack.proxy.up()
            recovery_s = await _first_success_after(client, url, headers)
            after = await asyncio.gather(*(client.get(url, headers=headers) for _ in range(20)))
            await assert_no_leaks(database, admin_url=stack.admin_url)

    refused_by_breaker = [t for t in timings if t[2] == "circuit_open"]
    figures = {
        "unready_after_s": unready_after,
        "requests_during_outage": len(timings),
        "refused_by_breaker": len(refused_by_breaker),
        "slowest_breaker_refusal_ms": round(max(t[0] for t in refused_by_breaker) * 1000, 1),
        "slowest_request_s": round(max(t[0] for t in timings), 2),
        "recovery_s": round(recovery_s, 2),
    }
    print(f"S8 figures: {figures}")
    assert unready_after is not None
    assert unready_after <= 5.0
    assert {status for _, status, _ in timings} == {503}
    assert opened >= 1
    assert len(refused_by_breaker) > len(timings) // 2
    # Fail fast: the breaker's refusals (an in-process HTTP round trip each, 10 at a time on a
    # shared event loop) take well under 100 ms; p99, since one GC pause is not the breaker.
    refusals = sorted(t[0] for t in refused_by_breaker)
    assert refusals[int(len(refusals) * 0.99)] <= 0.1
    # Nobody waited for the 30 s pool timeout: at worst one connect timeout (2 s).
    assert max(t[0] for t in timings) <= 2 + 1
    assert recovery_s <= RECOVERY_SLO_S
    assert {response.status_code for response in after} == {200}


async def _timed_get(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> tuple[float, int, str]:
    started = time.monotonic()
    response = await client.get(url, headers=headers)
    code = response.json().get("code", "") if response.status_code != 200 else ""
    if response.status_code == 503:
        assert int(response.headers["retry-after"]) >= 1
    return time.monotonic() - started, response.status_code, code


async def test_s14_retries_while_the_database_is_down_are_bounded_jittered_and_counted(
    fault_stack: FaultStack, caplog: pytest.LogCaptureFixture
) -> None:
    stack = fault_stack
    clients = 100
    settings = stack.settings(
        MAX_RETRY_ATTEMPTS=10,
        RETRY_MAX_DELAY=3,
        RETRY_INITIAL_BACKOFF=0.1,
        RETRY_MAX_BACKOFF=1,
        DB_CONNECT_TIMEOUT=1,
        # The retry layer alone is under test here: keep the breaker out of the way.
        BREAKER_FAILURE_THRESHOLD=10_000,
    )
    with leak_guard():
        async with Database(settings) as database:
            connects = 0

            def count_connect(*_args: Any) -> None:
                nonlocal connects
                connects += 1

            # It must run before Bastion's own do_connect handler, which ends the chain (it
            # connects, or raises); `insert=True` is not honoured for dialect events.
            engine = database.engine.sync_engine
            event.remove(engine, "do_connect", _connect_or_unavailable)
            event.listen(engine, "do_connect", count_connect)
            event.listen(engine, "do_connect", _connect_or_unavailable)
            stack.proxy.down()
            attempts_per_client: list[int] = []

            async def select_one(connection: AsyncConnection) -> None:
                await connection.execute(text("SELECT 1"))

            async def client() -> None:
                tries = 0

                def counted_unit() -> AbstractAsyncContextManager[AsyncConnection]:
                    nonlocal tries
                    tries += 1
                    return database.write_connection()

                with pytest.raises(DatabaseUnavailableError):
                    await database.run(counted_unit, select_one)
                attempts_per_client.append(tries)

            caplog.set_level(logging.WARNING, logger="bastion.database")
            started = time.monotonic()
            await asyncio.gather(*(client() for _ in range(clients)))
            elapsed = time.monotonic() - started
            stack.proxy.up()
            await assert_no_leaks(database, admin_url=stack.admin_url)
            retries_counted = database.retry_count

    retry_logs = [r for r in caplog.records if r.getMessage().startswith("retrying a unit")]
    sleeps = [float(r.getMessage().rsplit("next in ", 1)[1].rstrip("s)")) for r in retry_logs]
    figures = {
        "clients": clients,
        "elapsed_s": round(elapsed, 2),
        "unit_attempts": sum(attempts_per_client),
        "most_attempts_of_a_client": max(attempts_per_client),
        "connection_attempts": connects,
        "connects_per_s": round(connects / elapsed, 1),
        "retries_logged": len(retry_logs),
        "retries_counted": retries_counted,
        "sleep_spread_s": round(max(sleeps) - min(sleeps), 3),
    }
    print(f"S14 figures: {figures}")
    assert max(attempts_per_client) <= 10
    assert retries_counted == len(retry_logs) == sum(attempts_per_client) - clients
    assert max(sleeps) - min(sleeps) > 0
    assert connects >= clients  # the attempts really went to the network
    assert connects / elapsed <= clients / 0.1
    assert elapsed <= 3 + 1 + 1 + 1  # RETRY_MAX_DELAY + a backoff + a connect timeout + slack
