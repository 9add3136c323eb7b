"""``WS /v1/conversations/{id}/stream``: each new message of a conversation, once, in order.

Authentication is the HTTP API's API key, presented as ``Authorization: Bearer <key>`` or — for
browsers, which cannot set headers on a WebSocket — as the subprotocols ``bearer, <key>``
(the server answers with ``bearer``, never echoing the key). Never in the URL, where keys end
up in logs.

The socket is accepted, then refused with a close code when the request cannot be served:

====  ===============================================================
4401  no API key, or an unknown or revoked one
4404  no such conversation for this user (another user's reads the same)
4429  the client read too slowly: over ``LIVE_QUEUE_SIZE`` events behind
1012  the server is restarting
1013  live updates are unavailable now (hub or database down), or this address presented
      too many unknown API keys lately (:mod:`conversations.key_guard`): reconnect later
====  ===============================================================

One short read unit checks the key and the conversation, then gives its connection back:
an idle stream holds no database connection. Messages arrive from the live hub after their
transaction committed (:mod:`conversations.live_events`); each is sent as the ``MessageOut``
JSON of the HTTP API. A client that reconnects reads what it missed with
``GET …/messages?cursor=…``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from typing import Final

from fastapi import APIRouter, HTTPException
from starlette.websockets import WebSocket, WebSocketDisconnect

from bastion import BastionError, Database, NotFoundError
from bastion.fastapi import get_database, live_hub_of
from bastion.live import HubClosedError, LiveUnavailableError, SlowConsumerError, Subscription
from conversations.auth import MAX_KEY_LENGTH, PresentedKey, key_guard_of
from conversations.live_events import message_channel
from conversations.models import MessageSource
from conversations.routes._ids import parse_conversation_id
from conversations.routes._repositories import CONVERSATIONS, MESSAGES
from conversations.schemas import MessageOut, SourceOut

__all__ = [
    "CLOSE_NOT_FOUND",
    "CLOSE_RESTARTING",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TRY_LATER",
    "CLOSE_UNAUTHORIZED",
    "SUBPROTOCOL",
    "router",
]

logger = logging.getLogger("conversations.stream")

router = APIRouter(tags=["stream"])

SUBPROTOCOL: Final = "bearer"
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_NOT_FOUND: Final = 4404
CLOSE_SLOW_CONSUMER: Final = 4429
CLOSE_RESTARTING: Final = 1012
CLOSE_TRY_LATER: Final = 1013
_CLOSE_TIMEOUT_S: Final = 5.0  # a slow reader gets this long to take the close frame
_REMEMBERED_IDS: Final = 1024  # recent message ids, to send each once

_SOURCES_OF = MESSAGES.children_query("sources", order_by=MessageSource.position)


@router.websocket("/v1/conversations/{conversation_id}/stream")
async def stream_messages(websocket: WebSocket, conversation_id: str) -> None:
    database = await get_database(websocket)
    offered = list(websocket.scope.get("subprotocols", []))
    subprotocol = SUBPROTOCOL if SUBPROTOCOL in offered else None
    key = _presented_key(websocket, offered)
    if key is None:
        await _refuse(websocket, subprotocol, CLOSE_UNAUTHORIZED, "missing or invalid API key")
        return
    try:
        cid = parse_conversation_id(conversation_id)
    except NotFoundError:
        await _refuse(websocket, subprotocol, CLOSE_NOT_FOUND, "conversation not found")
        return
    client = websocket.client.host if websocket.client is not None else None
    try:
        presented = await PresentedKey.admit(key, client, key_guard_of(websocket))
    except HTTPException:  # 429: too many keys not known good from this address
        await _refuse(websocket, subprotocol, CLOSE_TRY_LATER, "too many unknown API keys")
        return
    try:
        async with database.read_connection() as connection:
            owner_id = await presented.authenticate(connection)
            found = await CONVERSATIONS.values(connection, cid, "id", scope=owner_id) is not None
    except HTTPException:  # 401: unknown or revoked
        await _refuse(websocket, subprotocol, CLOSE_UNAUTHORIZED, "invalid API key")
        return
    except BastionError as exc:
        await _refuse(websocket, subprotocol, CLOSE_TRY_LATER, exc.code)
        return
    if not found:
        await _refuse(websocket, subprotocol, CLOSE_NOT_FOUND, "conversation not found")
        return
    try:
        # Subscribed before accepting: every message committed after the client sees the
        # handshake succeed reaches it.
        subscription = await live_hub_of(websocket).subscribe(message_channel(cid))
    except HubClosedError:
        await _refuse(websocket, subprotocol, CLOSE_RESTARTING, "server restarting")
        return
    except LiveUnavailableError:
        await _refuse(websocket, subprotocol, CLOSE_TRY_LATER, "live updates unavailable")
        return
    async with subscription:
        await websocket.accept(subprotocol=subprotocol)
        await _relay(websocket, subscription, database, cid)


async def _relay(
    websocket: WebSocket, subscription: Subscription, database: Database, cid: uuid.UUID
) -> None:
    pump = asyncio.create_task(_pump(websocket, subscription, database, cid))
    listen = asyncio.create_task(_until_client_leaves(websocket))
    ended = asyncio.create_task(subscription.ended.wait())
    try:
        await asyncio.wait({pump, listen, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, listen, ended):
            task.cancel()
        await asyncio.gather(pump, listen, ended, return_exceptions=True)
    if listen.done() and not listen.cancelled():
        return  # the client left
    error = subscription.error
    if isinstance(error, SlowConsumerError):
        await _close(websocket, CLOSE_SLOW_CONSUMER, f"too slow: {error.message}")
    elif isinstance(error, LiveUnavailableError):
        await _close(websocket, CLOSE_TRY_LATER, "live updates interrupted; reconnect")
    elif isinstance(error, HubClosedError) or subscription.ended.is_set():
        await _close(websocket, CLOSE_RESTARTING, "server restarting")
    elif pump.done() and not pump.cancelled() and pump.exception() is not None:
        logger.warning("stream: relay failed", exc_info=pump.exception())
        await _close(websocket, CLOSE_TRY_LATER, "stream failed; reconnect")


async def _pump(
    websocket: WebSocket, subscription: Subscription, database: Database, cid: uuid.UUID
) -> None:
    recent: deque[int] = deque(maxlen=_REMEMBERED_IDS)
    while True:
        payload = await subscription.get()
        event = json.loads(payload)
        # A batch's messages arrive as one list (see conversations.live_events).
        for message in event if isinstance(event, list) else [event]:
            message_id = int(message["id"])
            if message_id in recent:
                continue  # published twice (a retried hook): sent once
            recent.append(message_id)
            if message.get("ref"):
                loaded = await _load_message(database, cid, message_id)
                if loaded is None:
                    continue
                text = loaded
            elif message is event:
                text = payload  # as published: no need to encode it again
            else:
                text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
            await websocket.send_text(text)


async def _load_message(database: Database, cid: uuid.UUID, message_id: int) -> str | None:
    """A message too large for the hub, read in one short unit."""
    async with database.read_connection() as connection:
        row = await MESSAGES.get(connection, message_id)
        if row is None or row["conversation_id"] != cid:
            return None
        sources = [
            SourceOut(url=source.url, title=source.title)
            for source in await connection.execute(_SOURCES_OF, {"parent_ids": [message_id]})
        ]
    return MessageOut.model_validate({**row, "sources": sources}).model_dump_json()


async def _until_client_leaves(websocket: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


def _presented_key(websocket: WebSocket, offered: list[str]) -> str | None:
    scheme, _, key = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        key = ""
        if SUBPROTOCOL in offered:
            position = offered.index(SUBPROTOCOL)
            key = offered[position + 1] if position + 1 < len(offered) else ""
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii():
        return None
    return key


async def _refuse(websocket: WebSocket, subprotocol: str | None, code: int, reason: str) -> None:
    # Accepted first: a close before the handshake becomes a bare HTTP 403, and the client
    # would never see the code that says what to do.
    await websocket.accept(subprotocol=subprotocol)
    await _close(websocket, code, reason)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await websocket.close(code, reason)
