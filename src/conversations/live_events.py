"""New-message events: published after the write committed, streamed to WebSocket clients.

An event is the message as the API returns it (``MessageOut`` JSON), or — when that is too
large for the hub (PostgreSQL notifications carry at most ~8 KB) — a reference
``{"id": …, "ref": true}`` that the stream resolves with one short read.

The message routes call :func:`message_created` (one message) or :func:`messages_created`
(a batch) once ``write_once`` has returned — the transaction committed — and before they
return the response.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Final

from starlette.requests import HTTPConnection
from starlette.responses import Response

from bastion.fastapi import REPLAYED_HEADER, cache_of, live_hub_of
from bastion.live import Hub, LiveError
from conversations.cache_keys import conversation_changed

__all__ = [
    "announce_messages",
    "message_channel",
    "message_created",
    "messages_created",
    "publish_message",
]

logger = logging.getLogger("conversations.live")

_REF: Final = "ref"


def message_channel(conversation_id: uuid.UUID) -> str:
    """The hub channel of one conversation's new messages."""
    return f"conversation:{conversation_id}:messages"


async def publish_message(hub: Hub, conversation_id: uuid.UUID, message_json: str) -> None:
    """Publish a committed message (its ``MessageOut`` JSON) to the conversation's streams.

    Raises:
        LiveUnavailableError: the hub cannot reach its transport.
    """
    if len(message_json.encode()) > hub.max_payload_bytes:
        message_id = json.loads(message_json)["id"]
        message_json = json.dumps({"id": message_id, _REF: True})
    await hub.publish(message_channel(conversation_id), message_json)


async def announce_messages(
    connection: HTTPConnection,
    owner_id: uuid.UUID,
    conversation_id: uuid.UUID,
    messages_json: Sequence[str],
) -> None:
    """Invalidate the conversation's cached reads, then publish each committed message.

    Never raises for the cache or the hub being unavailable: the messages are stored;
    streams that miss them are told to reconnect, and caches are invalidated later.
    """
    await conversation_changed(cache_of(connection), owner_id, conversation_id)
    hub = live_hub_of(connection)
    for message_json in messages_json:
        try:
            await publish_message(hub, conversation_id, message_json)
        except LiveError as exc:
            logger.warning("live: a message of %s not published (%s)", conversation_id, exc.code)
            return


async def message_created(
    connection: HTTPConnection, owner_id: uuid.UUID, response: Response
) -> None:
    """After ``POST …/messages``: announce the message in its 201 ``response``.

    Does nothing for an error or a replayed response (that message was announced when it was
    first created).
    """
    if response.status_code != 201 or REPLAYED_HEADER in response.headers:
        return
    body = bytes(response.body).decode()
    conversation_id = uuid.UUID(json.loads(body)["conversation_id"])
    await announce_messages(connection, owner_id, conversation_id, [body])


async def messages_created(
    connection: HTTPConnection, owner_id: uuid.UUID, conversation_id: uuid.UUID, response: Response
) -> None:
    """After ``POST …/messages:batch``: announce the stored messages of its 201/207 response."""
    if response.status_code not in (201, 207) or REPLAYED_HEADER in response.headers:
        return
    results = json.loads(bytes(response.body))["results"]
    stored = [
        json.dumps(result["message"], separators=(",", ":"))
        for result in results
        if result.get("status") == 201 and result.get("message") is not None
    ]
    if stored:
        await announce_messages(connection, owner_id, conversation_id, stored)
