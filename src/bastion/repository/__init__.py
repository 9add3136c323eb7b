"""The generic async repository: filters, sorting, pages, soft delete, audit, upsert.

See :mod:`bastion.repository.repository` for the tour; every name here is also exported
from :mod:`bastion`.
"""

from bastion.repository._base import returning_rows
from bastion.repository._invalid import InvalidQueryError
from bastion.repository.audit import (
    AuditMixin,
    Clock,
    acting_as,
    audit_now,
    current_actor,
    use_clock,
)
from bastion.repository.filters import Eq, Filter, In, IsNull, Range, Search, escape_like
from bastion.repository.pagination import CursorCodec, CursorPage, Keyset, Page
from bastion.repository.repository import Executor, Repository
from bastion.repository.sorting import SortKey, parse_sort
from bastion.repository.upsert import upsert_statement

__all__ = [
    "AuditMixin",
    "Clock",
    "CursorCodec",
    "CursorPage",
    "Eq",
    "Executor",
    "Filter",
    "In",
    "InvalidQueryError",
    "IsNull",
    "Keyset",
    "Page",
    "Range",
    "Repository",
    "Search",
    "SortKey",
    "acting_as",
    "audit_now",
    "current_actor",
    "escape_like",
    "parse_sort",
    "returning_rows",
    "upsert_statement",
    "use_clock",
]
