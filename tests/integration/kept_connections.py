"""What the tests of kept connections (bastion._warm_connections) share, read side and write."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import DatabaseSettings
from conversations.models import User
from tests.conftest import make_settings

USERS = User.__table__
NAME_OF = select(USERS.c.name).where(USERS.c.id == bindparam("uid"))


def small_pools(database_url: str) -> DatabaseSettings:
    """Pools of 2 and overflow of 2: small enough for a test to fill and to burst."""
    return make_settings(database_url, DB_POOL_SIZE=2, DB_MAX_OVERFLOW=2)


async def driver_of(connection: AsyncConnection) -> object:
    """The driver connection under ``connection``: the same object when a connection is kept."""
    return (await connection.get_raw_connection()).driver_connection
