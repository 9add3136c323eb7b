"""Cancellation faults (catalogue A15, S10 and S11), on PostgreSQL (asyncpg) and SQLite (aiosqlite).

S10 — random task cancellation. Each iteration starts one unit of work — ``read()``,
``read_connection()``, ``read(consistent=True)``, ``write()`` with an INSERT and a flush,
``write_connection()`` with an INSERT, a ``write()`` that takes a hot row ``FOR UPDATE`` and
updates it, a streamed result — and cancels it after a random delay (some event-loop turns, or
a time drawn from the unit's own measured duration), so the cancellation lands before the pool
checkout, while waiting for a connection or opening one, mid-query, inside ``FOR UPDATE``,
mid-stream or mid-COMMIT. Cancellation comes from ``asyncio.Task.cancel()``, from an anyio
task group's cancel scope, and from an anyio deadline (``move_on_after``); anyio's are
level-triggered (re-delivered at every await until the scope exits). Pass criteria:

* the leak check (:mod:`tests.faults.leaks`) passes after every 1,000 iterations and at the end
  (pool, server sessions, ``idle in transaction``, locks); over the whole test no task fails
  unobserved, no thread raises and no connection is left to the garbage collector;
* no row lock outlives its task by more than 1 s: after every round with a ``FOR UPDATE`` unit,
  a fresh unit takes the row with ``FOR UPDATE NOWAIT`` within 1 s (SQLite: a fresh connection
  gets the write lock and a full WAL checkpoint within 1 s);
* the pools keep their size and budget; no unit fails with anything but its cancellation; the
  database still reads and writes afterwards; every acknowledged write is stored;
* the run covers what it claims: every kind of unit was both cancelled and completed.

``BASTION_S10_ITERATIONS`` sets the iterations per backend (default 2,000; the catalogue's long
run is 10,000). ``BASTION_FAULT_SEED`` replays a seed (timing still varies).

S11 — cross-request result mix-up. Each operation reads row *k_i*, whose title embeds *i*,
together with a nonce of its own, in a unit of a random kind; about 10% are cancelled at a
random point. Pass criteria: no operation receives a row or nonce other than its own; no
operation fails; afterwards every row, read in a unit of its own, is its own (no stale result
on the next checkout); the leak check passes. The same through the reference HTTP service: two
users read their own conversations (and sometimes each other's) while 10% of the requests are
cancelled client-side; every response is exactly the conversation asked for, or 404 for
another user's. ``BASTION_S11_OPERATIONS`` sets the operations per backend (default 2,000;
10,000 for the long run); the HTTP variant makes half as many requests (at least 500).

The last tests pin down, each in isolation, the defects these scenarios found (see their
docstrings).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
import typing
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import anyio
import httpx
import pytest
from sqlalchemy import Integer, Table, cast, func, insert, literal, select, text, update
from sqlalchemy.ext.asyncio import AsyncResult

from bastion import BastionError, Database, DatabaseSettings, TransactionConflictError, utcnow
from conversations.app import create_app
from conversations.models import Conversation, User
from tests.conftest import Users, make_settings, serve
from tests.faults.leaks import (
    assert_no_leaks,
    assert_sqlite_write_lock_free,
    leak_guard,
    no_task_destroyed_pending,
    pool_budget,
)

S10_ITERATIONS: Final = int(os.environ.get("BASTION_S10_ITERATIONS", "2000"))
S11_OPERATIONS: Final = int(os.environ.get("BASTION_S11_OPERATIONS", "2000"))
S11_HTTP_REQUESTS: Final = max(S11_OPERATIONS // 2, 500)
CHECK_EVERY: Final = 1000
LOCK_RELEASE_S: Final = 1.0
S10_CONCURRENCY: Final = 8
S11_CONCURRENCY: Final = 16
S11_ROWS: Final = 100
S11_CANCEL_SHARE: Final = 0.10
HTTP_CONVERSATIONS_PER_USER: Final = 20

conversations = typing.cast(Table, Conversation.__table__)
users_table = typing.cast(Table, User.__table__)

CancelMode = Literal["asyncio", "anyio-task-group", "anyio-deadline"]
CANCEL_MODES: Final[tuple[CancelMode, ...]] = ("asyncio", "anyio-task-group", "anyio-deadline")


@pytest.fixture(autouse=True)
def _leak_guard() -> Iterator[None]:
    with leak_guard():
        yield


def fault_settings(database_url: str, **overrides: Any) -> DatabaseSettings:
    """Small pools (a leaked connection shows at once) and an application_name of its own."""
    values: dict[str, Any] = {
        "DB_POOL_SIZE": 5,
        "DB_MAX_OVERFLOW": 0,
        "DB_POOL_TIMEOUT": 5,
        "DB_APPLICATION_NAME": f"bastion-test-{uuid.uuid4().hex[:12]}",
    }
    values.update(overrides)
    return make_settings(database_url, **values)


def admin_url_for(database: Database, database_url: str) -> str | None:
    return database_url if database.backend == "postgresql" else None


def fault_seed() -> int:
    return int(os.environ.get("BASTION_FAULT_SEED", str(random.randrange(2**32))))


# -- cancelling a unit of work ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delay:
    """How long to let a unit run before cancelling it: event-loop turns, then seconds."""

    turns: int = 0
    seconds: float = 0.0

    async def elapse(self) -> None:
        for _ in range(self.turns):
            await asyncio.sleep(0)
        if self.seconds:
            await asyncio.sleep(self.seconds)


def random_delay(rng: random.Random, typical_s: float, mode: CancelMode) -> Delay:
    """Some event-loop turns, or a time up to twice ``typical_s``."""
    if rng.random() < 0.25 and mode != "anyio-deadline":
        return Delay(turns=rng.randrange(40))
    return Delay(seconds=rng.uniform(0, 2 * typical_s))


class DelayTuner:
    """Aims cancellations across each kind of unit, from its first await to its COMMIT.

    Under cancellation a unit takes far longer than when measured alone: a cancelled unit's
    connection is discarded, so the next one often connects anew. So each kind's delay scale
    adapts: up after a cancellation, down after a completion, settling where about half the
    time-delayed units of that kind finish — the cancellations then fall all along the unit.
    """

    def __init__(self, initial_s: dict[str, float]) -> None:
        self.scale_s = dict(initial_s)

    def delay(self, rng: random.Random, kind: str, mode: CancelMode) -> Delay:
        return random_delay(rng, self.scale_s[kind], mode)

    def record(self, kind: str, delay: Delay, outcome: Outcome) -> None:
        if delay.seconds:
            factor = 0.9 if outcome.completed else 1.1
            self.scale_s[kind] = min(max(self.scale_s[kind] * factor, 1e-4), 1.0)


@dataclass
class Outcome:
    """How one unit of work ended: completed (with its result), cancelled, or failed."""

    completed: bool = False
    cancelled: bool = False
    result: Any = None
    error: BaseException | None = None


async def run_and_cancel(
    work: Callable[[], Awaitable[Any]], mode: CancelMode, delay: Delay
) -> Outcome:
    """Run ``work`` and cancel it after ``delay``, the way ``mode`` cancels."""
    outcome = Outcome()

    async def observed() -> None:
        try:
            outcome.result = await work()
        except Exception as exc:
            outcome.error = exc
        else:
            outcome.completed = True

    if mode == "asyncio":
        task = asyncio.create_task(observed())
        await delay.elapse()
        task.cancel()
        await asyncio.wait([task])
    elif mode == "anyio-task-group":
        async with anyio.create_task_group() as group:
            group.start_soon(observed)
            await delay.elapse()
            group.cancel_scope.cancel()
    else:
        with anyio.move_on_after(delay.seconds):
            await observed()
    outcome.cancelled = not outcome.completed and outcome.error is None
    return outcome


async def run_uncancelled(work: Callable[[], Awaitable[Any]]) -> Outcome:
    try:
        return Outcome(completed=True, result=await work())
    except Exception as exc:
        return Outcome(error=exc)


async def typical_duration(work: Callable[[], Awaitable[Any]], runs: int = 5) -> float:
    """The median duration of ``work`` left to finish (to aim cancellations inside it)."""
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        await work()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


# -- shared set-up ---------------------------------------------------------------------------


async def add_owner(database: Database, name: str) -> uuid.UUID:
    owner_id = uuid.uuid4()
    async with database.write_connection() as connection:
        await connection.execute(
            insert(users_table).values(id=owner_id, name=name, created_at=utcnow())
        )
    return owner_id


async def add_conversations(
    database: Database, owner_id: uuid.UUID, titles: list[str]
) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in titles]
    async with database.write_connection() as connection:
        await connection.execute(
            insert(conversations),
            [
                {"id": cid, "owner_id": owner_id, "title": title}
                for cid, title in zip(ids, titles, strict=True)
            ],
        )
    return ids


async def assert_row_lock_released(database: Database, row_id: uuid.UUID) -> None:
    """A fresh unit locks ``row_id`` (``FOR UPDATE NOWAIT``) within LOCK_RELEASE_S."""
    if database.backend == "sqlite":
        # SQLite has no row locks: a write unit holds the whole file's write lock.
        await assert_sqlite_write_lock_free(database, within_s=LOCK_RELEASE_S)
        return
    started = time.monotonic()
    while True:
        try:
            async with database.write() as session:
                await session.execute(
                    select(conversations.c.id)
                    .where(conversations.c.id == row_id)
                    .with_for_update(nowait=True)
                )
        except TransactionConflictError:
            waited = time.monotonic() - started
            assert waited < LOCK_RELEASE_S, (
                f"the hot row was still locked {waited:.2f}s after every unit that locked it "
                "had ended (a cancelled FOR UPDATE holder's lock outlived its task)"
            )
            await asyncio.sleep(0.01)
        else:
            return


# -- S10: random task cancellation -----------------------------------------------------------


class S10Workload:
    """The units of work S10 cancels, and what each acknowledged."""

    def __init__(self, database: Database, owner_id: uuid.UUID, hot_id: uuid.UUID) -> None:
        self.database = database
        self.owner_id = owner_id
        self.hot_id = hot_id
        self.attempted_inserts: set[uuid.UUID] = set()
        self.acked_inserts: set[uuid.UUID] = set()
        self.attempted_increments = 0
        self.acked_increments = 0
        postgres = database.backend == "postgresql"
        self.units: dict[str, Callable[[], Awaitable[Any]]] = {
            "read": self.read,
            "read_connection": self.read_connection,
            "read_consistent": self.read_consistent,
            "write_insert_flush": self.write_insert_flush,
            "write_connection_insert": self.write_connection_insert,
            "write_for_update": self.write_for_update,
            # A server-side cursor needs a transaction on PostgreSQL, so streams run in the
            # units that have one there (see test_a_read_unit_can_stream_its_result).
            "stream": self.stream_consistent if postgres else self.stream_read_connection,
        }
        if postgres:
            self.units["stream_write_connection"] = self.stream_write_connection

    def _hot_title(self) -> Any:
        return select(conversations.c.title).where(conversations.c.id == self.hot_id)

    def _stream_query(self) -> Any:
        return select(conversations.c.id, conversations.c.title).order_by(conversations.c.id)

    async def read(self) -> Any:
        async with self.database.read() as session:
            return await session.scalar(self._hot_title())

    async def read_connection(self) -> Any:
        async with self.database.read_connection() as connection:
            return await connection.scalar(self._hot_title())

    async def read_consistent(self) -> Any:
        async with self.database.read(consistent=True) as session:
            total = await session.scalar(select(func.count()).select_from(conversations))
            return (total, await session.scalar(self._hot_title()))

    async def write_insert_flush(self) -> None:
        cid = uuid.uuid4()
        self.attempted_inserts.add(cid)
        async with self.database.write() as session:
            now = utcnow()
            session.add(
                Conversation(
                    id=cid,
                    owner_id=self.owner_id,
                    title=f"s10-insert-{cid}",
                    created_at=now,
                    updated_at=now,
                )
            )
            await session.flush()
        self.acked_inserts.add(cid)

    async def write_connection_insert(self) -> None:
        cid = uuid.uuid4()
        self.attempted_inserts.add(cid)
        async with self.database.write_connection() as connection:
            await connection.execute(
                insert(conversations).values(
                    id=cid, owner_id=self.owner_id, title=f"s10-insert-{cid}"
                )
            )
        self.acked_inserts.add(cid)

    async def write_for_update(self) -> None:
        self.attempted_increments += 1
        async with self.database.write() as session:
            count = await session.scalar(
                select(conversations.c.message_count)
                .where(conversations.c.id == self.hot_id)
                .with_for_update()
            )
            await asyncio.sleep(0)  # hold the lock across a loop turn: a cancellation lands here
            await session.execute(
                update(conversations)
                .where(conversations.c.id == self.hot_id)
                .values(message_count=int(count or 0) + 1)
            )
        self.acked_increments += 1

    async def stream_consistent(self) -> int:
        async with self.database.read(consistent=True) as session:
            return await _count_streamed(await session.stream(self._stream_query()))

    async def stream_write_connection(self) -> int:
        async with self.database.write_connection() as connection:
            return await _count_streamed(await connection.stream(self._stream_query()))

    async def stream_read_connection(self) -> int:
        async with self.database.read_connection() as connection:
            return await _count_streamed(await connection.stream(self._stream_query()))


async def _count_streamed(result: AsyncResult[Any]) -> int:
    """Consume a streamed result in partitions, yielding to the loop between them."""
    rows = 0
    async for partition in result.partitions(20):
        rows += len(partition)
        await asyncio.sleep(0)  # a cancellation point mid-stream
    return rows


@pytest.mark.timeout(120 + 0.03 * S10_ITERATIONS)  # the long run needs more than the default
async def test_s10_random_cancellations_leak_nothing(database_url: str) -> None:
    seed = fault_seed()
    rng = random.Random(seed)
    where = f"(BASTION_FAULT_SEED={seed})"
    async with Database(fault_settings(database_url)) as database:
        admin_url = admin_url_for(database, database_url)
        owner_id = await add_owner(database, "s10-owner")
        # Enough rows that a stream takes several fetches, and one hot row to fight over.
        hot_id, *_ = await add_conversations(
            database, owner_id, ["s10-hot"] + [f"s10-seed-{i}" for i in range(200)]
        )
        workload = S10Workload(database, owner_id, hot_id)
        kinds = sorted(workload.units)
        tuner = DelayTuner({kind: await typical_duration(workload.units[kind]) for kind in kinds})
        baseline = database.pool_status()
        budget = pool_budget(database)
        tally: Counter[tuple[str, str]] = Counter()
        errors: list[str] = []
        done = 0
        next_check = CHECK_EVERY

        while done < S10_ITERATIONS:
            plan = []
            for _ in range(min(S10_CONCURRENCY, S10_ITERATIONS - done)):
                kind, mode = rng.choice(kinds), rng.choice(CANCEL_MODES)
                plan.append((kind, mode, tuner.delay(rng, kind, mode)))
            outcomes = await asyncio.gather(
                *(run_and_cancel(workload.units[kind], mode, delay) for kind, mode, delay in plan)
            )
            for (kind, mode, delay), outcome in zip(plan, outcomes, strict=True):
                tuner.record(kind, delay, outcome)
                state = "cancelled" if outcome.cancelled else "completed"
                if outcome.error is not None:
                    state = "failed"
                    errors.append(f"{kind} ({mode}): {outcome.error!r}")
                tally[kind, state] += 1
            if any(kind == "write_for_update" for kind, _mode, _delay in plan):
                await assert_row_lock_released(database, hot_id)
            done += len(plan)
            if done >= next_check or done == S10_ITERATIONS:
                await assert_no_leaks(database, admin_url=admin_url)
                status = database.pool_status()
                assert status.size == baseline.size, f"pool size changed: {baseline} → {status}"
                assert status.checked_in <= budget, f"pools grew past their budget: {status}"
                next_check += CHECK_EVERY

        assert not errors, (
            f"{len(errors)} unit(s) failed with something other than their cancellation "
            f"{where}; first: {errors[:5]}"
        )
        cancelled = sum(n for (_kind, state), n in tally.items() if state == "cancelled")
        assert cancelled >= S10_ITERATIONS // 4, f"too few cancellations landed: {tally} {where}"
        for kind in kinds:
            assert tally[kind, "cancelled"] > 0, f"no {kind} unit was ever cancelled: {tally}"
            assert tally[kind, "completed"] > 0, f"no {kind} unit ever completed: {tally}"

        # The database still works, and what it acknowledged is there.
        (probe_id,) = await add_conversations(database, owner_id, ["s10-probe"])
        async with database.read_connection() as connection:
            probe = await connection.scalar(
                select(conversations.c.title).where(conversations.c.id == probe_id)
            )
            stored = set(
                await connection.scalars(
                    select(conversations.c.id).where(conversations.c.title.like("s10-insert-%"))
                )
            )
            stored_increments = await connection.scalar(
                select(conversations.c.message_count).where(conversations.c.id == hot_id)
            )
        assert probe == "s10-probe"
        assert stored_increments is not None, "the hot row is gone"
        missing = workload.acked_inserts - stored
        assert not missing, f"{len(missing)} acknowledged insert(s) are not stored {where}"
        assert stored <= workload.attempted_inserts, "rows that no unit inserted appeared"
        assert workload.acked_increments <= stored_increments <= workload.attempted_increments, (
            f"hot row counter {stored_increments} outside [acked {workload.acked_increments}, "
            f"attempted {workload.attempted_increments}] {where}"
        )
        await assert_no_leaks(database, admin_url=admin_url)


# -- S11: cross-request result mix-up --------------------------------------------------------

Row = tuple[uuid.UUID, str, int]


class S11Reader:
    """Reads one row and echoes a nonce, in a unit of each kind."""

    def __init__(self, database: Database) -> None:
        self.database = database
        postgres = database.backend == "postgresql"
        self.kinds: dict[str, Callable[[uuid.UUID, int], Awaitable[Row | None]]] = {
            "read": self.read,
            "read_connection": self.read_connection,
            "read_consistent": self.read_consistent,
            "write": self.write,
            "write_connection": self.write_connection,
            "stream": self.stream_consistent if postgres else self.stream_read_connection,
        }

    @staticmethod
    def _query(row_id: uuid.UUID, nonce: int) -> Any:
        return select(
            conversations.c.id, conversations.c.title, cast(literal(nonce), Integer)
        ).where(conversations.c.id == row_id)

    @staticmethod
    def _row(row: Any) -> Row | None:
        return None if row is None else (row[0], row[1], row[2])

    async def read(self, row_id: uuid.UUID, nonce: int) -> Row | None:
        async with self.database.read() as session:
            return self._row((await session.execute(self._query(row_id, nonce))).first())

    async def read_connection(self, row_id: uuid.UUID, nonce: int) -> Row | None:
        async with self.database.read_connection() as connection:
            return self._row((await connection.execute(self._query(row_id, nonce))).first())

    async def read_consistent(self, row_id: uuid.UUID, nonce: int) -> Row | None:
        async with self.database.read(consistent=True) as session:
            await session.scalar(select(func.count()).select_from(conversations))
            return self._row((await session.execute(self._query(row_id, nonce))).first())

    async def write(self, row_id: uuid.UUID, nonce: int) -> Row | None:
        async with self.database.write() as session:
            return self._row((await session.execute(self._query(row_id, nonce))).first())

    async def write_connection(self, row_id: uuid.UUID, nonce: int) -> Row | None:
        async with self.database.write_connection() as connection:
            return self._row((await connection.execute(self._query(row_id, nonce))).first())

    async def stream_consistent(self, row_id: uuid.UUID, nonce: int) -> Row | None:
        async with self.database.read(consistent=True) as session:
            result = await session.stream(self._query(row_id, nonce))
            return self._row(await result.first())

    async def stream_read_connection(self, row_id: uuid.UUID, nonce: int) -> Row | None:
        async with self.database.read_connection() as connection:
            result = await connection.stream(self._query(row_id, nonce))
            return self._row(await result.first())


@pytest.mark.timeout(120 + 0.01 * S11_OPERATIONS)
async def test_s11_no_result_reaches_another_request(database_url: str) -> None:
    seed = fault_seed()
    rng = random.Random(seed)
    where = f"(BASTION_FAULT_SEED={seed})"
    async with Database(fault_settings(database_url)) as database:
        owner_id = await add_owner(database, "s11-owner")
        ids = await add_conversations(database, owner_id, [f"s11-row-{i}" for i in range(S11_ROWS)])
        reader = S11Reader(database)
        kinds = sorted(reader.kinds)
        typical = await typical_duration(lambda: reader.read_connection(ids[0], -1))
        mixups: list[str] = []
        errors: list[str] = []
        outcomes: Counter[str] = Counter()
        next_nonce = 0

        async def worker() -> None:
            nonlocal next_nonce
            while next_nonce < S11_OPERATIONS:
                nonce, next_nonce = next_nonce, next_nonce + 1
                i, kind = rng.randrange(S11_ROWS), rng.choice(kinds)

                async def work(kind: str = kind, i: int = i, nonce: int = nonce) -> Row | None:
                    return await reader.kinds[kind](ids[i], nonce)

                if rng.random() < S11_CANCEL_SHARE:
                    mode = rng.choice(CANCEL_MODES)
                    outcome = await run_and_cancel(work, mode, random_delay(rng, typical, mode))
                else:
                    outcome = await run_uncancelled(work)
                outcomes["cancelled" if outcome.cancelled else "completed"] += 1
                if outcome.error is not None:
                    errors.append(f"{kind} #{nonce}: {outcome.error!r}")
                elif outcome.completed and outcome.result != (ids[i], f"s11-row-{i}", nonce):
                    mixups.append(f"{kind} #{nonce} asked for row {i}, got {outcome.result}")

        await asyncio.gather(*(worker() for _ in range(S11_CONCURRENCY)))

        # The next checkout of every connection returns its own row, in every kind of unit.
        for i, row_id in enumerate(ids):
            for kind in kinds:
                got = await reader.kinds[kind](row_id, S11_OPERATIONS + i)
                if got != (row_id, f"s11-row-{i}", S11_OPERATIONS + i):
                    mixups.append(f"fresh {kind} read of row {i} got {got}")

        assert not mixups, (
            f"{len(mixups)} result(s) reached the wrong request {where}: {mixups[:5]}"
        )
        assert not errors, f"{len(errors)} operation(s) failed {where}: {errors[:5]}"
        assert outcomes["cancelled"] >= S11_OPERATIONS * S11_CANCEL_SHARE / 3, outcomes
        await assert_no_leaks(database, admin_url=admin_url_for(database, database_url))


@pytest.mark.timeout(120 + 0.01 * S11_HTTP_REQUESTS)
async def test_s11_http_responses_carry_only_the_requested_conversation(
    database_url: str, users: Users
) -> None:
    seed = fault_seed()
    rng = random.Random(seed)
    where = f"(BASTION_FAULT_SEED={seed})"
    app = create_app(fault_settings(database_url))
    headers = {"alice": users.alice, "bob": users.bob}
    async with serve(app) as client:
        owned: dict[str, list[str]] = {"alice": [], "bob": []}
        for owner in owned:
            for j in range(HTTP_CONVERSATIONS_PER_USER):
                response = await client.post(
                    "/v1/conversations", json={"title": f"{owner}-{j}"}, headers=headers[owner]
                )
                assert response.status_code == 201, response.text
                owned[owner].append(response.json()["id"])

        async def get(requester: str, cid: str) -> httpx.Response:
            return await client.get(f"/v1/conversations/{cid}", headers=headers[requester])

        # Tuned as S10's units are: a request now runs with few suspensions, so fixed delays
        # mostly land after it has finished.
        tuner = DelayTuner({"get": await typical_duration(lambda: get("alice", owned["alice"][0]))})
        wrong: list[str] = []
        outcomes: Counter[str] = Counter()
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < S11_HTTP_REQUESTS:
                sent += 1
                requester = rng.choice(("alice", "bob"))
                # One request in ten asks for the other user's conversation: it must be a 404.
                owner = (
                    requester
                    if rng.random() >= 0.1
                    else {"alice": "bob", "bob": "alice"}[requester]
                )
                j = rng.randrange(HTTP_CONVERSATIONS_PER_USER)
                cid = owned[owner][j]

                async def work(requester: str = requester, cid: str = cid) -> httpx.Response:
                    return await get(requester, cid)

                if rng.random() < S11_CANCEL_SHARE:
                    mode = rng.choice(CANCEL_MODES)
                    delay = tuner.delay(rng, "get", mode)
                    outcome = await run_and_cancel(work, mode, delay)
                    tuner.record("get", delay, outcome)
                else:
                    outcome = await run_uncancelled(work)
                outcomes["cancelled" if outcome.cancelled else "completed"] += 1
                if outcome.error is not None:
                    wrong.append(f"{requester} GET {owner}-{j}: {outcome.error!r}")
                    continue
                if not outcome.completed:
                    continue
                response: httpx.Response = outcome.result
                expected = (200, cid, f"{owner}-{j}") if owner == requester else (404, None, None)
                body = response.json()
                got = (response.status_code, body.get("id"), body.get("title"))
                if got != expected:
                    wrong.append(f"{requester} GET {owner}-{j}: expected {expected}, got {got}")

        await asyncio.gather(*(worker() for _ in range(S11_CONCURRENCY)))
        for owner, cids in owned.items():
            for j, cid in enumerate(cids):
                response = await get(owner, cid)
                if (response.status_code, response.json().get("title")) != (200, f"{owner}-{j}"):
                    wrong.append(f"fresh GET {owner}-{j}: {response.status_code} {response.text}")

        assert not wrong, f"{len(wrong)} wrong response(s) {where}: {wrong[:5]}"
        # A GET on SQLite's read pool suspends only a few times (its statements run on the
        # loop), so fewer of the cancellations land inside it; still, some must have.
        assert outcomes["cancelled"] >= S11_HTTP_REQUESTS * S11_CANCEL_SHARE / 20, outcomes
        await assert_no_leaks(
            app.state.database, admin_url=admin_url_for(app.state.database, database_url)
        )


# -- defects found by S10/S11, each pinned down on its own ------------------------------------

SLOW_SQLITE_QUERY: Final = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400000) "
    "SELECT c.x FROM c, counter ORDER BY -c.x"
)
"""About half a second of SQLite work that reads a table before its first row."""


@pytest.mark.parametrize("unit", ["write", "write_connection", "read", "read_connection"])
async def test_a_cancelled_sqlite_unit_releases_its_locks(tmp_path: Path, unit: str) -> None:
    """A unit cancelled while its statement runs must not keep the file locked.

    Found by S10/S11 on SQLite. The cancelled unit's connection is invalidated and closed, but
    the statement that was running in aiosqlite's thread is never finalized: its cursor stays
    referenced from the CancelledError's traceback (through SQLAlchemy's execution context), so
    ``sqlite3_close_v2`` leaves a "zombie" handle that keeps the transaction — the write lock of
    a write unit, the read snapshot of a read unit — until the garbage collector frees that
    traceback (never, while anything still references the cancelled task or its exception).
    Meanwhile every writer waits ``busy_timeout`` and fails with TransactionConflictError
    ("database is locked"); a held snapshot stops WAL checkpoints, so the WAL file grows.
    """
    path = tmp_path / "cancelled.db"
    async with Database(make_settings(f"sqlite:///{path}", DB_POOL_SIZE=1)) as database:
        async with database.write() as session:
            await session.execute(text("CREATE TABLE counter (value INTEGER NOT NULL)"))
            await session.execute(text("INSERT INTO counter VALUES (0)"))

        async def cancelled_unit() -> None:
            if unit == "write":
                async with database.write() as session:
                    await session.execute(text("UPDATE counter SET value = value + 1"))
                    await session.execute(text(SLOW_SQLITE_QUERY))
            elif unit == "write_connection":
                async with database.write_connection() as connection:
                    await connection.execute(text("UPDATE counter SET value = value + 1"))
                    await connection.execute(text(SLOW_SQLITE_QUERY))
            elif unit == "read":
                async with database.read() as session:
                    await session.execute(text(SLOW_SQLITE_QUERY))
            else:
                async with database.read_connection() as connection:
                    await connection.execute(text(SLOW_SQLITE_QUERY))

        task = asyncio.create_task(cancelled_unit())
        await asyncio.sleep(0.1)  # the slow statement is running in aiosqlite's thread
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled()
        del task  # nothing here keeps the cancelled task (or its exception) alive

        # The statement may run on in aiosqlite's thread for a few hundred milliseconds (a
        # thread cannot be cancelled); after that the locks must go.
        await assert_sqlite_write_lock_free(database, within_s=1.5)
        async with database.write() as session:  # and the next writer is not refused
            await session.execute(text("UPDATE counter SET value = value + 1"))


async def test_an_anyio_cancelled_sqlite_unit_leaves_no_cleanup_task_behind(tmp_path: Path) -> None:
    """Cancelling units from an anyio cancel scope must not strand their connection's close.

    Found by S10/S11 on SQLite. anyio re-delivers a cancellation at every await in its scope.
    When that reaches SQLAlchemy's shielded graceful close of the invalidated aiosqlite
    connection, SQLAlchemy falls back to ``stop()`` (force close) — and the graceful close
    task, still waiting on aiosqlite's worker thread, which has now stopped, waits forever.
    Each such cancellation leaves one task pending for good (asyncio later logs "Task was
    destroyed but it is pending!"), holding the aiosqlite connection until the collector
    frees it.
    """
    rng = random.Random(fault_seed())
    path = tmp_path / "anyio.db"
    with no_task_destroyed_pending():
        async with Database(make_settings(f"sqlite:///{path}")) as database:
            before = asyncio.all_tasks()  # the Database's own monitor is expected to run
            async with database.write() as session:
                await session.execute(text("CREATE TABLE t (x INTEGER)"))
                await session.execute(text("INSERT INTO t VALUES (1), (2), (3)"))

            async def unit() -> None:
                async with database.write() as session:
                    await session.execute(text("UPDATE t SET x = x + 1"))
                    await session.execute(text("SELECT x FROM t"))

            for _ in range(200):
                await run_and_cancel(unit, "anyio-task-group", Delay(seconds=rng.uniform(0, 0.004)))
            await asyncio.sleep(1.0)  # every close has had ample time to finish
            leftover = [
                task
                for task in asyncio.all_tasks() - before
                if task is not asyncio.current_task() and not task.done()
            ]
            names = Counter(task.get_coro().__qualname__ for task in leftover)  # type: ignore[union-attr]
            for task in leftover:
                task.cancel()
            assert not leftover, f"tasks still pending 1s after their units ended: {dict(names)}"


@pytest.mark.postgres
async def test_a_failed_read_unit_leaves_no_transaction_on_its_connection(
    postgres_test_url: str,
) -> None:
    """A read unit failing between PREPARE and EXECUTE must leave its connection clean.

    Found by S10/S11 on PostgreSQL. Read units run on AUTOCOMMIT connections. asyncpg 0.32
    prepares a statement without ending the implicit transaction it opens on the server; when
    the execute step then fails *on the client* — a parameter asyncpg cannot encode, or a
    server-side cursor refused "outside of a transaction" — nothing ends it. The connection
    goes back to the pool with an open transaction holding AccessShareLock on the table (so
    ``ALTER TABLE``, ``TRUNCATE`` and migrations wait on it), and every later
    ``read(consistent=True)`` that draws it fails ("SET TRANSACTION ISOLATION LEVEL must be
    called before any query", then "SAVEPOINT can only be used in transaction blocks" — asyncpg
    keeps the failed BEGIN as its top transaction) until the connection is recycled.
    """
    settings = fault_settings(postgres_test_url, DB_POOL_SIZE=1)
    async with Database(settings) as database:
        with pytest.raises(BastionError):
            async with database.read_connection() as connection:
                await connection.execute(
                    text("SELECT title FROM conversations WHERE message_count = :n"),
                    {"n": "not a number"},
                )

        # The pool's one read connection is the one that failed; it must work as if new.
        async with database.read(consistent=True) as session:
            assert await session.scalar(select(func.count()).select_from(conversations)) is not None
        await assert_no_leaks(database, admin_url=postgres_test_url)


async def test_a_read_unit_can_stream_its_result(database_url: str) -> None:
    """``stream()`` works in every read unit, as it does in write units.

    Found while building S10: on PostgreSQL, ``read()`` and ``read_connection()`` run on
    AUTOCOMMIT connections, where asyncpg refuses a server-side cursor ("cursor cannot be
    created outside of a transaction"); the caller gets QueryError("the database rejected the
    statement") although the database never saw the statement. Streams work in
    ``read(consistent=True)`` and in write units, and in every unit on SQLite.
    """
    async with Database(fault_settings(database_url)) as database:
        owner_id = await add_owner(database, "streamer")
        await add_conversations(database, owner_id, [f"streamed-{i}" for i in range(30)])
        query = select(conversations.c.title).order_by(conversations.c.title)
        expected = sorted(f"streamed-{i}" for i in range(30))

        async with database.read_connection() as connection:
            result = await connection.stream(query)
            assert [row[0] async for row in result] == expected
        async with database.read() as session:
            scalars = await session.stream_scalars(query)
            assert [title async for title in scalars] == expected
        # The stream's transaction ended with its unit: the connection reads as before.
        async with database.read_connection() as connection:
            assert [row[0] for row in await connection.execute(query)] == expected
        if database.backend == "postgresql":
            await assert_no_leaks(database, admin_url=database_url)
