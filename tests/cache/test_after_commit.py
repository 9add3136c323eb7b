"""``InvalidateAfterCommit``: a route's invalidation runs after its write unit committed."""

from __future__ import annotations

import uuid

from fastapi import FastAPI
from sqlalchemy import text

from bastion import Database, DatabaseSettings
from bastion.cache import CacheSettings, RedisCache
from bastion.fastapi import InvalidateAfterCommit, WriteConnection, database_lifespan
from tests.conftest import serve


class RecordingCache(RedisCache):
    """A real Redis cache that notes what another connection sees when it invalidates."""

    def __init__(self, settings: CacheSettings, database: Database) -> None:
        super().__init__(settings)
        self.database = database
        self.seen: list[str | None] = []

    async def invalidate_tags(self, *tags: str) -> None:
        async with self.database.read_connection() as connection:
            self.seen.append(await connection.scalar(text("SELECT name FROM probe_notes")))
        await super().invalidate_tags(*tags)


def _app(settings: DatabaseSettings, cache_settings: CacheSettings) -> FastAPI:
    app = FastAPI(lifespan=database_lifespan(settings, cache=cache_settings))

    @app.put("/before/{name}")
    async def declared_before(
        name: str, stale: InvalidateAfterCommit, connection: WriteConnection
    ) -> None:
        await connection.execute(text("UPDATE probe_notes SET name = :name"), {"name": name})
        stale.add(tags=["notes"])

    @app.put("/after/{name}")
    async def declared_after(
        name: str, connection: WriteConnection, stale: InvalidateAfterCommit
    ) -> None:
        await connection.execute(text("UPDATE probe_notes SET name = :name"), {"name": name})
        stale.add(tags=["notes"])

    @app.put("/failing/{name}")
    async def failing(name: str, stale: InvalidateAfterCommit, connection: WriteConnection) -> None:
        stale.add(tags=["notes"])
        raise RuntimeError("the write fails")

    return app


async def test_declared_before_the_write_unit_it_invalidates_after_the_commit(
    database: Database, cache_settings: CacheSettings
) -> None:
    async with database.write_connection() as connection:
        await connection.execute(text("CREATE TABLE probe_notes (name VARCHAR(50))"))
        await connection.execute(text("INSERT INTO probe_notes VALUES ('old')"))
    try:
        app = _app(database.settings, cache_settings)
        async with serve(app) as client:
            recording = RecordingCache(cache_settings, app.state.database)
            app.state.cache = recording
            first = uuid.uuid4().hex[:8]
            assert (await client.put(f"/before/{first}")).status_code == 200
            second = uuid.uuid4().hex[:8]
            assert (await client.put(f"/after/{second}")).status_code == 200
            refused = await _put_failing(client)
            await recording.close()
    finally:
        async with database.write_connection() as connection:
            await connection.execute(text("DROP TABLE probe_notes"))
    # Before the unit: the commit had happened. After it (the hazard the docstring names):
    # the invalidation ran while the new row was still uncommitted.
    assert recording.seen[0] == first
    assert recording.seen[1] == first  # not `second`: that write was not committed yet
    assert refused == 500
    assert len(recording.seen) == 2  # a failed route invalidates nothing


async def _put_failing(client: object) -> int:
    import httpx

    assert isinstance(client, httpx.AsyncClient)
    try:
        response = await client.put("/failing/x")
    except RuntimeError:
        return 500
    return response.status_code
