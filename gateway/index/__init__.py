"""The index database: the durable state of every stage (SQLAlchemy Core).

Each stage owns its table or columns, and its transitions live in one module:

* :mod:`~gateway.index.schema`: the tables, the state enums, engine creation
  (SQLite pragmas, ``BEGIN IMMEDIATE`` writers) and the shared transaction
  helpers;
* :mod:`~gateway.index.instances` (arrival): ``instances`` and ``series``,
  what arrived, when, from whom, plus the :class:`GroupCommitter`;
* :mod:`~gateway.index.completion` (completion): ``series.state``/``deadline``,
  whether a series is complete, and the jobs its routing creates;
* :mod:`~gateway.index.jobs` (execution): ``jobs``, one per route that matched
  a series version, from claim to outcome;
* :mod:`~gateway.index.sends` (sending): ``sends``, one per output instance and
  destination, and the dead-letter list.

:class:`Index` combines the stage classes over one pair of engines, so callers
hold one object (``index.claim_job(...)``, ``index.record_batch(...)``). Reads
return frozen row dataclasses (:class:`SeriesRow`, :class:`InstanceRow`,
:class:`JobRow`, :class:`OutputRow`, :class:`RunnableJob`, :class:`SendRow`) named like the columns.
"""

from __future__ import annotations

import sqlalchemy as sa

from gateway.index.completion import CompletionTable
from gateway.index.instances import (
    GroupCommitter,
    InstanceRecord,
    InstanceRow,
    InstanceTable,
    Recorded,
    RecordOutcome,
    SeriesRow,
)
from gateway.index.jobs import JobRow, JobTable, OutputRow, RunnableJob
from gateway.index.schema import (
    IndexUnavailable,
    JobState,
    SendState,
    SeriesState,
    conflicts_t,
    instances_t,
    jobs_t,
    metadata,
    sends_t,
    series_t,
)
from gateway.index.sends import SendRow, SendTable

__all__ = [
    "GroupCommitter",
    "Index",
    "IndexUnavailable",
    "InstanceRecord",
    "InstanceRow",
    "JobRow",
    "JobState",
    "OutputRow",
    "RecordOutcome",
    "Recorded",
    "RunnableJob",
    "SendRow",
    "SendState",
    "SeriesRow",
    "SeriesState",
    "conflicts_t",
    "instances_t",
    "jobs_t",
    "metadata",
    "sends_t",
    "series_t",
]


class Index(InstanceTable, CompletionTable, JobTable, SendTable):
    """All reads and writes of gateway state, one method per stage transition.

    Parameters
    ----------
    url
        SQLAlchemy URL of the index (``sqlite:///...`` embedded, or PostgreSQL
        for multi-node sites); the tables are created if missing.
    """

    def counts(self) -> dict[str, dict[str, int]]:
        """Row counts by state for jobs, sends and series (for gauges and status).

        It reads every stage's table, so it lives on the combined class.
        """
        out: dict[str, dict[str, int]] = {}
        with self._ro() as conn:
            for name, table in (("jobs", jobs_t), ("sends", sends_t), ("series", series_t)):
                rows = conn.execute(sa.select(table.c.state, sa.func.count()).group_by(table.c.state))
                out[name] = {r[0]: int(r[1]) for r in rows}
        return out
