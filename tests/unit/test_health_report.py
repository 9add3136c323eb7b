"""How a HealthReport sums up its components, and what its JSON looks like."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from bastion import (
    ComponentHealth,
    ConfigurationError,
    Database,
    DatabaseSettings,
    HealthChecker,
    HealthReport,
    HealthStatus,
)

HEALTHY, DEGRADED, UNHEALTHY = HealthStatus.HEALTHY, HealthStatus.DEGRADED, HealthStatus.UNHEALTHY


@pytest.mark.parametrize(
    ("statuses", "overall", "score"),
    [
        ([HEALTHY, HEALTHY, HEALTHY], HEALTHY, 1.0),
        ([HEALTHY, DEGRADED, HEALTHY], DEGRADED, 0.833),
        ([DEGRADED, UNHEALTHY, HEALTHY], UNHEALTHY, 0.5),
        ([UNHEALTHY, UNHEALTHY], UNHEALTHY, 0.0),
        ([], HEALTHY, 1.0),
    ],
)
def test_the_worst_component_decides_and_the_score_is_the_mean(
    statuses: list[HealthStatus], overall: HealthStatus, score: float
) -> None:
    components = [ComponentHealth(f"c{i}", status) for i, status in enumerate(statuses)]
    report = HealthReport.of(components)
    assert (report.status, report.score) == (overall, score)


def test_the_json_is_keyed_by_component_and_carries_utc_time() -> None:
    checked_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    report = HealthReport.of(
        [
            ComponentHealth("database", HEALTHY, 1.25, {"backend": "sqlite"}),
            ComponentHealth("breaker", UNHEALTHY, None, {"state": "open"}, "circuit_open"),
        ],
        checked_at=checked_at,
    )

    assert json.loads(json.dumps(report.to_dict())) == {
        "status": "unhealthy",
        "score": 0.5,
        "checked_at": "2026-01-02T03:04:05Z",
        "components": {
            "database": {
                "status": "healthy",
                "latency_ms": 1.25,
                "error": None,
                "details": {"backend": "sqlite"},
            },
            "breaker": {
                "status": "unhealthy",
                "latency_ms": None,
                "error": "circuit_open",
                "details": {"state": "open"},
            },
        },
    }


def test_components_of_the_same_name_do_not_hide_each_other() -> None:
    report = HealthReport.of(
        [ComponentHealth("replica", HEALTHY), ComponentHealth("replica", UNHEALTHY)]
    )
    assert list(report.to_dict()["components"]) == ["replica", "replica_2"]
    assert report.status is UNHEALTHY


def test_a_wrong_migrations_location_fails_when_the_checker_is_built() -> None:
    database = Database(DatabaseSettings(DATABASE_URL="sqlite:///:memory:"))
    with pytest.raises(ConfigurationError, match="no Alembic migrations at 'nowhere:migrations'"):
        HealthChecker(database, migrations="nowhere:migrations")
