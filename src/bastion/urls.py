"""Database URL normalisation: whatever users paste becomes the async driver URL.

Users copy URLs from Heroku (``postgres://``), from sync SQLAlchemy code
(``postgresql+psycopg2://``) or from SQLite docs (``sqlite:///app.db``). Bastion runs on
asyncpg and aiosqlite, so every accepted spelling is rewritten to those drivers here, once,
before an engine exists.

>>> str(normalise_database_url("postgres://app@db:5432/app"))
'postgresql+asyncpg://app@db:5432/app'
>>> str(normalise_database_url("sqlite:///data/app.db"))
'sqlite+aiosqlite:///data/app.db'
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["Backend", "normalise_database_url"]

Backend = Literal["postgresql", "sqlite"]

_POSTGRES_SCHEMES = frozenset(
    {
        "postgres",
        "postgresql",
        "postgresql+asyncpg",
        "postgresql+psycopg",
        "postgresql+psycopg2",
        "postgresql+psycopg2cffi",
        "postgresql+pg8000",
    }
)
_SQLITE_SCHEMES = frozenset({"sqlite", "sqlite+pysqlite", "sqlite+aiosqlite"})
_EXPECTED = "expected postgresql://user:password@host:port/dbname or sqlite:///path/to/file.db"


def normalise_database_url(raw: str) -> URL:
    """Parse ``raw`` and return the equivalent URL on Bastion's async drivers.

    Accepts ``postgres://``, ``postgresql://`` and ``postgresql+<any sync driver>://`` (→
    asyncpg), ``sqlite://``, ``sqlite:///path`` (→ aiosqlite) and the bare ``:memory:``.
    libpq's ``sslmode`` query parameter is translated to asyncpg's ``ssl``.

    Raises:
        ValueError: the URL cannot be parsed or names a database Bastion does not drive. The
            message never contains the password.
    """
    text = raw.strip()
    if text == ":memory:":
        return make_url("sqlite+aiosqlite://")
    try:
        url = make_url(text)
        url.port  # noqa: B018 - parsed lazily; a bad port raises here, not in the engine
    except (ArgumentError, ValueError):
        # Not the parser's own message: it can quote the URL, password and all.
        raise ValueError(f"not a database URL; {_EXPECTED}") from None
    scheme = url.drivername.lower()
    if scheme in _POSTGRES_SCHEMES:
        url = url.set(drivername="postgresql+asyncpg")
        if not url.host and not url.query.get("host"):
            raise ValueError(f"PostgreSQL URL has no host; {_EXPECTED}")
        if "sslmode" in url.query:
            sslmode = url.query["sslmode"]
            url = url.difference_update_query(["sslmode"]).update_query_dict({"ssl": sslmode})
        return url
    if scheme in _SQLITE_SCHEMES:
        return url.set(drivername="sqlite+aiosqlite")
    raise ValueError(f"unsupported database {url.drivername!r}; {_EXPECTED}")


def backend_of(url: URL) -> Backend:
    """Return which backend a normalised URL points at."""
    return "postgresql" if url.get_backend_name() == "postgresql" else "sqlite"


def is_memory_sqlite(url: URL) -> bool:
    """Whether ``url`` is an SQLite in-memory database (one per connection)."""
    database = url.database or ""
    return backend_of(url) == "sqlite" and (
        database in ("", ":memory:") or "mode=memory" in str(url.query.get("mode", ""))
    )
