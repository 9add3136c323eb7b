"""The stack most fault scenarios run on: throwaway PostgreSQL ← fault proxy ← Bastion.

``fault_stack`` gives a fresh, migrated database on the throwaway server and a
:class:`FaultProxy` in front of it; :meth:`FaultStack.settings` points Bastion at the proxy
with a unique ``application_name``, so the leak check can find exactly this test's sessions.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from bastion import DatabaseSettings
from tests.conftest import make_settings
from tests.faults.pg_server import PostgresServer, migrated_database
from tests.faults.proxy import FaultProxy

__all__ = ["FaultStack", "fault_stack"]


@dataclass
class FaultStack:
    """A migrated database on the throwaway server, reached directly or through the proxy."""

    server: PostgresServer
    proxy: FaultProxy
    database_name: str
    direct_url: str
    application_name: str

    @property
    def proxied_url(self) -> str:
        """The database's URL through the proxy."""
        url = make_url(self.direct_url).set(host=self.proxy.host, port=self.proxy.port)
        return url.render_as_string(hide_password=False)

    @property
    def admin_url(self) -> str:
        """The server's maintenance database, directly (for checks the faults must not hit)."""
        return self.server.url()

    def settings(self, **overrides: Any) -> DatabaseSettings:
        """Settings through the proxy, with this test's application_name, plus overrides."""
        values: dict[str, Any] = {"DB_APPLICATION_NAME": self.application_name}
        values.update(overrides)
        return make_settings(self.proxied_url, **values)


@pytest.fixture
async def fault_stack(fresh_postgres_server: PostgresServer) -> AsyncIterator[FaultStack]:
    """A fresh database behind a fault proxy (cleared and stopped after the test)."""
    name = f"faults_{uuid.uuid4().hex[:12]}"
    url = await migrated_database(fresh_postgres_server, name)
    async with FaultProxy("127.0.0.1", fresh_postgres_server.port) as proxy:
        yield FaultStack(
            server=fresh_postgres_server,
            proxy=proxy,
            database_name=name,
            direct_url=url,
            application_name=f"bastion-{name}",
        )
