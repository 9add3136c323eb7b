"""Messages: added with sources, paged in creation order by cursor, counted."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import Users, new_conversation

Client = httpx.AsyncClient


async def test_a_message_is_stored_with_its_sources_in_order(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    body = {
        "role": "assistant",
        "content": "Line one\nline two\t<b>bold</b> & done",
        "metadata": {"model": "m-1", "tokens": 12},
        "sources": [
            {"url": "https://example.com/a", "title": "A"},
            {"url": "http://example.org/b?q=1#x"},
        ],
    }

    response = await app_client.post(
        f"/v1/conversations/{cid}/messages", json=body, headers=users.alice
    )

    assert response.status_code == 201, response.text
    message = response.json()
    assert message["conversation_id"] == cid
    assert (message["role"], message["content"], message["metadata"]) == (
        "assistant",
        body["content"],
        body["metadata"],
    )
    assert message["sources"] == [
        {"url": "https://example.com/a", "title": "A"},
        {"url": "http://example.org/b?q=1#x", "title": None},
    ]
    page = await app_client.get(f"/v1/conversations/{cid}/messages", headers=users.alice)
    assert page.json() == {"items": [message], "next_cursor": None, "total": 1}


async def test_pages_walk_every_message_once_in_creation_order(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    for n in range(23):
        response = await app_client.post(
            f"/v1/conversations/{cid}/messages",
            json={"role": "user", "content": f"message {n}"},
            headers=users.alice,
        )
        assert response.status_code == 201

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, object] = {"limit": 10}
        if cursor:
            params["cursor"] = cursor
        page = await app_client.get(
            f"/v1/conversations/{cid}/messages", params=params, headers=users.alice
        )
        assert page.status_code == 200
        body = page.json()
        assert body["total"] == 23
        seen.extend(item["content"] for item in body["items"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert seen == [f"message {n}" for n in range(23)]


async def test_messages_added_while_paging_are_neither_skipped_nor_repeated(
    app_client: Client, users: Users
) -> None:
    cid = await new_conversation(app_client, users)
    path = f"/v1/conversations/{cid}/messages"

    async def add(n: int) -> None:
        response = await app_client.post(
            path, json={"role": "user", "content": str(n)}, headers=users.alice
        )
        assert response.status_code == 201

    await asyncio.gather(*(add(n) for n in range(10)))
    first = (await app_client.get(path, params={"limit": 4}, headers=users.alice)).json()
    await asyncio.gather(*(add(n) for n in range(10, 20)))
    seen = [item["id"] for item in first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        page = (
            await app_client.get(path, params={"limit": 4, "cursor": cursor}, headers=users.alice)
        ).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]

    assert len(seen) == 20
    assert seen == sorted(set(seen))


async def test_a_deleted_conversation_takes_no_messages(app_client: Client, users: Users) -> None:
    cid = await new_conversation(app_client, users)
    await app_client.delete(f"/v1/conversations/{cid}", headers=users.alice)

    response = await app_client.post(
        f"/v1/conversations/{cid}/messages",
        json={"role": "user", "content": "hello?"},
        headers=users.alice,
    )

    assert response.status_code == 404
    await app_client.post(f"/v1/conversations/{cid}/restore", headers=users.alice)
    page = await app_client.get(f"/v1/conversations/{cid}/messages", headers=users.alice)
    assert page.json()["total"] == 0
