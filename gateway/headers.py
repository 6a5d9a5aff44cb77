"""Header attributes the index keeps for routing, completion and pipelines.

The index stores, per instance, a small JSON object of header values so
routing and selectors never re-read files. Kept:

* top-level elements with short, text-like or numeric values, by keyword;
* private elements with short values, as eight hex digits (``0019100C``),
  because vendors put clinically relevant values there (b-values, for one);
* values nested in the functional groups of enhanced multi-frame images,
  as lists of distinct values (for example every ``DiffusionBValue``).

Never kept: patient name, patient ID, birth date and other identifying
attributes, so the index can be inspected without exposing them.

On the C-STORE path the header is read by :func:`read_header` (the data set
up to Pixel Data, values left raw) and only the values kept are converted,
each as pydicom converts it; pydicom converting every element was most of
the header's cost per instance.
"""

from __future__ import annotations

import codecs
import re
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom import Dataset, config, dcmread
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRBigEndian, ImplicitVRLittleEndian, PrivateTransferSyntaxes
from pydicom.valuerep import PersonName

__all__ = ["routing_headers", "read_header", "EXCLUDED_KEYWORDS"]

_MAX_VALUE_CHARS = 256
_MAX_DISTINCT = 64
_MAX_NESTED_ITEMS = 5000  # bound the work on huge TILED_SPARSE per-frame sequences
_SKIP_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "UT", "LT", "ST", "UC"}

#: Identifying attributes never copied out of the DICOM files.
EXCLUDED_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "OtherPatientIDs",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "NameOfPhysiciansReadingStudy",
        "RequestingPhysician",
        "IssuerOfPatientID",
        "MilitaryRank",
        "EthnicGroup",
        "PatientComments",
        "AccessionNumber",
        "StudyID",
    }
)

_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def _json_value(elem: DataElement) -> Any:
    v = elem.value
    if v is None or v == "":
        return None
    if isinstance(v, PersonName):
        return None
    if isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, MultiValue):
        vals = [_scalar(x) for x in v]
        if any(x is None for x in vals):
            return None
        return vals if sum(len(str(x)) for x in vals) <= _MAX_VALUE_CHARS else None
    return _scalar(v)


def _scalar(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    try:  # DSfloat / IS are subclasses of float / int; handled above
        s = str(v)
    except Exception:  # pragma: no cover - defensive against odd VR classes
        return None
    return s if len(s) <= _MAX_VALUE_CHARS else None


def _key(elem: DataElement) -> str | None:
    if elem.tag.is_private:
        return f"{elem.tag.group:04X}{elem.tag.element:04X}"
    return elem.keyword or None


def _keyed_value(elem: DataElement) -> tuple[str, Any] | None:
    """(key, JSON value) of an element worth keeping, else None."""
    if elem.tag.group == 0x0002 or elem.tag == 0x7FE00010 or elem.VR in _SKIP_VRS:
        return None
    key = _key(elem)
    if key is None or key in EXCLUDED_KEYWORDS:
        return None
    try:
        value = _json_value(elem)
    except Exception:  # undecodable value: skip it, the file is still stored
        return None
    return None if value is None else (key, value)


def _collect_flat(ds: Dataset, out: dict[str, Any], fast: bool) -> None:
    for tag, elem in _elements(ds):
        kv = _element_kv(ds, tag, elem, fast)
        if kv is not None:
            out[kv[0]] = kv[1]


def _collect_nested(seq: Any, out: dict[str, list[Any]], budget: list[int], fast: bool) -> None:
    for item in seq:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        for tag, elem in _elements(item):
            if _vr(elem) == "SQ":
                _collect_nested(item[tag].value, out, budget, fast)
                continue
            kv = _element_kv(item, tag, elem, fast)
            if kv is None or isinstance(kv[1], list):
                continue
            key, value = kv
            bucket = out.setdefault(key, [])
            if value not in bucket and len(bucket) < _MAX_DISTINCT:
                bucket.append(value)


def routing_headers(ds: Dataset) -> dict[str, Any]:
    """Extract the JSON-safe routing attributes of a header-only dataset.

    Elements still in their raw form (as :func:`read_header` and pydicom's
    readers leave them) are converted here only as far as the index needs,
    with exactly pydicom's result (see :func:`_fast_value`); the rest go
    through pydicom's own conversion.
    """
    out: dict[str, Any] = {}
    fast = _fast_allowed()
    _collect_flat(ds, out, fast)
    nested: dict[str, list[Any]] = {}
    budget = [_MAX_NESTED_ITEMS]
    for kw in _FUNCTIONAL_GROUPS:
        seq = ds.get(kw)
        if seq:
            try:
                _collect_nested(seq, nested, budget, fast)
            except Exception:
                pass
    for key, values in nested.items():
        if key not in out:  # top-level wins; nested values only fill gaps
            out[key] = values[0] if len(values) == 1 else values
    return out


# ------------------------------------------------------------ the header read
#: Where pydicom's ``stop_before_pixels`` stops: Pixel Data, Float and Double Float Pixel Data.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_header(path: Path, transfer_syntax: str, data_set_offset: int) -> Dataset:
    """Read a Part 10 file's data set up to Pixel Data, its elements left unconverted.

    The same data set as ``dcmread(path, stop_before_pixels=True)`` gives,
    without reading the preamble and File Meta Information again (ingest
    has them from :func:`gateway.structure.read_file_meta`: ``transfer_syntax``
    and ``data_set_offset``) and without building a ``FileDataset``. The
    elements stay raw until asked for: :func:`routing_headers` converts only
    what it keeps. For what pydicom's reader treats specially (a deflated
    data set, a private transfer syntax, Command Set elements ahead of the
    data set) this is ``dcmread`` itself.

    Raises
    ------
    Exception
        Whatever pydicom raises on data it cannot read.
    """
    syntax = UID(transfer_syntax)
    if syntax.is_deflated or syntax in PrivateTransferSyntaxes:
        return dcmread(path, stop_before_pixels=True)
    # As dcmread decides the encoding for the syntaxes left (every other one is explicit VR little endian).
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    with open(path, "rb") as fh:
        fh.seek(data_set_offset)
        if fh.read(2) == b"\0\0":  # Command Set group (0000,eeee): dcmread reads it apart
            return dcmread(path, stop_before_pixels=True)
        fh.seek(data_set_offset)
        return read_dataset(fh, implicit, little, stop_when=_at_pixel_data)


# --------------------------------------------------- conversion of raw values
#: The value is one pydicom must convert (the fast path does not cover it).
_CONVERT = object()

#: VRs of the default repertoire that pydicom splits at backslashes after removing trailing spaces and NULs.
_SPLIT_VRS = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
#: Text VRs kept in the index (ST, LT, UT and UC are skipped), decoded in the data set's character set.
_TEXT_VRS = frozenset({"SH", "LO"})
#: struct formats of the binary number VRs (PS3.5 Table 6.2-1), as pydicom's ``convert_numbers`` reads them.
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
#: DS and IS values Python's float() and int() read exactly as pydicom's DSfloat and IS do. Anything
#: else (empty values, underscores, "nan", more than 12 digits of IS, ...) is left to pydicom.
_DS_VALUE = re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_IS_VALUE = re.compile(r" *[+-]?[0-9]{1,12} *")
#: LUT Descriptors, whose first value pydicom corrects when it is negative.
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_ESC = b"\x1b"
_ASCII = bytes(b for b in range(0x80) if b != 0x1B)


def _fast_allowed() -> bool:
    """Whether pydicom's settings convert values as :func:`_fast_value` assumes (its defaults)."""
    return not (
        config.settings.reading_validation_mode == config.RAISE
        or config.datetime_conversion
        or config.use_DS_decimal
        or config.use_DS_numpy
        or config.use_IS_numpy
    )


@lru_cache(maxsize=64)
def _ascii_compatible(encodings: tuple[str, ...]) -> bool:
    """Whether every codec decodes bytes below 0x80 (ESC aside) as ASCII, as pydicom decodes text in them."""
    try:
        return all(_ASCII.decode(codecs.lookup(e).name) == _ASCII.decode("ascii") for e in encodings)
    except (LookupError, UnicodeDecodeError):
        return False


def _text_ascii_ok(ds: Dataset) -> bool:
    """Whether pure ASCII text in ``ds`` decodes to itself in its character set (what pydicom decodes it with)."""
    charset = ds.original_character_set
    if not charset:
        return False
    return _ascii_compatible((charset,) if isinstance(charset, str) else tuple(charset))


@lru_cache(maxsize=4096)
def _tag_key(tag: int) -> str | None:
    """The index key of a tag: eight hex digits for a private tag, else its keyword (None if unknown)."""
    if (tag >> 16) & 1:
        return f"{tag >> 16:04X}{tag & 0xFFFF:04X}"
    return dictionary_keyword(tag) if dictionary_has_tag(tag) else None


@lru_cache(maxsize=4096)
def _implicit_vr(tag: int) -> str | None:
    """The dictionary VR pydicom gives a public element in implicit VR; None where it decides otherwise."""
    if (tag >> 16) & 1:
        return None  # private: looked up with its private creator
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return None
    return None if " or " in vr else vr  # ambiguous: pydicom resolves it from the data set


def _vr(elem: DataElement | RawDataElement) -> str | None:
    if isinstance(elem, RawDataElement) and elem.VR is None:
        return _implicit_vr(int(elem.tag))
    return str(elem.VR)


def _elements(ds: Dataset) -> list[tuple[int, DataElement | RawDataElement]]:
    """The data set's elements in tag order, as stored: raw or converted, none converted by this."""
    return sorted(ds.items(), key=lambda item: int(item[0]))


def _element_kv(ds: Dataset, tag: int, elem: DataElement | RawDataElement, fast: bool) -> tuple[str, Any] | None:
    """(key, JSON value) of an element worth keeping, else None; pydicom converts what the fast path cannot."""
    if not isinstance(elem, RawDataElement) or not fast:
        return _keyed_value(ds[tag])
    tag = int(tag)
    if tag >> 16 == 0x0002 or tag == 0x7FE00010:
        return None  # never kept, whatever its VR: not even converted
    vr = elem.VR
    if vr is None:
        vr = _implicit_vr(tag)
    elif vr == "UN":
        vr = None  # pydicom may replace it with the dictionary's VR
    if vr is None or tag in _LUT_DESCRIPTORS:
        return _keyed_value(ds[tag])
    if vr in _SKIP_VRS:
        return None
    key = _tag_key(tag)
    if key is None or key in EXCLUDED_KEYWORDS or vr == "PN":  # a PersonName is never kept
        return None
    value = elem.value
    if not elem.length or value is None:
        return None  # pydicom's empty value: "" or None, never kept
    text_ok = vr not in _TEXT_VRS or _text_ascii_ok(ds)
    json_value = _fast_value(vr, value, elem.is_little_endian, text_ok)
    if json_value is _CONVERT:
        return _keyed_value(ds[tag])
    return None if json_value is None else (key, json_value)


def _fast_value(vr: str, raw: bytes, little: bool, text_ok: bool) -> Any:
    """The JSON value :func:`_json_value` gives for pydicom's conversion of ``raw``, or :data:`_CONVERT`.

    Mirrors pydicom 3's ``convert_value`` with its default settings
    (:func:`_fast_allowed`) for the VRs that fill the index: strings of the
    default repertoire (``multi_string``; UI values then ``strip()``-ped as
    ``UID`` does; AE components stripped), SH and LO when their bytes are
    ASCII in an ASCII-compatible character set (``convert_text``), DS and
    IS when Python reads them as pydicom does, and binary numbers. The test
    ``tests/test_ingest_core.py::test_routing_headers_fast_path_matches_pydicom``
    compares both on every DICOM file of the test data.
    """
    if vr in _SPLIT_VRS:
        parts = raw.decode(default_encoding).rstrip(" \x00").split("\\")
        if vr == "UI":
            parts = [p.strip() for p in parts]
        return _json_strings(parts)
    if vr in _TEXT_VRS:
        if not text_ok or not raw.isascii() or _ESC in raw:
            return _CONVERT
        return _json_strings([p.rstrip("\x00 ") for p in raw.decode("ascii").split("\\")])
    if vr == "AE":
        return _json_strings([p.strip() for p in raw.decode(default_encoding).split("\\")])
    if vr == "DS" or vr == "IS":
        parts = raw.decode(default_encoding).rstrip(" \x00").split("\\")
        pattern, kind = (_DS_VALUE, float) if vr == "DS" else (_IS_VALUE, int)
        if not all(pattern.fullmatch(p) for p in parts):
            return _CONVERT
        return _json_numbers([kind(p) for p in parts])
    fmt = _NUMBER_FORMATS.get(vr)
    if fmt is None:
        return _CONVERT
    size = struct.calcsize("=" + fmt)
    if len(raw) % size:
        return _CONVERT  # pydicom turns it into UN, with a warning
    values = list(struct.unpack(f"{'<' if little else '>'}{len(raw) // size}{fmt}", raw))
    if len(values) == 1:
        return values[0]
    # pydicom leaves several binary numbers a plain list (not a MultiValue), which
    # _json_value has always kept as its str(): "[256, 0, 0, 134]". Kept so, for
    # the same index rows as before.
    text = str(values)
    return text if len(text) <= _MAX_VALUE_CHARS else None


def _json_strings(parts: Sequence[str]) -> Any:
    """:func:`_json_value` of a string or (several parts) a MultiValue of strings."""
    if len(parts) == 1:
        s = parts[0]
        return None if s == "" or len(s) > _MAX_VALUE_CHARS else s
    if any(len(p) > _MAX_VALUE_CHARS for p in parts) or sum(len(p) for p in parts) > _MAX_VALUE_CHARS:
        return None
    return list(parts)


def _json_numbers(values: list[Any]) -> Any:
    """:func:`_json_value` of a DS or IS number or (several) a MultiValue of them."""
    if len(values) == 1:
        return values[0]
    return values if sum(len(str(v)) for v in values) <= _MAX_VALUE_CHARS else None
