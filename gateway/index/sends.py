"""Sending: one ``sends`` row per output instance and destination, and the dead letters.

Sends are queued by a job's success (:func:`queue_sends`, called in the job's
own transaction) or by forwarding an unrouted series (job id 0). Each attempt
is recorded here; the last delivered send of a job closes it (``sent``). A
send rejected for good, or out of attempts, is ``dead``: the dead-letter list
an operator can requeue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.index.schema import IndexBase, JobState, SendState, from_row, jobs_t, sends_t

__all__ = ["SendRow", "SendTable", "queue_sends"]


@dataclass(frozen=True)
class SendRow:
    """One ``sends`` row: an instance to deliver to one destination, and how that went."""

    id: int
    job_id: int  # 0: a forwarded original
    sop_instance_uid: str
    sop_class_uid: str
    path: str
    destination: str
    state: str  # a SendState value
    attempts: int
    next_attempt_at: float
    last_status: int | None
    error: str | None
    created_at: float
    sent_at: float | None


def queue_sends(
    conn: Connection,
    job_id: int,
    items: Sequence[tuple[str, str, Path]],
    destinations: Sequence[str],
    now: float,
) -> None:
    """Queue a pending send per (SOPInstanceUID, SOPClassUID, path) and destination, in ``conn``.

    A send that already exists for the job, instance and destination is left
    alone, so a job that runs twice does not deliver twice.
    """
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


class SendTable(IndexBase):
    """Sending-stage reads and writes of ``sends`` (and the job closing they trigger)."""

    def queue_forward(self, items: Sequence[tuple[str, str, Path]], destinations: Sequence[str], now: float) -> None:
        """Queue originals of an unrouted series for forwarding (job id 0)."""
        with self._tx() as conn:
            queue_sends(conn, 0, items, destinations, now)

    def due_sends(self, now: float, limit: int = 100) -> list[SendRow]:
        """Pending sends due now, grouped by destination then job (one association per batch)."""
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(sends_t)
                .where(sends_t.c.state == SendState.PENDING.value)
                .where(sends_t.c.next_attempt_at <= now)
                .order_by(sends_t.c.destination, sends_t.c.job_id, sends_t.c.id)
                .limit(limit)
            )
            return [from_row(SendRow, r) for r in rows]

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
        """Move a succeeded job to ``sent`` once none of its sends is left undelivered."""
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

    def list_dead(self, limit: int = 1000) -> list[SendRow]:
        """The dead-letter list, oldest send first."""
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(sends_t).where(sends_t.c.state == SendState.DEAD.value).order_by(sends_t.c.id).limit(limit)
            )
            return [from_row(SendRow, r) for r in rows]

    def retry_dead(self, send_id: int | None, *, now: float) -> int:
        """Requeue one dead send (or all with ``send_id=None``) with fresh attempts."""
        with self._tx() as conn:
            q = sends_t.update().where(sends_t.c.state == SendState.DEAD.value)
            if send_id is not None:
                q = q.where(sends_t.c.id == send_id)
            res = conn.execute(q.values(state=SendState.PENDING.value, attempts=0, next_attempt_at=now))
            return int(res.rowcount or 0)

    def sends_for_job(self, job_id: int) -> list[SendRow]:
        """Every send of one job (0: the forwarded originals), in no particular order."""
        with self._ro() as conn:
            return [from_row(SendRow, r) for r in conn.execute(sa.select(sends_t).where(sends_t.c.job_id == job_id))]
