"""Alembic environment of the conversation store; Bastion supplies the connection."""

from bastion.migrations import run_env
from conversations.models import Base

run_env(target_metadata=Base.metadata)
