"""Ingest without a transport: durability, indexing, every refusal reason, and the DIMSE status table.

These drive :class:`gateway.ingest.Ingest` directly, as both the Storage SCP
and a STOW-RS endpoint do, with a fresh data dir, index and metrics registry
per test. The received file is put in ``incoming/`` first, as pynetdicom's
chunked dataset path leaves it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest
import sqlalchemy as sa
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

import gateway.ingest
from gateway.config import GatewaySettings
from gateway.headers import read_header, routing_headers
from gateway.index import GroupCommitter, Index, InstanceRecord, Recorded, RecordOutcome
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
from gateway.structure import MalformedDataSet, read_file_meta
from tests.conftest import mr_series
from tests.fuzz.corpus import malformed_datasets, valid_datasets

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


# ------------------------------------------------------------ the header parse
def _old_header_parse(path: Path) -> tuple[dict[str, Any], dict[str, object], str]:
    """What ingest took from a file before the lean parse: ``dcmread``, every value converted by pydicom."""
    ds = dcmread(path, stop_before_pixels=True)
    raw = {kw: gateway.ingest._raw(ds, kw) for kw in _IDENTITY}  # raw bytes first: conversion replaces them
    ds.walk(lambda _ds, _elem: None)  # converts every element, nested ones too
    return routing_headers(ds), raw, str(ds.get("Modality", "") or "")


def _new_header_parse(path: Path) -> tuple[dict[str, Any], dict[str, object], str]:
    meta = read_file_meta(path)
    ds = read_header(path, meta.transfer_syntax, meta.data_set_offset)
    raw = {kw: gateway.ingest._raw(ds, kw) for kw in _IDENTITY}
    return routing_headers(ds), raw, str(ds.get("Modality", "") or "")


_IDENTITY = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _header_test_files(tmp_path: Path) -> list[Path]:
    """Every DICOM file of the test data and the fuzz corpus, valid and malformed.

    pydicom's test data: vendors' files, implicit, explicit and big endian,
    deflate, enhanced multi-frame, and its character set files (ISO 2022
    with escapes, GB18030, UTF-8, Cyrillic, Hebrew, Arabic, Greek...).
    """
    files = [Path(f) for f in [*get_testdata_files(), *get_charset_files()] if Path(f).is_file()]
    for i, payload in enumerate([*valid_datasets().values(), *malformed_datasets(depths=(1000,)).values()]):
        p = tmp_path / f"corpus-{i}.dcm"
        p.write_bytes(payload)
        files.append(p)
    return sorted(files)


@pytest.mark.filterwarnings("ignore")  # pydicom warns about many odd values of its test files
def test_routing_headers_fast_path_matches_pydicom(tmp_path: Path) -> None:
    """The lean header parse gives exactly the old values: routing headers as indexed (JSON), identity UIDs, modality.

    Old: ``dcmread(stop_before_pixels=True)`` with every element converted by
    pydicom. New: :func:`gateway.headers.read_header` with values converted
    by the fast path where it applies. Where the old parse failed, the new
    one must fail too (ingest refuses the instance either way).
    """
    compared, charsets, syntaxes, mismatches = 0, set(), set(), []
    for path in _header_test_files(tmp_path):
        try:
            meta = read_file_meta(path)
        except MalformedDataSet:
            continue  # no File Meta Information: ingest refuses it before any parse
        try:
            old = _old_header_parse(path)
        except Exception:
            try:
                _new_header_parse(path)
                mismatches.append(f"{path.name} (read only by the new parse)")
            except Exception:
                pass
            continue
        new = _new_header_parse(path)
        compared += 1
        # The index stores the headers as this JSON text; it tells 1 from 1.0 and "1" from 1.
        as_json = (json.dumps(old[0], sort_keys=True, default=str), json.dumps(new[0], sort_keys=True, default=str))
        if as_json[0] != as_json[1] or old[1:] != new[1:]:
            mismatches.append(path.name)
        charsets.add(str(old[0].get("SpecificCharacterSet")))
        syntaxes.add(meta.transfer_syntax)
    assert mismatches == []
    assert compared > 200
    # The comparison covered what the fast path must get right, not just plain ASCII explicit VR files.
    encodings = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
    assert encodings <= syntaxes
    assert len(charsets) > 10


def test_routing_headers_fast_path_converts_like_pydicom() -> None:
    """Values at the fast path's edges (padding, empty parts, odd numbers, non-ASCII text) come out as pydicom's."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "", " PRIMARY "]
    ds.ProtocolName = "T2  "
    ds.StationName = "  AE  "
    ds.SliceThickness = " 3.50"
    ds.RepetitionTime = "1e3"
    ds.EchoTime = "nan"
    ds.ImagePositionPatient = ["-1", "+2.5", ".5"]
    ds.SeriesNumber = " 7 "
    ds.InstanceNumber = "1.0"  # an IS pydicom reads as 1
    ds.AcquisitionNumber = "9" * 13  # beyond the fast path's 12 digits
    ds.Rows = 4
    ds.WindowCenter = ["", "40"]
    ds.FrameOfReferenceUID = "1.2.3 "
    ds.add_new(0x00191010, "DS", "1000")
    ds.add_new(0x00191011, "US", [1, 2, 3])
    ds.add_new(0x00191012, "FL", 0.5)
    ds.add_new(0x00191013, "LO", "x" * 257)
    charsets = (
        ("ISO_IR 100", "Kopf \xfc"),
        ("ISO_IR 192", "\u982d\u90e8 MR"),
        (["", "ISO 2022 IR 87"], "\u982d\u90e8 MR"),  # written with escape sequences
        ("GB18030", "\u5934\u90e8"),
    )
    for charset, text in charsets:
        ds.SpecificCharacterSet = charset
        ds.SeriesDescription = text
        ds.StudyDescription = "ASCII in " + str(charset)
        for implicit, little in ((True, True), (False, True), (False, False)):
            buf = DicomBytesIO()
            buf.is_implicit_VR, buf.is_little_endian = implicit, little
            write_dataset(buf, ds)
            data = buf.getvalue()
            fresh = read_dataset(io.BytesIO(data), implicit, little)
            converted = read_dataset(io.BytesIO(data), implicit, little)
            converted.walk(lambda _ds, _elem: None)
            expected = routing_headers(converted)
            assert expected["SeriesDescription"] == text  # the case is what it claims to be
            assert json.dumps(routing_headers(fresh), sort_keys=True) == json.dumps(expected, sort_keys=True), (
                charset,
                implicit,
                little,
            )


# ------------------------------------------------------------ the arrival path
def _arrivals(index: Index, root: Path) -> list[list[Recorded]]:
    """Store, duplicate, conflict, a second series, a late instance after completion: every branch of _record."""

    def rec(sop: str, series: str, sha: str, expected: int | None = None) -> InstanceRecord:
        return InstanceRecord(
            sop, series, "1.2.3", MRImageStorage, ExplicitVRLittleEndian, root / f"{sop}.dcm", 100, sha, "SENDER",
            "MR", {"Modality": "MR", "InstanceNumber": 1}, expected,
        )  # fmt: skip

    out = [
        index.record_batch([(rec("1.2.3.1", "1.2.3.10", "a" * 64, 3), 100.0, 5.0, True)]),
        index.record_batch(
            [
                (rec("1.2.3.1", "1.2.3.10", "a" * 64), 101.0, 5.0, True),  # duplicate
                (rec("1.2.3.1", "1.2.3.10", "b" * 64), 102.0, 5.0, True),  # conflict
                (rec("1.2.3.2", "1.2.3.10", "c" * 64), 103.0, 5.0, True),
                (rec("1.2.3.3", "1.2.3.11", "d" * 64), 104.0, 5.0, True),
            ]
        ),
    ]
    index.hint_complete(["1.2.3.10"], now=105.0, within=0.0, cause="hint")
    assert index.mark_routed("1.2.3.10", 1, [], now=106.0, completed_by="hint") is not None
    out.append(index.record_batch([(rec("1.2.3.4", "1.2.3.10", "e" * 64), 300.0, 5.0, True)]))
    return out


def _tables(index: Index) -> dict[str, list[tuple[Any, ...]]]:
    from gateway.index.schema import conflicts_t, instances_t, series_t

    with index._ro() as conn:
        return {
            t.name: sorted(tuple(r) for r in conn.execute(sa.select(*[c for c in t.columns if c.name != "id"])))
            for t in (instances_t, series_t, conflicts_t)
        }


def test_arrival_statements_on_the_sqlite_cursor_write_what_sqlalchemy_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arrival path's statements run on SQLite's own cursor (prepared once) and write the same rows and
    outcomes as SQLAlchemy's execution of them."""
    from gateway.index import instances

    fast = Index(f"sqlite:///{tmp_path / 'fast.sqlite'}")
    fast_out = _arrivals(fast, tmp_path)
    prepared = [v for v in vars(instances).values() if isinstance(v, instances._Prepared)]
    assert len(prepared) >= 6
    assert all(p._compiled and None not in p._compiled.values() for p in prepared if p._compiled)
    assert fast.find_instance("1.2.3.1") is not None and fast.find_instance("1.2.3.9") is None

    monkeypatch.setattr(instances._Prepared, "_sqlite", lambda self, conn, keys: None)
    slow = Index(f"sqlite:///{tmp_path / 'slow.sqlite'}")
    assert _arrivals(slow, tmp_path) == fast_out
    assert [r.outcome for r in fast_out[1]] == [
        RecordOutcome.DUPLICATE,
        RecordOutcome.CONFLICT,
        RecordOutcome.STORED,
        RecordOutcome.STORED,
    ]
    assert _tables(slow) == _tables(fast)
    assert fast.find_instance("1.2.3.1") == slow.find_instance("1.2.3.1")


class _CountingIndex:
    """``record_batch`` that takes a while (like a WAL fsync), counts its transactions and fails one UID."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def record_batch(self, items: Any) -> list[Recorded]:
        uids = [rec.sop_instance_uid for rec, *_ in items]
        if "bad" in uids:
            raise ValueError("a row the database refuses")
        time.sleep(0.005)
        with self.lock:
            self.batches.append(uids)
        return [Recorded(RecordOutcome.STORED, int(uid.rsplit(".", 1)[1])) for uid in uids]


def test_group_commit_shares_transactions_and_every_handler_gets_its_own_outcome() -> None:
    """Concurrent handlers commit together, on their own threads; each gets its row's outcome once it is committed;
    a row that fails is retried alone and fails only its own handler."""
    index = _CountingIndex()
    committer = GroupCommitter(index, max_batch=8)  # type: ignore[arg-type]

    def rec(uid: str) -> InstanceRecord:
        return InstanceRecord(
            uid, "1.2.3.10", "1.2.3", MRImageStorage, ExplicitVRLittleEndian, Path("x"), 1, "a", "A", "MR", {}
        )

    committer.record(rec("1.2.3.1"), now=0.0, quiet_seconds=1.0, reprocess_late=True)
    assert index.batches == [["1.2.3.1"]]  # not started: a plain transaction
    committer.start()
    outcomes: dict[str, Any] = {}
    committed_before: dict[str, bool] = {}

    def handler(i: int) -> None:
        uid = "bad" if i == 13 else f"1.2.3.{i}"
        try:
            res = committer.record(rec(uid), now=0.0, quiet_seconds=1.0, reprocess_late=True)
            with index.lock:
                committed_before[uid] = any(uid in b for b in index.batches)
            outcomes[uid] = res.instance_count
        except ValueError as exc:
            outcomes[uid] = exc

    threads = [threading.Thread(target=handler, args=(i,)) for i in range(100, 160)] + [
        threading.Thread(target=handler, args=(13,))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert {u: v for u, v in outcomes.items() if u != "bad"} == {f"1.2.3.{i}": i for i in range(100, 160)}
    assert isinstance(outcomes["bad"], ValueError)
    assert all(committed_before.values()) and len(committed_before) == 60  # answered only once committed
    stored = [u for b in index.batches[1:] for u in b]
    assert sorted(stored) == sorted(f"1.2.3.{i}" for i in range(100, 160))  # each exactly once
    assert len(index.batches) - 1 < 60  # transactions were shared
    assert max(len(b) for b in index.batches) <= 8
    committer.stop()
    committer.record(rec("1.2.3.2"), now=0.0, quiet_seconds=1.0, reprocess_late=True)
    assert index.batches[-1] == ["1.2.3.2"]
