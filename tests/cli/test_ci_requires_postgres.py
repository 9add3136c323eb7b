"""Under CI=true a missing PostgreSQL fails the run; elsewhere it is one skip line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


def run_pytest(ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": ci, "TEST_POSTGRES_URL": UNREACHABLE}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "tests/integration/test_postgres_units.py",
            "tests/unit/test_urls.py",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_ci_fails_clearly_when_postgres_is_down() -> None:
    result = run_pytest("true")
    assert result.returncode != 0
    assert "PostgreSQL is required under CI=true" in result.stdout + result.stderr
    assert "127.0.0.1:1/nowhere" in result.stdout + result.stderr


def test_a_developer_machine_skips_postgres_tests_with_one_line() -> None:
    result = run_pytest("")
    assert result.returncode == 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if "PostgreSQL tests skipped" in line]
    assert len(lines) == 1
    assert "no server at postgresql://postgres@127.0.0.1:1/nowhere" in lines[0]
