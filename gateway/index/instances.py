"""Arrival: the ``instances`` and ``series`` rows written as instances are received.

Recording an instance inserts its row, creates or updates its series'
counters and (re)arms the series' completion deadline, in one transaction;
:class:`GroupCommitter` lets concurrent C-STORE handlers share those
transactions. Reads here give the series as pipelines see it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.contract import Instance, Series
from gateway.index.schema import IndexBase, SeriesState, conflicts_t, from_row, instances_t, series_t

__all__ = [
    "GroupCommitter",
    "InstanceRecord",
    "InstanceRow",
    "InstanceTable",
    "RecordOutcome",
    "Recorded",
    "SeriesRow",
]

log = logging.getLogger(__name__)


class RecordOutcome(str, Enum):
    """What recording one received instance did."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: stored once
    CONFLICT = "conflict"  # same UID, different bytes: kept aside


class Recorded(NamedTuple):
    """Outcome of recording an instance, with its series' counters after the write."""

    outcome: RecordOutcome
    instance_count: int = 0
    expected_instances: int | None = None


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


@dataclass(frozen=True)
class SeriesRow:
    """One ``series`` row: arrival counters and the completion state of its current version."""

    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    first_arrival: float
    last_arrival: float
    instance_count: int
    total_bytes: int
    state: str  # a SeriesState value
    version: int
    quiet_seconds: float
    deadline: float | None
    expected_instances: int | None
    completed_at: float | None
    completed_by: str | None


@dataclass(frozen=True)
class InstanceRow:
    """One ``instances`` row; ``headers`` is the routing headers' JSON text as stored."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size_bytes: int
    sha256: str
    calling_ae: str
    received_at: float
    series_version: int
    headers: str


# The arrival path's statements, built once: on the hot path SQLAlchemy then
# only binds parameters (building a statement per instance cost more than running it).
_SELECT_INSTANCE = sa.select(instances_t.c.sha256).where(instances_t.c.sop_instance_uid == sa.bindparam("uid"))
_SELECT_SERIES = sa.select(series_t).where(series_t.c.series_uid == sa.bindparam("uid"))
_INSERT_CONFLICT = conflicts_t.insert()
_INSERT_SERIES = series_t.insert()
_INSERT_INSTANCE = instances_t.insert()
_UPDATE_SERIES = (
    series_t.update()
    .where(series_t.c.series_uid == sa.bindparam("uid"))
    .values(
        {
            c: sa.bindparam(c)
            for c in (
                "last_arrival",
                "instance_count",
                "total_bytes",
                "expected_instances",
                "state",
                "version",
                "deadline",
                "completed_at",
                "completed_by",
            )
        }
    )
)


class InstanceTable(IndexBase):
    """Arrival-stage reads and writes of ``instances``, ``series`` and ``conflicts``."""

    def find_instance(self, sop_uid: str) -> InstanceRow | None:
        """The stored instance with this SOPInstanceUID, if any (duplicate/conflict check)."""
        with self._ro() as conn:
            row = conn.execute(sa.select(instances_t).where(instances_t.c.sop_instance_uid == sop_uid)).first()
        return None if row is None else from_row(InstanceRow, row)

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
        """Record one instance inside ``conn``'s transaction.

        A known UID with the same bytes is a duplicate (nothing written), with
        other bytes a conflict (kept aside in ``conflicts``). A new instance
        re-arms a receiving series' deadline; one that arrives after the
        series was routed starts a new version when ``reprocess_late``.
        """
        existing = conn.execute(_SELECT_INSTANCE, {"uid": rec.sop_instance_uid}).first()
        if existing is not None:
            if existing.sha256 == rec.sha256:
                return Recorded(RecordOutcome.DUPLICATE)
            conn.execute(
                _INSERT_CONFLICT,
                {
                    "sop_instance_uid": rec.sop_instance_uid,
                    "path": str(rec.path),
                    "sha256": rec.sha256,
                    "calling_ae": rec.calling_ae,
                    "received_at": now,
                },
            )
            return Recorded(RecordOutcome.CONFLICT)

        s = conn.execute(_SELECT_SERIES, {"uid": rec.series_uid}).first()
        if s is None:
            version, count, expected = 1, 1, rec.expected_instances
            conn.execute(
                _INSERT_SERIES,
                {
                    "series_uid": rec.series_uid,
                    "study_uid": rec.study_uid,
                    "modality": rec.modality[:16],
                    "calling_ae": rec.calling_ae,
                    "first_arrival": now,
                    "last_arrival": now,
                    "instance_count": 1,
                    "total_bytes": rec.size_bytes,
                    "state": SeriesState.RECEIVING.value,
                    "version": 1,
                    "quiet_seconds": quiet_seconds,
                    "deadline": now + quiet_seconds,
                    "expected_instances": rec.expected_instances,
                },
            )
        else:
            count = s.instance_count + 1
            expected = s.expected_instances or rec.expected_instances
            # Every column the statement sets, computed here: one statement, prepared once.
            values = {
                "uid": rec.series_uid,
                "last_arrival": now,
                "instance_count": count,
                "total_bytes": s.total_bytes + rec.size_bytes,
                "expected_instances": expected,
                "state": s.state,
                "version": s.version,
                "deadline": s.deadline,
                "completed_at": s.completed_at,
                "completed_by": s.completed_by,
            }
            if s.state == SeriesState.RECEIVING.value:
                # A new instance re-arms the full quiet period (hints are re-checked later).
                values.update(deadline=now + s.quiet_seconds, completed_by=None)
            elif reprocess_late:
                values.update(
                    state=SeriesState.RECEIVING.value,
                    version=s.version + 1,
                    deadline=now + s.quiet_seconds,
                    completed_at=None,
                    completed_by=None,
                )
            version = int(values["version"])
            conn.execute(_UPDATE_SERIES, values)
        conn.execute(
            _INSERT_INSTANCE,
            {
                "sop_instance_uid": rec.sop_instance_uid,
                "series_uid": rec.series_uid,
                "study_uid": rec.study_uid,
                "sop_class_uid": rec.sop_class_uid,
                "transfer_syntax": rec.transfer_syntax,
                "path": str(rec.path),
                "size_bytes": rec.size_bytes,
                "sha256": rec.sha256,
                "calling_ae": rec.calling_ae,
                "received_at": now,
                "series_version": version,
                "headers": json.dumps(rec.headers, separators=(",", ":"), default=str),
            },
        )
        return Recorded(RecordOutcome.STORED, count, expected)

    def receiving_series(self) -> list[SeriesRow]:
        """Every series still receiving (not yet complete), in no particular order."""
        with self._ro() as conn:
            rows = conn.execute(sa.select(series_t).where(series_t.c.state == SeriesState.RECEIVING.value))
            return [from_row(SeriesRow, r) for r in rows]

    def get_series(self, series_uid: str) -> SeriesRow | None:
        """The series row, or None for a UID never received."""
        with self._ro() as conn:
            row = conn.execute(sa.select(series_t).where(series_t.c.series_uid == series_uid)).first()
        return None if row is None else from_row(SeriesRow, row)

    def series_instances(self, series_uid: str) -> list[InstanceRow]:
        """The series' instances in arrival order (UID order among equal arrival times)."""
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(instances_t)
                .where(instances_t.c.series_uid == series_uid)
                .order_by(instances_t.c.received_at, instances_t.c.sop_instance_uid)
            )
            return [from_row(InstanceRow, r) for r in rows]

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


class GroupCommitter:
    """A single writer that records instances from every association in shared transactions.

    Each C-STORE handler waits for its own row to be committed (acknowledged
    still means durable), but concurrent handlers share one ``BEGIN IMMEDIATE``
    and one fsync of the WAL instead of queueing for the write lock one by one.

    Parameters
    ----------
    index
        The index to write to (any object with the arrival stage's
        :meth:`InstanceTable.record_batch`, normally :class:`gateway.index.Index`).
    max_batch
        Most instances recorded in one transaction.
    """

    def __init__(self, index: InstanceTable, max_batch: int = 64) -> None:
        self.index = index
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[tuple[InstanceRecord, float, float, bool], Future[Recorded]] | None]
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="aigw-index-writer", daemon=True)

    def start(self) -> None:
        """Start the writer thread; until then :meth:`record` commits each call alone."""
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the writer thread."""
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
        """Take what is queued (up to ``max_batch``) and commit it in one transaction."""
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
