"""Which requests a pacing or limiting middleware leaves alone: health probes, metrics."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Scope

__all__ = ["exempt_prefixes_of", "is_exempt"]


def exempt_prefixes_of(prefixes: Iterable[str]) -> tuple[str, ...]:
    """``prefixes`` as a tuple, each without a trailing ``/``.

    Raises:
        TypeError: ``prefixes`` is a single string (it would exempt every path that starts
            with any one of its characters).
    """
    if isinstance(prefixes, str):
        raise TypeError("exempt_prefixes takes a collection of path prefixes, not a string")
    return tuple(prefix.rstrip("/") for prefix in prefixes)


def is_exempt(scope: Scope, prefixes: tuple[str, ...]) -> bool:
    """Whether the request's path, below the app's ``root_path``, is one of ``prefixes`` or
    lies under one (``/health`` covers ``/health/ready``, not ``/healthz``)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    return any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)
