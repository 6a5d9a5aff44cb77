"""Execution: the ``jobs`` rows from claim to success or failure.

A worker claims a due queued job under a lease it renews while it runs; a job
whose lease ran out goes back to the queue (at-least-once execution). Every
outcome is recorded only by the job's current owner, so a worker that lost its
lease cannot overwrite the run that replaced it. Success queues the job's
sends in the same transaction (:func:`gateway.index.sends.queue_sends`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from gateway.index.schema import IndexBase, JobState, from_row, jobs_t, outputs_t
from gateway.index.sends import queue_sends

log = logging.getLogger(__name__)

__all__ = ["JobRow", "JobTable", "OutputRow", "RunnableJob"]


@dataclass(frozen=True)
class JobRow:
    """One ``jobs`` row: a route's pipeline run on one series version."""

    id: int
    series_uid: str
    series_version: int
    route: str
    pipeline: str
    state: str  # a JobState value
    attempts: int
    next_attempt_at: float
    lease_until: float | None
    owner: str | None
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    outputs: int


@dataclass(frozen=True)
class OutputRow:
    """One ``outputs`` row: an instance a job wrote, where it lies and which series it is in."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    path: str


@dataclass(frozen=True)
class RunnableJob:
    """The columns of a due queued job that a distributed executor announces."""

    id: int
    pipeline: str
    attempts: int
    next_attempt_at: float


def _version_exists(relation: str, state: JobState | None = None) -> sa.Exists:
    """Whether a job of the same series and route, on a later (``>``) or earlier (``<``) version, exists.

    The versions of one series run in order, each at most once: a queued job
    that a later version has overtaken never runs (its result would go out
    after the newer one, unmarked: a kill -9 requeues a running job behind a
    newer queued one), and a job waits while an earlier version runs, so that
    it can say it supersedes that result (:mod:`gateway.supersede`).
    """
    other = jobs_t.alias("other")
    if relation == ">":
        version = other.c.series_version > jobs_t.c.series_version
    else:
        version = other.c.series_version < jobs_t.c.series_version
    cond = (other.c.series_uid == jobs_t.c.series_uid) & (other.c.route == jobs_t.c.route) & version
    if state is not None:
        cond = cond & (other.c.state == state.value)
    return sa.exists().where(cond)


def _owned_running(job_id: int, owner: str) -> sa.Update:
    """An UPDATE of a running job that only its current owner can make.

    A worker whose lease ran out (and whose job another worker claimed)
    matches no row, so its late renewals and outcomes change nothing.
    """
    return (
        jobs_t.update()
        .where((jobs_t.c.id == job_id) & (jobs_t.c.owner == owner))
        .where(jobs_t.c.state == JobState.RUNNING.value)
    )


class JobTable(IndexBase):
    """Execution-stage transitions of ``jobs``."""

    def claim_job(self, owner: str, *, now: float, lease_seconds: float, job_id: int | None = None) -> JobRow | None:
        """Atomically take the oldest due queued job for ``owner``.

        With ``job_id``, take that job only, if it is queued and due (a
        distributed worker woken for one job); None when it is done, running
        elsewhere, waiting for its retry time, or locked by another claim.
        """
        with self._tx() as conn:
            superseded = conn.execute(
                jobs_t.update()
                .where(jobs_t.c.state == JobState.QUEUED.value)
                .where(_version_exists(">"))
                .values(state=JobState.SUPERSEDED.value, finished_at=now, error="a later series version came first")
            ).rowcount
            if superseded:
                log.info("%d queued job(s) superseded by a later version of their series before they ran", superseded)
            q = (
                sa.select(jobs_t.c.id)
                .where(jobs_t.c.state == JobState.QUEUED.value)
                .where(jobs_t.c.next_attempt_at <= now)
                .where(~_version_exists("<", JobState.RUNNING))
                .order_by(jobs_t.c.next_attempt_at, jobs_t.c.id)
                .limit(1)
            )
            if job_id is not None:
                q = q.where(jobs_t.c.id == job_id)
            if not self.is_sqlite:
                q = q.with_for_update(skip_locked=True)
            row = conn.execute(q).first()
            if row is None:
                return None
            conn.execute(
                jobs_t.update()
                .where(jobs_t.c.id == row.id)
                .values(
                    state=JobState.RUNNING.value,
                    attempts=jobs_t.c.attempts + 1,
                    owner=owner,
                    lease_until=now + lease_seconds,
                    started_at=now,
                )
            )
            claimed = conn.execute(sa.select(jobs_t).where(jobs_t.c.id == row.id)).first()
        return None if claimed is None else from_row(JobRow, claimed)

    def runnable_jobs(self, now: float, limit: int = 1000) -> list[RunnableJob]:
        """Queued jobs that are due now and claimable, oldest first (what a distributed executor announces)."""
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(jobs_t.c.id, jobs_t.c.pipeline, jobs_t.c.attempts, jobs_t.c.next_attempt_at)
                .where(jobs_t.c.state == JobState.QUEUED.value)
                .where(jobs_t.c.next_attempt_at <= now)
                .where(~_version_exists(">"))
                .where(~_version_exists("<", JobState.RUNNING))
                .order_by(jobs_t.c.next_attempt_at, jobs_t.c.id)
                .limit(limit)
            )
            return [from_row(RunnableJob, r) for r in rows]

    def renew_lease(self, job_id: int, owner: str, until: float) -> bool:
        """Extend ``owner``'s lease on a running job; False if the job is no longer its own."""
        with self._tx() as conn:
            res = conn.execute(_owned_running(job_id, owner).values(lease_until=until))
            return bool(res.rowcount)

    def requeue_running(
        self,
        *,
        now: float,
        owner_prefix: str | None = None,
        expired_only: bool = True,
        max_starts: int | None = None,
        delay: Callable[[int], float] | None = None,
    ) -> tuple[int, list[JobRow]]:
        """Put jobs whose worker died back in the queue (at-least-once execution).

        ``delay(attempts)`` says how long a job started that many times waits
        before it runs again (default: not at all). A job already started
        ``max_starts`` times fails for good instead: when every run of a job
        ends with its process (a crash in a model runtime, the out-of-memory
        killer), queueing it again would take the service down again and
        again. Returns how many were queued again and the rows of those
        failed, as they were before.
        """
        cond = jobs_t.c.state == JobState.RUNNING.value
        if expired_only:
            cond = cond & (jobs_t.c.lease_until < now)
        if owner_prefix is not None:
            cond = cond & jobs_t.c.owner.like(f"{owner_prefix}%")
        with self._tx() as conn:
            queued, failed = 0, []
            for row in conn.execute(sa.select(jobs_t).where(cond)).all():
                job = from_row(JobRow, row)
                one = jobs_t.update().where(cond & (jobs_t.c.id == job.id)).values(owner=None, lease_until=None)
                if max_starts is not None and job.attempts >= max_starts:
                    error = (
                        f"started {job.attempts} times ([jobs] max_starts = {max_starts}) and its process died "
                        "during the last run (a crash, kill -9 or out of memory); not started again"
                    )
                    if conn.execute(one.values(state=JobState.FAILED.value, finished_at=now, error=error)).rowcount:
                        failed.append(job)
                else:
                    wait = delay(job.attempts) if delay is not None else 0.0
                    res = conn.execute(one.values(state=JobState.QUEUED.value, next_attempt_at=now + wait))
                    queued += res.rowcount or 0
            return queued, failed

    def job_succeeded(
        self,
        job_id: int,
        owner: str,
        outputs: Sequence[OutputRow],
        destinations: Sequence[str],
        *,
        now: float,
    ) -> bool:
        """Record outputs and queue their sends, in one transaction.

        Returns False if this owner lost the job (lease expired and someone
        else took it).
        """
        with self._tx() as conn:
            res = conn.execute(
                _owned_running(job_id, owner).values(
                    state=(JobState.SUCCEEDED if destinations and outputs else JobState.SENT).value,
                    finished_at=now,
                    lease_until=None,
                    error=None,
                    outputs=len(outputs),
                )
            )
            if not res.rowcount:
                return False
            # A job run again after a lost lease keeps only its last run's outputs.
            conn.execute(outputs_t.delete().where(outputs_t.c.job_id == job_id))
            if outputs:
                conn.execute(outputs_t.insert(), [{"job_id": job_id, **vars(o)} for o in outputs])
            items = [(o.sop_instance_uid, o.sop_class_uid, Path(o.path)) for o in outputs]
            queue_sends(conn, job_id, items, destinations, now)
            return True

    def job_outputs(self, job_id: int) -> list[OutputRow]:
        """The instances a succeeded job put out (none for jobs of versions before this table)."""
        cols = [outputs_t.c[f] for f in OutputRow.__dataclass_fields__]
        with self._ro() as conn:
            q = sa.select(*cols).where(outputs_t.c.job_id == job_id).order_by(outputs_t.c.sop_instance_uid)
            return [from_row(OutputRow, r) for r in conn.execute(q)]

    def job_failed(self, job_id: int, owner: str, error: str, *, now: float, retry_at: float | None) -> bool:
        """Record a failure: back to the queue at ``retry_at``, or failed for good."""
        with self._tx() as conn:
            res = conn.execute(
                _owned_running(job_id, owner).values(
                    state=(JobState.QUEUED if retry_at is not None else JobState.FAILED).value,
                    next_attempt_at=retry_at if retry_at is not None else now,
                    error=error[:2000],
                    lease_until=None,
                    owner=None,
                    finished_at=None if retry_at is not None else now,
                )
            )
            return bool(res.rowcount)

    def retry_job(self, job_id: int, *, now: float) -> bool:
        """Manual retry of a failed (or finished) job: queue it with fresh attempts."""
        with self._tx() as conn:
            res = conn.execute(
                jobs_t.update()
                .where(jobs_t.c.id == job_id)
                .where(jobs_t.c.state != JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value, attempts=0, next_attempt_at=now, error=None, owner=None)
            )
            return bool(res.rowcount)

    def get_job(self, job_id: int) -> JobRow | None:
        """The job with this id, or None."""
        with self._ro() as conn:
            row = conn.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).first()
        return None if row is None else from_row(JobRow, row)

    def earlier_results(self, series_uid: str, pipeline: str, version: int) -> list[JobRow]:
        """Jobs of ``pipeline`` that succeeded on earlier versions of the series: what a rerun supersedes."""
        done = (JobState.SUCCEEDED.value, JobState.SENT.value)
        with self._ro() as conn:
            q = (
                sa.select(jobs_t)
                .where(jobs_t.c.series_uid == series_uid)
                .where(jobs_t.c.pipeline == pipeline)
                .where(jobs_t.c.series_version < version)
                .where(jobs_t.c.state.in_(done))
                .order_by(jobs_t.c.series_version)
            )
            return [from_row(JobRow, r) for r in conn.execute(q)]

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRow]:
        """The newest ``limit`` jobs (in ``state`` if given), newest first."""
        with self._ro() as conn:
            q = sa.select(jobs_t).order_by(jobs_t.c.id.desc()).limit(limit)
            if state:
                q = q.where(jobs_t.c.state == state)
            return [from_row(JobRow, r) for r in conn.execute(q)]
