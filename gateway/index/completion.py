"""Completion: when a series counts as complete, and the jobs its routing creates.

The completion stage owns ``series.state``, ``deadline`` and ``completed_*``:
hints bring a deadline forward, a forced completion sets it to now, and
:meth:`CompletionTable.mark_routed` closes one series version and queues one
job per matched route in the same transaction, so a series is never routed
without its jobs or twice by two nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from gateway.index.instances import SeriesRow
from gateway.index.schema import IndexBase, JobState, SeriesState, from_row, jobs_t, series_t

__all__ = ["CompletionTable"]


class CompletionTable(IndexBase):
    """Completion-stage transitions of ``series`` and the job rows they create."""

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

    def defer_completion(self, series_uids: Iterable[str] | None, *, now: float, within: float) -> int:
        """Push receiving series' deadlines back to at least ``now + within``: a transfer was interrupted.

        An association that ends by abort or a dropped connection, or a
        restart that cut every association, says nothing about whether the
        sender finished; a hint or a short quiet period would complete the
        series on what it has, and the re-sent rest would then make a second,
        different result. The deadline is only ever moved later here, and the
        series completes by its timer (``completed_by`` cleared), so a sender
        that resumes within the grace period keeps the series open.

        Parameters
        ----------
        series_uids : iterable of str or None
            The interrupted association's series; None for every receiving series.
        now, within : float
            The new deadline is at least ``now + within`` seconds.
        """
        query = (
            series_t.update()
            .where(series_t.c.state == SeriesState.RECEIVING.value)
            .where(series_t.c.deadline < now + within)
            .values(deadline=now + within, completed_by=None)
        )
        if series_uids is not None:
            uids = list(series_uids)
            if not uids:
                return 0
            query = query.where(series_t.c.series_uid.in_(uids))
        with self._tx() as conn:
            return int(conn.execute(query).rowcount or 0)

    def force_complete(self, series_uid: str, *, now: float) -> bool:
        """Make the series due now; a series already routed gets a new version to run again."""
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

    def due_series(self, now: float, limit: int = 50) -> list[SeriesRow]:
        """Receiving series whose deadline has passed, earliest deadline first."""
        with self._ro() as conn:
            rows = conn.execute(
                sa.select(series_t)
                .where(series_t.c.state == SeriesState.RECEIVING.value)
                .where(series_t.c.deadline <= now)
                .order_by(series_t.c.deadline)
                .limit(limit)
            )
            return [from_row(SeriesRow, r) for r in rows]

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
