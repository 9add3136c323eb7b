"""SQLite faults (catalogue A15, S17 and S18).

S17 — lock contention. Eight writer tasks sharing one Database and eight writer *processes*,
each with a Database of its own, hammer one SQLite file at once, every write a
read-modify-write unit (``SELECT`` the counter, yield to the loop, ``UPDATE`` it, and log the
increment under the writer's name and sequence number) in ``Database.write()``, for
``BASTION_S17_SECONDS`` (default 5; the catalogue's run is 60). Pass criteria: 0 "database is
locked" errors and 0 TransactionConflictError (Bastion's name for SQLITE_BUSY) — no error of
any kind; no lost update: the counter equals the number of acknowledged increments and the log
holds exactly the acknowledged ones; every writer made progress; the file passes
``PRAGMA integrity_check``; the leak check passes. (WAL, ``busy_timeout=5000`` and
``BEGIN IMMEDIATE`` are what make this hold; the in-process burst of 40 writers in
tests/integration/test_database.py is the quick version of this.)

S18 — clean exit. A process that used aiosqlite must exit promptly: the ``bastion`` and
``conversations`` commands against an SQLite file, and a script that starts a Database, writes,
reads and exits without ``close()`` or ``dispose()`` — also with a unit still open when its
event loop shuts down. Pass criteria: exit code 0, nothing on stderr that signals a leak or a
crash, under 1 s between its last output and its exit (the aiosqlite ≥ 0.22 exit hang,
SQLAlchemy #13039, shows up as that gap), and the whole process done in under 2 s (4 s for
``conversations``, whose FastAPI import alone takes about a second).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy import text

from bastion import Database, TransactionConflictError
from tests.conftest import make_settings
from tests.faults.leaks import assert_no_leaks, leak_guard

BIN: Final = Path(sys.executable).parent
S17_SECONDS: Final = float(os.environ.get("BASTION_S17_SECONDS", "5"))
S17_TASKS: Final = 8
S17_PROCESSES: Final = 8
# The hang S18 is about shows as a gap after the last output (a non-daemon thread, a pool left
# to the finalizers): seconds, then forever. The total is mostly imports (about 1 s for
# ``bastion`` on a quiet machine) and only guards against a gross hang, so it is loose enough
# for a loaded machine.
EXIT_WITHIN_S: Final = 8.0
EXIT_AFTER_OUTPUT_WITHIN_S: Final = 1.0


@pytest.fixture(autouse=True)
def _leak_guard() -> Iterator[None]:
    with leak_guard():
        yield


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: no inherited database settings, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_"))}
    env["PYTHONUNBUFFERED"] = "1"  # each line reaches us when printed, not at exit
    env.update(extra)
    return env


# -- S17: lock contention --------------------------------------------------------------------

SCHEMA: Final = (
    "CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO counter VALUES (1, 0)",
    "CREATE TABLE increments (writer TEXT NOT NULL, seq INTEGER NOT NULL, "
    "PRIMARY KEY (writer, seq))",
)


@dataclass
class WriterReport:
    """What one writer acknowledged and what went wrong for it."""

    name: str
    acked: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def increment(database: Database, writer: str, seq: int) -> None:
    """One read-modify-write unit: the kind that "database is locked" used to break."""
    async with database.write() as session:
        value = await session.scalar(text("SELECT value FROM counter WHERE id = 1"))
        await asyncio.sleep(0)  # let the other writers pile up on the lock meanwhile
        await session.execute(
            text("UPDATE counter SET value = :value WHERE id = 1"), {"value": int(value) + 1}
        )
        await session.execute(
            text("INSERT INTO increments (writer, seq) VALUES (:writer, :seq)"),
            {"writer": writer, "seq": seq},
        )


def describe_error(exc: Exception) -> str:
    locked = " (database is locked)" if "database is locked" in f"{exc} {exc.__cause__}" else ""
    return f"{type(exc).__name__}{locked}: {exc}"


async def write_until(database: Database, report: WriterReport, deadline: float) -> None:
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        try:
            await increment(database, report.name, seq)
        except Exception as exc:
            report.errors.append(describe_error(exc))
        else:
            report.acked.append(seq)


WRITER_PROCESS: Final = """
import asyncio, json, sys, time
from sqlalchemy import text
from bastion import Database, DatabaseSettings

async def increment(database, writer, seq):  # the same unit as the test's own writers
    async with database.write() as session:
        value = await session.scalar(text("SELECT value FROM counter WHERE id = 1"))
        await asyncio.sleep(0)
        await session.execute(
            text("UPDATE counter SET value = :value WHERE id = 1"), {"value": int(value) + 1}
        )
        await session.execute(
            text("INSERT INTO increments (writer, seq) VALUES (:writer, :seq)"),
            {"writer": writer, "seq": seq},
        )

async def main():
    url, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    acked, errors = [], []
    async with Database(DatabaseSettings(DATABASE_URL=url, DB_POOL_SIZE=1)) as database:
        print("ready", flush=True)
        sys.stdin.readline()  # "go": every process starts writing at the same moment
        deadline, seq = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            seq += 1
            try:
                await increment(database, name, seq)
            except Exception as exc:
                text_ = f"{exc} {exc.__cause__}"
                locked = " (database is locked)" if "database is locked" in text_ else ""
                errors.append(f"{type(exc).__name__}{locked}: {exc}")
            else:
                acked.append(seq)
    print(json.dumps({"acked": acked, "errors": errors}), flush=True)

asyncio.run(main())
"""


async def test_s17_concurrent_writers_never_see_database_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "s17.db"
    url = f"sqlite:///{path}"
    settings = make_settings(
        url, DB_POOL_SIZE=S17_TASKS, DB_MAX_OVERFLOW=0, DB_APPLICATION_NAME=f"s17-{uuid.uuid4()}"
    )
    async with Database(settings) as database:
        async with database.write() as session:
            for statement in SCHEMA:
                await session.execute(text(statement))

        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WRITER_PROCESS,
                url,
                f"process-{n}",
                str(S17_SECONDS),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=child_env(),
                cwd=tmp_path,
            )
            for n in range(S17_PROCESSES)
        ]
        try:
            for process in processes:
                assert process.stdout is not None
                ready = await asyncio.wait_for(process.stdout.readline(), 60)
                if ready != b"ready\n":
                    _out, err = await process.communicate()
                    pytest.fail(f"a writer process did not start: {ready!r} {err.decode()}")
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(b"go\n")
                await process.stdin.drain()

            reports = [WriterReport(f"task-{n}") for n in range(S17_TASKS)]
            deadline = time.monotonic() + S17_SECONDS
            await asyncio.gather(*(write_until(database, report, deadline) for report in reports))

            for n, process in enumerate(processes):
                out, err = await asyncio.wait_for(process.communicate(), S17_SECONDS + 60)
                assert process.returncode == 0, f"writer process {n} failed: {err.decode()}"
                result = json.loads(out.decode().strip().splitlines()[-1])
                reports.append(WriterReport(f"process-{n}", result["acked"], result["errors"]))
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()

        errors = [f"{report.name}: {error}" for report in reports for error in report.errors]
        kinds = Counter(error.split(":")[1].strip() for error in errors)
        locked = sum("database is locked" in error for error in errors)
        conflicts = sum(TransactionConflictError.__name__ in error for error in errors)
        assert (locked, conflicts) == (0, 0), (
            f"{locked} 'database is locked' and {conflicts} TransactionConflictError over "
            f"{S17_TASKS} tasks and {S17_PROCESSES} processes; first: {errors[:3]}"
        )
        assert not errors, f"{len(errors)} failed write(s) ({dict(kinds)}); first: {errors[:3]}"
        idle = [report.name for report in reports if not report.acked]
        assert not idle, f"writers that never got the lock in {S17_SECONDS:g}s: {idle}"

        acked = {(report.name, seq) for report in reports for seq in report.acked}
        async with database.read() as session:
            counter = await session.scalar(text("SELECT value FROM counter WHERE id = 1"))
            logged = {
                (row.writer, row.seq)
                for row in await session.execute(text("SELECT writer, seq FROM increments"))
            }
            integrity = await session.scalar(text("PRAGMA integrity_check"))
        assert counter == len(acked), f"lost updates: counter {counter}, acknowledged {len(acked)}"
        assert logged == acked, (
            f"{len(acked - logged)} acknowledged increment(s) missing, "
            f"{len(logged - acked)} unacknowledged one(s) stored"
        )
        assert integrity == "ok"
        await assert_no_leaks(database)


# -- S18: clean exit -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exit:
    returncode: int
    stdout: str
    stderr: str
    total_s: float
    after_output_s: float


def run_and_time(command: list[str], env: dict[str, str], cwd: Path) -> Exit:
    """Run ``command``; time the whole run, and the gap between its last output and its exit."""
    lines: list[str] = []
    started = time.monotonic()
    last_output = started
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    ) as process:

        def read_stdout() -> None:
            nonlocal last_output
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                last_output = time.monotonic()

        reader = threading.Thread(target=read_stdout, daemon=True)
        reader.start()
        try:
            process.wait(timeout=30)  # a hung exit fails here instead of hanging the suite
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"{command[0]} did not exit within 30s; its output: {lines!r}")
        ended = time.monotonic()
        reader.join(timeout=5)
        assert process.stderr is not None
        stderr = process.stderr.read()
    return Exit(process.returncode, "".join(lines), stderr, ended - started, ended - last_output)


def assert_exited_cleanly(result: Exit, what: str, *, within_s: float = EXIT_WITHIN_S) -> None:
    assert result.returncode == 0, f"{what} failed: {result.stderr}"
    for sign in ("Traceback", "Exception ignored", "non-checked-in", "Task was destroyed"):
        assert sign not in result.stderr, f"{what} wrote {sign!r} to stderr: {result.stderr}"
    assert result.after_output_s < EXIT_AFTER_OUTPUT_WITHIN_S, (
        f"{what} took {result.after_output_s:.2f}s to exit after its last output "
        "(an exit hang: a non-daemon aiosqlite thread, or a pool left to the finalizers?)"
    )
    assert result.total_s < within_s, f"{what} took {result.total_s:.2f}s in all"


@pytest.mark.parametrize(
    ("command", "within_s"),
    [
        (("bastion", "db", "current", "-m", "conversations:migrations"), EXIT_WITHIN_S),
        # Importing the FastAPI app alone takes about a second here: this command's exit is
        # judged by the gap after its output, its total only against a looser bound.
        (("conversations", "create-user", "s18-user"), 2 * EXIT_WITHIN_S),
    ],
    ids=["bastion-db-current", "conversations-create-user"],
)
def test_s18_a_command_that_used_aiosqlite_exits_promptly(
    tmp_path: Path, command: tuple[str, ...], within_s: float
) -> None:
    env = child_env(DATABASE_URL=f"sqlite:///{tmp_path}/s18.db")
    migrated = subprocess.run(
        [str(BIN / "bastion"), "db", "upgrade", "-m", "conversations:migrations"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr

    result = run_and_time([str(BIN / command[0]), *command[1:]], env, tmp_path)

    assert_exited_cleanly(result, " ".join(command), within_s=within_s)
    assert result.stdout.strip(), "the command printed nothing"


UNCLOSED_DATABASE_SCRIPT: Final = """
import asyncio, sys
from sqlalchemy import text
from bastion import Database, DatabaseSettings

async def main() -> None:
    database = Database(DatabaseSettings(DATABASE_URL=sys.argv[1]))
    await database.start()
    async with database.write() as session:
        await session.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))
        await session.execute(text("INSERT INTO t VALUES (1)"))
    async with database.read() as session:
        assert await session.scalar(text("SELECT count(*) FROM t")) == 1
    if sys.argv[2] == "unit-open":
        entered = asyncio.Event()

        async def holder() -> None:
            async with database.read() as session:
                await session.execute(text("SELECT x FROM t"))
                entered.set()
                await asyncio.sleep(3600)

        main.holder = asyncio.create_task(holder())  # kept alive until the loop shuts down
        await entered.wait()
    print("done", database.pool_status(), flush=True)
    # No database.close(), no engine.dispose(): the process must still exit at once.

asyncio.run(main())
"""


@pytest.mark.parametrize("variant", ["units-done", "unit-open"])
def test_s18_a_script_that_never_closes_its_database_exits_promptly(
    tmp_path: Path, variant: str
) -> None:
    result = run_and_time(
        [sys.executable, "-c", UNCLOSED_DATABASE_SCRIPT, f"sqlite:///{tmp_path}/s18.db", variant],
        child_env(),
        tmp_path,
    )

    assert_exited_cleanly(result, f"the {variant} script")
    assert result.stdout.startswith("done"), result.stdout
