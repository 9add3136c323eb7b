"""Redis for tests: the shared server (``TEST_REDIS_URL``) and throwaway servers to stop.

The shared server is probed once; when it does not answer, tests needing it are skipped with
the reason — except under ``CI=true``, where they fail. Tests that stop Redis get a
``redis-server`` of their own on a free port (no persistence), never the shared one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from bastion.cache import CacheSettings
from tests.conftest import free_port, unavailable

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require(problem: str) -> None:
    """Skip with ``problem`` — or fail, under ``CI=true``."""
    unavailable(f"Redis unavailable: {problem}")


@pytest.fixture(scope="session")
async def shared_redis_url() -> str:
    """The shared Redis server's URL, after checking that it answers."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        require(f"no Redis at {REDIS_URL} ({type(exc).__name__}); start it or set TEST_REDIS_URL")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
async def cache_settings(shared_redis_url: str) -> AsyncIterator[CacheSettings]:
    """Cache settings on the shared Redis, under a prefix of this test's own (removed after)."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield CacheSettings(REDIS_URL=shared_redis_url, CACHE_PREFIX=prefix)
    client = aioredis.Redis.from_url(shared_redis_url)
    try:
        names = [name async for name in client.scan_iter(match=prefix + "*", count=1000)]
        if names:
            await client.unlink(*names)
    finally:
        await client.aclose()


class RedisServer:
    """A ``redis-server`` of the test's own on 127.0.0.1, which it may stop and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it answers."""
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, commands get no answer."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw it (SIGCONT), with its data."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill it (SIGKILL: an outage, not a goodbye) and wait until it is gone."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)  # a frozen server must still die
            self._process.kill()
            self._process.wait(10)
            self._process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A throwaway Redis server, started; stopped after the test."""
    if shutil.which("redis-server") is None:
        require("redis-server not found on PATH")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
