"""The index on a real PostgreSQL server (the multi-node configuration).

The server is the session's throw-away one (``pg_server`` in conftest.py,
or ``AIGW_TEST_PG_URL``); a fresh database per test, dropped afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.index import Index, InstanceRecord, JobState, RecordOutcome


@pytest.fixture
def pg_index(pg_url: str) -> Iterator[Index]:
    idx = Index(pg_url)
    try:
        yield idx
    finally:
        idx.close()


def _rec(sop: str, series: str = "1.2.3", sha: str = "a" * 64) -> InstanceRecord:
    return InstanceRecord(
        sop,
        series,
        "1.2",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.1.2.1",
        Path(f"/x/{sop}"),
        100,
        sha,
        "SCANNER",
        "MR",
        {"Modality": "MR"},
    )


def test_record_complete_claim_on_postgres(pg_index: Index) -> None:
    now = time.time()
    assert pg_index.record_instance(_rec("1.1"), now=now, quiet_seconds=5, reprocess_late=True) == RecordOutcome.STORED
    assert (
        pg_index.record_instance(_rec("1.1"), now=now, quiet_seconds=5, reprocess_late=True) == RecordOutcome.DUPLICATE
    )
    assert (
        pg_index.record_instance(_rec("1.1", sha="b" * 64), now=now, quiet_seconds=5, reprocess_late=True)
        == RecordOutcome.CONFLICT
    )
    assert pg_index.due_series(now + 1) == []
    (row,) = pg_index.due_series(now + 6)
    ids = pg_index.mark_routed(
        row.series_uid, row.version, [("r1", "p1"), ("r2", "p2")], now=now + 6, completed_by="timer"
    )
    assert ids is not None and len(ids) == 2
    assert pg_index.mark_routed(row.series_uid, row.version, [("r1", "p1")], now=now + 7, completed_by="timer") is None


def test_concurrent_claims_never_share_a_job(pg_index: Index) -> None:
    now = time.time()
    for k in range(20):
        pg_index.record_instance(_rec(f"2.{k}", series=f"9.{k}"), now=now, quiet_seconds=0.1, reprocess_late=True)
    for row in pg_index.due_series(now + 1, limit=100):
        pg_index.mark_routed(row.series_uid, row.version, [("r", "p")], now=now + 1, completed_by="timer")
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(owner: str) -> None:
        while (job := pg_index.claim_job(owner, now=time.time() + 2, lease_seconds=60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 20
    assert {j.state for j in pg_index.list_jobs()} == {JobState.RUNNING.value}
