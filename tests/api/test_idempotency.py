"""``Idempotency-Key`` on every POST: a repeat replays the first answer and writes nothing."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import Database, DatabaseSettings, IdempotencyStore, StoredResponse
from conversations.models import idempotency_keys
from tests.conftest import Users, new_conversation, revoke_key

Client = httpx.AsyncClient


def keyed(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, "Idempotency-Key": key}


async def message_total(client: Client, users: Users, cid: str) -> int:
    page = await client.get(f"/v1/conversations/{cid}/messages", headers=users.alice)
    assert page.status_code == 200
    return int(page.json()["total"])


async def test_a_repeated_message_post_replays_the_first_answer_and_stores_one_message(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    url = f"/v1/conversations/{cid}/messages"
    body = {"role": "user", "content": "once"}

    first = await app_client.post(url, json=body, headers=keyed(users.alice, "k-1"))
    again = await app_client.post(url, json=body, headers=keyed(users.alice, "k-1"))

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await message_total(app_client, users, cid) == 1


async def test_a_repeated_conversation_post_creates_one_conversation(
    app_client: Client, users: Users
) -> None:
    headers = keyed(users.alice, "create-1")
    first = await app_client.post("/v1/conversations", json={"title": "a"}, headers=headers)
    again = await app_client.post("/v1/conversations", json={"title": "a"}, headers=headers)

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["etag"] == first.headers["etag"]
    listed = await app_client.get("/v1/conversations", headers=users.alice)
    assert listed.json()["total"] == 1


async def test_restore_accepts_a_key_and_replays_its_answer(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    assert (
        await app_client.delete(f"/v1/conversations/{cid}", headers=users.alice)
    ).status_code == 204
    url = f"/v1/conversations/{cid}/restore"

    first = await app_client.post(url, headers=keyed(users.alice, "restore-1"))
    again = await app_client.post(url, headers=keyed(users.alice, "restore-1"))

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_key_reused_for_another_request_is_refused_and_writes_nothing(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    url = f"/v1/conversations/{cid}/messages"
    headers = keyed(users.alice, "k-2")
    assert (
        await app_client.post(url, json={"role": "user", "content": "a"}, headers=headers)
    ).status_code == 201

    other_body = await app_client.post(url, json={"role": "user", "content": "b"}, headers=headers)
    other_path = await app_client.post("/v1/conversations", json={"title": "x"}, headers=headers)

    for response in (other_body, other_path):
        assert response.status_code == 422
        assert response.json()["code"] == "idempotency_key_reused"
    assert await message_total(app_client, users, cid) == 1


async def test_keys_are_per_user_so_nobody_replays_another_users_answer(
    app_client: Client, users: Users
) -> None:
    body = {"title": "mine"}
    alice = await app_client.post(
        "/v1/conversations", json=body, headers=keyed(users.alice, "same")
    )
    bob = await app_client.post("/v1/conversations", json=body, headers=keyed(users.bob, "same"))

    assert alice.status_code == bob.status_code == 201
    assert alice.json()["id"] != bob.json()["id"]
    assert "idempotent-replayed" not in bob.headers


async def test_concurrent_requests_with_one_key_store_one_message_and_agree(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    url = f"/v1/conversations/{cid}/messages"
    body = {"role": "user", "content": "racing"}

    responses = await asyncio.gather(
        *(app_client.post(url, json=body, headers=keyed(users.alice, "race")) for _ in range(20))
    )

    assert {response.status_code for response in responses} == {201}
    assert len({response.json()["id"] for response in responses}) == 1
    assert await message_total(app_client, users, cid) == 1


async def test_a_failed_write_stores_no_answer_so_the_key_can_succeed_later(
    app_client: Client, users: Users
) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    headers = keyed(users.alice, "later")
    body = {"role": "user", "content": "x"}
    failed = await app_client.post(
        f"/v1/conversations/{missing}/messages", json=body, headers=headers
    )
    assert failed.status_code == 404

    cid = await new_conversation(app_client, users)
    # Nothing was stored for the 404, so the key is still free (even for another path).
    succeeded = await app_client.post(
        f"/v1/conversations/{cid}/messages", json=body, headers=headers
    )
    assert succeeded.status_code == 201


@pytest.mark.parametrize(
    "key",
    ["", "   ", "x" * 256, "clé", "tab\there"],
    ids=["empty", "blank", "too-long", "non-ascii", "control"],
)
async def test_a_malformed_key_is_a_400_and_writes_nothing(
    app_client: Client, users: Users, key: str
) -> None:
    headers = [*users.alice.items(), ("Idempotency-Key", key.encode())]
    response = await app_client.post("/v1/conversations", json={"title": "t"}, headers=headers)

    assert response.status_code == 400
    assert response.json()["code"] == "bad_request"
    listed = await app_client.get("/v1/conversations", headers=users.alice)
    assert listed.json()["total"] == 0


async def test_two_key_headers_are_a_400(app_client: Client, users: Users) -> None:
    headers = [*users.alice.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    response = await app_client.post("/v1/conversations", json={"title": "t"}, headers=headers)
    assert response.status_code == 400


async def test_a_scope_function_that_returns_no_string_is_refused(
    settings: DatabaseSettings,
) -> None:
    ran: list[str] = []

    async def scope(_connection: AsyncConnection) -> str:
        return uuid.uuid4()  # type: ignore[return-value]  # the mistake under test

    async def work(_connection: AsyncConnection) -> StoredResponse:
        ran.append("work")
        return StoredResponse(201, b"{}")

    async with Database(settings) as database:
        with pytest.raises(TypeError, match="idempotency scope"):
            await IdempotencyStore(idempotency_keys).run(
                database, scope=scope, key="k", request_hash="h", work=work
            )
    assert ran == []


async def test_a_repeat_is_found_by_its_lookup_and_its_work_does_not_run_again(
    settings: DatabaseSettings,
) -> None:
    # Found by the write unit's lookup, not by colliding on the key after running the work
    # again (which would replay too, but only after doing the work twice).
    ran: list[int] = []

    async def work(_connection: AsyncConnection) -> StoredResponse:
        ran.append(1)
        return StoredResponse(201, b"{}")

    store = IdempotencyStore(idempotency_keys)
    async with Database(settings) as database:
        first = await store.run(database, scope="s", key="k", request_hash="h", work=work)
        commits = database.metrics.registry.get_sample_value(
            "bastion_transactions_total", {"outcome": "commit"}
        )
        again = await store.run(database, scope="s", key="k", request_hash="h", work=work)
        # The replay wrote nothing: its unit ends by ROLLBACK, with no COMMIT to wait for.
        assert commits == database.metrics.registry.get_sample_value(
            "bastion_transactions_total", {"outcome": "commit"}
        )
    assert (first[1], again[1]) == (False, True)
    assert ran == [1]


async def test_a_repeat_replays_even_when_the_work_could_not_run_again(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    url = f"/v1/conversations/{cid}/messages"
    headers = keyed(users.alice, "after-delete")
    message = {"role": "user", "content": "x"}
    assert (await app_client.post(url, json=message, headers=headers)).status_code == 201
    deleted = await app_client.delete(f"/v1/conversations/{cid}", headers=users.alice)
    assert deleted.status_code == 204
    again = await app_client.post(url, json=message, headers=headers)
    assert again.status_code == 201  # not the 404 the work would give now
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_caller_revoked_after_a_keyed_write_gets_401_not_its_replay(
    app_client: Client, users: Users, settings: DatabaseSettings
) -> None:
    cid = await new_conversation(app_client, users)
    url = f"/v1/conversations/{cid}/messages"
    headers = keyed(users.alice, "before-revoke")
    message = {"role": "user", "content": "x"}
    assert (await app_client.post(url, json=message, headers=headers)).status_code == 201
    await revoke_key(settings, users.alice)
    again = await app_client.post(url, json=message, headers=headers)
    assert again.status_code == 401
    assert "idempotent-replayed" not in again.headers
