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
"""

from __future__ import annotations

from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

__all__ = ["routing_headers", "EXCLUDED_KEYWORDS"]

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


def _collect_flat(ds: Dataset, out: dict[str, Any]) -> None:
    for elem in ds:
        kv = _keyed_value(elem)
        if kv is not None:
            out[kv[0]] = kv[1]


def _collect_nested(seq: Any, out: dict[str, list[Any]], budget: list[int]) -> None:
    for item in seq:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        for elem in item:
            if elem.VR == "SQ":
                _collect_nested(elem.value, out, budget)
                continue
            kv = _keyed_value(elem)
            if kv is None or isinstance(kv[1], list):
                continue
            key, value = kv
            bucket = out.setdefault(key, [])
            if value not in bucket and len(bucket) < _MAX_DISTINCT:
                bucket.append(value)


def routing_headers(ds: Dataset) -> dict[str, Any]:
    """Extract the JSON-safe routing attributes of a header-only dataset."""
    out: dict[str, Any] = {}
    _collect_flat(ds, out)
    nested: dict[str, list[Any]] = {}
    budget = [_MAX_NESTED_ITEMS]
    for kw in _FUNCTIONAL_GROUPS:
        seq = ds.get(kw)
        if seq:
            try:
                _collect_nested(seq, nested, budget)
            except Exception:
                pass
    for key, values in nested.items():
        if key not in out:  # top-level wins; nested values only fill gaps
            out[key] = values[0] if len(values) == 1 else values
    return out
