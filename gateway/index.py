"""The index database: the durable state of every stage (SQLAlchemy Core).

Each stage owns its table or columns:

* ``instances`` and ``series`` (arrival): what arrived, when, from whom;
* ``series.state``/``deadline`` (completion): whether a series is complete;
* ``jobs`` (execution): one per route that matched a series version;
* ``sends`` (sending): one per output instance and destination.

SQLite (WAL, ``synchronous=FULL``) is the embedded default; PostgreSQL works
through the same code for multi-node sites. Writers on SQLite take the lock at
``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade; readers
use a second engine with ordinary deferred transactions.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gateway.contract import Instance, Series

__all__ = [
    "GroupCommitter",
    "Index",
    "InstanceRecord",
    "JobState",
    "RecordOutcome",
    "Recorded",
    "SendState",
    "SeriesState",
]

log = logging.getLogger(__name__)


class SeriesState(str, Enum):
    RECEIVING = "receiving"
    ROUTED = "routed"
    UNROUTED = "unrouted"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # outputs written, sends pending
    FAILED = "failed"  # gave up: permanent error or retries exhausted
    SENT = "sent"  # every output delivered


class SendState(str, Enum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # permanent rejection or retries exhausted: the dead-letter list


class RecordOutcome(str, Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: stored once
    CONFLICT = "conflict"  # same UID, different bytes: kept aside


class Recorded(NamedTuple):
    """Outcome of recording an instance, with its series' counters after the write."""

    outcome: RecordOutcome
    instance_count: int = 0
    expected_instances: int | None = None


metadata = sa.MetaData()

series_t = sa.Table(
    "series",
    metadata,
    sa.Column("series_uid", sa.String(64), primary_key=True),
    sa.Column("study_uid", sa.String(64), nullable=False, index=True),
    sa.Column("modality", sa.String(16), nullable=False, default=""),
    sa.Column("calling_ae", sa.String(16), nullable=False, default=""),
    sa.Column("first_arrival", sa.Float, nullable=False),
    sa.Column("last_arrival", sa.Float, nullable=False),
    sa.Column("instance_count", sa.Integer, nullable=False, default=0),
    sa.Column("total_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False, default=1),
    sa.Column("quiet_seconds", sa.Float, nullable=False),
    sa.Column("deadline", sa.Float, nullable=True, index=True),
    sa.Column("expected_instances", sa.Integer, nullable=True),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("completed_by", sa.String(16), nullable=True),  # timer, hint, release, forced
)

instances_t = sa.Table(
    "instances",
    metadata,
    sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("transfer_syntax", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("calling_ae", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("series_version", sa.Integer, nullable=False),
    sa.Column("headers", sa.Text, nullable=False),
)

conflicts_t = sa.Table(
    "conflicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("calling_ae", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)

jobs_t = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),
    sa.Column("series_version", sa.Integer, nullable=False),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("pipeline", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("outputs", sa.Integer, nullable=False, default=0),
    sa.UniqueConstraint("series_uid", "series_version", "route", name="uq_job_series_route"),
)

sends_t = sa.Table(
    "sends",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, nullable=False, index=True),  # 0: forwarded original
    sa.Column("sop_instance_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.UniqueConstraint("job_id", "sop_instance_uid", "destination", name="uq_send"),
)


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP hands the index for one received instance."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size_bytes: int
    sha256: str
    calling_ae: str
    modality: str
    headers: dict[str, Any]
    expected_instances: int | None = None


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's events control BEGIN, not the sqlite3 module.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns ("acknowledged means durable").
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Index:
    """All reads and writes of gateway state, one method per stage transition."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self._write = _sqlite_engine(url, immediate=True)
            self._read = _sqlite_engine(url, immediate=False)
        else:
            self._write = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
            self._read = self._write
        metadata.create_all(self._write)

    def close(self) -> None:
        self._write.dispose()
        if self._read is not self._write:
            self._read.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._write.begin() as conn:
            yield conn

    @contextmanager
    def _ro(self) -> Iterator[Connection]:
        with self._read.connect() as conn:
            yield conn

    def ping(self) -> bool:
        try:
            with self._tx() as conn:
                conn.execute(sa.select(sa.literal(1)))
            return True
        except Exception:
            return False

    # ------------------------------------------------------------------ arrival
    def find_instance(self, sop_uid: str) -> sa.Row[Any] | None:
        with self._ro() as conn:
            return conn.execute(
                sa.select(instances_t).where(instances_t.c.sop_instance_uid == sop_uid)
            ).first()

    def record_instance(
        self, rec: InstanceRecord, *, now: float, quiet_seconds: float, reprocess_late: bool
    ) -> RecordOutcome:
        """Index a stored instance and (re)arm its series' completion timer (own transaction)."""
        with self._tx() as conn:
            return self._record(conn, rec, now, quiet_seconds, reprocess_late).outcome

    def record_batch(self, items: Sequence[tuple[InstanceRecord, float, float, bool]]) -> list[Recorded]:
        """Record several instances in one transaction: one lock, one commit (group commit)."""
        with self._tx() as conn:
            return [self._record(conn, rec, now, quiet, late) for rec, now, quiet, late in items]

    def _record(
        self, conn: Connection, rec: InstanceRecord, now: float, quiet_seconds: float, reprocess_late: bool
    ) -> Recorded:
        existing = conn.execute(
            sa.select(instances_t.c.sha256).where(instances_t.c.sop_instance_uid == rec.sop_instance_uid)
        ).first()
        if existing is not None:
            if existing.sha256 == rec.sha256:
                return Recorded(RecordOutcome.DUPLICATE)
            conn.execute(
                conflicts_t.insert().values(
                    sop_instance_uid=rec.sop_instance_uid,
                    path=str(rec.path),
                    sha256=rec.sha256,
                    calling_ae=rec.calling_ae,
                    received_at=now,
                )
            )
            return Recorded(RecordOutcome.CONFLICT)

        s = conn.execute(sa.select(series_t).where(series_t.c.series_uid == rec.series_uid)).first()
        deadline = now + quiet_seconds
        if s is None:
            version, count, expected = 1, 1, rec.expected_instances
            conn.execute(
                series_t.insert().values(
                    series_uid=rec.series_uid,
                    study_uid=rec.study_uid,
                    modality=rec.modality[:16],
                    calling_ae=rec.calling_ae,
                    first_arrival=now,
                    last_arrival=now,
                    instance_count=1,
                    total_bytes=rec.size_bytes,
                    state=SeriesState.RECEIVING.value,
                    version=1,
                    quiet_seconds=quiet_seconds,
                    deadline=deadline,
                    expected_instances=rec.expected_instances,
                )
            )
        else:
            version, count = s.version, s.instance_count + 1
            expected = s.expected_instances or rec.expected_instances
            values: dict[str, Any] = {
                "last_arrival": now,
                "instance_count": s.instance_count + 1,
                "total_bytes": s.total_bytes + rec.size_bytes,
            }
            if rec.expected_instances and not s.expected_instances:
                values["expected_instances"] = rec.expected_instances
            if s.state == SeriesState.RECEIVING.value:
                # A new instance re-arms the full quiet period (hints are re-checked later).
                values["deadline"] = now + s.quiet_seconds
                values["completed_by"] = None
            elif reprocess_late:
                version = s.version + 1
                values.update(
                    state=SeriesState.RECEIVING.value,
                    version=version,
                    deadline=now + s.quiet_seconds,
                    completed_at=None,
                    completed_by=None,
                )
            conn.execute(series_t.update().where(series_t.c.series_uid == rec.series_uid).values(**values))
        conn.execute(
            instances_t.insert().values(
                sop_instance_uid=rec.sop_instance_uid,
                series_uid=rec.series_uid,
                study_uid=rec.study_uid,
                sop_class_uid=rec.sop_class_uid,
                transfer_syntax=rec.transfer_syntax,
                path=str(rec.path),
                size_bytes=rec.size_bytes,
                sha256=rec.sha256,
                calling_ae=rec.calling_ae,
                received_at=now,
                series_version=version,
                headers=json.dumps(rec.headers, separators=(",", ":"), default=str),
            )
        )
        return Recorded(RecordOutcome.STORED, count, expected)

    # --------------------------------------------------------------- completion
    def hint_complete(self, series_uids: Iterable[str], *, now: float, within: float, cause: str) -> int:
        """Bring receiving series' deadlines forward to ``now + within`` (hints).

        ``cause`` (hint, release) is kept in ``completed_by`` for the metrics.
        """
        uids = list(series_uids)
        if not uids:
            return 0
        with self._tx() as conn:
            res = conn.execute(
                series_t.update()
                .where(series_t.c.series_uid.in_(uids))
                .where(series_t.c.state == SeriesState.RECEIVING.value)
                .where(series_t.c.deadline > now + within)
                .values(deadline=now + within, completed_by=cause)
            )
            return int(res.rowcount or 0)

    def force_complete(self, series_uid: str, *, now: float) -> bool:
        with self._tx() as conn:
            res = conn.execute(
                series_t.update()
                .where(series_t.c.series_uid == series_uid)
                .where(series_t.c.state == SeriesState.RECEIVING.value)
                .values(deadline=now, completed_by="forced")
            )
            if res.rowcount:
                return True
            # Already routed: force a new version so the series runs again.
            res = conn.execute(
                series_t.update()
                .where(series_t.c.series_uid == series_uid)
                .values(
                    state=SeriesState.RECEIVING.value,
                    version=series_t.c.version + 1,
                    deadline=now,
                    completed_by="forced",
                )
            )
            return bool(res.rowcount)

    def due_series(self, now: float, limit: int = 50) -> list[sa.Row[Any]]:
        with self._ro() as conn:
            return list(
                conn.execute(
                    sa.select(series_t)
                    .where(series_t.c.state == SeriesState.RECEIVING.value)
                    .where(series_t.c.deadline <= now)
                    .order_by(series_t.c.deadline)
                    .limit(limit)
                )
            )

    def receiving_series(self) -> list[sa.Row[Any]]:
        with self._ro() as conn:
            return list(
                conn.execute(sa.select(series_t).where(series_t.c.state == SeriesState.RECEIVING.value))
            )

    def get_series(self, series_uid: str) -> sa.Row[Any] | None:
        with self._ro() as conn:
            return conn.execute(sa.select(series_t).where(series_t.c.series_uid == series_uid)).first()

    def series_instances(self, series_uid: str) -> list[sa.Row[Any]]:
        with self._ro() as conn:
            return list(
                conn.execute(
                    sa.select(instances_t)
                    .where(instances_t.c.series_uid == series_uid)
                    .order_by(instances_t.c.received_at, instances_t.c.sop_instance_uid)
                )
            )

    def assemble(self, series_uid: str) -> Series | None:
        """The series as pipelines and selectors see it, from the index alone."""
        row = self.get_series(series_uid)
        if row is None:
            return None
        insts = [
            Instance(i.sop_instance_uid, i.sop_class_uid, Path(i.path), json.loads(i.headers))
            for i in self.series_instances(series_uid)
        ]
        return Series(
            series_uid=row.series_uid,
            study_uid=row.study_uid,
            modality=row.modality,
            calling_ae=row.calling_ae,
            instances=insts,
            version=row.version,
        )

    def mark_routed(
        self,
        series_uid: str,
        version: int,
        routes: Sequence[tuple[str, str]],
        *,
        now: float,
        completed_by: str,
    ) -> list[int] | None:
        """Complete a series version and queue one job per matched (route, pipeline).

        Returns the new job ids, or None if the series was not in the expected
        state (a newer version arrived meanwhile, or another node completed it).
        A job for the same version and route is created once.
        """
        with self._tx() as conn:
            res = conn.execute(
                series_t.update()
                .where(series_t.c.series_uid == series_uid)
                .where(series_t.c.version == version)
                .where(series_t.c.state == SeriesState.RECEIVING.value)
                .values(
                    state=(SeriesState.ROUTED if routes else SeriesState.UNROUTED).value,
                    completed_at=now,
                    completed_by=sa.func.coalesce(series_t.c.completed_by, completed_by),
                    deadline=None,
                )
            )
            if not res.rowcount:
                return None
            ids = []
            for route, pipeline in routes:
                exists = conn.execute(
                    sa.select(jobs_t.c.id).where(
                        (jobs_t.c.series_uid == series_uid)
                        & (jobs_t.c.series_version == version)
                        & (jobs_t.c.route == route)
                    )
                ).first()
                if exists:
                    continue
                r = conn.execute(
                    jobs_t.insert().values(
                        series_uid=series_uid,
                        series_version=version,
                        route=route,
                        pipeline=pipeline,
                        state=JobState.QUEUED.value,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                        outputs=0,
                    )
                )
                ids.append(int(r.inserted_primary_key[0]))  # type: ignore[index]
            return ids

    # --------------------------------------------------------------------- jobs
    def claim_job(
        self, owner: str, *, now: float, lease_seconds: float, job_id: int | None = None
    ) -> sa.Row[Any] | None:
        """Atomically take the oldest due queued job for ``owner``.

        With ``job_id``, take that job only, if it is queued and due (a
        distributed worker woken for one job); None when it is done, running
        elsewhere, waiting for its retry time, or locked by another claim.
        """
        with self._tx() as conn:
            q = (
                sa.select(jobs_t.c.id)
                .where(jobs_t.c.state == JobState.QUEUED.value)
                .where(jobs_t.c.next_attempt_at <= now)
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
            return conn.execute(sa.select(jobs_t).where(jobs_t.c.id == row.id)).first()

    def runnable_jobs(self, now: float, limit: int = 1000) -> list[sa.Row[Any]]:
        """Queued jobs that are due now, oldest first (what a distributed executor announces)."""
        with self._ro() as conn:
            return list(
                conn.execute(
                    sa.select(jobs_t.c.id, jobs_t.c.pipeline, jobs_t.c.attempts, jobs_t.c.next_attempt_at)
                    .where(jobs_t.c.state == JobState.QUEUED.value)
                    .where(jobs_t.c.next_attempt_at <= now)
                    .order_by(jobs_t.c.next_attempt_at, jobs_t.c.id)
                    .limit(limit)
                )
            )

    def renew_lease(self, job_id: int, owner: str, until: float) -> bool:
        with self._tx() as conn:
            res = conn.execute(
                jobs_t.update()
                .where((jobs_t.c.id == job_id) & (jobs_t.c.owner == owner))
                .where(jobs_t.c.state == JobState.RUNNING.value)
                .values(lease_until=until)
            )
            return bool(res.rowcount)

    def requeue_running(self, *, now: float, owner_prefix: str | None = None, expired_only: bool = True) -> int:
        """Put jobs whose worker died back in the queue (at-least-once execution)."""
        with self._tx() as conn:
            q = jobs_t.update().where(jobs_t.c.state == JobState.RUNNING.value)
            if expired_only:
                q = q.where(jobs_t.c.lease_until < now)
            if owner_prefix is not None:
                q = q.where(jobs_t.c.owner.like(f"{owner_prefix}%"))
            res = conn.execute(
                q.values(state=JobState.QUEUED.value, owner=None, lease_until=None, next_attempt_at=now)
            )
            return int(res.rowcount or 0)

    def job_succeeded(
        self,
        job_id: int,
        owner: str,
        outputs: Sequence[tuple[str, str, Path]],
        destinations: Sequence[str],
        *,
        now: float,
    ) -> bool:
        """Record outputs and queue their sends, in one transaction.

        ``outputs`` holds (SOPInstanceUID, SOPClassUID, path). Returns False if
        this owner lost the job (lease expired and someone else took it).
        """
        with self._tx() as conn:
            res = conn.execute(
                jobs_t.update()
                .where((jobs_t.c.id == job_id) & (jobs_t.c.owner == owner))
                .where(jobs_t.c.state == JobState.RUNNING.value)
                .values(
                    state=(JobState.SUCCEEDED if destinations and outputs else JobState.SENT).value,
                    finished_at=now,
                    lease_until=None,
                    error=None,
                    outputs=len(outputs),
                )
            )
            if not res.rowcount:
                return False
            self._queue_sends(conn, job_id, outputs, destinations, now)
            return True

    @staticmethod
    def _queue_sends(
        conn: Connection,
        job_id: int,
        items: Sequence[tuple[str, str, Path]],
        destinations: Sequence[str],
        now: float,
    ) -> None:
        for sop_uid, sop_class, path in items:
            for dest in destinations:
                exists = conn.execute(
                    sa.select(sends_t.c.id).where(
                        (sends_t.c.job_id == job_id)
                        & (sends_t.c.sop_instance_uid == sop_uid)
                        & (sends_t.c.destination == dest)
                    )
                ).first()
                if exists:
                    continue
                conn.execute(
                    sends_t.insert().values(
                        job_id=job_id,
                        sop_instance_uid=sop_uid,
                        sop_class_uid=sop_class,
                        path=str(path),
                        destination=dest,
                        state=SendState.PENDING.value,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )

    def queue_forward(self, items: Sequence[tuple[str, str, Path]], destinations: Sequence[str], now: float) -> None:
        """Queue originals of an unrouted series for forwarding (job id 0)."""
        with self._tx() as conn:
            self._queue_sends(conn, 0, items, destinations, now)

    def job_failed(
        self, job_id: int, owner: str, error: str, *, now: float, retry_at: float | None
    ) -> bool:
        """Record a failure: back to the queue at ``retry_at``, or failed for good."""
        with self._tx() as conn:
            res = conn.execute(
                jobs_t.update()
                .where((jobs_t.c.id == job_id) & (jobs_t.c.owner == owner))
                .where(jobs_t.c.state == JobState.RUNNING.value)
                .values(
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

    def get_job(self, job_id: int) -> sa.Row[Any] | None:
        with self._ro() as conn:
            return conn.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).first()

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[sa.Row[Any]]:
        with self._ro() as conn:
            q = sa.select(jobs_t).order_by(jobs_t.c.id.desc()).limit(limit)
            if state:
                q = q.where(jobs_t.c.state == state)
            return list(conn.execute(q))

    # -------------------------------------------------------------------- sends
    def due_sends(self, now: float, limit: int = 100) -> list[sa.Row[Any]]:
        with self._ro() as conn:
            return list(
                conn.execute(
                    sa.select(sends_t)
                    .where(sends_t.c.state == SendState.PENDING.value)
                    .where(sends_t.c.next_attempt_at <= now)
                    .order_by(sends_t.c.destination, sends_t.c.job_id, sends_t.c.id)
                    .limit(limit)
                )
            )

    def send_result(
        self,
        send_id: int,
        state: SendState,
        *,
        now: float,
        status: int | None,
        error: str | None,
        retry_at: float | None = None,
    ) -> None:
        """Record one send attempt; closes the job when its last send is delivered."""
        with self._tx() as conn:
            conn.execute(
                sends_t.update()
                .where(sends_t.c.id == send_id)
                .values(
                    state=state.value,
                    attempts=sends_t.c.attempts + 1,
                    last_status=status,
                    error=(error or None) and error[:2000],
                    next_attempt_at=retry_at if retry_at is not None else now,
                    sent_at=now if state == SendState.SENT else None,
                )
            )
            job_id = conn.execute(sa.select(sends_t.c.job_id).where(sends_t.c.id == send_id)).scalar()
            if job_id:
                self._close_job_if_sent(conn, int(job_id))

    @staticmethod
    def _close_job_if_sent(conn: Connection, job_id: int) -> None:
        left = conn.execute(
            sa.select(sa.func.count())
            .select_from(sends_t)
            .where((sends_t.c.job_id == job_id) & (sends_t.c.state != SendState.SENT.value))
        ).scalar()
        if not left:
            conn.execute(
                jobs_t.update()
                .where((jobs_t.c.id == job_id) & (jobs_t.c.state == JobState.SUCCEEDED.value))
                .values(state=JobState.SENT.value)
            )

    def list_dead(self, limit: int = 1000) -> list[sa.Row[Any]]:
        with self._ro() as conn:
            return list(
                conn.execute(
                    sa.select(sends_t)
                    .where(sends_t.c.state == SendState.DEAD.value)
                    .order_by(sends_t.c.id)
                    .limit(limit)
                )
            )

    def retry_dead(self, send_id: int | None, *, now: float) -> int:
        """Requeue one dead send (or all with ``send_id=None``) with fresh attempts."""
        with self._tx() as conn:
            q = sends_t.update().where(sends_t.c.state == SendState.DEAD.value)
            if send_id is not None:
                q = q.where(sends_t.c.id == send_id)
            res = conn.execute(q.values(state=SendState.PENDING.value, attempts=0, next_attempt_at=now))
            return int(res.rowcount or 0)

    def sends_for_job(self, job_id: int) -> list[sa.Row[Any]]:
        with self._ro() as conn:
            return list(conn.execute(sa.select(sends_t).where(sends_t.c.job_id == job_id)))

    # ------------------------------------------------------------------- gauges
    def counts(self) -> dict[str, dict[str, int]]:
        """Row counts by state for jobs, sends and series (for gauges and status)."""
        out: dict[str, dict[str, int]] = {}
        with self._ro() as conn:
            for name, table in (("jobs", jobs_t), ("sends", sends_t), ("series", series_t)):
                rows = conn.execute(sa.select(table.c.state, sa.func.count()).group_by(table.c.state))
                out[name] = {r[0]: int(r[1]) for r in rows}
        return out


class GroupCommitter:
    """A single writer that records instances from every association in shared transactions.

    Each C-STORE handler waits for its own row to be committed (acknowledged
    still means durable), but concurrent handlers share one ``BEGIN IMMEDIATE``
    and one fsync of the WAL instead of queueing for the write lock one by one.
    """

    def __init__(self, index: Index, max_batch: int = 64) -> None:
        self.index = index
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[tuple[InstanceRecord, float, float, bool], Future[Recorded]] | None]
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="aigw-index-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def record(self, rec: InstanceRecord, *, now: float, quiet_seconds: float, reprocess_late: bool) -> Recorded:
        """Record one instance; returns once its transaction has committed."""
        if not self._thread.is_alive():  # not started (tools, tests): plain transaction
            return self.index.record_batch([(rec, now, quiet_seconds, reprocess_late)])[0]
        fut: Future[Recorded] = Future()
        self._queue.put(((rec, now, quiet_seconds, reprocess_late), fut))
        return fut.result()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                results = self.index.record_batch([args for args, _ in batch])
                for (_, fut), res in zip(batch, results):
                    fut.set_result(res)
            except Exception:
                # One bad row must not fail its neighbours: retry each alone.
                log.exception("group commit of %d instance(s) failed; recording them one by one", len(batch))
                for (rec, now, quiet, late), fut in batch:
                    try:
                        fut.set_result(self.index.record_batch([(rec, now, quiet, late)])[0])
                    except Exception as exc:
                        fut.set_exception(exc)
