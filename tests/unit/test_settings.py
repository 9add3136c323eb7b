"""Settings: read once from the environment; a bad value is one clear line."""

import pytest

from bastion import ConfigurationError, DatabaseSettings, load_settings


def test_settings_come_from_the_environment_names_users_expect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://app:pw@db:5432/app")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "3")
    monkeypatch.setenv("DB_POOL_TIMEOUT", "2.5")
    monkeypatch.setenv("DB_POOL_RECYCLE", "60")
    monkeypatch.setenv("DB_POOL_PRE_PING", "true")

    settings = load_settings()

    assert settings.url.drivername == "postgresql+asyncpg"
    assert settings.backend == "postgresql"
    assert (settings.pool_size, settings.max_overflow) == (7, 3)
    assert settings.pool_timeout_s == 2.5
    assert settings.pool_recycle_s == 60
    assert settings.pool_pre_ping is True


def test_defaults_run_on_a_local_sqlite_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = DatabaseSettings(_env_file=None)  # type: ignore[call-arg]
    assert settings.backend == "sqlite"
    assert settings.url.drivername == "sqlite+aiosqlite"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DB_POOL_SIZE", "abc", "DB_POOL_SIZE: Input should be a valid integer"),
        ("DB_POOL_SIZE", "0", "DB_POOL_SIZE: Input should be greater than or equal to 1"),
        ("DB_MAX_OVERFLOW", "-1", "DB_MAX_OVERFLOW: Input should be greater than or equal to 0"),
        ("DB_POOL_TIMEOUT", "0", "DB_POOL_TIMEOUT: Input should be greater than 0"),
        ("DB_POOL_PRE_PING", "maybe", "DB_POOL_PRE_PING: Input should be a valid boolean"),
        ("DATABASE_URL", "mysql://root@x/y", "DATABASE_URL: unsupported database 'mysql'"),
    ],
)
def test_a_bad_value_fails_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = caught.value.message
    assert message.startswith(expected)
    assert "\n" not in message


def test_the_database_password_never_reaches_repr_or_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = DatabaseSettings(DATABASE_URL="postgresql://app:hunter2@db/app")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())
    assert "hunter2" not in settings.display_url
    assert "hunter2" not in repr(settings.url)

    monkeypatch.setenv("DATABASE_URL", "mysql://app:hunter2@db/app")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_the_admin_token_never_reaches_repr_or_errors() -> None:
    token = "admin-token-" + "s3cr3t" * 4
    settings = DatabaseSettings(ADMIN_TOKEN=token)
    assert token not in repr(settings)
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == token
    with pytest.raises(ConfigurationError) as caught:
        load_settings(ADMIN_TOKEN="weak-s3cr3t")
    assert "ADMIN_TOKEN" in str(caught.value)
    assert "weak-s3cr3t" not in str(caught.value)
