"""STOW-RS Store Instances (PS3.18 10.5): parts to temporary files, ingest, the response.

A request's parts are streamed to temporary files under the data dir's
``incoming`` folder while the body arrives (:func:`receive_parts`), never
held in memory. Only once the body is complete and well formed does each
part go through :meth:`gateway.ingest.Ingest.receive`, in a worker thread;
a request that breaks off (too large, stalled, malformed, the client gone)
therefore stores nothing, and its files are removed. The response
(:func:`store_response`) goes back after every part is durable or refused:
the Store Instances Response Module of PS3.18 I.2 in DICOM JSON (PS3.18
F.2), with the HTTP status of PS3.18 10.5.3.1.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import tempfile
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO

import anyio.to_thread
from pydicom.filereader import read_file_meta_info
from starlette.types import Receive

from gateway.index import RecordOutcome
from gateway.ingest import Ingest, Received, RefusalReason, Refused, Source, Stored, Transport
from gateway.metrics import Metrics
from gateway.uids import InvalidUID, checked_uid

from .multipart import MultipartError, MultipartParser, PartData, PartEnd, PartStart

__all__ = [
    "FAILURE_REASON_FOR_REFUSAL",
    "FailureReason",
    "Part",
    "RequestRefused",
    "WarningReason",
    "ingest_parts",
    "receive_parts",
    "store_response",
]

log = logging.getLogger(__name__)

#: Media type of a part: a PS3.10 file (PS3.18 8.7.3.1, Table 10.5.1-1).
DICOM_MEDIA_TYPE = "application/dicom"
#: Media type of the response: the DICOM JSON Model (PS3.18 F.2).
DICOM_JSON = "application/dicom+json"

_WRITE_BYTES = 1 << 20  # content gathered per write to the temporary file


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) of a Store Instances response (PS3.18 I.2.2, Table I.2-2)."""

    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


class WarningReason(IntEnum):
    """Warning Reason (0008,1196) of a stored instance (PS3.18 I.2.1; implementation specific, see conformance)."""

    #: Stored aside: another instance with this SOP Instance UID and other bytes was stored first.
    CONFLICT_KEPT_ASIDE = 0xB001


#: The Failure Reason answered for each ingest refusal (PS3.18 I.2.2). Every
#: :class:`~gateway.ingest.RefusalReason` has one; docs/conformance.md
#: section 6.3 lists them (tests/test_dicomweb.py compares the two).
FAILURE_REASON_FOR_REFUSAL: dict[RefusalReason, FailureReason] = {
    # A7xx tells the client to retry later or elsewhere, as 0xA700 does for C-STORE.
    RefusalReason.INSTANCE_TOO_LARGE: FailureReason.OUT_OF_RESOURCES,
    RefusalReason.OUT_OF_RESOURCES: FailureReason.OUT_OF_RESOURCES,
    RefusalReason.CANNOT_UNDERSTAND: FailureReason.CANNOT_UNDERSTAND,
    RefusalReason.SOP_CLASS_NOT_SUPPORTED: FailureReason.SOP_CLASS_NOT_SUPPORTED,
    RefusalReason.TRANSFER_SYNTAX_NOT_SUPPORTED: FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
    # Over STOW-RS the only declaration is the study of /studies/{study}: an
    # instance of another study does not match the request (PS3.18 10.5.3.1
    # names "Study Instance UID mismatch" a conflict). 0x0110 stays for the
    # gateway's own failures, so a client can tell its fault from ours.
    RefusalReason.DATASET_MISMATCH: FailureReason.DATASET_DOES_NOT_MATCH,
    # STOW-RS declares no SOP class, so ingest never returns this here; mapped
    # for completeness, with the meaning C-STORE gives it (0xA900).
    RefusalReason.SOP_CLASS_MISMATCH: FailureReason.DATASET_DOES_NOT_MATCH,
    RefusalReason.INTERNAL_ERROR: FailureReason.PROCESSING_FAILURE,
}


class RequestRefused(Exception):
    """The request as a whole is refused with an HTTP status; nothing of it was stored.

    ``detail`` is safe to return and log (no patient data).
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class Part:
    """One received part: its temporary file until ingest consumes it, or a failure found while receiving."""

    path: Path | None
    failure: FailureReason | None = None
    size: int = 0
    _fh: BinaryIO | None = field(default=None, repr=False)
    _pending: bytearray = field(default_factory=bytearray, repr=False)

    def discard(self) -> None:
        """Remove the temporary file (a refused request, or a part that failed while receiving)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _new_part(incoming: Path) -> Part:
    fd, name = tempfile.mkstemp(prefix="stow-", suffix=".part", dir=incoming)
    return Part(Path(name), _fh=os.fdopen(fd, "wb"))


async def _flush(part: Part, metrics: Metrics) -> None:
    """Write a part's gathered content in a worker thread; a full disk fails the part, not the request."""
    if part._fh is None or not part._pending:
        return
    data, part._pending = bytes(part._pending), bytearray()
    fh = part._fh
    try:
        await anyio.to_thread.run_sync(fh.write, data)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.warning("STOW-RS part dropped: the data dir is full (FailureReason 0x%04X)", FailureReason.OUT_OF_RESOURCES)
        part.discard()
        part.failure = FailureReason.OUT_OF_RESOURCES
        metrics.instances_received.labels(
            outcome=RefusalReason.OUT_OF_RESOURCES.metric_outcome, transport=Transport.DICOMWEB.value
        ).inc()


async def receive_parts(
    receive: Receive,
    boundary: bytes,
    incoming: Path,
    max_bytes: int,
    timeout: float,
    metrics: Metrics,
) -> list[Part]:
    """Stream a multipart/related body into one temporary file per part.

    Parameters
    ----------
    receive : callable
        The ASGI ``receive`` of the request.
    boundary : bytes
        The request's multipart boundary.
    incoming : pathlib.Path
        Where the temporary files go (the data dir's ``incoming``, so that
        ingest's rename into the store is atomic).
    max_bytes : int
        Longest body accepted (``[dicomweb] max_request_bytes``).
    timeout : float
        Longest wait for the next piece of the body.
    metrics : Metrics
        Counts parts dropped for a full disk.

    Returns
    -------
    list of Part
        Every part, complete, in order.

    Raises
    ------
    RequestRefused
        400 malformed body, 408 stalled, 413 too large, 415 a part that is
        not ``application/dicom``; 400 too when the client went away (nobody
        reads that answer).
        The temporary files are removed before it propagates.
    """
    try:
        parser = MultipartParser(boundary)
    except MultipartError as exc:
        raise RequestRefused(400, f"unusable Content-Type: {exc}") from None
    parts: list[Part] = []
    current: Part | None = None
    total = 0
    try:
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                raise RequestRefused(408, f"no request data for {timeout:g} s") from None
            if message["type"] == "http.disconnect":
                raise RequestRefused(400, "the client closed the connection before the body was complete")
            chunk: bytes = message.get("body", b"")
            total += len(chunk)
            if total > max_bytes:
                raise RequestRefused(413, f"request body exceeds max_request_bytes={max_bytes}")
            try:
                events = parser.feed(chunk)
            except MultipartError as exc:
                raise RequestRefused(400, f"malformed multipart body: {exc}") from None
            for ev in events:
                if isinstance(ev, PartStart):
                    _check_part_type(ev.headers, parser.parts)
                    current = _new_part(incoming)
                    parts.append(current)
                elif isinstance(ev, PartData) and current is not None:
                    if current.failure is None:
                        current._pending += ev.data
                        current.size += len(ev.data)
                        if len(current._pending) >= _WRITE_BYTES:
                            await _flush(current, metrics)
                elif isinstance(ev, PartEnd) and current is not None:
                    await _flush(current, metrics)
                    if current._fh is not None:
                        await anyio.to_thread.run_sync(current._fh.close)
                        current._fh = None
                    current = None
            if not message.get("more_body", False):
                break
        try:
            parser.close()
        except MultipartError as exc:
            raise RequestRefused(400, f"malformed multipart body: {exc}") from None
        if not parts:
            raise RequestRefused(400, "the multipart body holds no part")
        return parts
    except BaseException:
        # Refused, cancelled at shutdown, or a bug: nothing half-written stays behind.
        for p in parts:
            p.discard()
        raise


def _check_part_type(headers: dict[str, str], number: int) -> None:
    """Each part must be a PS3.10 file (PS3.18 10.5.1.2); a part without Content-Type takes the request's type."""
    ctype = headers.get("content-type", DICOM_MEDIA_TYPE).split(";", 1)[0].strip().lower()
    if ctype != DICOM_MEDIA_TYPE:
        raise RequestRefused(415, f"part {number} is {ctype or 'untyped'}; only {DICOM_MEDIA_TYPE} is supported")


@dataclass(frozen=True)
class PartResult:
    """What became of one part, for the response."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    failure: FailureReason | None = None
    warning: WarningReason | None = None


def _file_meta_uids(path: Path) -> tuple[str | None, str | None]:
    """The SOP class and instance a part's File Meta Information names, if they are UIDs (for a failure item)."""
    try:
        meta = read_file_meta_info(path)
    except Exception:  # garbage: nothing to report but the failure
        return None, None
    out: list[str | None] = []
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
        try:
            out.append(checked_uid(meta.get(keyword), keyword))
        except InvalidUID:
            out.append(None)
    return out[0], out[1]


def _ingest_one(ingest: Ingest, part: Part, study: str | None, source: Source) -> PartResult:
    """Ingest one complete part (blocking: runs in a worker thread)."""
    if part.failure is not None or part.path is None:
        return PartResult(None, None, failure=part.failure or FailureReason.PROCESSING_FAILURE)
    path, part.path = part.path, None  # ingest consumes the file
    declared = _file_meta_uids(path)
    result = ingest.receive(Received(path=path, study_instance_uid=study), source)
    if isinstance(result, Refused):
        reason = FAILURE_REASON_FOR_REFUSAL[result.reason]
        if result.reason is RefusalReason.INTERNAL_ERROR:
            log.error("STOW-RS part failed unexpectedly; FailureReason 0x%04X", int(reason))
        else:
            log.warning("STOW-RS part refused with FailureReason 0x%04X: %s", int(reason), result.detail)
        return PartResult(*declared, failure=reason)
    assert isinstance(result, Stored)
    warning = WarningReason.CONFLICT_KEPT_ASIDE if result.outcome == RecordOutcome.CONFLICT else None
    return PartResult(result.sop_class_uid, result.sop_instance_uid, warning=warning)


async def ingest_parts(ingest: Ingest, parts: list[Part], study: str | None, source: Source) -> list[PartResult]:
    """Ingest every part in order, each in a worker thread so the event loop keeps serving.

    A cancellation (service stop) waits for the part being ingested, then
    removes the files of the parts not reached.
    """
    results: list[PartResult] = []
    try:
        for part in parts:
            results.append(await anyio.to_thread.run_sync(_ingest_one, ingest, part, study, source))
    finally:
        for part in parts:
            part.discard()
    return results


def _uid_element(uid: str | None) -> dict[str, Any]:
    # An unknown UID (an unparseable part) is sent empty rather than made up.
    return {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}


def store_response(results: list[PartResult]) -> tuple[int, dict[str, Any]]:
    """The HTTP status (PS3.18 10.5.3.1) and Store Instances Response Module (PS3.18 I.2) in DICOM JSON.

    200 when every part was stored without warning, 202 when some were
    stored and others failed or carry a warning, 409 when none was stored.
    Retrieve URL (0008,1190) is absent: the gateway offers no WADO-RS.
    """
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for r in results:
        item = {"00081150": _uid_element(r.sop_class_uid), "00081155": _uid_element(r.sop_instance_uid)}
        if r.failure is not None:
            item["00081197"] = {"vr": "US", "Value": [int(r.failure)]}
            failed.append(item)
        else:
            if r.warning is not None:
                item["00081196"] = {"vr": "US", "Value": [int(r.warning)]}
            referenced.append(item)
    body: dict[str, Any] = {}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    warned = any(r.warning is not None for r in results)
    if not referenced:
        status = 409
    elif failed or warned:
        status = 202
    else:
        status = 200
    return status, body
