"""POST /v1/conversations/{id}/messages:batch: per-item results, all-or-nothing per item."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Users, new_conversation

Client = httpx.AsyncClient


async def all_messages(client: Client, users: Users, cid: str) -> dict[str, Any]:
    response = await client.get(
        f"/v1/conversations/{cid}/messages", params={"limit": 100}, headers=users.alice
    )
    assert response.status_code == 200
    return dict(response.json())


async def test_a_valid_batch_stores_every_message_in_order(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    messages = [{"role": "user", "content": f"m{n}"} for n in range(30)]
    # Several sources over several messages: each answer shows its own message's, in order.
    messages[3]["sources"] = [  # type: ignore[assignment]
        {"url": "https://example.com/a", "title": "A"},
        {"url": "https://example.com/b", "title": None},
    ]
    messages[7]["sources"] = [{"url": "https://example.com/c", "title": "C"}]  # type: ignore[assignment]

    response = await app_client.post(
        f"/v1/conversations/{cid}/messages:batch", json={"messages": messages}, headers=users.alice
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["created"], body["failed"]) == (30, 0)
    assert [r["index"] for r in body["results"]] == list(range(30))
    assert {r["status"] for r in body["results"]} == {201}
    stored = await all_messages(app_client, users, cid)
    assert stored["total"] == 30
    assert stored["items"] == [r["message"] for r in body["results"]]
    assert [item["sources"] for item in stored["items"]] == [m.get("sources", []) for m in messages]


async def test_a_batch_with_bad_items_stores_the_others_and_answers_207(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    secret = "zq9-secret-probe"
    messages: list[Any] = [{"role": "user", "content": f"m{n}"} for n in range(8)]
    messages[1] = {"role": "robot", "content": secret}
    messages[4] = {"role": "user", "content": f"{secret}\x00"}
    messages[5] = f"just a string {secret}"
    messages[7] = {"role": "user", "content": "x", "extra": secret}

    response = await app_client.post(
        f"/v1/conversations/{cid}/messages:batch", json={"messages": messages}, headers=users.alice
    )

    assert response.status_code == 207, response.text
    assert secret not in response.text  # errors say where and what, never echo the input
    body = response.json()
    statuses = {r["index"]: r["status"] for r in body["results"]}
    assert statuses == {0: 201, 1: 422, 2: 201, 3: 201, 4: 422, 5: 422, 6: 201, 7: 422}
    assert (body["created"], body["failed"]) == (4, 4)
    refused = {r["index"]: r["errors"] for r in body["results"] if r["status"] == 422}
    assert refused[1][0]["loc"] == ["body", "messages", 1, "role"]
    assert refused[7][0]["loc"] == ["body", "messages", 7, "extra"]
    stored = await all_messages(app_client, users, cid)
    assert [m["content"] for m in stored["items"]] == ["m0", "m2", "m3", "m6"]
    assert stored["total"] == 4


async def test_a_batch_where_nothing_is_valid_is_a_422_and_stores_nothing(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    path = f"/v1/conversations/{cid}/messages:batch"

    none_valid = await app_client.post(
        path, json={"messages": [{"role": "x"}, 5]}, headers=users.alice
    )
    empty = await app_client.post(path, json={"messages": []}, headers=users.alice)
    too_many = await app_client.post(
        path,
        json={"messages": [{"role": "user", "content": "m"}] * 1_001},
        headers=users.alice,
    )

    assert (none_valid.status_code, empty.status_code, too_many.status_code) == (422, 422, 422)
    assert none_valid.json()["code"] == "validation_error"
    assert [e["loc"][:3] for e in none_valid.json()["detail"]] == [
        ["body", "messages", 0],
        ["body", "messages", 0],
        ["body", "messages", 1],
    ]
    assert (await all_messages(app_client, users, cid))["total"] == 0


async def test_a_batch_of_a_thousand_is_accepted(app_client: Client, users: Users) -> None:
    cid = await new_conversation(app_client, users)
    messages = [{"role": "assistant", "content": f"message {n}"} for n in range(1_000)]

    response = await app_client.post(
        f"/v1/conversations/{cid}/messages:batch", json={"messages": messages}, headers=users.alice
    )

    assert response.status_code == 201
    ids = [r["message"]["id"] for r in response.json()["results"]]
    assert ids == sorted(set(ids))
    page = await app_client.get(f"/v1/conversations/{cid}/messages", headers=users.alice)
    assert page.json()["total"] == 1_000


async def test_a_missing_or_foreign_or_deleted_conversation_is_404(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    batch = {"messages": [{"role": "user", "content": "hi"}]}

    foreign = await app_client.post(
        f"/v1/conversations/{cid}/messages:batch", json=batch, headers=users.bob
    )
    missing = await app_client.post(
        "/v1/conversations/00000000-0000-0000-0000-000000000000/messages:batch",
        json=batch,
        headers=users.alice,
    )
    await app_client.delete(f"/v1/conversations/{cid}", headers=users.alice)
    deleted = await app_client.post(
        f"/v1/conversations/{cid}/messages:batch", json=batch, headers=users.alice
    )

    assert [foreign.status_code, missing.status_code, deleted.status_code] == [404, 404, 404]
    assert deleted.json() == {"detail": "conversation not found", "code": "not_found"}


async def test_a_repeated_batch_with_the_same_key_is_stored_once(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    batch = {"messages": [{"role": "user", "content": "a"}, {"role": "bad"}]}
    headers = {**users.alice, "Idempotency-Key": "batch-1"}
    path = f"/v1/conversations/{cid}/messages:batch"

    first = await app_client.post(path, json=batch, headers=headers)
    again = await app_client.post(path, json=batch, headers=headers)

    assert (first.status_code, again.status_code) == (207, 207)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert (await all_messages(app_client, users, cid))["total"] == 1
