"""``conversations demo`` as a newcomer runs it: migrate, issue a key, serve, stop on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import environment_without_database, free_port

BIN = Path(sys.executable).parent
# uvloop's compiled loop, as mapped into a process that imported it.
UVLOOP_EXTENSION = re.compile(r"/uvloop/[^/\n]*\.so")

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def key(self) -> str:
        match = re.search(r"Demo key:\s+(\S+)", self.output())
        assert match is not None, self.output()
        return match.group(1)

    def loads_uvloop(self) -> bool:
        """Whether uvloop's extension is mapped: uvicorn imports uvloop only to run on it."""
        maps = Path(f"/proc/{self.process.pid}/maps").read_text()
        return UVLOOP_EXTENSION.search(maps) is not None


def demo_environment(tmp_path: Path) -> dict[str, str]:
    # A directory whose name says nothing about loops: its path shows in the process's maps.
    (tmp_path / "db").mkdir(exist_ok=True)
    return {**environment_without_database(), "DATABASE_URL": f"sqlite:///{tmp_path}/db/demo.db"}


@contextmanager
def running_demo(tmp_path: Path, *args: str) -> Iterator[Demo]:
    """The demo serving a fresh SQLite file, its output going to a log file; stopped after."""
    log = tmp_path / "demo.log"
    base = f"http://127.0.0.1:{(port := free_port())}"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(BIN / "conversations"), "demo", "--port", str(port), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=demo_environment(tmp_path),
        )
    demo = Demo(process, base, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the demo exited before serving:\n{demo.output()}"
            try:
                httpx.get(f"{base}/health/live", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"no answer in 30 s:\n{demo.output()}"
                time.sleep(0.1)
        yield demo
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_the_demo_serves_on_asyncios_loop_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    with running_demo(tmp_path) as demo:
        on_uvloop = demo.loads_uvloop()
        banner = demo.output()
        ready = httpx.get(f"{demo.base}/health/ready", timeout=5)
        demo.process.send_signal(signal.SIGINT)
        exit_code = demo.process.wait(timeout=15)
    assert not on_uvloop
    assert "Loop:      asyncio's" in banner
    assert ready.json()["status"] == "healthy"
    assert exit_code == 0


def test_the_demo_key_reads_the_api(tmp_path: Path) -> None:
    with running_demo(tmp_path) as demo:
        headers = {"Authorization": f"Bearer {demo.key()}"}
        listed = httpx.get(f"{demo.base}/v1/conversations", headers=headers, timeout=5)
        anonymous = httpx.get(f"{demo.base}/v1/conversations", timeout=5)
    assert listed.status_code == 200
    assert listed.json()["items"] == []
    assert anonymous.status_code == 401


def test_the_demo_serves_on_bastions_uvloop_when_asked(tmp_path: Path) -> None:
    with running_demo(tmp_path, "--loop", "uvloop") as demo:
        assert demo.loads_uvloop()
        assert "Loop:      uvloop, accepting connections in batches" in demo.output()


def test_an_unknown_loop_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "conversations"), "demo", "--loop", "trio"],
        capture_output=True,
        text=True,
        env=demo_environment(tmp_path),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "asyncio" in result.stderr
    assert "uvloop" in result.stderr
    assert not (tmp_path / "db" / "demo.db").exists()
