"""``make soak``: mixed load on PostgreSQL for 10 minutes, watching memory and connections.

Every 30 s it records the server's RSS, its connections in ``pg_stat_activity`` and the
pool's checked-out count (from ``/health/ready``). It passes when RSS grows by less than 5 %
after the first minute and the server's connection count stays flat (never above what the
pools allow, and back to the idle level at the end). ``SOAK_SECONDS`` shortens it.
Writes ``bench/results/soak.json``; exits 1 when a criterion fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg

from bench.run import (
    LUA,
    POSTGRES_ADMIN_URL,
    RESULTS,
    ROOT,
    Server,
    create_postgres_database,
    drop_postgres_database,
)

DURATION_S = int(os.environ.get("SOAK_SECONDS", "600"))
SAMPLE_S = 30 if DURATION_S >= 120 else 5
POOL_SIZE, MAX_OVERFLOW = 10, 10


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def server_connections(database: str) -> int:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
            )
        )
    finally:
        await connection.close()


def checked_out(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=10) as reply:
        return int(json.load(reply)["components"]["pool"]["details"]["checked_out"])


def main() -> None:
    url = asyncio.run(create_postgres_database("bastion_soak"))
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DB_POOL_SIZE": str(POOL_SIZE),
        "DB_MAX_OVERFLOW": str(MAX_OVERFLOW),
        "PYTHONPATH": str(ROOT),
    }
    with tempfile.TemporaryDirectory(prefix="bastion-soak-") as tmp:
        workdir = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "bench.seed", str(workdir)], env=env, cwd=ROOT, check=True
        )
        server = Server("bastion", env, workdir)
        server.wait_ready()  # else wrk meets a closed port and the soak measures nothing
        wrk_env = {
            **os.environ,
            "BENCH_IDS": str(workdir / "ids.txt"),
            "BENCH_KEY": (workdir / "key.txt").read_text().strip(),
            "BENCH_MIX": "1",
        }
        load = subprocess.Popen(
            [
                "wrk",
                "-t2",
                "-c64",
                f"-d{DURATION_S}s",
                "-s",
                str(LUA),
                f"http://127.0.0.1:{server.port}",
            ],
            env=wrk_env,
            stdout=subprocess.PIPE,
            text=True,
        )
        samples = []
        started = time.monotonic()
        try:
            while load.poll() is None:
                time.sleep(SAMPLE_S)
                if load.poll() is not None:
                    break
                sample = {
                    "t_s": round(time.monotonic() - started),
                    "rss_mib": round(rss_mib(server.process.pid), 1),
                    "server_connections": asyncio.run(server_connections("bastion_soak")),
                    "pool_checked_out": checked_out(server.port),
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
            output = load.communicate()[0]
            idle_connections = asyncio.run(server_connections("bastion_soak"))
            idle_checked_out = checked_out(server.port)
        finally:
            server.stop()
    summary_line = next((line for line in output.splitlines() if "BENCH_JSON" in line), "")
    after_first_minute = [s for s in samples if s["t_s"] >= min(60, DURATION_S // 4)]
    baseline_rss = after_first_minute[0]["rss_mib"] if after_first_minute else 0.0
    peak_rss = max((s["rss_mib"] for s in after_first_minute), default=0.0)
    growth = (peak_rss - baseline_rss) / baseline_rss if baseline_rss else 0.0
    allowed = 2 * (POOL_SIZE + MAX_OVERFLOW)
    load_summary = json.loads(summary_line.split(" ", 1)[1]) if summary_line else None
    # A soak passes only on a load that ran: without this, a server that never answered
    # passed with no samples at all.
    load_ran = bool(load_summary and load_summary["requests"] > 0) and len(after_first_minute) >= 2
    peak_connections = max((s["server_connections"] for s in samples), default=0)
    report = {
        "duration_s": DURATION_S,
        "samples": samples,
        "wrk": load_summary,
        "load_ran": load_ran,
        "rss_growth_after_first_minute": round(growth, 4),
        "peak_server_connections": peak_connections,
        "connections_allowed": allowed,
        "idle_pool_checked_out": idle_checked_out,
        "idle_server_connections": idle_connections,
        "passed": load_ran
        and growth < 0.05
        and peak_connections <= allowed
        and idle_checked_out == 0,
    }
    asyncio.run(drop_postgres_database("bastion_soak"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
