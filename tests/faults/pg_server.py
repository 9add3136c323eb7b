"""A throwaway PostgreSQL 15 server that fault tests may stop, crash and restart at will.

The shared server (port 5432, ``TEST_POSTGRES_URL``) must never be stopped under the other
tests' feet, so fault tests get a cluster of their own: ``initdb`` into a temporary directory,
listening on 127.0.0.1 only, on a free port below the ephemeral range (nothing dialling out
can take it while the server is down), with its Unix socket and its log in that directory.
Durability settings are the production ones (``fsync``, ``synchronous_commit``), since
crash tests are about what survives.

PostgreSQL refuses to run as root; as root, every server command runs as the ``postgres``
user through ``runuser``, on a directory handed to that user.

The control methods (``start``, ``stop``, ``kill``...) block while the server changes
state (up to a few seconds). From an async test that needs its event loop to go on meanwhile
(a proxy or an application on the same loop), call them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from bastion import Database, DatabaseSettings
from bastion.migrations import upgrade
from conversations import MIGRATIONS
from tests.conftest import unavailable

BINDIR = Path("/usr/lib/postgresql/15/bin")
INITDB = BINDIR / "initdb"
PG_CTL = BINDIR / "pg_ctl"
POSTGRES = BINDIR / "postgres"
STOP_MODES = ("smart", "fast", "immediate")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _running_as_root() -> bool:
    return os.geteuid() == 0


def missing_requirement() -> str | None:
    """Why a throwaway server cannot be run here, or ``None`` if it can."""
    missing = [str(path) for path in (INITDB, PG_CTL, POSTGRES) if not path.exists()]
    if missing:
        return f"PostgreSQL 15 server binaries not found ({', '.join(missing)})"
    if _running_as_root():
        if shutil.which("runuser") is None:
            return "runuser not found (util-linux); it runs PostgreSQL as postgres under root"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no 'postgres' user to run PostgreSQL as (it refuses to run as root)"
    return None


def require_throwaway_server() -> None:
    """Skip the test if a throwaway server cannot be run here (fail it under ``CI=true``)."""
    problem = missing_requirement()
    if problem is not None:
        unavailable(f"throwaway PostgreSQL server unavailable: {problem}")


def _free_port() -> int:
    """A free TCP port on 127.0.0.1, below the ephemeral range when possible.

    The server keeps its port across restarts; an ephemeral port could meanwhile become
    the local port of some outgoing connection, and the restart would fail.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = random.sample(range(20000, low), k=50) if low > 20100 else [0] * 3
    for candidate in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise RuntimeError("no free port for the throwaway PostgreSQL server")


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ")"
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


class PostgresServer:
    """A PostgreSQL 15 cluster of its own, in a temporary directory (see the module doc).

    ``PostgresServer()`` only picks the directory and the port; :meth:`init` runs initdb.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bastion-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = _free_port()
        if _running_as_root():
            shutil.chown(self.root, "postgres", "postgres")

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this server (asyncpg and Bastion both take it)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- lifecycle -------------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster (initdb) and configure it."""
        self._run(
            str(INITDB),
            "-D",
            str(self.datadir),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",  # the cluster is thrown away; initdb's own fsync only costs time
            "--no-instructions",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "max_connections": "200",
            "shared_buffers": "32MB",
            # What survives a crash is the point of these tests: durability as in production.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "logging_collector": "off",  # pg_ctl -l sends the server's stderr to the log file
        }
        with (self.datadir / "postgresql.conf").open("a") as config:
            config.write("\n# bastion fault tests\n")
            config.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self, wait: bool = True) -> None:
        """Start the server; with ``wait``, return once it accepts connections.

        After :meth:`kill` or an immediate stop this runs crash recovery first.
        """
        self._remove_stale_lock_files()
        self._run(
            str(PG_CTL),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-t",
            "60",
            "-w" if wait else "-W",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server with ``pg_ctl stop -m smart|fast|immediate`` and wait for it.

        smart waits for clients to disconnect, fast ends their sessions (rolling back), and
        immediate makes every process quit at once, like a crash (the next start recovers).
        Does nothing if the server is not running.
        """
        if mode not in STOP_MODES:
            raise ValueError(f"mode must be one of {STOP_MODES}, not {mode!r}")
        if not self.is_running():
            return
        self._run(str(PG_CTL), "-D", str(self.datadir), "-m", mode, "-t", "60", "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop (``mode``) and start again, waiting until it accepts connections."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and its processes, wait until all are gone.

        Every server process dies at once, as in a power cut or an OOM kill of the whole
        server: clients see their connections drop, nothing gets written or cleaned up.
        Killing the postmaster alone would leave its backends to exit when they notice,
        and no new postmaster starts while they still hold the shared memory. The next
        :meth:`start` runs crash recovery.
        """
        pid = self._postmaster_pid()
        if pid is None or not _process_alive(pid):
            return
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_process_alive(victim) for victim in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL processes {victims} survived SIGKILL")
            time.sleep(0.01)
        self._remove_stale_lock_files()

    def is_running(self) -> bool:
        """Whether a postmaster of this cluster is alive (starting, up or stopping)."""
        pid = self._postmaster_pid()
        return pid is not None and _process_alive(pid)

    def halt(self) -> None:
        """Stop the server at once (immediate, or kill if that fails); it stays startable."""
        try:
            self.stop("immediate")
        except RuntimeError:
            self.kill()
        finally:
            if self.is_running():
                self.kill()

    def destroy(self) -> None:
        """Halt the server and delete its directory."""
        try:
            self.halt()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        """The server log so far."""
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- databases -------------------------------------------------------------------------

    async def create_database(self, name: str) -> str:
        """Create database ``name`` (an identifier) and return its URL."""
        if not _NAME.match(name):
            raise ValueError(f"not a plain identifier: {name!r}")
        connection = await asyncpg.connect(self.url(), timeout=10)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return self.url(name)

    async def terminate_backends(self, database: str) -> int:
        """End every other client session on ``database``; return how many ended.

        Waits (up to 5 s each) until the sessions' processes are gone, so their clients'
        connections are closed by the time this returns.
        """
        connection = await asyncpg.connect(self.url(), timeout=10)
        try:
            # Chosen first and terminated one by one: in a single WHERE clause the planner
            # may call pg_terminate_backend before the other conditions have filtered.
            sessions = await connection.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1"
                " AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                database,
            )
            ended = 0
            for session in sessions:
                if await connection.fetchval(
                    "SELECT pg_terminate_backend($1, 5000)", session["pid"]
                ):
                    ended += 1
        finally:
            await connection.close()
        return ended

    # -- internals -------------------------------------------------------------------------

    def _run(self, *command: str) -> None:
        if _running_as_root():
            command = ("runuser", "-u", "postgres", "--", *command)
        result = subprocess.run(
            command,
            cwd=self.root,  # postgres may not be allowed into the caller's directory
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            log = "\n".join(self.log_text().splitlines()[-20:])
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n--- server log (tail) ---\n{log}"
            )

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line)
        except (FileNotFoundError, ValueError):
            return None

    def _remove_stale_lock_files(self) -> None:
        """Remove lock files whose process is dead.

        PostgreSQL removes them itself when their process is gone, but it asks with
        kill(pid, 0), which a zombie answers; an unreaped postmaster would block the restart.
        """
        for lock in (self.datadir / "postmaster.pid", self.root / f".s.PGSQL.{self.port}.lock"):
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (FileNotFoundError, ValueError):
                continue
            if not _process_alive(pid):
                lock.unlink(missing_ok=True)


async def migrated_database(server: PostgresServer, name: str) -> str:
    """Create database ``name`` on ``server``, migrate it to head, return its URL."""
    url = await server.create_database(name)
    async with Database(DatabaseSettings(DATABASE_URL=url)) as database:
        await upgrade(database, MIGRATIONS)
    return url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The throwaway server, created and started once per session and destroyed after.

    Skipped when PostgreSQL 15's binaries (or runuser, as root) are missing; under
    ``CI=true`` that is a failure instead.
    """
    require_throwaway_server()
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def fresh_postgres_server(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """The session's throwaway server, running when the test starts and after it ends.

    A test may stop or kill it; the next test still finds it up.
    """
    if not postgres_server.is_running():
        postgres_server.start()
    yield postgres_server
    if not postgres_server.is_running():
        postgres_server.start()
