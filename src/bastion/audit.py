"""An audit trail of administrative actions: who asked for what, on what, and how it ended.

Every admin action writes a record when it is asked for (outcome ``"requested"``) and another
when it ends (``"succeeded"``, ``"failed"``, ``"refused"`` …), so an action that crashes the
process still leaves its first half. Records go to the ``bastion.audit`` logger as one JSON
object per line — ship that logger to durable storage — and the last ``keep`` stay in memory for
the admin API. Records hold names and ids only: never a token, a password or a URL with one.

>>> audit = AuditLog()
>>> audit.record(actor="admin@127.0.0.1", action="backup.create", target=None,
...              outcome="requested")
AuditRecord(...)
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from bastion.request_context import current_request
from bastion.types import utcnow

__all__ = ["AuditLog", "AuditRecord"]

logger = logging.getLogger("bastion.audit")


@dataclass(frozen=True)
class AuditRecord:
    """One line of the audit trail."""

    actor: str
    action: str
    target: str | None
    outcome: str
    detail: str | None = None
    request_id: str | None = None
    at: datetime = field(default_factory=utcnow)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


class AuditLog:
    """Writes audit records to the ``bastion.audit`` logger and keeps the latest in memory.

    Args:
        keep: how many recent records :attr:`recent` holds.
    """

    def __init__(self, *, keep: int = 1000) -> None:
        self._recent: deque[AuditRecord] = deque(maxlen=keep)
        # Apart, so a flood of unauthenticated calls cannot push real actions out of memory.
        self._refusals: deque[AuditRecord] = deque(maxlen=keep)

    def record(
        self,
        *,
        actor: str,
        action: str,
        target: str | None,
        outcome: str,
        detail: str | None = None,
    ) -> AuditRecord:
        """Write one record (tagged with the current request's id) and return it."""
        entry = _write(actor, action, target, outcome, detail)
        self._recent.append(entry)
        return entry

    def record_refusal(self, *, actor: str, action: str, detail: str | None = None) -> AuditRecord:
        """Write the record of a call refused before it was authenticated (401/403).

        Logged like every record, but kept in memory apart from :attr:`recent`.
        """
        entry = _write(actor, action, None, "refused", detail)
        self._refusals.append(entry)
        return entry

    @property
    def recent(self) -> list[AuditRecord]:
        """The records of authenticated actions kept in memory, oldest first."""
        return list(self._recent)

    @property
    def refusals(self) -> list[AuditRecord]:
        """The records of refused, unauthenticated calls kept in memory, oldest first."""
        return list(self._refusals)


def _write(
    actor: str, action: str, target: str | None, outcome: str, detail: str | None
) -> AuditRecord:
    """A record tagged with the current request's id, logged as one JSON line."""
    context = current_request()
    entry = AuditRecord(
        actor=actor,
        action=action,
        target=target,
        outcome=outcome,
        detail=detail,
        request_id=context.request_id if context is not None else None,
    )
    logger.info(json.dumps(entry.to_dict(), sort_keys=True))
    return entry
