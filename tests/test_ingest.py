"""Receiving: bit-exact storage of varied real files, idempotency, and bad input.

The scanner is DCMTK's storescu/echoscu. Payloads DCMTK refuses to send
(garbage, truncated data sets, path characters in the affected UID) are
sent raw with pynetdicom's chunked sender, which puts the bytes on the wire
without decoding them.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config

from gateway.status import StorageStatus
from tests.conftest import GatewayProcess, free_port, http_get, mr_series, need, storescu, wait_for

pytestmark = pytest.mark.peers

# Several vendors, SOP classes and transfer syntaxes (uncompressed, big endian,
# implicit, deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE).
REAL_FILES = [
    "CT_small.dcm",  # GE CT, explicit LE
    "MR_small.dcm",  # Toshiba MR, explicit LE
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGExtended.dcm",  # GE, JPEG extended
    "JPEG-LL.dcm",  # GE, JPEG lossless
    "image_dfl.dcm",  # deflate
    "emri_small.dcm",  # Enhanced MR multi-frame
    "emri_small_jpeg_2k_lossless.dcm",
    "US1_J2KR.dcm",  # GE ultrasound, JPEG 2000
    "MR2_J2KR.dcm",  # Philips MR, JPEG 2000
    "OBXXXX1A.dcm",  # Philips ultrasound
    "liver.dcm",  # Segmentation
    "rtplan.dcm",  # RT Plan, implicit LE
]

# storescu converts uncompressed data to its preferred syntax unless told to
# propose the file's own, so the wire carries the file's bytes unchanged.
_PROPOSE = {
    "1.2.840.10008.1.2": ["-xi"],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1": ["-xe"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.5": ["-xr"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
}



def _testdata(name: str) -> Path:
    """A file of pydicom's test data by name (pydicom-data is a test dependency)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path)

def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information group (what travels on the wire)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    # (0002,0000) UL group length: tag 4, VR 2, length 2, value 4 bytes.
    meta_len = int.from_bytes(raw[132 + 8 : 132 + 12], "little")
    return raw[132 + 12 + meta_len :]


def stored_path(gw: GatewayProcess, src: Path) -> Path:
    ds = dcmread(src, stop_before_pixels=True)
    return gw.data_dir / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


@pytest.fixture
def reference_scp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp in bit-preserving mode: what the sender put on the wire."""
    port = free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [need("storescp"), "--bit-preserving", "+xa", "-aet", "AIGW", "-od", str(out), "-uf", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _port_open(port), 10, "storescp")
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_real_world_files_are_stored_bit_exact(gateway: GatewayProcess, reference_scp: tuple[int, Path]) -> None:
    ref_port, ref_dir = reference_scp
    for name in REAL_FILES:
        src = _testdata(name)
        ds = dcmread(src, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        extra = ["-R", *_PROPOSE[ts]]
        r = storescu(gateway.port, [src], extra=extra)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        ref = storescu(ref_port, [src], extra=extra)
        assert ref.returncode == 0, f"{name} to storescp: {ref.stderr}"
        # Several test files share a SOPInstanceUID with different encodings:
        # the first is stored, later ones are kept as conflicts. Either way
        # some file on disk must hold exactly what was sent.
        dst = stored_path(gateway, src)
        candidates = [dst, *(gateway.data_dir / "conflicts").glob(f"{ds.SOPInstanceUID}.*.dcm")]
        # storescp names files <modality prefix>.<SOPInstanceUID>
        refs = [p for p in ref_dir.iterdir() if p.name.endswith(f".{ds.SOPInstanceUID}")]
        assert len(refs) == 1, f"{name}: storescp stored {len(refs)} files"
        ref_file = refs[0]
        sent = hashlib.sha256(dataset_bytes(ref_file)).digest()
        matches = [c for c in candidates if c.exists() and hashlib.sha256(dataset_bytes(c)).digest() == sent]
        assert len(matches) == 1, f"{name}: no stored file holds the bytes that were sent"
        assert str(dcmread(matches[0], stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts, name
    m = gateway.metrics()
    stored = m['aigw_instances_received_total{outcome="stored",transport="dimse"}']
    conflicts = m['aigw_instances_received_total{outcome="conflict",transport="dimse"}']
    assert stored + conflicts == len(REAL_FILES) and stored >= 12


def test_same_instance_twice_is_stored_once_and_conflict_kept(tmp_path: Path, gateway: GatewayProcess) -> None:
    (src,) = mr_series(tmp_path / "a", n=1, seed=21)
    assert storescu(gateway.port, [src]).returncode == 0
    assert storescu(gateway.port, [src]).returncode == 0
    # Same SOPInstanceUID, different pixels: a conflict, kept aside, not lost.
    ds = dcmread(src)
    ds.PixelData = bytes(len(ds.PixelData))
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    assert storescu(gateway.port, [other]).returncode == 0
    m = gateway.metrics()
    assert m['aigw_instances_received_total{outcome="stored",transport="dimse"}'] == 1
    assert m['aigw_instances_received_total{outcome="duplicate",transport="dimse"}'] == 1
    assert m['aigw_instances_received_total{outcome="conflict",transport="dimse"}'] == 1
    assert dcmread(stored_path(gateway, src)).PixelData == dcmread(src).PixelData
    conflicts = list((gateway.data_dir / "conflicts").iterdir())
    assert len(conflicts) == 1 and dcmread(conflicts[0]).PixelData == ds.PixelData
    assert "conflict" in gateway.log()


def _send_raw(port: int, path: Path, sop_uid: str = "") -> int:
    """Send a file's data set bytes unparsed; return the C-STORE status (-1 if none)."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="AIGW")
        assert assoc.is_established
        try:
            rsp = assoc.send_c_store(path, originator_aet=None)
            return int(rsp.Status) if rsp and "Status" in rsp else -1
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def _with_payload(tmp_path: Path, name: str, payload: bytes, sop_uid: str) -> Path:
    """A file with valid File Meta (so the raw sender can read the syntax) and ``payload`` as data set."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / name
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta)  # type: ignore[arg-type]
        fh.write(payload)
    return path


def _echo_ok(gw: GatewayProcess, aet: str = "SCANNER") -> bool:
    r = subprocess.run([need("echoscu"), "-aet", aet, "-aec", "AIGW", "127.0.0.1", str(gw.port)], capture_output=True)
    return r.returncode == 0


def test_bad_data_sets_get_failure_status_and_listener_survives(tmp_path: Path, gateway: GatewayProcess) -> None:
    (good,) = mr_series(tmp_path / "good", n=1, seed=31)
    payload = dataset_bytes(good)
    sop = str(dcmread(good, stop_before_pixels=True).SOPInstanceUID)

    garbage = _with_payload(tmp_path, "garbage.dcm", b"\xff\x13garbage, not DICOM" * 50, sop)
    assert _send_raw(gateway.port, garbage, sop) == StorageStatus.CANNOT_DECODE

    truncated_pixels = _with_payload(tmp_path, "trunc1.dcm", payload[:-500], sop)
    assert _send_raw(gateway.port, truncated_pixels, sop) == StorageStatus.CANNOT_DECODE

    truncated_header = _with_payload(tmp_path, "trunc2.dcm", payload[:300], sop)
    assert _send_raw(gateway.port, truncated_header, sop) == StorageStatus.CANNOT_DECODE

    # Path characters in UIDs never reach the file system.
    ds = dcmread(good)
    ds.SeriesInstanceUID = "1.2.3/../../../../tmp/evil"
    evil = tmp_path / "evil.dcm"
    ds.save_as(evil)
    assert _send_raw(gateway.port, evil, sop) == StorageStatus.CANNOT_DECODE
    assert not any(p.name == "evil" for p in tmp_path.parent.rglob("evil"))

    assert _echo_ok(gateway)
    assert storescu(gateway.port, [good]).returncode == 0
    assert stored_path(gateway, good).exists()
    m = gateway.metrics()
    assert m['aigw_instances_received_total{outcome="invalid",transport="dimse"}'] == 4
    assert m['aigw_instances_received_total{outcome="stored",transport="dimse"}'] == 1
    assert list((gateway.data_dir / "incoming").iterdir()) == []


def test_unknown_calling_ae_is_rejected(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(gateway={"allow_ae": ["SCANNER"]})
    r = subprocess.run(
        [need("echoscu"), "-aet", "INTRUDER", "-aec", "AIGW", "127.0.0.1", str(gw.port)], capture_output=True, text=True
    )
    assert r.returncode != 0
    assert "calling ae title not recognized" in (r.stdout + r.stderr).lower(), r.stderr
    assert _echo_ok(gw, "SCANNER")
    assert gw.metrics()['aigw_associations_rejected_total{reason="calling_ae_not_recognised"}'] == 1


def test_oversize_instance_refused_out_of_resources(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = make_gateway(gateway={"max_instance_bytes": 20_000})
    big = _testdata("CT_small.dcm")  # 39 kB
    assert _send_raw(gw.port, big) == StorageStatus.OUT_OF_RESOURCES
    (small,) = mr_series(tmp_path / "s", n=1, seed=41)
    assert storescu(gw.port, [small]).returncode == 0
    m = gw.metrics()
    assert m['aigw_instances_received_total{outcome="refused_size",transport="dimse"}'] == 1
    assert m['aigw_instances_received_total{outcome="stored",transport="dimse"}'] == 1


def test_full_disk_watermark_refuses_with_a700(tmp_path: Path, make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(gateway={"min_free_bytes": 10**18})
    (src,) = mr_series(tmp_path / "s", n=1, seed=51)
    assert _send_raw(gw.port, src) == StorageStatus.OUT_OF_RESOURCES
    assert not stored_path(gw, src).exists()
    assert _echo_ok(gw)
    assert gw.metrics()['aigw_instances_received_total{outcome="refused_space",transport="dimse"}'] == 1
    code, body = http_get(f"http://127.0.0.1:{gw.metrics_port}/readyz")
    assert code == 503 and b'"free_space_above_watermark": false' in body
    assert gw.metrics()["aigw_refusing_for_space"] == 1


def test_too_many_associations_rejected_transient(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(gateway={"max_associations": 1})
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", gw.port, ae_title="AIGW")
    assert first.is_established
    try:
        second = ae.associate("127.0.0.1", gw.port, ae_title="AIGW")
        assert second.is_rejected and second.acceptor.primitive is not None
        assert second.acceptor.primitive.result == 0x02  # rejected-transient
    finally:
        first.release()
    wait_for(lambda: _echo_ok(gw), 10, "a free association slot")


def test_source_address_allow_list(make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway(gateway={"allow_hosts": ["192.0.2.0/24"]})  # loopback not in it
    assert not _echo_ok(gw)
    assert gw.metrics()['aigw_associations_rejected_total{reason="address_not_allowed"}'] == 1
    gw2 = make_gateway(gateway={"allow_hosts": ["127.0.0.0/8"]})
    assert _echo_ok(gw2)


def test_malformed_data_sets_are_refused_over_dimse_and_stored_data_is_untouched(
    tmp_path: Path, gateway: GatewayProcess
) -> None:
    """Issue 16's loopback attack: every case that would not read back gets a failure status, never 0x0000."""
    from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

    from tests.test_structure import Enc, encode, image, nested, part10

    (good,) = mr_series(tmp_path / "good", n=1, seed=61)
    assert storescu(gateway.port, [good]).returncode == 0
    kept = stored_path(gateway, good)
    before = hashlib.sha256(kept.read_bytes()).hexdigest()

    cases: dict[str, Path] = {}
    for ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        wire = ExplicitVRLittleEndian if ts == DeflatedExplicitVRLittleEndian else ts
        e, folder = Enc(wire), tmp_path / ts
        folder.mkdir()
        body = encode(image(), wire)
        past_end = body + e.elem(0x7FE11010, "OB", b"\0" * 16, length=0x7FFFFFF0)
        cases[f"{ts} past the end"] = part10(folder, past_end, ts, "a.dcm")
        cases[f"{ts} short pixels"] = part10(folder, encode(image(pixels=b"\0" * 100), wire), ts, "b.dcm")
        cases[f"{ts} 1000 deep"] = part10(folder, nested(e, 1000), ts, "c.dcm")
        cases[f"{ts} 20000 deep"] = part10(folder, nested(e, 20000), ts, "d.dcm")
    wrong_vr = tmp_path / "wrong-vr"
    wrong_vr.mkdir()
    implicit_bytes = encode(image(), ImplicitVRLittleEndian)
    cases["implicit bytes as explicit"] = part10(wrong_vr, implicit_bytes, ExplicitVRLittleEndian)

    for name, path in cases.items():
        status = _send_raw(gateway.port, path)
        assert status == StorageStatus.CANNOT_DECODE, f"{name}: 0x{status:04X}"
        assert _echo_ok(gateway), name

    # An MR data set in a C-STORE for the CT Image Storage SOP class (PS3.4 B.2.3).
    ct_request = part10(tmp_path, dataset_bytes(good), ExplicitVRLittleEndian, "mr-as-ct.dcm", sop_class=CTImageStorage)
    assert _send_raw(gateway.port, ct_request) == StorageStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS

    assert hashlib.sha256(kept.read_bytes()).hexdigest() == before
    m = gateway.metrics()
    assert m['aigw_instances_received_total{outcome="invalid",transport="dimse"}'] == len(cases) + 1
    assert m['aigw_instances_received_total{outcome="stored",transport="dimse"}'] == 1
    assert list((gateway.data_dir / "incoming").iterdir()) == []
