"""The /v1/conversations API on both backends: the life of a conversation."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select

from bastion import Database, DatabaseSettings, use_clock
from conversations.models import Conversation
from tests.conftest import Users
from tests.repository.conftest import SteppingClock

Client = httpx.AsyncClient


async def create(client: Client, headers: dict[str, str], **body: object) -> dict[str, object]:
    response = await client.post("/v1/conversations", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_create_returns_the_conversation_with_its_fields(
    app_client: Client, users: Users
) -> None:
    response = await app_client.post(
        "/v1/conversations",
        json={"title": "Trip <planning> & notes", "metadata": {"topic": "travel", "n": [1, 2]}},
        headers=users.alice,
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {
        "id",
        "title",
        "status",
        "metadata",
        "created_at",
        "updated_at",
        "deleted_at",
        "version",
    }
    assert body["title"] == "Trip <planning> & notes"  # stored as sent, never escaped
    assert body["metadata"] == {"topic": "travel", "n": [1, 2]}
    assert (body["status"], body["version"], body["deleted_at"]) == ("active", 1, None)
    created = datetime.fromisoformat(body["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert body["created_at"] == body["updated_at"]
    assert response.headers["location"] == f"/v1/conversations/{body['id']}"
    assert response.headers["etag"] == '"1"'

    fetched = await app_client.get(f"/v1/conversations/{body['id']}", headers=users.alice)
    assert fetched.status_code == 200
    assert fetched.json() == body


async def test_another_users_conversation_is_not_found_for_every_verb(
    app_client: Client, users: Users
) -> None:
    conversation = await create(app_client, users.alice, title="Alice only")
    path = f"/v1/conversations/{conversation['id']}"

    attempts = [
        await app_client.get(path, headers=users.bob),
        await app_client.patch(path, json={"title": "mine now"}, headers=users.bob),
        await app_client.delete(path, headers=users.bob),
        await app_client.post(f"{path}/restore", headers=users.bob),
        await app_client.post(
            f"{path}/messages", json={"role": "user", "content": "hi"}, headers=users.bob
        ),
        await app_client.get(f"{path}/messages", headers=users.bob),
    ]

    assert [response.status_code for response in attempts] == [404] * len(attempts)
    assert (await app_client.get("/v1/conversations", headers=users.bob)).json()["total"] == 0
    unchanged = await app_client.get(path, headers=users.alice)
    assert unchanged.json() == conversation


async def test_patch_changes_only_what_was_sent_and_bumps_the_version(
    app_client: Client, users: Users
) -> None:
    conversation = await create(app_client, users.alice, title="Draft", metadata={"a": 1})
    path = f"/v1/conversations/{conversation['id']}"

    response = await app_client.patch(path, json={"status": "archived"}, headers=users.alice)

    assert response.status_code == 200
    body = response.json()
    assert (body["title"], body["status"], body["metadata"]) == ("Draft", "archived", {"a": 1})
    assert body["version"] == 2
    assert response.headers["etag"] == '"2"'
    assert body["updated_at"] > conversation["updated_at"]  # type: ignore[operator]


async def test_patch_with_a_stale_if_match_is_refused_with_412(
    app_client: Client, users: Users
) -> None:
    conversation = await create(app_client, users.alice, title="Draft")
    path = f"/v1/conversations/{conversation['id']}"
    first = await app_client.patch(
        path, json={"title": "First"}, headers={**users.alice, "If-Match": '"1"'}
    )
    assert first.status_code == 200

    stale = await app_client.patch(
        path, json={"title": "Second"}, headers={**users.alice, "If-Match": '"1"'}
    )

    assert stale.status_code == 412
    assert stale.json()["code"] == "stale_version"
    current = (await app_client.get(path, headers=users.alice)).json()
    assert (current["title"], current["version"]) == ("First", 2)


async def test_concurrent_patches_with_the_same_version_let_exactly_one_win(
    app_client: Client, users: Users
) -> None:
    conversation = await create(app_client, users.alice, title="Race")
    path = f"/v1/conversations/{conversation['id']}"

    responses = await asyncio.gather(
        *(
            app_client.patch(
                path, json={"title": f"writer {n}"}, headers={**users.alice, "If-Match": "1"}
            )
            for n in range(8)
        )
    )

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [412] * 7
    current = (await app_client.get(path, headers=users.alice)).json()
    assert current["version"] == 2


async def test_delete_hides_the_conversation_and_restore_brings_it_back(
    app_client: Client, users: Users
) -> None:
    conversation = await create(app_client, users.alice, title="Soon gone")
    path = f"/v1/conversations/{conversation['id']}"

    deleted = await app_client.delete(path, headers=users.alice)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await app_client.get(path, headers=users.alice)).status_code == 404
    assert (await app_client.delete(path, headers=users.alice)).status_code == 404
    listed = await app_client.get("/v1/conversations", headers=users.alice)
    assert listed.json()["total"] == 0
    with_deleted = await app_client.get(
        "/v1/conversations", params={"include_deleted": "true"}, headers=users.alice
    )
    assert with_deleted.json()["total"] == 1
    assert with_deleted.json()["items"][0]["deleted_at"] is not None

    restored = await app_client.post(f"{path}/restore", headers=users.alice)
    assert restored.status_code == 200
    assert restored.json()["deleted_at"] is None
    assert restored.json()["version"] == 3
    assert (await app_client.get(path, headers=users.alice)).status_code == 200
    again = await app_client.post(f"{path}/restore", headers=users.alice)
    assert again.status_code == 200
    assert again.json()["version"] == 3  # restoring a live conversation changes nothing


async def test_list_filters_sorts_and_pages_with_a_total(app_client: Client, users: Users) -> None:
    titles = ["alpha", "Beta 100%", "gamma_1", "delta", "epsilon"]
    made = [await create(app_client, users.alice, title=title) for title in titles]
    await create(app_client, users.bob, title="alpha of bob")
    await app_client.patch(
        f"/v1/conversations/{made[3]['id']}", json={"status": "archived"}, headers=users.alice
    )

    async def listing(**params: object) -> dict[str, object]:
        response = await app_client.get("/v1/conversations", params=params, headers=users.alice)
        assert response.status_code == 200, response.text
        return dict(response.json())

    everything = await listing()
    assert everything["total"] == 5
    assert [item["title"] for item in everything["items"]] == titles[::-1]  # newest first

    page = await listing(limit=2, offset=2, sort="created_at")
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)
    assert [item["title"] for item in page["items"]] == ["gamma_1", "delta"]

    # Case order is the database's collation (binary on SQLite, linguistic on PostgreSQL).
    by_title = [item["title"] for item in (await listing(sort="title"))["items"]]
    by_title_desc = [item["title"] for item in (await listing(sort="-title"))["items"]]
    assert by_title[2:] == ["delta", "epsilon", "gamma_1"]
    assert by_title_desc == by_title[::-1]

    archived = await listing(status="archived")
    assert [item["title"] for item in archived["items"]] == ["delta"]

    # LIKE wildcards in q are literal characters.
    assert [item["title"] for item in (await listing(q="100%"))["items"]] == ["Beta 100%"]
    assert [item["title"] for item in (await listing(q="a_1"))["items"]] == ["gamma_1"]
    assert (await listing(q="ALPHA"))["total"] == 1
    assert [item["title"] for item in (await listing(q="%"))["items"]] == ["Beta 100%"]
    assert (await listing(q="_"))["total"] == 1

    middle = made[2]["created_at"]
    after = await listing(created_after=middle, sort="created_at")
    assert [item["title"] for item in after["items"]] == ["delta", "epsilon"]
    before = await listing(created_before=middle, sort="created_at")
    assert [item["title"] for item in before["items"]] == ["alpha", "Beta 100%"]

    updated_first = await listing(sort="-updated_at", limit=1)
    assert updated_first["items"][0]["title"] == "delta"  # type: ignore[index]


async def test_dates_and_versions_beyond_range_are_client_errors(
    app_client: Client, users: Users
) -> None:
    conversation = await create(app_client, users.alice, title="Edge")
    path = f"/v1/conversations/{conversation['id']}"

    too_early = await app_client.get(
        "/v1/conversations",
        params={"created_after": "0001-01-01T00:00:00+05:00"},
        headers=users.alice,
    )
    too_late = await app_client.get(
        "/v1/conversations",
        params={"created_before": "9999-12-31T23:59:59-05:00"},
        headers=users.alice,
    )
    huge_version = await app_client.patch(
        path, json={"title": "x"}, headers={**users.alice, "If-Match": '"99999999999"'}
    )

    assert (too_early.status_code, too_late.status_code) == (422, 422)
    assert huge_version.status_code == 412


async def test_conversations_record_when_and_by_whom_they_were_written(
    app_client: Client, users: Users, settings: DatabaseSettings
) -> None:
    clock = SteppingClock()
    with use_clock(clock):
        first = await create(app_client, users.alice, title="first")
        clock.advance(1)
        second = await create(app_client, users.alice, title="second")
        clock.advance(1)
        edited = await app_client.patch(
            f"/v1/conversations/{first['id']}", json={"title": "1st"}, headers=users.alice
        )
        # With an Idempotency-Key the caller is looked up in the key's unit, not the write's.
        keyed = await create(
            app_client, {**users.alice, "Idempotency-Key": "audit-1"}, title="keyed"
        )

    created = [datetime.fromisoformat(str(c["created_at"])) for c in (first, second)]
    assert created[1] - created[0] == timedelta(seconds=1)
    updated = datetime.fromisoformat(edited.json()["updated_at"])
    assert updated - created[0] == timedelta(seconds=2)
    async with Database(settings) as database, database.read() as session:
        owner, created_by, updated_by = (
            await session.execute(
                select(
                    Conversation.owner_id, Conversation.created_by, Conversation.updated_by
                ).where(Conversation.id == uuid.UUID(str(first["id"])))
            )
        ).one()
        keyed_row = (
            await session.execute(
                select(Conversation.owner_id, Conversation.created_by).where(
                    Conversation.id == uuid.UUID(str(keyed["id"]))
                )
            )
        ).one()
    assert created_by == updated_by == str(owner)
    assert keyed_row == (owner, str(owner))
