"""Real uvicorn worker processes of the reference service, for the WebSocket tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from tests.conftest import free_port

ADMIN_TOKEN = "live-admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Worker:
    """One uvicorn process serving the reference service (``conversations.app``)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        self._env = {**os.environ, **env, "ADMIN_TOKEN": ADMIN_TOKEN}
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self._process = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child)
            [sys.executable, "-m", "uvicorn", "conversations.app:create_app", "--factory",
             "--port", str(self.port), "--log-level", "warning", "--ws", "websockets"],
            env=self._env,
        )  # fmt: skip
        async with httpx.AsyncClient(base_url=self.http) as client:
            for _ in range(200):
                try:
                    if (await client.get("/health/live")).status_code == 200:
                        return
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        raise AssertionError("uvicorn did not start")

    async def checked_out(self) -> int:
        """Connections this worker's pools have lent out now."""
        async with httpx.AsyncClient(base_url=self.http) as client:
            metrics = (await client.get("/admin/database/metrics", headers=ADMIN)).json()
        return int(metrics["pool"]["checked_out"])

    async def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            await asyncio.to_thread(self._process.wait, 15)


@asynccontextmanager
async def running(count: int, env: dict[str, str]) -> AsyncIterator[list[Worker]]:
    workers = [Worker(env) for _ in range(count)]
    try:
        await asyncio.gather(*(worker.start() for worker in workers))
        yield workers
    finally:
        await asyncio.gather(*(worker.stop() for worker in workers))
