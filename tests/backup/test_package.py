"""The backup package stays light: no FastAPI, Redis or obstore until they are needed."""

from __future__ import annotations

import subprocess
import sys

import bastion.backup


def test_importing_backups_and_their_cli_loads_no_web_cache_or_s3_client() -> None:
    code = (
        "import sys, bastion.backup, bastion.cli.backup\n"
        "heavy = ('fastapi', 'redis', 'obstore')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_every_exported_name_exists() -> None:
    for name in bastion.backup.__all__:
        assert hasattr(bastion.backup, name), name
