"""Clients that hang up mid-request, against the reference service under real uvicorn.

The database answers slowly (1 s of latency through the fault proxy), so each request is still
waiting on PostgreSQL when its client closes the socket. Pass criteria (issue 4, cancellation
safety): afterwards no connection is checked out, no server session is ``idle in
transaction``, no lock is held, and the service answers the next request normally; a write
whose client left either landed whole or not at all.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from bastion import Database
from conversations.users import create_user
from tests.faults.leaks import asyncpg_dsn, server_sessions
from tests.faults.stack import FaultStack

ADMIN_TOKEN = "disconnect-admin-token-0123456789"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def served(fault_stack: FaultStack) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """uvicorn serving the reference service through the proxy; its URL and a user's headers."""
    stack = fault_stack
    async with Database(stack.settings()) as database:
        key = await create_user(database, "leaver")
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": stack.proxied_url,
        "DB_APPLICATION_NAME": stack.application_name,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "DB_POOL_SIZE": "5",
        "DB_MAX_OVERFLOW": "0",
    }
    server = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child, waited for below)
        [sys.executable, "-m", "uvicorn", "conversations.app:create_app", "--factory",
         "--port", str(port), "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(100):
                try:
                    if (await client.get("/health/live")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("uvicorn did not start")
        yield base, {"Authorization": f"Bearer {key}"}
    finally:
        server.terminate()
        await asyncio.to_thread(server.wait, 10)


async def _hang_up_during(port: int, request: bytes, after_s: float) -> None:
    """Send ``request`` and close the socket ``after_s`` later, before any answer."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    await asyncio.sleep(after_s)
    writer.close()
    await writer.wait_closed()


def _request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_clients_hanging_up_mid_request_leave_no_connection_transaction_or_lock(
    fault_stack: FaultStack, served: tuple[str, dict[str, str]]
) -> None:
    stack = fault_stack
    base, headers = served
    port = int(base.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=base) as client:
        created = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)
        assert created.status_code == 201
        messages = f"/v1/conversations/{created.json()['id']}/messages"

        stack.proxy.latency(1000, direction="downstream")
        hang_ups = [
            _hang_up_during(port, _request("GET", messages, headers), 0.3),
            _hang_up_during(port, _request("GET", "/v1/conversations", headers), 0.3),
            *(
                _hang_up_during(
                    port,
                    _request("POST", messages, headers, b'{"role": "user", "content": "left"}'),
                    0.3 + n * 0.4,
                )
                for n in range(5)
            ),
        ]
        await asyncio.gather(*hang_ups)
        stack.proxy.clear()

        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        deadline = time.monotonic() + 15
        while True:  # the abandoned requests finish on the server side in their own time
            metrics = (await client.get("/admin/database/metrics", headers=admin)).json()
            if metrics["pool"]["checked_out"] == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert metrics["pool"]["checked_out"] == 0

        connection = await asyncpg.connect(asyncpg_dsn(stack.admin_url))
        try:
            sessions = await server_sessions(connection, stack.application_name)
        finally:
            await connection.close()
        assert sessions.idle_in_transaction == []
        assert sessions.locks == []

        page = await client.get(messages, headers=headers)
        assert page.status_code == 200
        # Each abandoned write landed whole or not at all: count and rows agree.
        assert page.json()["total"] == len(page.json()["items"]) <= 5
