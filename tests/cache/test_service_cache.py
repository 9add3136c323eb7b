"""The reference service with its Redis cache on, through HTTP: reads are served from the
cache, every write is visible to the very next read, and no user is ever served another's."""

from __future__ import annotations

import httpx

from bastion import DatabaseSettings
from bastion.cache import CacheSettings, RedisCache
from conversations.app import create_app
from tests.conftest import Users, serve


async def test_cached_reads_are_fresh_after_every_write_and_scoped_by_owner(
    settings: DatabaseSettings, cache_settings: CacheSettings, users: Users
) -> None:
    app = create_app(settings, cache_settings=cache_settings)
    async with serve(app) as client:
        cache: RedisCache = app.state.cache
        created = await client.post("/v1/conversations", json={"title": "v0"}, headers=users.alice)
        path = f"/v1/conversations/{created.json()['id']}"

        async def title() -> str:
            response = await client.get(path, headers=users.alice)
            assert response.status_code == 200
            return str(response.json()["title"])

        async def messages() -> list[str]:
            page = (await client.get(f"{path}/messages", headers=users.alice)).json()
            assert page["total"] == len(page["items"])
            return [item["content"] for item in page["items"]]

        assert await title() == "v0"
        hits = cache.metrics.hits
        assert await title() == "v0"
        assert cache.metrics.hits == hits + 1  # the second read came from Redis

        seen: list[tuple[str, list[str]]] = []
        for n in range(1, 6):
            version = (await client.get(path, headers=users.alice)).headers["ETag"]
            patched = await client.patch(
                path, json={"title": f"v{n}"}, headers={**users.alice, "If-Match": version}
            )
            assert patched.status_code == 200
            posted = await client.post(
                f"{path}/messages", json={"role": "user", "content": f"m{n}"}, headers=users.alice
            )
            assert posted.status_code == 201
            seen.append((await title(), await messages()))
        deleted = await client.delete(path, headers=users.alice)
        after_delete = await client.get(path, headers=users.alice)
        restored = await client.post(f"{path}/restore", headers=users.alice)
        after_restore = await client.get(path, headers=users.alice)
        foreign = [
            await client.get(path, headers=users.bob),
            await client.get(f"{path}/messages", headers=users.bob),
        ]

    assert seen == [(f"v{n}", [f"m{k}" for k in range(1, n + 1)]) for n in range(1, 6)]
    assert deleted.status_code == 204
    assert after_delete.status_code == 404  # not the cached copy from before the delete
    assert restored.status_code == 200
    assert after_restore.status_code == 200
    assert [response.status_code for response in foreign] == [404, 404]
    assert all("v5" not in response.text for response in foreign)


async def test_without_redis_the_service_reads_the_database_every_time(
    settings: DatabaseSettings, users: Users
) -> None:
    app = create_app(settings, cache_settings=CacheSettings(REDIS_URL=None))
    async with serve(app) as client:
        created = await client.post("/v1/conversations", json={"title": "t"}, headers=users.alice)
        got: httpx.Response = await client.get(
            f"/v1/conversations/{created.json()['id']}", headers=users.alice
        )
        assert got.status_code == 200
        assert "cache" not in (await client.get("/health/ready")).json()["components"]
