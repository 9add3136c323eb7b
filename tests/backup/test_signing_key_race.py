"""Workers starting together agree on one generated signing key, never read a partial file."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bastion.backup import BackupSettings
from bastion.backup.keys import load_signing_key

WORKERS = 6
ROUNDS = 40  # before the fix a round in the first ~20 failed in every run tried


def race(settings: BackupSettings) -> list[bytes | BaseException]:
    """``load_signing_key`` from ``WORKERS`` threads released at the same instant."""
    start = threading.Barrier(WORKERS)

    def worker() -> bytes | BaseException:
        start.wait()
        try:
            return load_signing_key(settings)
        except Exception as exc:  # reported, so every failure of the round is seen
            return exc

    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda _: worker(), range(WORKERS)))


def test_workers_racing_to_generate_the_signing_key_all_get_the_same_complete_key(
    tmp_path: Path,
) -> None:
    for round_ in range(ROUNDS):
        settings = BackupSettings(BACKUP_DIR=tmp_path / str(round_) / "backups")
        results = race(settings)

        failures = [result for result in results if isinstance(result, BaseException)]
        assert failures == [], f"round {round_}"
        key_file = settings.signing_key_file
        assert set(results) == {key_file.read_text().strip().encode()}
        assert len(key_file.read_text().strip()) == 64
        assert os.stat(key_file).st_mode & 0o777 == 0o600
        assert sorted(path.name for path in key_file.parent.iterdir()) == ["backup-signing.key"]
