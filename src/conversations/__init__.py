"""The reference service of Bastion: a conversation store (conversations, messages, sources).

It uses only Bastion's public API; run it with ``make demo``.
"""

MIGRATIONS = "conversations:migrations"
"""The Alembic script location of this service's schema."""

__all__ = ["MIGRATIONS"]
