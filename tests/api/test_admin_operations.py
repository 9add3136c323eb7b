"""The admin operations API: backups, verify, restore, integrity, optimize, jobs and audit.

On both backends, through real HTTP handling (ASGI) and a real backup directory: a backup
made over the API restores the data it held; a restore needs its confirmation and never
overlaps another; ids from clients are never paths; bursts get 429; every action is audited
and no secret appears in any answer or log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from bastion import Database
from bastion.backup import BackupSettings
from bastion.fastapi import (
    create_admin_router,
    database_lifespan,
    install_error_handlers,
)
from conversations.app import create_app
from conversations.models import Conversation
from conversations.routes import conversations
from tests.conftest import Users, make_settings, serve

ADMIN_TOKEN = "admin-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SIGNING_KEY = "signing-" + "fedcba9876543210" * 3


def admin_app(database_url: str, backup_dir: Path, *, rate: str = "100/minute") -> FastAPI:
    app = FastAPI(lifespan=database_lifespan(make_settings(database_url, ADMIN_TOKEN=ADMIN_TOKEN)))
    install_error_handlers(app)
    backups = BackupSettings(BACKUP_DIR=backup_dir, BACKUP_SIGNING_KEY=SIGNING_KEY)
    app.include_router(create_admin_router(backups=backups, rate=rate))
    app.include_router(conversations.router)
    return app


@pytest.fixture
async def admin(
    database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, Path]]:
    backup_dir = tmp_path / "backups"
    app = admin_app(database_url, backup_dir)
    async with serve(app) as client:
        yield client, app, backup_dir


async def finished(client: httpx.AsyncClient, job: dict[str, Any]) -> dict[str, Any]:
    """Poll a job until it has ended; return its last state."""
    for _ in range(600):
        state = (await client.get(f"/admin/database/jobs/{job['id']}", headers=AUTH)).json()
        if state["state"] in ("succeeded", "failed"):
            return dict(state)
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job['id']} did not finish")


async def count_conversations(app: FastAPI) -> int:
    database: Database = app.state.database
    async with database.read_connection() as connection:
        return int(await connection.scalar(select(func.count()).select_from(Conversation)) or 0)


async def test_backup_verify_and_restore_round_trip_over_the_api(
    admin: tuple[httpx.AsyncClient, FastAPI, Path], users: Users
) -> None:
    client, app, _ = admin
    for title in ("first", "second"):
        await client.post("/v1/conversations", json={"title": title}, headers=users.alice)

    started = await client.post("/admin/database/backup", headers=AUTH)
    assert started.status_code == 202
    backup = await finished(client, started.json())
    assert backup["state"] == "succeeded", backup
    backup_id = backup["result"]["id"]
    assert backup["result"]["tables"]["conversations"]["rows"] == 2

    listed = (await client.get("/admin/database/backups", headers=AUTH)).json()
    assert [item["id"] for item in listed["backups"]] == [backup_id]
    manifest = (await client.get(f"/admin/database/backups/{backup_id}", headers=AUTH)).json()
    assert manifest["archive_sha256"] == backup["result"]["archive_sha256"]

    verify = await client.post(f"/admin/database/backups/{backup_id}/verify", headers=AUTH)
    assert verify.status_code == 202
    verified = await finished(client, verify.json())
    assert verified["state"] == "succeeded", verified
    assert verified["result"]["ok"] is True

    await client.post("/v1/conversations", json={"title": "after"}, headers=users.alice)
    assert await count_conversations(app) == 3

    dry = await client.post(
        "/admin/database/restore", json={"backup_id": backup_id, "dry_run": True}, headers=AUTH
    )
    assert dry.status_code == 200
    assert dry.json()["tables"]["conversations"] == 2
    unconfirmed = await client.post(
        "/admin/database/restore", json={"backup_id": backup_id}, headers=AUTH
    )
    assert unconfirmed.status_code == 400
    assert await count_conversations(app) == 3  # neither changed anything

    restore = await client.post(
        "/admin/database/restore", json={"backup_id": backup_id, "confirm": backup_id},
        headers=AUTH,
    )  # fmt: skip
    assert restore.status_code == 202
    restored = await finished(client, restore.json())
    assert restored["state"] == "succeeded", restored
    assert restored["result"]["safety_backup_id"]
    assert await count_conversations(app) == 2
    titles = (await client.get("/v1/conversations", headers=users.alice)).json()
    assert sorted(item["title"] for item in titles["items"]) == ["first", "second"]


async def test_a_second_restore_while_one_runs_is_refused_with_409(
    admin: tuple[httpx.AsyncClient, FastAPI, Path],
) -> None:
    client, _, _ = admin
    backup = await finished(
        client, (await client.post("/admin/database/backup", headers=AUTH)).json()
    )
    backup_id = backup["result"]["id"]
    body = {"backup_id": backup_id, "confirm": backup_id}
    first = await client.post("/admin/database/restore", json=body, headers=AUTH)
    second = await client.post("/admin/database/restore", json=body, headers=AUTH)
    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["code"] == "job_conflict"
    assert (await finished(client, first.json()))["state"] == "succeeded"


TRAVERSAL_IDS = [
    "../x",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc",
    "..%255c..%255cwindows",
    "%2Fetc%2Fpasswd",
    "x%00y",
    "a" * 300,
    "20261123T000000Z-abcdef12\u2215..",  # a unicode division slash, not "/"
    "planted",
]


async def test_no_client_id_ever_reaches_the_file_system(
    admin: tuple[httpx.AsyncClient, FastAPI, Path], tmp_path: Path
) -> None:
    """S26: every id parameter, fed a path traversal corpus, answers 400/404/422 and no file
    outside the backup directory is read, written or deleted."""
    client, _, backup_dir = admin
    await finished(client, (await client.post("/admin/database/backup", headers=AUTH)).json())
    outside = tmp_path / "outside.txt"
    outside.write_text("do not touch")
    (backup_dir / "planted.manifest.json").symlink_to(outside)
    (backup_dir / "planted.archive").symlink_to(outside)
    before = os.stat(outside)

    for bad in TRAVERSAL_IDS:
        answers = [
            await client.get(f"/admin/database/backups/{bad}", headers=AUTH),
            await client.post(f"/admin/database/backups/{bad}/verify", headers=AUTH),
            await client.get(f"/admin/database/jobs/{bad}", headers=AUTH),
            await client.post(
                "/admin/database/restore", json={"backup_id": bad, "dry_run": True}, headers=AUTH
            ),
            await client.post(
                "/admin/database/restore", json={"backup_id": bad, "confirm": bad}, headers=AUTH
            ),
        ]
        for answer in answers:
            assert answer.status_code in (400, 404, 405, 422), (bad, answer.status_code)
            assert "do not touch" not in answer.text

    after = os.stat(outside)
    assert outside.read_text() == "do not touch"
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino, before.st_mtime_ns, before.st_size,
    )  # fmt: skip
    listed = (await client.get("/admin/database/backups", headers=AUTH)).json()
    assert "planted" not in {item["id"] for item in listed["backups"]}


async def test_bursts_of_expensive_calls_get_429_with_retry_after(
    database_url: str, tmp_path: Path
) -> None:
    app = admin_app(database_url, tmp_path / "backups", rate="2/minute")
    async with serve(app) as client:
        answers = [await client.get("/admin/database/integrity", headers=AUTH) for _ in range(3)]
        # Another operation has its own window.
        optimize = await client.post("/admin/database/optimize", headers=AUTH)
        await finished(client, optimize.json())
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert int(answers[2].headers["Retry-After"]) >= 1
    assert optimize.status_code == 202


async def test_every_admin_action_and_refusal_is_audited_without_secrets(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """S29: a record when asked and one at the end, for successes, failures and refusals."""
    caplog.set_level(logging.INFO)
    app = admin_app(database_url, tmp_path / "backups")
    async with serve(app) as client:
        backup = await client.post("/admin/database/backup", headers=AUTH)
        await finished(client, backup.json())
        await client.get("/admin/database/backups/20990101T000000Z-00000000", headers=AUTH)
        await client.post("/admin/database/backups/20990101T000000Z-00000000/verify", headers=AUTH)
        await client.get("/admin/database/integrity", headers=AUTH)
        await client.post("/admin/database/backup", headers={"Authorization": "Bearer wrong"})
        audit = (await client.get("/admin/database/audit", headers=AUTH)).json()
    records, refusals = audit["records"], audit["refusals"]

    outcomes = [(record["action"], record["outcome"]) for record in records]
    assert ("backup.create", "requested") in outcomes
    assert ("backup.create", "accepted") in outcomes
    assert ("backup.create", "succeeded") in outcomes
    assert ("backup.verify", "failed") in outcomes
    assert ("integrity", "succeeded") in outcomes
    assert [(r["action"], r["outcome"]) for r in refusals] == [
        ("POST /admin/database/backup", "refused")
    ]
    assert refusals[0]["actor"].startswith("anonymous@")
    assert all(record["actor"].startswith("admin@") for record in records)
    audit_lines = [r.getMessage() for r in caplog.records if r.name == "bastion.audit"]
    assert len(audit_lines) == len(records) + len(refusals)
    for secret in (ADMIN_TOKEN, SIGNING_KEY):
        assert secret not in caplog.text
        assert secret not in str(audit)


async def test_the_token_is_checked_before_the_body_is_even_parsed(
    database_url: str, tmp_path: Path
) -> None:
    """A malformed body must not reveal an admin route: 404 when the API is off, 401 without
    a token — never the 422 that parsing the body first would give."""
    off = FastAPI(lifespan=database_lifespan(make_settings(database_url)))
    install_error_handlers(off)
    off.include_router(create_admin_router(backups=BackupSettings(BACKUP_DIR=tmp_path)))
    on = admin_app(database_url, tmp_path / "backups")
    bodies = [b"{not json", b'{"backup_id": 1, "unknown": true}', b"\xff\xfe"]
    async with serve(off) as client:
        answers_off = [
            await client.post("/admin/database/restore", content=body, headers=AUTH)
            for body in bodies
        ]
    async with serve(on) as client:
        answers_on = [await client.post("/admin/database/restore", content=body) for body in bodies]
    assert [answer.status_code for answer in answers_off] == [404, 404, 404]
    assert [answer.status_code for answer in answers_on] == [401, 401, 401]


async def test_integrity_and_optimize_answer_on_a_healthy_database(
    admin: tuple[httpx.AsyncClient, FastAPI, Path],
) -> None:
    client, _, _ = admin
    integrity = await client.get("/admin/database/integrity", headers=AUTH)
    optimize = await client.post("/admin/database/optimize", json={"vacuum": False}, headers=AUTH)
    done = await finished(client, optimize.json())
    assert integrity.status_code == 200
    assert integrity.json()["ok"] is True
    assert done["state"] == "succeeded"
    assert done["result"]["statements"]
    jobs = (await client.get("/admin/database/jobs", headers=AUTH)).json()["jobs"]
    assert jobs[0]["id"] == done["id"]


async def test_scheduled_backups_run_and_feed_readiness(database_url: str, tmp_path: Path) -> None:
    """With BACKUP_INTERVAL_S the reference service backs itself up, the admin API lists
    the scheduled backups, and /health/ready carries a healthy ``backup`` component."""
    backups = BackupSettings(
        BACKUP_DIR=tmp_path / "backups", BACKUP_SIGNING_KEY=SIGNING_KEY, BACKUP_INTERVAL_S=0.2
    )
    app = create_app(make_settings(database_url, ADMIN_TOKEN=ADMIN_TOKEN), backup_settings=backups)
    async with serve(app) as client:
        listed: list[dict[str, Any]] = []
        for _ in range(200):
            listed = (await client.get("/admin/database/backups", headers=AUTH)).json()["backups"]
            if listed:
                break
            await asyncio.sleep(0.05)
        ready = (await client.get("/health/ready")).json()
    assert listed, "no scheduled backup appeared"
    assert listed[0]["label"] == "scheduled"
    assert ready["components"]["backup"]["status"] == "healthy"
