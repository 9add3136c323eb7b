"""How long operations (export, import) report progress: a small protocol the CLI implements.

Calls come from the event loop's thread, one table at a time: ``start`` once per table and
phase (``"exporting"``; ``"checking"`` then ``"importing"``), then ``advance`` as rows go by.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NoProgress", "Progress"]


class Progress(Protocol):
    """Told when a table's phase starts (with its row count) and as its rows go by."""

    def start(self, phase: str, table: str, rows: int) -> None: ...

    def advance(self, rows: int) -> None: ...


class NoProgress:
    """A :class:`Progress` that reports nothing."""

    def start(self, phase: str, table: str, rows: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass
