"""Behind PgBouncer in transaction mode (Debian's pgbouncer, started here on a free port).

Transaction pooling hands every transaction whichever server connection is free, which breaks
cached and named prepared statements and refuses start-up settings. ``DB_PGBOUNCER=true``
must make every kind of unit work anyway, under concurrency.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import literal, select, text
from sqlalchemy.engine import make_url

from bastion import (
    Database,
    DatabaseSettings,
    DatabaseUnavailableError,
    HealthChecker,
    HealthStatus,
)
from conversations import MIGRATIONS
from tests.conftest import free_port, unavailable

pytestmark = pytest.mark.postgres

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
def pgbouncer_url(postgres_test_url: str) -> Iterator[str]:
    if not Path(PGBOUNCER).exists():
        unavailable("pgbouncer is not installed (apt-get install -y pgbouncer)")
    server = make_url(postgres_test_url)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bastion-pgbouncer-"))
    (workdir / "users.txt").write_text(f'"{server.username}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.host} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir}/users.txt\n"
        "pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 500\n"
        f"logfile = {workdir}/pgbouncer.log\npidfile = {workdir}/pgbouncer.pid\n"
    )
    command = [PGBOUNCER, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        shutil.chown(workdir, "postgres")
        for child in workdir.iterdir():
            shutil.chown(child, "postgres")
        command = ["runuser", "-u", "postgres", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("pgbouncer did not start") from None
                time.sleep(0.05)
        yield server.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


async def exercise(database: Database, worker: int) -> None:
    """Every kind of unit, with statements other workers also prepare."""
    for step in range(5):
        async with database.read_connection() as connection:
            assert await connection.scalar(text("SELECT :n + 1"), {"n": step}) == step + 1
        async with database.read_connection() as connection:
            # Reads here run in a READ ONLY transaction, which SQLAlchemy must know of (so that
            # commit() and rollback() reach it), whichever path a select() takes.
            for _ in range(2):
                assert await connection.scalar(select(literal(step) + 1)) == step + 1
                assert connection.in_transaction()
        async with database.write() as session:
            await session.execute(
                text("INSERT INTO bouncer_rows (worker, step) VALUES (:w, :s)"),
                {"w": worker, "s": step},
            )
        async with database.read() as session:
            rows = await session.scalar(
                text("SELECT count(*) FROM bouncer_rows WHERE worker = :w"), {"w": worker}
            )
            assert rows == step + 1
        async with database.read(consistent=True) as session:
            assert await session.scalar(text("SELECT count(*) FROM bouncer_rows")) is not None


async def test_every_unit_works_behind_pgbouncer_in_transaction_mode(
    pgbouncer_url: str,
) -> None:
    settings = DatabaseSettings(
        DATABASE_URL=pgbouncer_url, DB_PGBOUNCER=True, DB_POOL_SIZE=10, DB_MAX_OVERFLOW=0
    )
    async with Database(settings) as database:
        async with database.write() as session:
            await session.execute(text("DROP TABLE IF EXISTS bouncer_rows"))
            await session.execute(text("CREATE TABLE bouncer_rows (worker int, step int)"))
        try:
            await asyncio.gather(*(exercise(database, worker) for worker in range(20)))
            async with database.read() as session:
                total = await session.scalar(text("SELECT count(*) FROM bouncer_rows"))
        finally:
            async with database.write() as session:
                await session.execute(text("DROP TABLE bouncer_rows"))
    assert total == 100


async def test_without_the_setting_pgbouncer_refuses_the_read_pool(pgbouncer_url: str) -> None:
    """The control: the direct configuration does not survive transaction pooling."""
    settings = DatabaseSettings(DATABASE_URL=pgbouncer_url, DB_CONNECT_TIMEOUT=5)
    with pytest.raises(DatabaseUnavailableError):
        async with Database(settings):
            pass


async def test_health_checks_work_behind_pgbouncer(pgbouncer_url: str) -> None:
    """The probe's SELECT 1, revisions and figures share one transaction, so one server."""
    settings = DatabaseSettings(
        DATABASE_URL=pgbouncer_url, DB_PGBOUNCER=True, DB_POOL_SIZE=10, DB_MAX_OVERFLOW=0
    )
    async with Database(settings) as database:
        # Twenty checkers, not one: their probes must run at the same time, not be shared.
        checkers = [HealthChecker(database, migrations=MIGRATIONS) for _ in range(20)]
        reports = await asyncio.gather(*(checker.check() for checker in checkers))

    assert {report.status for report in reports} == {HealthStatus.HEALTHY}
    probe = reports[0].component("database")
    assert probe is not None
    assert probe.details["size_bytes"] > 0
