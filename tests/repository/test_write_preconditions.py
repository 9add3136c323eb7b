"""Write preconditions the repository must not skip: version checks and soft-deleted clashes."""

from __future__ import annotations

import pytest

from bastion import Database, Repository
from tests.repository.conftest import Shelf, items_repository

ITEMS = items_repository()
SHELVES = Repository(Shelf, name="shelf")


async def test_expected_version_on_a_table_without_a_version_column_is_refused(
    db: Database,
) -> None:
    async with db.write_connection() as connection:
        shelf = await SHELVES.create(connection, {"id": 1, "label": "top"})
        with pytest.raises(ValueError, match="no version column"):
            await SHELVES.update(connection, shelf["id"], {"label": "x"}, expected_version=99)
        unchanged = await SHELVES.require(connection, shelf["id"])
        # Without a precondition the same update still works.
        changed = await SHELVES.update(connection, shelf["id"], {"label": "middle"})

    assert unchanged["label"] == "top"
    assert changed["label"] == "middle"


async def test_an_upsert_onto_a_soft_deleted_row_revives_it(db: Database) -> None:
    async with db.write_connection() as connection:
        made = await ITEMS.create(connection, {"id": 5, "name": "old"}, scope="alice")
        await ITEMS.soft_delete(connection, made["id"], scope="alice")
        revived = await ITEMS.upsert(connection, {"id": 5, "name": "again"}, scope="alice")

    async with db.read_connection() as connection:
        seen = await ITEMS.get(connection, 5, scope="alice")
        listed = await ITEMS.page(connection, scope="alice")

    assert revived["deleted_at"] is None
    assert seen is not None
    assert seen["name"] == "again"
    assert [row["id"] for row in listed.items] == [5]
