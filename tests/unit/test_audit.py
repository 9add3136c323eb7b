"""The audit trail: records are logged as JSON, and refusals cannot evict real actions."""

from __future__ import annotations

import json
import logging

import pytest

from bastion.audit import AuditLog


def test_a_flood_of_refusals_keeps_the_actions_in_memory(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bastion.audit")
    audit = AuditLog(keep=3)
    audit.record(actor="admin@10.0.0.1", action="backup.create", target=None, outcome="requested")
    for n in range(10):
        audit.record_refusal(actor=f"anonymous@10.0.0.{n}", action="POST /x", detail="401")

    assert [record.action for record in audit.recent] == ["backup.create"]
    assert [record.actor for record in audit.refusals] == [
        "anonymous@10.0.0.7", "anonymous@10.0.0.8", "anonymous@10.0.0.9",
    ]  # fmt: skip
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "bastion.audit"]
    assert len(logged) == 11  # every record still reaches the log
    assert logged[0]["outcome"] == "requested"
    assert logged[-1] == {**logged[-1], "outcome": "refused", "detail": "401", "target": None}
