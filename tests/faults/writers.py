"""A fleet of careful HTTP writers, for scenarios that break the server under write load.

Each writer posts messages, each with its own client-made ``Idempotency-Key``; on a 5xx it
sends the same request with the same key again (that is what the key is for), until it gets
an answer or the run ends. Afterwards :meth:`WriterFleet.resolve` re-sends every request
still open, so each one ends acknowledged, and :meth:`WriterFleet.audit` compares what was
acknowledged with what the database stored.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from sqlalchemy import text

from bastion import Database

__all__ = ["Attempt", "Audit", "WriterFleet"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One HTTP request of a writer: when it started and ended, and its status."""

    started: float
    ended: float
    status: int


@dataclass(frozen=True, slots=True)
class Audit:
    """Acknowledged keys against stored messages."""

    acknowledged: int
    stored: int
    lost: list[str]
    duplicated: list[str]
    unexpected: list[str]


@dataclass
class WriterFleet:
    """``writers`` tasks posting keyed messages to ``url`` until :meth:`stop`."""

    client: httpx.AsyncClient
    url: str
    headers: dict[str, str]
    writers: int
    acknowledged: set[str] = field(default_factory=set)
    open_keys: set[str] = field(default_factory=set)
    attempts: list[Attempt] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write(n)) for n in range(self.writers)]

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def statuses(self) -> Counter[int]:
        return Counter(attempt.status for attempt in self.attempts)

    async def resolve(self) -> None:
        """Re-send every request whose outcome the run left open, until each is answered."""
        for key in sorted(self.open_keys):
            for _ in range(20):
                if await self._post(key) == 201:
                    break
                await asyncio.sleep(0.25)
            else:
                raise AssertionError(f"{key} still unanswered after the server came back")

    async def audit(self, database: Database) -> Audit:
        async with database.read_connection() as connection:
            rows = (
                await connection.execute(
                    text("SELECT content, count(*) FROM messages GROUP BY content")
                )
            ).all()
        stored = {str(content): int(count) for content, count in rows}
        return Audit(
            acknowledged=len(self.acknowledged),
            stored=sum(stored.values()),
            lost=sorted(self.acknowledged - stored.keys()),
            duplicated=sorted(key for key, count in stored.items() if count > 1),
            unexpected=sorted(stored.keys() - self.acknowledged),
        )

    async def _write(self, writer: int) -> None:
        sequence = 0
        while not self._stopping.is_set():
            key = f"w{writer}-{sequence}"
            sequence += 1
            self.open_keys.add(key)
            while not self._stopping.is_set():
                if await self._post(key) == 201:
                    break
                await asyncio.sleep(0.05)

    async def _post(self, key: str) -> int:
        started = time.monotonic()
        try:
            response = await self.client.post(
                self.url,
                json={"role": "user", "content": key},
                headers={**self.headers, "Idempotency-Key": key},
            )
            status = response.status_code
        except httpx.HTTPError:
            status = 599  # the transport failed: outcome open, like a 5xx
        self.attempts.append(Attempt(started, time.monotonic(), status))
        if status == 201:
            self.acknowledged.add(key)
            self.open_keys.discard(key)
        return status
