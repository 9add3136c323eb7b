"""Long operations (backup, verify, restore, optimize) run as in-process background jobs.

An HTTP call that starts one answers ``202`` with the job's id at once; the client then polls
the job. A :class:`JobRegistry` runs each job as an asyncio task, keeps its state, progress and
outcome, and forgets the oldest finished jobs beyond ``keep``. Jobs in the same ``exclusive``
group never overlap: a second one is refused with :class:`JobConflictError` (HTTP 409) instead of
queueing behind the first, so two restores cannot race.

A failed job records its error's stable ``code`` and message (Bastion's errors carry no secrets
or SQL), never a traceback; the traceback goes to the log.

>>> jobs = JobRegistry()
>>> job = jobs.submit("optimize", lambda progress: optimize(database))  # doctest: +SKIP
>>> jobs.get(job.id).state                                            # doctest: +SKIP
<JobState.RUNNING: 'running'>
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from bastion.errors import BastionError, NotFoundError
from bastion.types import utcnow

__all__ = [
    "Job",
    "JobConflictError",
    "JobNotFoundError",
    "JobProgress",
    "JobRegistry",
    "JobState",
    "JobWork",
]

logger = logging.getLogger("bastion.jobs")

JobProgress = Callable[[int, int], None]
"""Called by a job's work as ``progress(done, total)``; the job reports the latest figures."""

JobWork = Callable[[JobProgress], Awaitable[Mapping[str, Any] | None]]
"""A job's body: given a progress callback, do the work and return a JSON-ready result."""

_ID_BYTES: Final = 12


class JobNotFoundError(NotFoundError):
    """No job has that id (it never existed, or it finished long enough ago to be forgotten)."""

    code = "job_not_found"


class JobConflictError(BastionError):
    """A job of the same exclusive group is still running; wait for it (HTTP 409)."""

    code = "job_conflict"


class JobState(enum.Enum):
    """Where a job is in its life: pending → running → succeeded | failed."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """Whether the job has ended, well or not."""
        return self in (JobState.SUCCEEDED, JobState.FAILED)


@dataclass
class Job:
    """One background operation and what is known about it so far."""

    id: str
    kind: str
    target: str | None
    exclusive: str | None
    state: JobState = JobState.PENDING
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    done: int = 0
    total: int = 0
    result: Mapping[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready data, as the admin API shows it."""

        def when(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment is not None else None

        return {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "state": self.state.value,
            "created_at": when(self.created_at),
            "started_at": when(self.started_at),
            "finished_at": when(self.finished_at),
            "progress": {"done": self.done, "total": self.total},
            "result": dict(self.result) if self.result is not None else None,
            "error": (
                {"code": self.error_code, "message": self.error_message}
                if self.state is JobState.FAILED
                else None
            ),
        }


class JobRegistry:
    """Runs jobs as asyncio tasks on the current loop and remembers the last ``keep`` of them.

    Args:
        keep: how many jobs to remember; the oldest *finished* ones are forgotten first.
    """

    def __init__(self, *, keep: int = 200) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def submit(
        self,
        kind: str,
        work: JobWork,
        *,
        target: str | None = None,
        exclusive: str | None = None,
    ) -> Job:
        """Start ``work`` in the background and return its job (state pending or running).

        Raises:
            JobConflictError: a job of the same ``exclusive`` group has not finished.
        """
        if exclusive is not None:
            for other in self._jobs.values():
                if other.exclusive == exclusive and not other.state.finished:
                    raise JobConflictError(
                        f"a {other.kind} job is already running ({other.id}); wait for it to finish"
                    )
        job = Job(id=secrets.token_hex(_ID_BYTES), kind=kind, target=target, exclusive=exclusive)
        self._jobs[job.id] = job
        self._tasks[job.id] = asyncio.create_task(self._run(job, work), name=f"job-{kind}")
        self._forget_old()
        return job

    def get(self, job_id: str) -> Job:
        """The job with that id.

        Raises:
            JobNotFoundError: no such job is remembered.
        """
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFoundError("no such job")
        return job

    def list(self) -> list[Job]:
        """The remembered jobs, newest first."""
        return list(reversed(self._jobs.values()))

    async def wait(self, job_id: str) -> Job:
        """Wait until the job has finished and return it (for tests and the CLI).

        Raises:
            JobNotFoundError: no such job is remembered.
        """
        job = self.get(job_id)
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return job

    async def aclose(self, *, grace_s: float = 10.0) -> None:
        """Let running jobs finish for up to ``grace_s`` seconds, then cancel the rest and
        wait for them to end (at application shutdown, before the database closes)."""
        # A grace period first: a job cancelled mid-statement gives its connection back only
        # after the driver's call returns, which can be after the database was closed.
        tasks = list(self._tasks.values())
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: Job, work: JobWork) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        job.state, job.started_at = JobState.RUNNING, utcnow()
        try:
            job.result = await work(progress)
        except asyncio.CancelledError:
            self._fail(job, "cancelled", "the job was cancelled (the service shut down)")
            raise
        except BastionError as exc:
            logger.warning("job %s %s failed: %s", job.kind, job.id, exc.code)
            self._fail(job, exc.code, str(exc))
        except Exception:
            # Not one of ours: the message may carry anything, so it goes to the log only.
            logger.exception("job %s %s failed", job.kind, job.id)
            self._fail(job, "internal_error", "internal error; see the service log")
        else:
            job.state = JobState.SUCCEEDED
            job.finished_at = utcnow()
        finally:
            self._tasks.pop(job.id, None)

    @staticmethod
    def _fail(job: Job, code: str, message: str) -> None:
        job.state, job.finished_at = JobState.FAILED, utcnow()
        job.error_code, job.error_message = code, message

    def _forget_old(self) -> None:
        excess = len(self._jobs) - self._keep
        for job_id in [job.id for job in self._jobs.values() if job.state.finished][:excess]:
            del self._jobs[job_id]
