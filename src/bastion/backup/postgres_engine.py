"""PostgreSQL backups with ``pg_dump -Fc`` and restores with ``pg_restore``, as subprocesses.

The tools run from an argument list (never a shell); the password goes in ``PGPASSWORD``,
never on the command line where ``ps`` would show it. The client tools must be at least the
server's major version (an older ``pg_dump`` refuses a newer server, or silently misses what
it does not know), which is checked before each run.

*Dump*: a read-only REPEATABLE READ transaction exports its snapshot; ``pg_dump
--snapshot`` dumps exactly that snapshot while the same transaction digests every table, so the
manifest's row counts and hashes describe the archive exactly, whatever is written meanwhile.

*Restore*: ``pg_restore --clean --if-exists --single-transaction --exit-on-error``: the whole
replacement is one transaction, so a failed or killed restore rolls back to the old database.

*Check*: the dump is restored into a temporary database (``bastion_verify_<hex>``), checked,
digested and dropped.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Final, Literal

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bastion.backup.engines import (
    CopyCheck,
    DumpInfo,
    LockName,
    StageProgress,
    alembic_revisions,
    check_database,
)
from bastion.backup.errors import BackupToolError
from bastion.backup.locks import advisory_lock
from bastion.database import Database
from bastion.maintenance.digest import table_digests

__all__ = ["PostgresEngine", "tool_major_version"]

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")
_STDERR_LINES: Final = 20


class PostgresEngine:
    """Backups of a PostgreSQL database."""

    backend: Literal["postgresql"] = "postgresql"

    def __init__(self, database: Database, bin_dir: Path | None = None) -> None:
        self.database = database
        self.url: URL = database.settings.url
        self.bin_dir = bin_dir

    async def dump(self, destination: Path) -> DumpInfo:
        """Dump the live database's current snapshot to ``destination`` and digest it."""
        await self._check_tool("pg_dump")
        async with self.database.read(consistent=True) as session:
            connection = await session.connection()
            snapshot = await connection.scalar(text("SELECT pg_export_snapshot()"))
            version = str(await connection.scalar(text("SHOW server_version")))
            dumping = asyncio.ensure_future(
                self._run(
                    "pg_dump",
                    ["--format=custom", f"--snapshot={snapshot}", f"--file={destination}"],
                    self.url,
                )
            )
            try:
                revisions = await alembic_revisions(connection)
                tables = await table_digests(connection)
            except BaseException:
                # Failed or cancelled: pg_dump must not outlive the snapshot it reads.
                dumping.cancel()
                await asyncio.gather(dumping, return_exceptions=True)
                raise
            # The snapshot must stay open until pg_dump is done with it: wait inside the unit.
            await dumping
        return DumpInfo(server_version=version, alembic_revisions=revisions, tables=tables)

    async def check_copy(self, dump: Path, work_dir: Path) -> CopyCheck:
        """Restore ``dump`` into a temporary database, check and digest it, then drop it."""
        await self._check_tool("pg_restore")
        name = f"bastion_verify_{secrets.token_hex(6)}"
        await self._admin(f'CREATE DATABASE "{name}"')
        scratch = self.url.set(database=name)
        try:
            await self._run(
                "pg_restore",
                ["--no-owner", "--no-acl", "--exit-on-error", "--single-transaction", str(dump)],
                scratch,
            )
            return await check_database(scratch.render_as_string(hide_password=False))
        finally:
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def restore(self, dump: Path, work_dir: Path, progress: StageProgress | None) -> None:
        """Replace the live database's objects with the dump's, in one transaction."""
        await self._check_tool("pg_restore")
        listing = await self._run("pg_restore", ["--list", str(dump)], None)
        total = sum(1 for line in listing.splitlines() if line and not line.startswith(";"))
        done = 0

        def on_line(line: str) -> None:
            nonlocal done
            if progress is not None and line.startswith("pg_restore: "):
                done = min(done + 1, total)
                progress(done, total)

        await self._run(
            "pg_restore",
            [
                "--clean",
                "--if-exists",
                "--single-transaction",
                "--exit-on-error",
                "--no-owner",
                "--no-acl",
                "--verbose",
                str(dump),
            ],
            self.url,
            on_stderr_line=on_line,
        )
        if progress is not None:
            progress(total, total)

    @asynccontextmanager
    async def lock(self, name: LockName) -> AsyncIterator[bool]:
        async with advisory_lock(self.url, name) as taken:
            yield taken

    async def _admin(self, statement: str) -> None:
        engine = create_async_engine(self.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.execute(text(statement))
        finally:
            await engine.dispose()

    def _tool(self, name: str) -> str:
        if self.bin_dir is not None:
            return str(self.bin_dir / name)
        found = shutil.which(name)
        if found is None:
            raise BackupToolError(
                f"{name} is not installed (or not on PATH); install the PostgreSQL client "
                "tools of the server's version, or set BACKUP_PG_BIN_DIR"
            )
        return found

    async def _check_tool(self, name: str) -> None:
        client = tool_major_version(await self._run(name, ["--version"], None))
        async with self.database.read_connection() as connection:
            server = int(str(await connection.scalar(text("SHOW server_version_num")))) // 10000
        if client is None or client < server:
            raise BackupToolError(
                f"{name} is version {client or 'unknown'} but the server is PostgreSQL {server}; "
                f"install {name} {server} or newer (or set BACKUP_PG_BIN_DIR)"
            )

    async def _run(
        self,
        name: str,
        arguments: list[str],
        url: URL | None,
        *,
        on_stderr_line: Callable[[str], None] | None = None,
    ) -> str:
        """Run tool ``name`` with ``arguments`` (plus connection options for ``url``).

        Returns its standard output. Raises BackupToolError if it fails.
        """
        argv = [self._tool(name), *arguments]
        environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        password = None
        if url is not None:
            argv += ["--no-password", f"--dbname={_conninfo(url)}"]
            environment.update(_connection_environment(url))
            password = url.password
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=environment,
            )
        except OSError as exc:
            raise BackupToolError(f"{name} could not be started ({exc.strerror})") from None
        tail: deque[str] = deque(maxlen=_STDERR_LINES)

        async def read_stderr() -> None:
            assert process.stderr is not None
            async for raw in process.stderr:
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                if on_stderr_line is not None:
                    on_stderr_line(line)

        try:
            stdout, _ = await asyncio.gather(_read_all(process.stdout), read_stderr())
            code = await process.wait()
        except BaseException:
            # Cancelled (or failed) mid-run: the tool must not outlive the request for it.
            with suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if code != 0:
            excerpt = _scrub("\n".join(tail), password)
            raise BackupToolError(
                f"{name} failed with exit code {code}: {excerpt[-500:]}",
                exit_code=code,
                stderr_excerpt=excerpt,
            )
        return stdout.decode(errors="replace")


async def _read_all(stream: asyncio.StreamReader | None) -> bytes:
    assert stream is not None
    return await stream.read()


def tool_major_version(output: str) -> int | None:
    """The major version in ``pg_dump --version`` output (``pg_dump (PostgreSQL) 15.4``)."""
    match = _VERSION.search(output)
    return int(match[1]) if match else None


def _conninfo(url: URL) -> str:
    # A conninfo string, so a database name holding "=" or a URI prefix stays a name.
    name = (url.database or "").replace("\\", "\\\\").replace("'", "\\'")
    return f"dbname='{name}'"


def _connection_environment(url: URL) -> dict[str, str]:
    """libpq's variables for ``url``: host, port, user and (never on argv) the password."""
    environment = {"PGAPPNAME": "bastion-backup"}
    if url.host:
        environment["PGHOST"] = url.host
    if url.port:
        environment["PGPORT"] = str(url.port)
    if url.username:
        environment["PGUSER"] = url.username
    if url.password:
        environment["PGPASSWORD"] = str(url.password)
    return environment


def _scrub(text_: str, password: object) -> str:
    secret = str(password) if password else ""
    return text_.replace(secret, "***") if secret else text_
