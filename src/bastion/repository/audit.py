"""Audit columns: when a row was created, changed and deleted, and who did it.

Times come from the audit clock, read once per row at the moment the row is written (a
column default is a function, never a value computed at import). The clock is
:func:`bastion.utcnow` unless a test or a data import swaps it with :func:`use_clock`.
*Who* is the user of the request being served (``RequestContext.user``, set by the
application once it has authenticated the caller), or the one named with :func:`acting_as`
outside requests (a CLI command, a job).

>>> class Note(AuditMixin, Base):  # doctest: +SKIP
...     __tablename__ = "notes"
...     id: Mapped[int] = mapped_column(primary_key=True)
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Final

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from bastion.request_context import current_request
from bastion.types import UTCDateTime, utcnow

__all__ = ["AuditMixin", "Clock", "acting_as", "audit_now", "current_actor", "use_clock"]

Clock = Callable[[], datetime]
"""A function returning the current instant as an aware datetime."""

ACTOR_MAX_LENGTH: Final = 64

_clock: contextvars.ContextVar[Clock] = contextvars.ContextVar("bastion_clock", default=utcnow)
_actor: contextvars.ContextVar[str | None] = contextvars.ContextVar("bastion_actor", default=None)


def audit_now() -> datetime:
    """The audit clock's current instant (aware UTC unless a test clock says otherwise)."""
    return _clock.get()()


@contextmanager
def use_clock(clock: Clock) -> Iterator[None]:
    """Within the block (and tasks started in it), audit times come from ``clock``."""
    token = _clock.set(clock)
    try:
        yield
    finally:
        _clock.reset(token)


@contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Within the block, changes are recorded as made by ``actor`` (outside requests).

    Raises:
        ValueError: ``actor`` is empty or longer than 64 characters.
    """
    if not actor or len(actor) > ACTOR_MAX_LENGTH:
        raise ValueError(f"an actor is 1 to {ACTOR_MAX_LENGTH} characters")
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def current_actor() -> str | None:
    """Who is acting: :func:`acting_as`'s actor, else the request's user, else ``None``."""
    actor = _actor.get()
    if actor is not None:
        return actor
    request = current_request()
    return request.user if request is not None else None


class AuditMixin:
    """``created_at``, ``updated_at``, ``deleted_at``, ``created_by``, ``updated_by``.

    Every value is computed per row when the row is written, by the ORM, by Core
    ``insert()``/``update()`` and by :func:`bastion.bulk_insert` alike.
    :class:`~bastion.repository.Repository` also treats ``deleted_at`` as the soft-delete
    marker.
    """

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=audit_now)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=audit_now, onupdate=audit_now)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_by: Mapped[str | None] = mapped_column(String(ACTOR_MAX_LENGTH), default=current_actor)
    updated_by: Mapped[str | None] = mapped_column(
        String(ACTOR_MAX_LENGTH), default=current_actor, onupdate=current_actor
    )
