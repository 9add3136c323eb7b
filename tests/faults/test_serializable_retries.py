"""S12 — serialization conflicts: whole transactions retried, the invariant holds.

Fault: 50 concurrent SERIALIZABLE bank transfers between 10 hot accounts, 2,000 transfers.
Pass: the sum of balances never changes; every balance equals its opening balance plus the
transfers the log says were applied; conflicts (40001/40P01) were retried as whole units with
bounded attempts (the retry count is > 0); a non-retryable error (23502) surfaces at once,
after exactly one attempt.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections import Counter

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import Database, NotNullViolationError, TransactionConflictError
from tests.conftest import make_settings

pytestmark = pytest.mark.postgres

ACCOUNTS = 10
OPENING_BALANCE = 1_000
TRANSFERS = int(os.environ.get("S12_TRANSFERS", "2000"))
CONCURRENCY = 50
MAX_ATTEMPTS = 20


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def bank(database_url: str) -> Database:
    settings = make_settings(
        database_url,
        DB_POOL_SIZE=10,
        DB_MAX_OVERFLOW=10,
        MAX_RETRY_ATTEMPTS=MAX_ATTEMPTS,
        RETRY_INITIAL_BACKOFF=0.01,
        RETRY_MAX_BACKOFF=0.2,
        RETRY_MAX_DELAY=30,
        DB_APPLICATION_NAME=f"bastion-s12-{uuid.uuid4().hex[:8]}",
    )
    database = Database(settings)
    await database.start()
    async with database.write_connection() as connection:
        await connection.execute(text("DROP TABLE IF EXISTS s12_log, s12_accounts"))
        await connection.execute(
            text("CREATE TABLE s12_accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
        )
        await connection.execute(
            text(
                "CREATE TABLE s12_log (id bigserial PRIMARY KEY, source int NOT NULL, "
                "target int NOT NULL, amount bigint NOT NULL)"
            )
        )
        await connection.execute(
            text("INSERT INTO s12_accounts SELECT n, :opening FROM generate_series(1, :n) n"),
            {"opening": OPENING_BALANCE, "n": ACCOUNTS},
        )
    return database


async def _transfer(connection: AsyncConnection, source: int, target: int, amount: int) -> None:
    await connection.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
    # Transfers in opposite directions deadlock (40P01) as well as conflict (40001); both must
    # be retried. The server's 1 s default detection delay would only make the test slow.
    await connection.execute(text("SET LOCAL deadlock_timeout = '20ms'"))
    balance = await connection.scalar(
        text("SELECT balance FROM s12_accounts WHERE id = :id"), {"id": source}
    )
    if balance is None or balance < amount:
        return  # an ordinary business refusal: commits nothing of note
    await connection.execute(
        text("UPDATE s12_accounts SET balance = balance - :amount WHERE id = :id"),
        {"amount": amount, "id": source},
    )
    await connection.execute(
        text("UPDATE s12_accounts SET balance = balance + :amount WHERE id = :id"),
        {"amount": amount, "id": target},
    )
    await connection.execute(
        text("INSERT INTO s12_log (source, target, amount) VALUES (:s, :t, :a)"),
        {"s": source, "t": target, "a": amount},
    )


async def _run_transfer(
    database: Database, source: int, target: int, amount: int
) -> tuple[bool, int]:
    """Run one transfer with retries: whether it was applied, and how many attempts it took."""
    attempts = 0

    async def transfer(connection: AsyncConnection) -> None:
        nonlocal attempts
        attempts += 1
        await _transfer(connection, source, target, amount)

    try:
        await database.run(database.write_connection, transfer)
    except TransactionConflictError:
        return False, attempts
    return True, attempts


async def test_concurrent_serializable_transfers_keep_the_total_and_are_retried(
    bank: Database,
) -> None:
    database = bank
    rng = random.Random(12)
    plans = [(*rng.sample(range(1, ACCOUNTS + 1), 2), rng.randint(1, 50)) for _ in range(TRANSFERS)]
    queue: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    outcomes: Counter[str] = Counter()
    attempts_when_done: list[int] = []
    attempts_when_given_up: list[int] = []

    async def worker() -> None:
        while not queue.empty():
            done, attempts = await _run_transfer(database, *queue.get_nowait())
            outcomes["done" if done else "gave_up"] += 1
            (attempts_when_done if done else attempts_when_given_up).append(attempts)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(CONCURRENCY):
                group.create_task(worker())

        async with database.read_connection() as connection:
            total = await connection.scalar(text("SELECT sum(balance) FROM s12_accounts"))
            balances = dict(
                (await connection.execute(text("SELECT id, balance FROM s12_accounts"))).all()
            )
            log = (
                await connection.execute(text("SELECT source, target, amount FROM s12_log"))
            ).all()
        expected = dict.fromkeys(range(1, ACCOUNTS + 1), OPENING_BALANCE)
        for source, target, amount in log:
            expected[source] -= amount
            expected[target] += amount

        assert outcomes["done"] + outcomes["gave_up"] == TRANSFERS
        assert total == ACCOUNTS * OPENING_BALANCE
        assert balances == expected
        assert all(balance >= 0 for balance in balances.values())
        retries = database.retry_count
        figures = {
            "transfers": TRANSFERS,
            "applied": outcomes["done"],
            "gave_up": outcomes["gave_up"],
            "retries": retries,
            "most_attempts": max(attempts_when_done + attempts_when_given_up),
        }
        print(f"S12 figures: {figures}")
        assert retries > 0, "50 writers on 10 rows must have conflicted"
        assert retries == sum(attempts_when_done) + sum(attempts_when_given_up) - TRANSFERS
        # Bounded: nobody ran more than MAX_RETRY_ATTEMPTS times, and whoever gave up had
        # used them all. A transfer that gave up changed nothing (the balances prove it).
        assert max(attempts_when_done) <= MAX_ATTEMPTS
        assert set(attempts_when_given_up) <= {MAX_ATTEMPTS}
        assert outcomes["gave_up"] <= TRANSFERS // 100
        assert database.pool_status().checked_out == 0
    finally:
        async with database.write_connection() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS s12_log, s12_accounts"))
        await database.close()


async def test_a_non_retryable_error_surfaces_after_one_attempt(bank: Database) -> None:
    database = bank
    attempts = 0

    async def insert_null(connection: AsyncConnection) -> None:
        nonlocal attempts
        attempts += 1
        await connection.execute(text("INSERT INTO s12_accounts VALUES (99, NULL)"))

    try:
        retries_before = database.retry_count
        with pytest.raises(NotNullViolationError):
            await database.run(database.write_connection, insert_null)
        assert attempts == 1
        assert database.retry_count == retries_before
    finally:
        async with database.write_connection() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS s12_log, s12_accounts"))
        await database.close()
