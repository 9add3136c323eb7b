"""``conversations demo`` as a newcomer runs it: migrate, issue a key, serve, stop on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_demo(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The demo serving a fresh SQLite file; yields the process and its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/demo.db"
    process = subprocess.Popen(
        [str(BIN / "conversations"), "demo", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "the demo exited before serving"
            try:
                httpx.get(f"{base}/health/live", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the demo did not answer within 30 s"
                time.sleep(0.1)
        yield process, base
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def demo_key(output: str) -> str:
    match = re.search(r"Demo key:\s+(\S+)", output)
    assert match is not None, output
    return match.group(1)


def loads_uvloop(pid: int) -> bool:
    """Whether uvloop's extension is mapped into the process: uvicorn imports it only to use it."""
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")


def test_the_demo_serves_on_asyncios_loop_and_its_key_works(tmp_path: Path) -> None:
    with running_demo(tmp_path) as (process, base):
        on_uvloop = loads_uvloop(process.pid)
        ready = httpx.get(f"{base}/health/ready", timeout=5).json()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
    key = demo_key(output)
    assert not on_uvloop
    assert ready["status"] == "healthy"
    assert process.returncode == 0
    assert key.startswith("cv_")


def test_the_demo_key_reads_the_api(tmp_path: Path) -> None:
    with running_demo(tmp_path) as (process, base):
        # The banner is printed before serving starts; read it without waiting for exit.
        assert process.stdout is not None
        banner = ""
        while "Demo key:" not in banner:
            line = process.stdout.readline()
            assert line, banner
            banner += line
        headers = {"Authorization": f"Bearer {demo_key(banner)}"}
        listed = httpx.get(f"{base}/v1/conversations", headers=headers, timeout=5)
        anonymous = httpx.get(f"{base}/v1/conversations", timeout=5)
    assert listed.status_code == 200
    assert listed.json()["items"] == []
    assert anonymous.status_code == 401


def test_the_demo_serves_on_uvloop_when_asked(tmp_path: Path) -> None:
    with running_demo(tmp_path, "--loop", "uvloop") as (process, _):
        assert loads_uvloop(process.pid)


def test_an_unknown_loop_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path}/demo.db"
    result = subprocess.run(
        [str(BIN / "conversations"), "demo", "--loop", "trio"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "asyncio" in result.stderr
    assert "uvloop" in result.stderr
    assert not (tmp_path / "demo.db").exists()
