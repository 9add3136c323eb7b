"""How long operations (export, import) report progress: a small protocol the CLI implements."""

from __future__ import annotations

from typing import Protocol

__all__ = ["NoProgress", "Progress"]


class Progress(Protocol):
    """Told when a table starts (with its row count) and as its rows go by."""

    def start_table(self, table: str, rows: int) -> None: ...

    def advance(self, table: str, rows: int) -> None: ...


class NoProgress:
    """A :class:`Progress` that reports nothing."""

    def start_table(self, table: str, rows: int) -> None:
        pass

    def advance(self, table: str, rows: int) -> None:
        pass
