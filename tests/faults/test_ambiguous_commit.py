"""S13 — a connection reset at COMMIT never duplicates a write, and is never blindly re-run.

Fault: the proxy resets the connection on asyncpg's COMMIT message, either before the server
sees it (nothing committed) or after (committed, but the client never hears so). Both look
the same to the client: the outcome is unknown.

Pass criteria:
* without an idempotency key, Bastion does not re-run the unit (exactly one attempt) and
  reports ``commit_outcome_unknown`` (HTTP 500, no ``Retry-After``);
* with an ``Idempotency-Key``, over 1,000 trials: every request ends in 201, every message is
  stored exactly once (0 duplicates, 0 lost), and every trial really hit the fault.
"""

from __future__ import annotations

import uuid
from collections import Counter

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import CommitOutcomeUnknownError, Database
from conversations.app import create_app
from conversations.users import create_user
from tests.conftest import serve
from tests.faults.leaks import assert_no_leaks, leak_guard
from tests.faults.proxy import ASYNCPG_COMMIT
from tests.faults.stack import FaultStack

TRIALS = 1_000


async def test_an_ambiguous_commit_is_reported_and_not_re_run(fault_stack: FaultStack) -> None:
    stack = fault_stack
    with leak_guard():
        async with Database(stack.settings()) as database:
            async with database.write_connection() as connection:
                await connection.execute(text("CREATE TABLE s13_plain (id uuid PRIMARY KEY)"))
            attempts = 0

            async def insert(connection: AsyncConnection) -> None:
                nonlocal attempts
                attempts += 1
                await connection.execute(
                    text("INSERT INTO s13_plain VALUES (:id)"), {"id": uuid.uuid4()}
                )

            for forward_first in (False, True):
                attempts = 0
                stack.proxy.reset_on(ASYNCPG_COMMIT, forward_first=forward_first)
                with pytest.raises(CommitOutcomeUnknownError):
                    await database.run(database.write_connection, insert)
                assert attempts == 1, "an unknown COMMIT outcome must not be re-run blindly"
            assert stack.proxy.resets_done == 2

            async with database.read_connection() as connection:
                stored = await connection.scalar(text("SELECT count(*) FROM s13_plain"))
            assert stored == 1  # only the COMMIT the server saw landed
            await assert_no_leaks(database, admin_url=stack.admin_url)


async def test_without_a_key_the_api_answers_500_commit_outcome_unknown(
    fault_stack: FaultStack,
) -> None:
    stack = fault_stack
    app = create_app(stack.settings())
    async with serve(app) as client:
        headers = {"Authorization": f"Bearer {await create_user(app.state.database, 'ann')}"}
        stack.proxy.reset_on(ASYNCPG_COMMIT, forward_first=True)
        response = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)

    assert response.status_code == 500
    assert response.json()["code"] == "commit_outcome_unknown"
    assert "retry-after" not in response.headers


async def test_a_thousand_resets_at_commit_store_each_keyed_message_exactly_once(
    fault_stack: FaultStack,
) -> None:
    stack = fault_stack
    app = create_app(stack.settings())
    with leak_guard():
        async with serve(app) as client:
            database: Database = app.state.database
            headers = {"Authorization": f"Bearer {await create_user(database, 'ann')}"}
            created = await client.post("/v1/conversations", json={"title": "t"}, headers=headers)
            messages = f"/v1/conversations/{created.json()['id']}/messages"
            statuses: Counter[int] = Counter()

            for trial in range(TRIALS):
                # Alternate: the server never sees the COMMIT / commits without telling us.
                stack.proxy.reset_on(ASYNCPG_COMMIT, forward_first=trial % 2 == 1)
                response = await _post_until_answered(
                    client,
                    messages,
                    json={"role": "user", "content": f"s13-{trial}"},
                    headers={**headers, "Idempotency-Key": f"s13-{trial}"},
                )
                statuses[response.status_code] += 1

            print(
                f"S13 figures: {{'trials': {TRIALS}, 'resets': {stack.proxy.resets_done}, "
                f"'statuses': {dict(statuses)}, 'retries': {database.retry_count}}}"
            )
            assert stack.proxy.resets_done == TRIALS, "every trial must really hit the fault"
            assert statuses == {201: TRIALS}
            async with database.read_connection() as connection:
                rows = (
                    await connection.execute(
                        text("SELECT content, count(*) FROM messages GROUP BY content")
                    )
                ).all()
                message_count = await connection.scalar(
                    text("SELECT message_count FROM conversations")
                )
            counts = dict(rows)
            assert len(counts) == TRIALS, f"{TRIALS - len(counts)} acknowledged messages lost"
            duplicated = {content: n for content, n in counts.items() if n != 1}
            assert duplicated == {}, f"duplicated: {list(duplicated)[:5]}"
            assert message_count == TRIALS
            await assert_no_leaks(database, admin_url=stack.admin_url)


async def _post_until_answered(
    client: httpx.AsyncClient, url: str, *, json: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    """What a careful client does: repeat the same request and key while the outcome is open."""
    for _ in range(5):
        response = await client.post(url, json=json, headers=headers)
        if response.status_code not in (500, 503):
            return response
    return response
