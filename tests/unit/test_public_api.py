"""The public API is curated and complete, and the core stays free of FastAPI."""

import importlib
import inspect
import subprocess
import sys

import pytest

import bastion
import bastion.fastapi

CORE_MODULES = [
    "bastion.breaker",
    "bastion.bulk",
    "bastion.connection_leaks",
    "bastion.fingerprint",
    "bastion.inspection",
    "bastion.metrics",
    "bastion.request_context",
    "bastion.database",
    "bastion.errors",
    "bastion.health",
    "bastion.idempotency",
    "bastion.loop_lag",
    "bastion.settings",
    "bastion.tracing",
    "bastion.types",
    "bastion.urls",
    "bastion.validation",
]


@pytest.mark.parametrize("module_name", CORE_MODULES)
def test_every_public_name_of_a_core_module_is_exported_from_bastion(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [
        name for name in module.__all__ if name not in bastion.__all__ and not name.isupper()
    ]
    assert missing == []


@pytest.mark.parametrize("package", [bastion, bastion.fastapi])
def test_all_lists_exactly_what_the_package_defines(package: object) -> None:
    exported = set(package.__all__)  # type: ignore[attr-defined]
    assert all(hasattr(package, name) for name in exported)
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public - exported == set()


def test_every_error_is_documented_in_the_error_tree() -> None:
    for name in bastion.errors.__all__:
        assert name in bastion.errors.__doc__  # type: ignore[operator]


def test_the_core_imports_no_fastapi_or_starlette() -> None:
    code = (
        "import sys, bastion, bastion.database, bastion.migrations, bastion.cli\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette'))\n"
        "print(','.join(leaked))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
