"""Readiness that tells the truth while the database stops, comes back, slows down or goes silent.

Against the throwaway PostgreSQL behind the fault proxy (``tests/faults/stack.py``), through
the reference service's ``/health/ready``:

* the server stopped under the service (``pg_ctl stop -m fast``): 503 within 5 s of the stop,
  and *healthy* again (200, every component healthy) within 5 s of the server accepting
  connections — with only probes arriving, and under request load, where the breaker opens
  and must close again;
* latency above a lowered ``HEALTH_LATENCY_DEGRADED``: degraded, still 200 (a slow database
  still serves; taking every instance out of rotation would make it an outage);
* a black hole: 503 within the check's 2 s deadline plus the cache (the silent connection's
  socket is cut at the deadline, not closed politely), and it is dropped rather than lent to
  the next unit.

Each ends with the leak check. The figures are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bastion import Database
from conversations.app import create_app
from conversations.users import create_user
from tests.conftest import serve
from tests.faults.leaks import assert_no_leaks, leak_guard
from tests.faults.stack import FaultStack

SLO_S = 5.0


def _healthy(response: httpx.Response) -> bool:
    return response.status_code == 200 and response.json()["status"] == "healthy"


async def _until(
    client: httpx.AsyncClient, wanted: Callable[[httpx.Response], bool], *, give_up_s: float = 30
) -> tuple[float, httpx.Response]:
    """Seconds until ``/health/ready`` (asked every 100 ms) answers as ``wanted``, and that answer.

    Polls past the SLO, so a miss reports by how much instead of only that it missed.
    """
    started = time.monotonic()
    while True:
        response = await client.get("/health/ready")
        if wanted(response):
            return time.monotonic() - started, response
        if time.monotonic() - started > give_up_s:
            raise AssertionError(f"never as wanted in {give_up_s}s; last: {response.text}")
        await asyncio.sleep(0.1)


async def _requests(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], statuses: Counter[int]
) -> None:
    """Request load until cancelled: a GET every 20 ms."""
    while True:
        statuses[(await client.get(url, headers=headers)).status_code] += 1
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("load", [False, True], ids=["probes-only", "under-load"])
async def test_readiness_follows_the_server_stopping_and_coming_back(
    fault_stack: FaultStack, load: bool
) -> None:
    stack = fault_stack
    settings = stack.settings(
        DB_CONNECT_TIMEOUT=2, BREAKER_FAILURE_THRESHOLD=5, BREAKER_RESET_TIMEOUT=2
    )
    app = create_app(settings)
    statuses: Counter[int] = Counter()
    with leak_guard():
        async with serve(app) as client:
            database: Database = app.state.database
            headers = {"Authorization": f"Bearer {await create_user(database, 'ann')}"}
            created = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)
            url = f"/v1/conversations/{created.json()['id']}"
            before = await client.get("/health/ready")
            requests = (
                [asyncio.create_task(_requests(client, url, headers, statuses))] if load else []
            )

            stopping_at = time.monotonic()
            await asyncio.to_thread(stack.server.stop, "fast")
            _, unready = await _until(client, lambda response: response.status_code == 503)
            unready_s = time.monotonic() - stopping_at
            await asyncio.sleep(1.5)  # an outage, not a blip: under load the breaker opens
            during = await client.get("/health/ready")
            opened = database.breaker.opened_count

            await asyncio.to_thread(stack.server.start)  # returns once it accepts connections
            back_s, back = await _until(client, _healthy)

            for task in requests:
                task.cancel()
            await asyncio.gather(*requests, return_exceptions=True)
            await assert_no_leaks(database, admin_url=stack.admin_url)

    figures = {
        "load": load,
        "unready_after_stop_s": round(unready_s, 2),
        "healthy_after_start_s": round(back_s, 2),
        "breaker_opened": opened,
        "request_statuses": dict(statuses),
        "error_during_outage": during.json()["components"]["database"]["error"],
    }
    print(f"health outage figures: {figures}")
    assert _healthy(before)
    assert unready_s <= SLO_S
    assert back_s <= SLO_S
    for body in (unready.json(), during.json()):
        assert body["status"] == "unhealthy"
        assert body["components"]["database"]["status"] == "unhealthy"
        assert body["components"]["database"]["error"] in {"database_unavailable", "circuit_open"}
        assert stack.proxied_url.split("@")[-1] not in str(body)  # no host, port or database
    assert during.status_code == 503
    assert all(c["status"] == "healthy" for c in back.json()["components"].values())
    if load:
        assert opened >= 1  # the breaker did open, and readiness saw it close again
        assert during.json()["components"]["breaker"]["status"] in {"unhealthy", "degraded"}
        assert statuses[200] > 0
        assert statuses[503] > 0
    else:
        assert opened == 0  # probes alone never trip the breaker: they only observe it


async def test_latency_over_the_threshold_reads_degraded_but_stays_ready(
    fault_stack: FaultStack,
) -> None:
    stack = fault_stack
    app = create_app(stack.settings(HEALTH_LATENCY_DEGRADED=0.1))
    with leak_guard():
        async with serve(app) as client:
            database: Database = app.state.database
            before = await client.get("/health/ready")
            stack.proxy.latency(200, direction="downstream")
            degraded_s, slow = await _until(
                client, lambda response: response.json()["status"] == "degraded"
            )
            stack.proxy.clear()
            recovered_s, _ = await _until(client, _healthy)
            await assert_no_leaks(database, admin_url=stack.admin_url)

    body = slow.json()
    print(
        f"health latency figures: {{'degraded_after_s': {degraded_s:.2f}, "
        f"'latency_ms': {body['components']['database']['latency_ms']}, "
        f"'healthy_again_after_s': {recovered_s:.2f}}}"
    )
    assert _healthy(before)
    assert slow.status_code == 200
    assert degraded_s <= SLO_S
    database_health = body["components"]["database"]
    assert (database_health["status"], database_health["error"]) == ("degraded", "slow")
    assert database_health["latency_ms"] >= 200
    others = {name: c["status"] for name, c in body["components"].items() if name != "database"}
    assert others == {"pool": "healthy", "breaker": "healthy", "migrations": "healthy"}


async def test_a_black_hole_is_unready_within_the_deadline_and_its_connection_is_dropped(
    fault_stack: FaultStack,
) -> None:
    stack = fault_stack
    app = create_app(stack.settings())
    with leak_guard():
        async with serve(app) as client:
            database: Database = app.state.database
            before = await client.get("/health/ready")
            stack.proxy.blackhole()
            holing_at = time.monotonic()
            _, silent = await _until(client, lambda response: response.status_code == 503)
            unready_s = time.monotonic() - holing_at
            stack.proxy.clear()
            recovered_s, _ = await _until(client, _healthy)
            await assert_no_leaks(database, admin_url=stack.admin_url)

    figures: dict[str, Any] = {
        "unready_after_s": round(unready_s, 2),
        "healthy_again_after_s": round(recovered_s, 2),
    }
    print(f"health black hole figures: {figures}")
    assert _healthy(before)
    # The 2 s deadline, plus up to one cached second, plus polling; not 2 s more for a
    # graceful close of the silent connection (its socket is cut at the deadline).
    assert unready_s <= 3.5
    database_health = silent.json()["components"]["database"]
    assert (database_health["status"], database_health["error"]) == ("unhealthy", "timeout")
    assert database_health["details"]["waiting_for"] == "an answer"
    # The abandoned connection was not pooled: once the cached answer expires, the next probe
    # gets a working connection at once.
    assert recovered_s <= 1.5
