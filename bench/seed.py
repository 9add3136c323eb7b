"""Create and fill the benchmark database: one user, conversations, messages with sources.

Writes ``<workdir>/ids.txt`` (one conversation id per line) and ``<workdir>/key.txt``.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert

from bastion import Database, load_settings, utcnow
from bastion.migrations import upgrade
from conversations import MIGRATIONS
from conversations.auth import generate_api_key, hash_api_key
from conversations.models import ApiKey, Conversation, Message, MessageSource, User

CONVERSATIONS = 1000
MESSAGES_PER_CONVERSATION = 30


async def seed(workdir: Path) -> None:
    settings = load_settings()
    key = generate_api_key()
    start = utcnow() - timedelta(days=1)
    user_id = uuid.uuid4()
    conversation_ids = [uuid.uuid4() for _ in range(CONVERSATIONS)]
    async with Database(settings) as database:
        await upgrade(database, MIGRATIONS)
        async with database.write() as session:
            await session.execute(insert(User), [{"id": user_id, "name": "bench"}])
            await session.execute(
                insert(ApiKey), [{"user_id": user_id, "key_hash": hash_api_key(key)}]
            )
            await session.execute(
                insert(Conversation),
                [
                    {
                        "id": cid,
                        "owner_id": user_id,
                        "title": f"Conversation {n}",
                        "metadata_": {"n": n},
                        "message_count": MESSAGES_PER_CONVERSATION,
                        "created_at": start + timedelta(seconds=n),
                        "updated_at": start + timedelta(seconds=n),
                    }
                    for n, cid in enumerate(conversation_ids)
                ],
            )
            message_id = 0
            messages, sources = [], []
            for cid in conversation_ids:
                for m in range(MESSAGES_PER_CONVERSATION):
                    message_id += 1
                    messages.append(
                        {
                            "id": message_id,
                            "conversation_id": cid,
                            "role": "user" if m % 2 == 0 else "assistant",
                            "content": f"Message {m} of the conversation. " * 4,
                            "metadata_": {},
                            "created_at": start + timedelta(seconds=m),
                        }
                    )
                    if m % 3 == 0:
                        sources.append(
                            {
                                "message_id": message_id,
                                "position": 0,
                                "url": f"https://example.com/{message_id}",
                                "title": "Example",
                            }
                        )
            await session.execute(insert(Message), messages)
            await session.execute(insert(MessageSource), sources)
            if database.backend == "postgresql":
                # Explicit ids bypassed the identity; move it past them for new messages.
                from sqlalchemy import text

                await session.execute(
                    text("SELECT setval(pg_get_serial_sequence('messages', 'id'), :n)"),
                    {"n": message_id},
                )
    (workdir / "ids.txt").write_text("".join(f"{cid}\n" for cid in conversation_ids))
    (workdir / "key.txt").write_text(key)


if __name__ == "__main__":
    import sys

    asyncio.run(seed(Path(sys.argv[1])))
