"""DATABASE_URL spellings users paste, and what Bastion makes of them."""

import pytest

from bastion import normalise_database_url
from bastion.urls import backend_of, is_memory_sqlite


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
        ("postgres://u:p@db/app", "postgresql+asyncpg://u:p@db/app"),
        ("postgresql+psycopg2://u@db/app", "postgresql+asyncpg://u@db/app"),
        ("postgresql+psycopg://u@db/app", "postgresql+asyncpg://u@db/app"),
        ("postgresql+asyncpg://u@db/app", "postgresql+asyncpg://u@db/app"),
        ("postgresql://u@db/app?sslmode=require", "postgresql+asyncpg://u@db/app?ssl=require"),
        ("sqlite:///data/app.db", "sqlite+aiosqlite:///data/app.db"),
        ("sqlite:////abs/app.db", "sqlite+aiosqlite:////abs/app.db"),
        ("sqlite+pysqlite:///app.db", "sqlite+aiosqlite:///app.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        (":memory:", "sqlite+aiosqlite://"),
        ("  sqlite:///app.db  ", "sqlite+aiosqlite:///app.db"),
    ],
)
def test_accepted_urls_are_normalised_to_async_drivers(raw: str, expected: str) -> None:
    url = normalise_database_url(raw)
    assert url.render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("mysql://root@localhost/test", "unsupported database 'mysql'"),
        ("not a url", "not a database URL"),
        ("", "not a database URL"),
        ("postgresql:///app", "has no host"),
    ],
)
def test_unsupported_urls_are_refused_with_what_is_expected(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        normalise_database_url(raw)
    assert "expected postgresql://" in str(caught.value)


def test_error_for_a_bad_url_never_contains_the_password() -> None:
    with pytest.raises(ValueError, match="unsupported database") as caught:
        normalise_database_url("mysql://root:hunter2@localhost/test")
    assert "hunter2" not in str(caught.value)


def test_memory_and_file_sqlite_are_told_apart() -> None:
    assert is_memory_sqlite(normalise_database_url(":memory:"))
    assert is_memory_sqlite(normalise_database_url("sqlite://"))
    assert not is_memory_sqlite(normalise_database_url("sqlite:///app.db"))
    assert backend_of(normalise_database_url("postgres://u@h/d")) == "postgresql"


def test_a_malformed_port_does_not_echo_the_url() -> None:
    with pytest.raises(ValueError, match="not a database URL") as caught:
        normalise_database_url("postgresql://app:hunter2@db:hunter3/app")
    assert "hunter" not in str(caught.value)
