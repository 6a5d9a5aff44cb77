"""Interrupted transfers: an aborted or cut association never completes its series on what it has.

A release says "I sent everything"; an A-ABORT, a dropped connection or a
crash of the gateway says nothing of the kind. Completing the series then
would send a partial result, and the re-sent rest a second, different one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import KeyObjectSelectionDocumentStorage
from pynetdicom import AE

from gateway.index import Index, InstanceRecord, JobRow, OutputRow, SeriesState
from gateway.supersede import mark_superseding
from tests.conftest import REPO, GatewayProcess, mr_series, storescu, wait_for
from tests.validators import assert_valid

GRACE = 8.0


def _state(gw: GatewayProcess, series_uid: str) -> str | None:
    index = gw.index()
    try:
        row = index.get_series(series_uid)
        return None if row is None else row.state
    finally:
        index.close()


def _send_then_abort(port: int, files: list[Path]) -> None:
    ae = AE(ae_title="SCANNER")
    ds = [dcmread(f) for f in files]
    ae.add_requested_context(ds[0].SOPClassUID, ds[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="AIGW")
    assert assoc.is_established
    for d in ds:
        assert assoc.send_c_store(d).Status == 0x0000
    assoc.abort()


def test_defer_only_moves_deadlines_later(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        for uid, quiet in (("1.2.3", 100.0), ("1.2.4", 1.0)):
            rec = InstanceRecord(
                sop_instance_uid=uid + ".1",
                series_uid=uid,
                study_uid="1.2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                transfer_syntax="1.2.840.10008.1.2.1",
                path=tmp_path / uid,
                size_bytes=1,
                sha256="0" * 64,
                calling_ae="S",
                modality="MR",
                headers={},
            )
            index.record_instance(rec, now=1000.0, quiet_seconds=quiet, reprocess_late=True)
        assert index.defer_completion(None, now=1000.0, within=10.0) == 1  # only the one due sooner
        due = {r.series_uid: r.deadline for r in index.receiving_series()}
        assert due == {"1.2.3": 1100.0, "1.2.4": 1010.0}
        assert index.defer_completion([], now=1000.0, within=50.0) == 0
    finally:
        index.close()


def test_abort_keeps_the_series_open_for_the_grace_period(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(series_timeout=1, release_quiet=0.2, completion={"abort_grace_seconds": GRACE})
    files = mr_series(tmp_path / "in", n=4, seed=81)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    t0 = time.monotonic()
    _send_then_abort(gw.port, files[:2])
    time.sleep(3)  # three quiet periods: without the grace it would have completed
    assert _state(gw, series_uid) == SeriesState.RECEIVING.value
    assert "ended without release" in gw.log()
    # The sender resumes and finishes properly: one series, all four instances, one job.
    assert storescu(gw.port, files[2:]).returncode == 0
    wait_for(lambda: _state(gw, series_uid) != SeriesState.RECEIVING.value, 30, "completion after the resume")
    assert time.monotonic() - t0 < GRACE + 20
    index = gw.index()
    try:
        row = index.get_series(series_uid)
        assert row is not None and row.instance_count == 4 and row.version == 1
        assert len([j for j in index.list_jobs() if j.series_uid == series_uid]) == 1
    finally:
        index.close()


def test_a_released_association_still_completes_at_once(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    # The control case: the grace applies to interrupted transfers only.
    gw = make_gateway(series_timeout=30, release_quiet=0.2, completion={"abort_grace_seconds": 60})
    files = mr_series(tmp_path / "in", n=2, seed=82)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert storescu(gw.port, files).returncode == 0
    wait_for(lambda: _state(gw, series_uid) != SeriesState.RECEIVING.value, 10, "completion on release")


def test_restart_gives_open_series_a_fresh_grace(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(series_timeout=1.5, release_quiet=None, completion={"abort_grace_seconds": GRACE})
    files = mr_series(tmp_path / "in", n=3, seed=83)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert storescu(gw.port, files[:2]).returncode == 0
    gw.kill9()  # before the quiet period ends: the series is open in the index
    time.sleep(2)  # its old deadline passes while the gateway is down
    gw.start()
    time.sleep(2)
    assert _state(gw, series_uid) == SeriesState.RECEIVING.value, "completed on a partial series after restart"
    assert "open series wait" in gw.log()
    assert storescu(gw.port, files[2:]).returncode == 0
    wait_for(lambda: _state(gw, series_uid) != SeriesState.RECEIVING.value, 30, "completion after the resume")
    index = gw.index()
    try:
        row = index.get_series(series_uid)
        assert row is not None and row.instance_count == 3 and row.version == 1
    finally:
        index.close()


def _outputs(gw: GatewayProcess) -> dict[int, list[Dataset]]:
    """Headers of the results in the outbox, by job."""
    out: dict[int, list[Dataset]] = {}
    for path in sorted((gw.data_dir / "outbox").rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        ds.filename = str(path)
        out.setdefault(int(path.parent.name), []).append(ds)  # outbox/<job id>/
    return out


def _first_and_rerun(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess], seed: int, **kw: object
) -> tuple[list[Dataset], list[Dataset]]:
    gw = make_gateway(series_timeout=1, release_quiet=0.2, **kw)  # no destination: results land in the outbox
    files = mr_series(tmp_path / "in", n=3, seed=seed)
    assert storescu(gw.port, files[:2]).returncode == 0
    wait_for(lambda: len(_outputs(gw)) == 1, 30, "the first result")
    assert storescu(gw.port, files[2:]).returncode == 0  # a late instance: the series runs again
    wait_for(lambda: len(_outputs(gw)) == 2, 30, "the second result")
    first, second = (_outputs(gw)[k] for k in sorted(_outputs(gw)))
    return first, second


def test_a_rerun_after_late_instances_says_and_references_what_it_supersedes(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    first, second = _first_and_rerun(tmp_path, make_gateway, seed=84)
    assert not any("supersedes" in d.SeriesDescription or "RelatedSeriesSequence" in d for d in first)
    assert len(second) == 3, "no rejection note unless asked for"
    old_series = {(d.StudyInstanceUID, d.SeriesInstanceUID) for d in first}
    for d in second:
        assert d.SeriesDescription.endswith("(supersedes v1)") and len(d.SeriesDescription) <= 64
        assert {(r.StudyInstanceUID, r.SeriesInstanceUID) for r in d.RelatedSeriesSequence} == old_series
    assert_valid([d.filename for d in second])


def test_an_iocm_rejection_note_rejects_the_superseded_result(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    first, second = _first_and_rerun(tmp_path, make_gateway, seed=85, jobs={"iocm_rejection_notes": True})
    notes = [d for d in second if d.SOPClassUID == KeyObjectSelectionDocumentStorage]
    assert len(notes) == 1 and len(second) == 4
    note = notes[0]
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")  # Rejected for Quality Reasons
    referenced = {
        sop.ReferencedSOPInstanceUID
        for study in note.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert referenced == {d.SOPInstanceUID for d in first}, "the note rejects exactly the first result"
    assert note.StudyInstanceUID == first[0].StudyInstanceUID and note.PatientID == first[0].PatientID
    assert_valid([note.filename])


def test_a_superseding_report_lists_the_earlier_reports_as_predecessors() -> None:
    sr_class, seg_class = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.66.4"
    earlier = [
        OutputRow("1.9.1", sr_class, "1.9", "1.9.10", "/x/a.dcm"),
        OutputRow("1.9.2", seg_class, "1.9", "1.9.20", "/x/b.dcm"),
    ]
    report, image = Dataset(), Dataset()
    report.SOPClassUID, report.SeriesDescription = sr_class, "Tumour report"
    image.SOPClassUID, image.SeriesDescription = seg_class, "X" * 64
    mark_superseding([report, image], 1, earlier)
    assert image.SeriesDescription == "X" * 48 + " (supersedes v1)"
    assert {r.SeriesInstanceUID for r in image.RelatedSeriesSequence} == {"1.9.10", "1.9.20"}
    assert "RelatedSeriesSequence" not in report  # not in the SR Document Series module
    (study,) = report.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == ("1.9", "1.9.10")
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == ["1.9.1"]


def _jobs(gw: GatewayProcess) -> list[JobRow]:
    index = gw.index()
    try:
        return sorted(index.list_jobs(), key=lambda j: j.id)
    finally:
        index.close()


def test_a_job_overtaken_by_a_later_version_never_runs_after_a_crash(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    """v1 runs, late instances queue v2, kill -9: v1 must not run again after v2 (its result would go out unmarked)."""
    gw = make_gateway(extra_toml="[pipelines.test-invert]\nsleep_seconds = 4\n", series_timeout=1, release_quiet=0.2)
    files = mr_series(tmp_path / "in", n=4, seed=86)
    assert storescu(gw.port, files[:2]).returncode == 0
    wait_for(lambda: any(j.state == "running" for j in _jobs(gw)), 30, "the v1 job to run")
    assert storescu(gw.port, files[2:]).returncode == 0
    wait_for(lambda: any(j.series_version == 2 for j in _jobs(gw)), 30, "the v2 job")
    gw.kill9()
    gw.start()
    wait_for(lambda: [j.state for j in _jobs(gw)] == ["superseded", "sent"], 60, "v1 superseded, v2 done")
    results = _outputs(gw)
    assert list(results) == [_jobs(gw)[1].id] and len(results[_jobs(gw)[1].id]) == 4, "one result, of v2"


def test_a_later_version_waits_for_the_earlier_one_and_says_it_supersedes_it(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    """Two workers: v2 is queued while v1 runs; it must not run beside it, or it could not mark v1 superseded."""
    gw = make_gateway(
        extra_toml="[pipelines.test-invert]\nsleep_seconds = 3\n",
        series_timeout=1,
        release_quiet=0.2,
        jobs={"workers": 2},
    )
    files = mr_series(tmp_path / "in", n=4, seed=87)
    assert storescu(gw.port, files[:2]).returncode == 0
    wait_for(lambda: any(j.state == "running" for j in _jobs(gw)), 30, "the v1 job to run")
    assert storescu(gw.port, files[2:]).returncode == 0
    wait_for(lambda: len(_jobs(gw)) == 2 and all(j.state == "sent" for j in _jobs(gw)), 60, "both jobs")
    v1, v2 = _jobs(gw)
    assert v2.started_at is not None and v1.finished_at is not None and v2.started_at >= v1.finished_at
    first, second = (_outputs(gw)[j.id] for j in (v1, v2))
    assert all(d.SeriesDescription.endswith("(supersedes v1)") for d in second)
    assert not any("supersedes" in d.SeriesDescription for d in first)


def test_a_damaged_index_stops_the_start_with_a_clear_message(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = make_gateway(start=False)
    gw.data_dir.mkdir(parents=True, exist_ok=True)
    (gw.data_dir / "index.sqlite").write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 16)  # a torn file
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(gw.config)],
        capture_output=True, text=True, timeout=60, cwd=gw.root, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "the index sqlite:///" in done.stderr and "cannot be opened" in done.stderr
    assert "move it and its -wal and -shm files aside" in done.stderr
