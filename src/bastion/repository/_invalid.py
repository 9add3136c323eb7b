"""The one error of the repository's query language: a parameter the caller must fix."""

from __future__ import annotations

__all__ = ["InvalidQueryError"]


class InvalidQueryError(ValueError):
    """A sort, filter or cursor the repository refuses; nothing was run.

    A ``ValueError`` rather than a :class:`~bastion.errors.BastionError`: it is the caller's
    input that is wrong, not the database. HTTP layers answer it with 422, naming
    ``parameter``. The message never quotes the refused value.

    Attributes:
        parameter: which input was refused (``"sort"``, ``"cursor"``, ``"filter"``).
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message
