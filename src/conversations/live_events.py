"""New-message events: published after the write committed, streamed to WebSocket clients.

An event is the message as the API returns it (``MessageOut`` JSON), or — when that is too
large for the hub (PostgreSQL notifications carry at most ~8 KB) — a reference
``{"id": …, "ref": true}`` that the stream resolves with one short read.

The message route calls :func:`message_created` once ``write_once`` has returned (the
transaction committed) and before it returns the response.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Final

from starlette.requests import HTTPConnection
from starlette.responses import Response

from bastion.fastapi import REPLAYED_HEADER, cache_of, live_hub_of
from bastion.live import Hub, LiveError
from conversations.cache_keys import conversation_changed

__all__ = ["message_channel", "message_created", "publish_message"]

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


async def message_created(
    connection: HTTPConnection, owner_id: uuid.UUID, response: Response
) -> None:
    """After a message was created (``response`` is the route's 201): invalidate, publish.

    Does nothing for an error or a replayed response (that message was announced when it was
    first created). Never raises for the cache or the hub being unavailable: the message is
    stored; streams that miss it are told to reconnect, caches are invalidated later.
    """
    if response.status_code != 201 or REPLAYED_HEADER in response.headers:
        return
    body = bytes(response.body).decode()
    conversation_id = uuid.UUID(json.loads(body)["conversation_id"])
    await conversation_changed(cache_of(connection), owner_id, conversation_id)
    try:
        await publish_message(live_hub_of(connection), conversation_id, body)
    except LiveError as exc:
        logger.warning("live: message %s not published (%s)", conversation_id, exc.code)
