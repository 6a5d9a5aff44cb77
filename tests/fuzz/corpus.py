"""Seed corpus of the fuzzers and the replay test: valid and malformed data sets and A-ASSOCIATE-RQs.

Generated in code, deterministically, from the builders of the tests that
crafted each case of issue 16 by hand (:mod:`tests.test_structure`,
:mod:`tests.test_listener_hardening`), plus a few small real files of
pydicom's test data (pydicom-data is a test dependency).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tests.test_listener_hardening import MALFORMED, associate_rq, context, item
from tests.test_structure import Enc, encode, image, nested, part10

#: Small real files in several encodings (explicit, big endian, implicit, deflate, JPEG, RLE, RT).
REAL_FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "image_dfl.dcm",
    "rtplan.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "MR_small_RLE.dcm",
)
#: The wire encoding of each transfer syntax's crafted payload (a deflated one is explicit LE, then deflated).
SYNTAXES = {
    ImplicitVRLittleEndian: ImplicitVRLittleEndian,
    ExplicitVRLittleEndian: ExplicitVRLittleEndian,
    ExplicitVRBigEndian: ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian: ExplicitVRLittleEndian,
}


def _files(build: Mapping[str, tuple[bytes, str, str]]) -> dict[str, bytes]:
    """Part 10 bytes of each ``name: (payload, transfer syntax, SOP class)`` through :func:`part10`."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (payload, ts, sop_class)) in enumerate(build.items()):
            out[name] = part10(Path(tmp), payload, ts, f"{i}.dcm", sop_class=sop_class).read_bytes()
    return out


def valid_datasets() -> dict[str, bytes]:
    """Part 10 files the structure walk must pass: crafted in every encoding, and real ones."""
    out: dict[str, bytes] = {}
    for name in REAL_FILES:
        path = get_testdata_file(name)
        assert isinstance(path, str), name
        out[f"real {name}"] = Path(path).read_bytes()
    build = {}
    for ts, wire in SYNTAXES.items():
        e = Enc(wire)
        inner = e.elem(0x00080100, "SH", b"CODE01")
        seqs = e.elem(0x00081032, "SQ", length=0xFFFFFFFF) + e.item() + inner + e.item_end() + e.seq_end()
        uid = e.elem(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.4\0")
        build[f"{ts} image"] = (encode(image(), wire), ts, image().SOPClassUID)
        build[f"{ts} sequences"] = (uid + seqs, ts, image().SOPClassUID)
        build[f"{ts} nested 8"] = (nested(e, 8), ts, image().SOPClassUID)
    return {**out, **_files(build)}


def malformed_datasets(depths: tuple[int, ...] = (1000, 20000)) -> dict[str, bytes]:
    """Part 10 files of issue 16 that must be refused, in every transfer syntax.

    An element declaring 0x7FFFFFF0 bytes, short native pixel data (big
    endian and deflate included), sequences nested ``depths`` deep, the
    wrong VR encoding for the transfer syntax, a truncated deflate stream.
    The SOP-class and UID cases need a DIMSE peer (see
    :mod:`tests.test_replay_corpus`): their structure is valid.
    """
    mr = image().SOPClassUID
    build: dict[str, tuple[bytes, str, str]] = {}
    for ts, wire in SYNTAXES.items():
        e = Enc(wire)
        body = encode(image(), wire)
        build[f"{ts} 0x7FFFFFF0 past the end"] = (
            body + e.elem(0x7FE11010, "OB", b"\0" * 16, length=0x7FFFFFF0),
            ts,
            mr,
        )
        build[f"{ts} short pixel data"] = (encode(image(pixels=b"\0" * 100), wire), ts, mr)
        build[f"{ts} cut pixel data"] = (body[:-40], ts, mr)
        for depth in depths:
            build[f"{ts} nested {depth} deep"] = (nested(e, depth), ts, mr)
    implicit = encode(image(), ImplicitVRLittleEndian)
    big = encode(image(), ExplicitVRBigEndian)
    build["implicit bytes as explicit"] = (implicit, ExplicitVRLittleEndian, mr)
    build["big endian bytes as little"] = (big, ExplicitVRLittleEndian, mr)
    build["implicit bytes as deflated"] = (implicit, DeflatedExplicitVRLittleEndian, mr)
    out = _files(build)
    deflated = _files({"x": (encode(image(), ExplicitVRLittleEndian), DeflatedExplicitVRLittleEndian, mr)})["x"]
    out["truncated deflate stream"] = deflated[:-20]
    out["no DICM prefix"] = encode(image(), ExplicitVRLittleEndian)
    return out


def mr_as_ct(payload: bytes) -> bytes:
    """An MR data set under File Meta (and so a C-STORE) for the CT Image Storage SOP class."""
    return _files({"x": (payload, ExplicitVRLittleEndian, CTImageStorage)})["x"]


def associate_requests() -> dict[str, bytes]:
    """A-ASSOCIATE-RQ PDUs: valid ones (several contexts, protocol version 2) and those of issue 16."""
    out = {
        "valid": associate_rq(),
        "three contexts": associate_rq(
            [context(1), context(3, syntaxes=("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")), context(255)]
        ),
        "protocol version 2": associate_rq(version=2),
        "cut in the fixed fields": associate_rq()[:40],
        "repeated context id": associate_rq([context(1), context(1)]),
        "two abstract syntaxes": associate_rq(
            [item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2") * 2 + item(0x40, b"1.2.840.10008.1.2"))]
        ),
    }
    out.update({name: pdu for name, (pdu, _) in MALFORMED.items()})
    # A 4 GB request declares it; a real one must carry its whole body (the front door reads that many).
    out["4 GB request"] = struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + bytes(68)
    return out
