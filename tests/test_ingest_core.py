"""Ingest without a transport: durability, indexing, every refusal reason, and the DIMSE status table.

These drive :class:`gateway.ingest.Ingest` directly, as both the Storage SCP
and a STOW-RS endpoint do, with a fresh data dir, index and metrics registry
per test. The received file is put in ``incoming/`` first, as pynetdicom's
chunked dataset path leaves it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

import gateway.ingest
from gateway.config import GatewaySettings
from gateway.index import Index, RecordOutcome
from gateway.ingest import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    Ingest,
    Received,
    RefusalReason,
    Refused,
    Source,
    Stored,
    Transport,
)
from gateway.metrics import STORE_OUTCOMES, Metrics
from gateway.scp import STATUS_FOR_REFUSAL
from gateway.status import StorageStatus
from gateway.storage import DataDir
from tests.conftest import mr_series

SCANNER = Source(Transport.DIMSE, "SCANNER", "127.0.0.1")


class Declared(TypedDict, total=False):
    """What a transport may declare about a received file (the optional fields of :class:`Received`)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    study_instance_uid: str


@dataclass
class Rig:
    """One ingest on its own data dir, index and metrics registry."""

    ingest: Ingest
    data: DataDir
    index: Index
    metrics: Metrics
    quiet: list[tuple[dict[str, Any], str]]

    def receive(self, src: Path, source: Source = SCANNER, declared: Declared | None = None) -> Stored | Refused:
        """Copy ``src`` into incoming/ (as a transport would) and ingest it."""
        tmp = self.data.incoming / f"rx-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}.dcm"
        shutil.copyfile(src, tmp)
        result = self.ingest.receive(Received(tmp, **(declared or {})), source)
        assert not tmp.exists(), "the received temporary file outlived the call"
        return result

    def count(self, outcome: str, transport: str = "dimse") -> float:
        labels = {"outcome": outcome, "transport": transport}
        value = self.metrics.registry.get_sample_value("aigw_instances_received_total", labels)
        return value or 0.0


def make_rig(tmp_path: Path, **settings: Any) -> Iterator[Rig]:
    root = tmp_path / "data"
    data = DataDir(root)
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    metrics = Metrics()
    quiet: list[tuple[dict[str, Any], str]] = []

    def quiet_seconds(headers: dict[str, Any], calling: str) -> float:
        quiet.append((headers, calling))
        return 10.0

    ingest = Ingest(
        GatewaySettings(data_dir=root, **{"min_free_bytes": 0, **settings}),
        data,
        index,
        metrics,
        quiet_seconds=quiet_seconds,
        hint_quiet_seconds=0.5,
        reprocess_late=True,
    )
    ingest.start()
    try:
        yield Rig(ingest, data, index, metrics, quiet)
    finally:
        ingest.stop()
        index.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from make_rig(tmp_path)


def declared_for(path: Path) -> Declared:
    """What a C-STORE declares for ``path``: its SOP class, instance and transfer syntax."""
    ds = dcmread(path, stop_before_pixels=True)
    return {
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
    }


def with_payload(folder: Path, name: str, payload: bytes, *, ts: str = ExplicitVRLittleEndian) -> Path:
    """A Part 10 file with a valid File Meta and ``payload`` as its data set (what pynetdicom writes)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID("2.25.1")
    meta.TransferSyntaxUID = UID(ts)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta)  # type: ignore[arg-type]
        fh.write(payload)
    return path


def data_set_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information group."""
    raw = path.read_bytes()
    meta_len = int.from_bytes(raw[132 + 8 : 132 + 12], "little")
    return raw[132 + 12 + meta_len :]


def refused(result: Stored | Refused, reason: RefusalReason) -> Refused:
    assert isinstance(result, Refused), f"expected a refusal ({reason}), got {result}"
    assert result.reason is reason, result.detail
    return result


def assert_nothing_left(r: Rig) -> None:
    assert list(r.data.incoming.iterdir()) == []
    assert [p for p in (r.data.root / "store").rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------------ stored
def test_stored_instance_is_durable_bit_exact_and_indexed(tmp_path: Path, rig: Rig) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=61)
    result = rig.receive(src, declared=declared_for(src))
    assert isinstance(result, Stored) and result.outcome == RecordOutcome.STORED
    ds = dcmread(src, stop_before_pixels=True)
    assert result.path == rig.data.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert result.path.read_bytes() == src.read_bytes()  # nothing transcoded
    assert (result.sop_instance_uid, result.series_uid, result.study_uid, result.sop_class_uid) == (
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
        MRImageStorage,
    )
    assert result.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert result.size_bytes == src.stat().st_size
    row = rig.index.find_instance(str(ds.SOPInstanceUID))
    assert row is not None
    assert (row.sha256, Path(row.path), row.calling_ae) == (result.sha256, result.path, "SCANNER")
    assert rig.quiet and rig.quiet[-1][1] == "SCANNER"
    assert rig.count("stored") == 1
    assert rig.metrics.registry.get_sample_value("aigw_received_bytes_total") == result.size_bytes
    assert list(rig.data.incoming.iterdir()) == []


def test_nothing_declared_uses_the_data_set_as_stow_does(tmp_path: Path, rig: Rig) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=62)
    web = Source(Transport.DICOMWEB, "ward-7", "10.0.0.8")
    result = rig.receive(src, web)
    assert isinstance(result, Stored) and result.outcome == RecordOutcome.STORED
    assert result.sop_class_uid == MRImageStorage
    row = rig.index.find_instance(result.sop_instance_uid)
    assert row is not None and row.calling_ae == "ward-7"
    assert (rig.count("stored", "dicomweb"), rig.count("stored", "dimse")) == (1, 0)


def test_same_bytes_twice_is_a_duplicate_and_other_bytes_a_conflict_kept_aside(tmp_path: Path, rig: Rig) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=63)
    first = rig.receive(src)
    again = rig.receive(src)
    assert isinstance(first, Stored) and isinstance(again, Stored)
    assert again.outcome == RecordOutcome.DUPLICATE and again.path == first.path
    ds = dcmread(src)
    ds.PixelData = bytes(len(ds.PixelData))
    other = tmp_path / "other.dcm"
    ds.save_as(other, enforce_file_format=True)
    conflict = rig.receive(other)
    assert isinstance(conflict, Stored) and conflict.outcome == RecordOutcome.CONFLICT
    assert conflict.path.parent == rig.data.root / "conflicts"
    assert conflict.path.read_bytes() == other.read_bytes()
    assert first.path.read_bytes() == src.read_bytes()  # the first stays what it was
    assert (rig.count("stored"), rig.count("duplicate"), rig.count("conflict")) == (1, 1, 1)


def test_count_hint_brings_completion_forward(tmp_path: Path, rig: Rig) -> None:
    paths = mr_series(tmp_path / "s", n=2, seed=64)
    for p in paths:  # ImagesInAcquisition says the series has two instances
        ds = dcmread(p)
        ds.ImagesInAcquisition = 2
        ds.save_as(p, enforce_file_format=True)
    first = rig.receive(paths[0])
    assert isinstance(first, Stored)
    series = rig.index.get_series(first.series_uid)
    assert series is not None and series.completed_by is None
    assert isinstance(rig.receive(paths[1]), Stored)
    series = rig.index.get_series(first.series_uid)
    assert series is not None and series.completed_by == "hint"


# ----------------------------------------------------------------------- refused
def test_too_large_is_refused(tmp_path: Path) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=71)
    for r in make_rig(tmp_path, max_instance_bytes=1024):
        res = refused(r.receive(src), RefusalReason.INSTANCE_TOO_LARGE)
        assert "max_instance_bytes" in res.detail
        assert r.count("refused_size") == 1
        assert_nothing_left(r)


def test_under_the_free_space_watermark_is_refused(tmp_path: Path) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=72)
    for r in make_rig(tmp_path, min_free_bytes=10**18):
        res = refused(r.receive(src), RefusalReason.OUT_OF_RESOURCES)
        assert "watermark" in res.detail
        assert r.count("refused_space") == 1
        assert_nothing_left(r)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the crafted values
def test_undecodable_truncated_or_non_uid_data_cannot_be_understood(tmp_path: Path, rig: Rig) -> None:
    (good,) = mr_series(tmp_path / "s", n=1, seed=73)
    payload = data_set_bytes(good)
    evil = dcmread(good)
    evil.SeriesInstanceUID = "1.2.3/../../../../tmp/evil"
    evil_path = tmp_path / "evil.dcm"
    evil.save_as(evil_path, enforce_file_format=True)
    cases = {
        "garbage": with_payload(tmp_path, "garbage.dcm", b"\xff\x13garbage, not DICOM" * 50),
        "truncated pixel data": with_payload(tmp_path, "trunc1.dcm", payload[:-500]),
        "truncated header": with_payload(tmp_path, "trunc2.dcm", payload[:300]),
        "path in a UID": evil_path,
    }
    for what, path in cases.items():
        res = refused(rig.receive(path), RefusalReason.CANNOT_UNDERSTAND)
        assert "/" not in res.detail and "evil" not in res.detail, what  # the value never reaches the detail
    res = refused(rig.receive(good, declared={"sop_instance_uid": "1.2.x"}), RefusalReason.CANNOT_UNDERSTAND)
    assert "AffectedSOPInstanceUID" in res.detail
    assert rig.count("invalid") == len(cases) + 1
    assert not any(p.name == "evil" for p in tmp_path.parent.rglob("evil"))
    assert_nothing_left(rig)


def test_a_sop_class_that_is_not_storage_is_not_supported(tmp_path: Path, rig: Rig) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=74)
    verification = "1.2.840.10008.1.1"
    assert verification not in STORAGE_SOP_CLASSES
    refused(rig.receive(src, declared={"sop_class_uid": verification}), RefusalReason.SOP_CLASS_NOT_SUPPORTED)
    ds = dcmread(src)
    ds.SOPClassUID = verification  # and in the data set, when nothing is declared (STOW-RS)
    undeclared = tmp_path / "undeclared.dcm"
    ds.save_as(undeclared, enforce_file_format=True)
    refused(rig.receive(undeclared), RefusalReason.SOP_CLASS_NOT_SUPPORTED)
    assert rig.count("invalid") == 2
    assert_nothing_left(rig)


def test_an_unknown_transfer_syntax_is_not_supported(tmp_path: Path, rig: Rig) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=75)
    unknown = "1.2.826.0.1.3680043.2.1143.999"
    assert unknown not in TRANSFER_SYNTAXES
    path = with_payload(tmp_path, "private-ts.dcm", data_set_bytes(src), ts=unknown)
    refused(rig.receive(path), RefusalReason.TRANSFER_SYNTAX_NOT_SUPPORTED)
    assert rig.count("invalid") == 1
    assert_nothing_left(rig)


def test_declared_and_actual_uids_that_differ_are_a_mismatch(tmp_path: Path, rig: Rig) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=76)
    declared = declared_for(src)
    changes: list[Declared] = [
        {"sop_instance_uid": "2.25.999"},
        {"transfer_syntax": str(ImplicitVRLittleEndian)},
        {"study_instance_uid": "2.25.998"},
    ]
    for change in changes:
        refused(rig.receive(src, declared={**declared, **change}), RefusalReason.DATASET_MISMATCH)
    assert rig.count("invalid") == 3
    assert_nothing_left(rig)


def test_a_failure_in_the_gateway_is_an_internal_error_not_an_exception(
    tmp_path: Path, rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    (src,) = mr_series(tmp_path / "s", n=1, seed=77)

    def broken(tmp: Path, final: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(gateway.ingest, "install_file", broken)
    res = refused(rig.receive(src), RefusalReason.INTERNAL_ERROR)
    assert "OSError" in res.detail
    assert rig.count("error") == 1
    assert rig.index.find_instance(str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)) is None
    assert_nothing_left(rig)


def test_every_refusal_reason_is_counted_under_a_primed_outcome() -> None:
    assert {r.metric_outcome for r in RefusalReason} <= set(STORE_OUTCOMES)
    assert {o.value for o in RecordOutcome} <= set(STORE_OUTCOMES)


# ------------------------------------------------------------------------- DIMSE
#: Today's wire statuses (docs/conformance.md section 5.3); changing one is a conformance change.
_EXPECTED_STATUS = {
    RefusalReason.INSTANCE_TOO_LARGE: 0xA700,
    RefusalReason.OUT_OF_RESOURCES: 0xA700,
    RefusalReason.CANNOT_UNDERSTAND: 0xC210,
    RefusalReason.SOP_CLASS_NOT_SUPPORTED: 0x0122,
    RefusalReason.TRANSFER_SYNTAX_NOT_SUPPORTED: 0xC210,
    RefusalReason.DATASET_MISMATCH: 0xC210,
    RefusalReason.SOP_CLASS_MISMATCH: 0xA900,
    RefusalReason.INTERNAL_ERROR: 0xC211,
}


def test_every_refusal_reason_has_a_storage_status() -> None:
    assert set(STATUS_FOR_REFUSAL) == set(RefusalReason)
    assert all(isinstance(status, StorageStatus) for status in STATUS_FOR_REFUSAL.values())
    assert StorageStatus.SUCCESS not in STATUS_FOR_REFUSAL.values()
    assert {reason: int(status) for reason, status in STATUS_FOR_REFUSAL.items()} == _EXPECTED_STATUS


def test_the_scp_negotiates_exactly_what_ingest_understands() -> None:
    from pynetdicom import ALL_TRANSFER_SYNTAXES
    from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

    assert set(STORAGE_SOP_CLASSES) == {str(u) for u in _STORAGE_CLASSES.values()}
    assert list(TRANSFER_SYNTAXES) == [str(ts) for ts in ALL_TRANSFER_SYNTAXES]
