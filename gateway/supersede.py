"""A rerun's result replaces the earlier one: said in the description, by reference, and optionally by IOCM.

More instances of a series can arrive after its result went out (a scanner
resends after an interrupted transfer). The rerun's result then goes to PACS
beside the first one, and a reader who finds both must be able to tell which
counts, in the viewer and by machine:

* the Series Description ends with ``(supersedes vN)``: what every series list
  shows;
* each image result names the series it replaces in its Related Series
  Sequence (0008,1250), General Series module (PS3.3 C.7.3.1). CID 7210 has no
  "replaces" purpose, and Purpose of Reference is type 2, so it stays empty and
  the description says why the series is related;
* each SR result lists the earlier SR documents in its Predecessor Documents
  Sequence (0040,A360), SR Document General module (PS3.3 C.17.2), which is
  meant for documents a new one replaces;
* optionally (``[jobs] iocm_rejection_notes``, off by default because not every
  PACS acts on it), a Key Object Selection document titled (113001, DCM,
  "Rejected for Quality Reasons"), the IHE IOCM rejection note: a PACS that
  supports IOCM hides the superseded instances.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import KeyObjectSelectionDocumentStorage

from gateway.contract import Identity
from gateway.index import OutputRow

__all__ = ["mark_superseding", "rejection_note", "superseded"]

log = logging.getLogger(__name__)

#: The IHE IOCM title of a rejection note (CID 7010 Key Object Selection Document Title).
REJECTED_FOR_QUALITY = codes.DCM.RejectedForQualityReasons


def superseded(earlier: Sequence[OutputRow]) -> list[OutputRow]:
    """The results a rerun replaces: the earlier job's outputs less its own rejection note."""
    return [o for o in earlier if o.sop_class_uid != KeyObjectSelectionDocumentStorage]


def mark_superseding(outputs: Sequence[Dataset], version: int, earlier: Sequence[OutputRow]) -> None:
    """Say in each output's description, and by reference, that it replaces the result of ``version``.

    The description is cut to its 64-character limit (PS3.5 LO) from the left
    part, so the note stays.
    """
    note = f" (supersedes v{version})"
    series = sorted({(o.study_uid, o.series_uid) for o in earlier})
    documents = [o for o in earlier if _is_sr(o.sop_class_uid)]
    for ds in outputs:
        desc = str(ds.get("SeriesDescription", "") or "")
        ds.SeriesDescription = desc[: 64 - len(note)] + note
        if _is_sr(str(ds.SOPClassUID)):
            if documents:
                ds.PredecessorDocumentsSequence = _hierarchy(documents)
        elif series:
            ds.RelatedSeriesSequence = [_related(study, uid) for study, uid in series]


def rejection_note(
    earlier: Sequence[OutputRow], identity: Identity, uid: str, series_uid: str
) -> Dataset | None:
    """An IOCM rejection note for ``earlier``, or None when none of their files can be read.

    Parameters
    ----------
    earlier : sequence of OutputRow
        The superseded instances (one study).
    identity : Identity
        Who makes the note (Equipment module).
    uid, series_uid : str
        SOP Instance and Series Instance UID of the note, derived from the
        job so that a rerun of the job makes the same note.
    """
    evidence = []
    for o in earlier:
        try:
            evidence.append(dcmread(Path(o.path), stop_before_pixels=True))
        except (OSError, ValueError) as exc:  # removed by an operator, or damaged: reject the rest
            log.warning("superseded result %s cannot be read (%s); the note leaves it out", Path(o.path).name, exc)
    if not evidence:
        return None
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY,
        referenced_objects=evidence,
        description="Superseded by a result computed on more instances of the same series",
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_uid,
        series_number=_series_number(evidence[0]),
        sop_instance_uid=uid,
        instance_number=1,
        manufacturer=identity.manufacturer,
        institution_name=identity.institution_name,
    )
    # TID 2010 forbids a purpose of reference on the references of a rejection
    # note (the title says it); highdicom names them "Source" for every title.
    for item in note.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE", "WAVEFORM"):
            del item.ConceptNameCodeSequence
    note.SeriesDescription = "Rejection note (IOCM)"
    return note


def _is_sr(sop_class_uid: str) -> bool:
    # Structured reporting storage classes (PS3.4 B.5) share this root; the KOS is one of them.
    return sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88.")


def _related(study_uid: str, series_uid: str) -> Dataset:
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.SeriesInstanceUID = series_uid
    item.PurposeOfReferenceCodeSequence = []
    return item


def _hierarchy(documents: Sequence[OutputRow]) -> list[Dataset]:
    """Study > Series > SOP references (the SOP Instance Reference Macro's hierarchy, PS3.3 C.17.2.1)."""
    studies: dict[str, dict[str, list[OutputRow]]] = {}
    for o in documents:
        studies.setdefault(o.study_uid, {}).setdefault(o.series_uid, []).append(o)
    out = []
    for study_uid, by_series in sorted(studies.items()):
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, rows in sorted(by_series.items()):
            series = Dataset()
            series.SeriesInstanceUID = series_uid
            series.ReferencedSOPSequence = []
            for o in rows:
                ref = Dataset()
                ref.ReferencedSOPClassUID = o.sop_class_uid
                ref.ReferencedSOPInstanceUID = o.sop_instance_uid
                series.ReferencedSOPSequence.append(ref)
            study.ReferencedSeriesSequence.append(series)
        out.append(study)
    return out


def _series_number(ds: Dataset) -> int:
    # Next to the result it rejects in a viewer's series list.
    try:
        return max(1, int(str(ds.get("SeriesNumber", 1))))
    except ValueError:
        return 1
