"""Which paths the pacing and limiting middlewares leave alone."""

from __future__ import annotations

import pytest

from bastion.fastapi._exempt_paths import exempt_prefixes_of, is_exempt

PREFIXES = exempt_prefixes_of(["/health", "/metrics/"])


@pytest.mark.parametrize(
    ("path", "root_path", "exempt"),
    [
        ("/health", "", True),
        ("/health/ready", "", True),
        ("/metrics", "", True),
        ("/healthz", "", False),  # a prefix of the name is not the path
        ("/metricsX/1", "", False),
        ("/v1/health", "", False),
        ("/api/health/live", "/api", True),  # below the app's root_path
        ("/api/v1/conversations", "/api", False),
        ("/health/live", "/api", True),  # a server that leaves root_path out of path
    ],
)
def test_a_path_is_exempt_when_it_is_or_lies_under_a_prefix(
    path: str, root_path: str, exempt: bool
) -> None:
    scope = {"type": "http", "path": path, "root_path": root_path}
    assert is_exempt(scope, PREFIXES) is exempt


def test_a_single_string_is_refused() -> None:
    with pytest.raises(TypeError, match="not a string"):
        exempt_prefixes_of("/health")
