"""Query metrics, the slow-query log, leak detection, Server-Timing, N+1, request ids, and
the admin API's authorization matrix — on the reference service, on both backends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from bastion import Database, fingerprint
from bastion.fastapi import DatabaseDep, create_admin_router
from conversations.app import create_app
from tests.conftest import Users, make_settings, serve

ADMIN_TOKEN = "admin-" + "0123456789abcdef" * 2
SLOW_SQL = {
    "postgresql": "SELECT pg_sleep(0.3)",
    # SQLite has no sleep: a counting loop that takes a few hundred milliseconds.
    "sqlite": "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 3000000) "
    "SELECT count(*) FROM n",
}


def add_probe_routes(app: FastAPI, backend: str) -> None:
    """Routes a real service would not have: slow, repetitive, and connection-hogging."""

    @app.get("/probe/slow")
    async def slow(database: DatabaseDep) -> dict[str, str]:
        async with database.read_connection() as connection:
            await connection.execute(text(SLOW_SQL[backend]))
        return {"ok": "yes"}

    @app.get("/probe/n-plus-one")
    async def n_plus_one(database: DatabaseDep) -> dict[str, int]:
        async with database.read_connection() as connection:
            for n in range(15):  # one query per item: the N+1 pattern, on purpose
                await connection.execute(text("SELECT :n + 0 AS item"), {"n": n})
        return {"items": 15}

    @app.get("/probe/hold")
    async def hold(database: DatabaseDep) -> dict[str, str]:
        async with database.read_connection() as connection:
            await connection.execute(text("SELECT 1"))
            await asyncio.sleep(1.2)
        return {"held": "yes"}


@pytest.fixture
async def observed(
    database_url: str, backend: str
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    settings = make_settings(
        database_url,
        SLOW_QUERY_THRESHOLD=0.2,
        LEAK_DETECTION_THRESHOLD=0.5,
        N_PLUS_ONE_THRESHOLD=10,
        ADMIN_TOKEN=ADMIN_TOKEN,
    )
    app = create_app(settings)
    add_probe_routes(app, backend)
    async with serve(app) as client:
        yield client, app


def sample(app: FastAPI, name: str, labels: dict[str, str] | None = None) -> float:
    database: Database = app.state.database
    value = database.metrics.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


async def test_metrics_count_exactly_the_statements_that_ran(
    observed: tuple[httpx.AsyncClient, FastAPI],
) -> None:
    _, app = observed
    database: Database = app.state.database
    statement = "SELECT 40 + :n AS answer"
    async with database.read_connection() as connection:
        for n in range(7):
            assert await connection.scalar(text(statement), {"n": n}) == 40 + n

    shape = fingerprint(statement)
    assert shape == "SELECT ? + ? AS answer"  # no value survives, not even the literal 40
    count = sample(app, "bastion_query_duration_seconds_count", {"fingerprint": shape})
    assert count == 7


async def test_a_slow_query_is_logged_with_its_route_and_request_id(
    observed: tuple[httpx.AsyncClient, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    client, app = observed
    caplog.set_level(logging.WARNING, logger="bastion.slow_query")

    response = await client.get("/probe/slow", headers={"X-Request-ID": "trace-slow-1"})

    assert response.status_code == 200
    slow = [r for r in caplog.records if r.name == "bastion.slow_query"]
    assert len(slow) == 1
    message = slow[0].getMessage()
    assert "route=GET /probe/slow" in message
    assert "request_id=trace-slow-1" in message
    assert slow[0].request_id == "trace-slow-1"  # type: ignore[attr-defined]
    assert sample(app, "bastion_slow_queries_total") == 1


async def test_a_connection_held_past_the_threshold_is_reported_with_its_route(
    observed: tuple[httpx.AsyncClient, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    client, app = observed
    caplog.set_level(logging.WARNING, logger="bastion.leaks")

    response = await client.get("/probe/hold", headers={"X-Request-ID": "hog-1"})

    assert response.status_code == 200
    leaks = [r.getMessage() for r in caplog.records if r.name == "bastion.leaks"]
    assert len(leaks) == 1, leaks
    assert "route=GET /probe/hold" in leaks[0]
    assert "request_id=hog-1" in leaks[0]
    database: Database = app.state.database
    assert database.leaks.reported == 1
    assert database.leaks.held() == []  # returned since


async def test_an_n_plus_one_endpoint_is_reported(
    observed: tuple[httpx.AsyncClient, FastAPI], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = observed
    caplog.set_level(logging.WARNING, logger="bastion.n_plus_one")

    response = await client.get("/probe/n-plus-one")

    assert response.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "bastion.n_plus_one"]
    assert len(warnings) == 1
    assert "15 runs of one statement in GET /probe/n-plus-one" in warnings[0]


async def test_api_responses_carry_server_timing_and_a_request_id(
    observed: tuple[httpx.AsyncClient, FastAPI], users: Users
) -> None:
    client, _ = observed
    created = await client.post("/v1/conversations", json={"title": "t"}, headers=users.alice)
    read = await client.get(
        f"/v1/conversations/{created.json()['id']}",
        headers={**users.alice, "X-Request-ID": "abc-123"},
    )

    assert read.status_code == 200
    timing = read.headers["server-timing"]
    assert timing.startswith("db;dur=")
    assert timing.endswith('desc="2 queries"')  # the key lookup and the read
    assert read.headers["x-request-id"] == "abc-123"
    assert len(created.headers["x-request-id"]) == 32  # generated when none was sent


@pytest.mark.parametrize(
    "hostile",
    ["", "x" * 200, "a b", "<script>", "id\x7f"],
    ids=["empty", "long", "space", "html", "del"],
)
async def test_a_malformed_request_id_is_replaced_not_echoed(
    observed: tuple[httpx.AsyncClient, FastAPI], hostile: str
) -> None:
    client, _ = observed
    response = await client.get("/health/live", headers={"X-Request-ID": hostile})
    assert response.headers["x-request-id"] != hostile
    assert len(response.headers["x-request-id"]) == 32


async def test_metrics_parse_and_hold_no_secret(
    database_url: str, backend: str, users: Users, caplog: pytest.LogCaptureFixture
) -> None:
    url = database_url
    if backend == "postgresql":
        # The test server trusts everyone, so a password in the URL is sent but not needed.
        url = (
            make_url(database_url)
            .set(password="hunter2-db-secret")
            .render_as_string(hide_password=False)
        )
    app = create_app(make_settings(url, ADMIN_TOKEN=ADMIN_TOKEN))
    caplog.set_level(logging.DEBUG)
    async with serve(app) as client:
        await client.post("/v1/conversations", json={"title": "t"}, headers=users.alice)
        await client.get("/v1/conversations/not-a-uuid", headers=users.alice)
        await client.get("/admin/database/info", headers={"Authorization": "Bearer wrong"})
        admin = await client.get(
            "/admin/database/info", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        exposition = (await client.get("/metrics")).text

    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    assert "bastion_query_duration_seconds" in families
    assert "bastion_pool_checked_out" in families
    assert "bastion_breaker_state" in families
    api_key = users.alice["Authorization"].removeprefix("Bearer ")
    for secret in ("hunter2-db-secret", ADMIN_TOKEN, api_key):
        assert secret not in exposition
        assert secret not in admin.text
        assert secret not in caplog.text
    assert admin.status_code == 200
    if backend == "postgresql":
        assert "***" in admin.json()["pool"]["url"]  # the password's place, masked


def admin_routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) of the admin router, found by walking the router itself.

    Also checks that the app documents no admin path the router does not have, so a route
    added to the app some other way cannot slip past the matrix either.
    """
    routes = sorted(
        (method, route.path)
        for route in create_admin_router().routes
        if isinstance(route, APIRoute)
        for method in route.methods
    )
    documented = {path for path in app.openapi()["paths"] if path.startswith("/admin")}
    assert documented == {path for _, path in routes}
    return routes


async def test_every_admin_route_denies_by_default(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The authorization matrix: a new admin route is in it automatically."""
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    app = create_app(make_settings(database_url, ADMIN_TOKEN=ADMIN_TOKEN))
    routes = admin_routes(app)
    assert {path for _, path in routes} >= {
        "/admin/database/info",
        "/admin/database/metrics",
        "/admin/database/metrics/history",
        "/admin/database/metrics/summary",
        "/admin/database/backup",
        "/admin/database/backups",
        "/admin/database/backups/{backup_id}",
        "/admin/database/backups/{backup_id}/verify",
        "/admin/database/restore",
        "/admin/database/prune",
        "/admin/database/integrity",
        "/admin/database/optimize",
        "/admin/database/jobs",
        "/admin/database/jobs/{job_id}",
        "/admin/database/audit",
    }
    async with serve(app) as client:
        for method, path in routes:
            no_creds = await client.request(method, path)
            wrong_scheme = await client.request(method, path, headers={"Authorization": "Basic x"})
            wrong = await client.request(method, path, headers={"Authorization": "Bearer nope"})
            prefix = await client.request(
                method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}
            )
            right = await client.request(
                method, path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            )
            assert no_creds.status_code == 401, (method, path)
            assert no_creds.headers["www-authenticate"] == "Bearer"
            assert wrong_scheme.status_code == 401, (method, path)
            assert wrong.status_code == 403, (method, path)
            assert prefix.status_code == 403, (method, path)
            # Past the guard: answered by the route (200/202, or 404/422 for the literal
            # "{backup_id}" or a missing body) — never refused, never a crash.
            assert right.status_code in (200, 202, 404, 422), (method, path, right.text)
            other = "DELETE" if method == "GET" else "GET"
            assert (await client.request(other, path)).status_code == 405, (other, path)
        unknown = await client.get(
            "/admin/database/nope", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert unknown.status_code == 404
        await jobs_finished(client, {"Authorization": f"Bearer {ADMIN_TOKEN}"})


async def jobs_finished(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    """Wait until the jobs the matrix started (a backup, an optimize) have ended."""
    for _ in range(600):
        jobs = (await client.get("/admin/database/jobs", headers=auth)).json()["jobs"]
        if all(job["state"] in ("succeeded", "failed") for job in jobs):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("admin jobs did not finish")


async def test_without_a_token_the_admin_api_is_off(database_url: str) -> None:
    app = create_app(make_settings(database_url))
    async with serve(app) as client:
        for method, path in admin_routes(app):
            response = await client.request(method, path, headers={"Authorization": "Bearer x"})
            assert response.status_code == 404, (method, path)


async def test_admin_info_metrics_history_and_summary(
    observed: tuple[httpx.AsyncClient, FastAPI], backend: str
) -> None:
    client, app = observed
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await client.get("/probe/n-plus-one")
    database: Database = app.state.database
    database.history.take(pool_checked_out=0, breaker="closed")

    info = (await client.get("/admin/database/info", headers=auth)).json()
    metrics = (await client.get("/admin/database/metrics", headers=auth)).json()
    history = (await client.get("/admin/database/metrics/history", headers=auth)).json()
    summary = (await client.get("/admin/database/metrics/summary", headers=auth)).json()

    assert info["database"]["backend"] == backend
    assert {"conversations", "messages"} <= {table["name"] for table in info["database"]["tables"]}
    assert info["migrations"]["current"] == [_head()]
    assert metrics["queries"] >= 15
    assert metrics["breaker"]["state"] == "closed"
    assert history["snapshots"][-1]["queries"] >= 15
    assert summary["queries"] >= 15
    assert summary["p99_ms"] is not None
    top = [item["fingerprint"] for item in summary["top_fingerprints"]]
    assert "SELECT ? + ? AS item" in top


def _head() -> Any:
    from bastion.migrations import head_revisions

    (head,) = head_revisions("conversations:migrations")
    return head
