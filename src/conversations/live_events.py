"""New-message events: published after the write committed, streamed to WebSocket clients.

An event is the message as the API returns it (``MessageOut`` JSON), or — when that is too
large for the hub (PostgreSQL notifications carry at most ~8 KB) — a reference
``{"id": …, "ref": true}`` that the stream resolves with one short read; or, for a batch, a
JSON list of those, in order.

The message routes call :func:`message_created` (one message) or :func:`messages_created`
(a batch) once ``write_once`` has returned — the transaction committed — and before they
return the response.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Final

from starlette.requests import HTTPConnection
from starlette.responses import Response

from bastion.fastapi import REPLAYED_HEADER, cache_of, live_hub_of
from bastion.live import Hub, LiveError
from conversations.cache_keys import conversation_changed

__all__ = [
    "BATCH_INLINE_FRACTION",
    "announce_messages",
    "message_channel",
    "message_created",
    "messages_created",
    "publish_message",
    "publish_messages",
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
        message_json = _reference(message_json)
    await hub.publish(message_channel(conversation_id), message_json)


async def publish_messages(
    hub: Hub, conversation_id: uuid.UUID, messages_json: Sequence[str]
) -> bool:
    """Publish committed messages, in order; ``True`` when every one was published.

    Several messages go out as few events as the hub's payload limit allows, each a JSON list
    of messages (one larger than :data:`BATCH_INLINE_FRACTION` of the limit as a reference):
    a batch of 1,000 is a handful of events, so it never puts a stream that keeps up
    ``LIVE_QUEUE_SIZE`` events behind, and a subscriber's memory stays bounded by that many
    events of at most the limit each.

    When a publish fails, the rest are not sent and this process's streams of the
    conversation are ended (:meth:`~bastion.live.Hub.interrupt`): they reconnect (close code
    1013) and read what they missed by cursor. Never raises for the hub being unavailable.
    """
    if len(messages_json) == 1:
        events = [messages_json[0]]
    else:
        events = list(_pack(messages_json, hub.max_payload_bytes))
    channel = message_channel(conversation_id)
    for event in events:
        try:
            if len(events) == 1:
                await publish_message(hub, conversation_id, event)
            else:
                await hub.publish(channel, event)
        except LiveError as exc:
            logger.warning("live: messages of %s not published (%s); streams told to reconnect",
                           conversation_id, exc.code)  # fmt: skip
            hub.interrupt(channel)
            return False
    return True


BATCH_INLINE_FRACTION: Final = 16
"""In a batch event, a message over ``max_payload_bytes / 16`` is sent as a reference."""


def _pack(messages_json: Sequence[str], limit: int) -> Iterator[str]:
    inline_limit = limit // BATCH_INLINE_FRACTION
    items: list[str] = []
    size = 2  # the brackets
    for message_json in messages_json:
        item = message_json
        if len(item.encode()) > inline_limit:
            item = _reference(item)
        item_size = len(item.encode()) + 1  # and its comma
        if items and size + item_size > limit:
            yield "[" + ",".join(items) + "]"
            items, size = [], 2
        items.append(item)
        size += item_size
    if items:
        yield "[" + ",".join(items) + "]"


def _reference(message_json: str) -> str:
    return json.dumps({"id": json.loads(message_json)["id"], _REF: True})


async def announce_messages(
    connection: HTTPConnection,
    owner_id: uuid.UUID,
    conversation_id: uuid.UUID,
    messages_json: Sequence[str],
) -> None:
    """Invalidate the conversation's cached reads, then publish the committed messages.

    Never raises for the cache or the hub being unavailable: the messages are stored;
    streams that miss them are told to reconnect, and caches are invalidated later.
    """
    await conversation_changed(cache_of(connection), owner_id, conversation_id)
    await publish_messages(live_hub_of(connection), conversation_id, messages_json)


async def message_created(
    connection: HTTPConnection,
    owner_id: uuid.UUID,
    conversation_id: uuid.UUID,
    response: Response,
) -> None:
    """After ``POST …/messages``: announce the message in its 201 ``response``.

    Does nothing for an error or a replayed response (that message was announced when it was
    first created).
    """
    if response.status_code != 201 or REPLAYED_HEADER in response.headers:
        return
    await announce_messages(connection, owner_id, conversation_id, [bytes(response.body).decode()])


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
