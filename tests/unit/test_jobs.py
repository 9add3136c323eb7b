"""Background jobs: state, progress, outcome, exclusivity, and what a failure shows."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from bastion.errors import NotFoundError
from bastion.jobs import JobConflictError, JobNotFoundError, JobProgress, JobRegistry, JobState


async def test_a_job_reports_progress_and_its_result() -> None:
    jobs = JobRegistry()
    release = asyncio.Event()

    async def work(progress: JobProgress) -> Mapping[str, Any]:
        progress(1, 3)
        await release.wait()
        progress(3, 3)
        return {"rows": 3}

    job = jobs.submit("export", work, target="db")
    await asyncio.sleep(0)
    assert jobs.get(job.id).state is JobState.RUNNING
    assert (job.done, job.total) == (1, 3)
    release.set()
    finished = await jobs.wait(job.id)
    assert finished.state is JobState.SUCCEEDED
    assert finished.to_dict()["result"] == {"rows": 3}
    assert finished.to_dict()["progress"] == {"done": 3, "total": 3}
    assert finished.to_dict()["error"] is None


async def test_a_failed_job_shows_a_bastion_error_code_but_hides_foreign_messages() -> None:
    jobs = JobRegistry()

    async def ours(progress: JobProgress) -> None:
        raise NotFoundError("no such backup")

    async def foreign(progress: JobProgress) -> None:
        raise RuntimeError("postgresql://app:hunter2@db/app exploded")

    first = await jobs.wait(jobs.submit("verify", ours).id)
    second = await jobs.wait(jobs.submit("verify", foreign).id)
    assert first.to_dict()["error"] == {"code": "not_found", "message": "no such backup"}
    assert second.state is JobState.FAILED
    assert second.error_code == "internal_error"
    assert "hunter2" not in str(second.to_dict())


async def test_jobs_of_one_exclusive_group_never_overlap() -> None:
    jobs = JobRegistry()
    release = asyncio.Event()

    async def work(progress: JobProgress) -> None:
        await release.wait()

    first = jobs.submit("restore", work, exclusive="restore")
    with pytest.raises(JobConflictError):
        jobs.submit("restore", work, exclusive="restore")
    other_group = jobs.submit("backup", work, exclusive="backup")
    release.set()
    await jobs.wait(first.id)
    await jobs.wait(other_group.id)
    again = jobs.submit("restore", work, exclusive="restore")
    assert (await jobs.wait(again.id)).state is JobState.SUCCEEDED


async def test_old_finished_jobs_are_forgotten_and_unknown_ids_are_not_found() -> None:
    jobs = JobRegistry(keep=2)

    async def work(progress: JobProgress) -> None:
        return None

    ids = []
    for _ in range(4):
        job = jobs.submit("optimize", work)
        await jobs.wait(job.id)
        ids.append(job.id)
    assert [job.id for job in jobs.list()] == [ids[3], ids[2]]
    with pytest.raises(JobNotFoundError):
        jobs.get(ids[0])


async def test_closing_the_registry_lets_short_jobs_finish_and_cancels_the_rest() -> None:
    jobs = JobRegistry()

    async def endless(progress: JobProgress) -> None:
        await asyncio.Event().wait()

    async def short(progress: JobProgress) -> None:
        await asyncio.sleep(0.01)

    stuck = jobs.submit("backup", endless)
    quick = jobs.submit("optimize", short)
    await asyncio.sleep(0)
    await jobs.aclose(grace_s=0.5)
    assert quick.state is JobState.SUCCEEDED
    assert stuck.state is JobState.FAILED
    assert stuck.error_code == "cancelled"
