"""Ingest: one received instance in, durable and indexed or refused with a reason.

This module owns "acknowledged means durable" for every transport. A
transport (the DIMSE Storage SCP in :mod:`gateway.scp`, a DICOMweb STOW-RS
endpoint) writes what it received to a temporary file under
``<data_dir>/incoming`` and hands it to :meth:`Ingest.receive` with what it
declared (for C-STORE the Affected SOP Class/Instance UID and the
presentation context's transfer syntax). Ingest then

1. checks resources: the instance size limit and the free-space watermark
   (a streaming transport asks :meth:`Ingest.admit` while the bytes arrive,
   so the disk never fills, and hands in its refusal as ``Received.refused``);
2. checks what was declared and what the file holds: valid UIDs (PS3.5 9.1),
   a storage SOP class and a transfer syntax the gateway understands, an
   element structure that reads back in that transfer syntax
   (:mod:`gateway.structure`: lengths, delimiters, VRs, nesting, whole Pixel
   Data), a header that parses, declared and actual UIDs that agree, and a
   data set of the SOP class the request declared (PS3.4 B.2.3);
3. hashes the file, fsyncs it and renames it into the store, records it in
   the index (through :class:`~gateway.index.GroupCommitter`) and applies
   the completion hints;

and only then returns :class:`Stored`, so a transport that answers success
for it keeps PS3.4 B.2.3's promise: the instance is stored. Anything else is
a typed :class:`Refused` whose :class:`RefusalReason` each transport maps to
its own status (DIMSE: :data:`gateway.scp.STATUS_FOR_REFUSAL`). The file is
never transcoded (stored means bit-exact), and the temporary file never
outlives the call.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeAlias

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import _STORAGE_CLASSES  # type: ignore[attr-defined]

from gateway.completion import count_hint, is_slide, slide_pyramid_complete
from gateway.config import GatewaySettings
from gateway.headers import read_header, routing_headers
from gateway.index import GroupCommitter, Index, InstanceRecord, Recorded, RecordOutcome
from gateway.metrics import Metrics
from gateway.storage import DataDir, install_file, sha256_file
from gateway.structure import FileMeta, MalformedDataSet, check_structure, read_file_meta
from gateway.uids import InvalidUID, checked_uid

__all__ = [
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "Ingest",
    "IngestResult",
    "Received",
    "RefusalReason",
    "Refused",
    "Source",
    "Stored",
    "Transport",
]

log = logging.getLogger(__name__)

#: Storage SOP classes the gateway accepts (the SCP negotiates exactly these; PS3.4 B.5).
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(str(uid) for uid in _STORAGE_CLASSES.values())
#: Transfer syntaxes whose header the gateway can parse, in pynetdicom's preference order (PS3.5 10).
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES)

_STORAGE_SOP_CLASSES = frozenset(STORAGE_SOP_CLASSES)
_TRANSFER_SYNTAXES = frozenset(TRANSFER_SYNTAXES)


class Transport(str, Enum):
    """How an instance arrived; a bounded set, so safe in logs and labels."""

    DIMSE = "dimse"  # C-STORE (PS3.7 9.1.1)
    DICOMWEB = "dicomweb"  # STOW-RS (PS3.18 10.5)


@dataclass(frozen=True)
class Source:
    """Who sent an instance.

    Attributes
    ----------
    transport : Transport
        The transport that received it.
    calling : str
        The sender's name: the calling AE title for DIMSE, the configured
        source name for HTTP. It is stored with the instance and picks the
        routes' quiet period, so it must be a configured value, never free
        text from the request body.
    address : str
        The peer's network address, for logs.
    """

    transport: Transport
    calling: str
    address: str = ""


@dataclass(frozen=True)
class Received:
    """A received file and what the transport declared about it.

    Attributes
    ----------
    path : pathlib.Path
        A Part 10 file (preamble, File Meta Information, data set) under
        the data dir's ``incoming`` folder, as pynetdicom's chunked dataset
        path writes it. :meth:`Ingest.receive` consumes it: afterwards it
        has been renamed into the store or removed.
    sop_class_uid, sop_instance_uid : str or None
        Declared by the transport (C-STORE's Affected SOP Class/Instance UID,
        PS3.7 9.1.1.1); ``None`` if it declares none, and then the data
        set's own values are used.
    transfer_syntax : str or None
        The transfer syntax the transport negotiated or was told; ``None``
        to take the File Meta Information's.
    study_instance_uid : str or None
        A study the instance must belong to (STOW-RS ``/studies/{study}``).
    refused : Refused or None
        A refusal the transport already made while the data streamed in
        (from :meth:`Ingest.admit`: too large, out of space); ``path`` may
        then be partial or absent. :meth:`Ingest.receive` returns it as it
        is, removes what is left of the file and counts it like any other.
    sha256 : str or None
        The file's SHA-256 (hex), if the transport computed it while the bytes
        arrived; else ingest reads the file once more to compute it.
    """

    path: Path
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    transfer_syntax: str | None = None
    study_instance_uid: str | None = None
    refused: Refused | None = None
    sha256: str | None = None


class RefusalReason(str, Enum):
    """Why an instance was not stored, in transport-neutral terms.

    Each transport maps every member to its own answer; for DIMSE see
    :data:`gateway.scp.STATUS_FOR_REFUSAL` (PS3.4 B.2.3), for STOW-RS the
    Failure Reason and HTTP status of PS3.18 10.5.3.
    """

    #: The instance is larger than ``[gateway] max_instance_bytes``; it may fit on another node.
    INSTANCE_TOO_LARGE = "instance_too_large"
    #: Free space in the data dir is under ``[gateway] min_free_bytes``; worth retrying later.
    OUT_OF_RESOURCES = "out_of_resources"
    #: The data set cannot be understood: unparseable or truncated, or a UID that is not a UID.
    CANNOT_UNDERSTAND = "cannot_understand"
    #: The SOP class is not a storage SOP class the gateway accepts.
    SOP_CLASS_NOT_SUPPORTED = "sop_class_not_supported"
    #: The transfer syntax is not one the gateway can parse.
    TRANSFER_SYNTAX_NOT_SUPPORTED = "transfer_syntax_not_supported"
    #: What the transport declared (instance, study, transfer syntax) differs from the data set.
    DATASET_MISMATCH = "dataset_mismatch"
    #: The data set's SOP Class UID differs from the one the transport declared (PS3.4 B.2.3).
    SOP_CLASS_MISMATCH = "sop_class_mismatch"
    #: A failure of the gateway itself (an I/O error, a bug); logged with a stack trace.
    INTERNAL_ERROR = "internal_error"

    @property
    def metric_outcome(self) -> str:
        """The ``outcome`` label of ``aigw_instances_received_total`` (:data:`gateway.metrics.STORE_OUTCOMES`)."""
        return _METRIC_OUTCOME[self]


_METRIC_OUTCOME: dict[RefusalReason, str] = {
    RefusalReason.INSTANCE_TOO_LARGE: "refused_size",
    RefusalReason.OUT_OF_RESOURCES: "refused_space",
    RefusalReason.CANNOT_UNDERSTAND: "invalid",
    RefusalReason.SOP_CLASS_NOT_SUPPORTED: "invalid",
    RefusalReason.TRANSFER_SYNTAX_NOT_SUPPORTED: "invalid",
    RefusalReason.DATASET_MISMATCH: "invalid",
    RefusalReason.SOP_CLASS_MISMATCH: "invalid",
    RefusalReason.INTERNAL_ERROR: "error",
}


@dataclass(frozen=True)
class Stored:
    """The instance is durable and indexed; the transport may answer success.

    ``outcome`` says how: newly stored, a duplicate (same UID and bytes as a
    stored instance: kept once) or a conflict (same UID, other bytes: kept
    aside under ``conflicts/``, never lost). All three are successes.
    """

    outcome: RecordOutcome
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Refused:
    """The instance was not stored; ``detail`` says why without patient data (safe to log and return)."""

    reason: RefusalReason
    detail: str

    def __str__(self) -> str:
        return self.detail


#: What :meth:`Ingest.receive` returns; tell the two apart with ``isinstance``.
IngestResult: TypeAlias = Stored | Refused


class _Refusal(Exception):
    """Internal: unwinds a check to :meth:`Ingest.receive`, which returns it as :class:`Refused`."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(detail)
        self.refused = Refused(reason, detail)


class _UidLocks:
    """Striped locks so two senders storing the same SOP Instance UID serialise, in any listener process.

    Between the index lookup and the index row, a second store of the UID must
    wait: else its rename could replace the first one's file with other bytes.
    A thread lock orders this process's threads and an ``flock`` on the
    stripe's file in ``<data_dir>/locks`` the listener processes
    (:mod:`gateway.listeners`); both are released when the holder ends, a
    killed process included.
    """

    def __init__(self, folder: Path, stripes: int = 64) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(stripes)]
        self._files = [str(folder / f"uid-{i:02d}.lock") for i in range(stripes)]
        self._fds: list[int | None] = [None] * stripes

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        i = int(hashlib.blake2s(key.encode(), digest_size=2).hexdigest(), 16) % len(self._locks)
        with self._locks[i]:
            fd = self._fds[i]
            if fd is None:
                fd = self._fds[i] = os.open(self._files[i], os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


def _uid(value: object, what: str) -> str:
    """``checked_uid`` whose failure is a CANNOT_UNDERSTAND refusal (the message names ``what``, not the value)."""
    try:
        return checked_uid(value, what)
    except InvalidUID as exc:
        raise _Refusal(RefusalReason.CANNOT_UNDERSTAND, str(exc)) from None


def _raw(ds: Dataset, keyword: str) -> object:
    """The value of ``keyword`` as stored, before pydicom's conversion strips surrounding whitespace.

    A UID is checked on the bytes that are stored and will be sent on: pydicom's
    UID type drops a trailing newline, so the index would hold "1.2.3" while the
    file holds "1.2.3\n", an invalid UID that other systems would refuse.
    """
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    value = elem.value
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _read_header(path: Path, meta: FileMeta) -> Dataset:
    """Parse the header up to Pixel Data, values left raw (its structure is checked: :mod:`gateway.structure`)."""
    try:
        return read_header(path, meta.transfer_syntax, meta.data_set_offset)
    except Exception as exc:  # pydicom raises a variety of errors on garbage
        raise _Refusal(
            RefusalReason.CANNOT_UNDERSTAND, f"data set cannot be decoded ({type(exc).__name__})"
        ) from None


class _FreeSpace:
    """Free bytes in the data dir for admission: measured, or estimated between two measurements.

    Admission asks before every 16 kB fragment; a ``statvfs`` each time was
    5-9 % of the listener's CPU. Between measurements the estimate is the last
    one less every byte admitted since, by any association, so it never
    overstates what this process wrote. It is measured again when the
    estimated headroom above the watermark falls under half of the last
    measured headroom (so checks come closer together near the watermark, and
    writing still stops there), and at least every :data:`RECHECK_SECONDS`,
    for what other programs write to the same disk.
    """

    RECHECK_SECONDS = 0.5

    def __init__(self, measure: Callable[[], int], watermark: int) -> None:
        self._measure = measure
        self._watermark = watermark
        self._lock = threading.Lock()
        self._at: float | None = None
        self._measured = 0
        self._since = 0

    def free(self, incoming: int) -> int:
        """Free bytes before ``incoming`` more are written (which are then counted as admitted)."""
        with self._lock:
            now = time.monotonic()
            estimate = self._measured - self._since
            half_headroom = (self._measured - self._watermark) / 2
            stale = self._at is None or now - self._at > self.RECHECK_SECONDS
            if stale or estimate - incoming - self._watermark < half_headroom:
                self._measured, self._since, self._at = self._measure(), 0, now
                estimate = self._measured
            self._since += incoming
            return estimate


class Ingest:
    """Check, store durably and index received instances, for every transport.

    Parameters
    ----------
    settings : GatewaySettings
        ``max_instance_bytes`` and ``min_free_bytes`` are read from here.
    data : DataDir
        Where instances are stored; received files must lie in its
        ``incoming`` folder (same filesystem, so the rename is atomic).
    index : Index
        Looked up for duplicates and conflicts, and for completion hints.
    metrics : Metrics
        Every call counts once in ``aigw_instances_received_total{outcome, transport}``.
    quiet_seconds : callable
        ``(headers, calling) -> seconds``: the quiet period that completes
        the series (from the routes that could match it).
    hint_quiet_seconds : float
        How soon a series completes once a count or pyramid hint says it
        is whole.
    reprocess_late : bool
        Whether an instance arriving after its series completed opens a new
        version of it (``[completion] late_instances = "reprocess"``).
    committer : GroupCommitter, optional
        The index writer; by default one of our own, started by
        :meth:`start`. Unstarted, it records in plain transactions.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        data: DataDir,
        index: Index,
        metrics: Metrics,
        quiet_seconds: Callable[[dict[str, Any], str], float],
        hint_quiet_seconds: float,
        reprocess_late: bool,
        committer: GroupCommitter | None = None,
    ) -> None:
        self.settings = settings
        self.data = data
        self.index = index
        self.metrics = metrics
        self._quiet_seconds = quiet_seconds
        self._hint_quiet = hint_quiet_seconds
        self._reprocess_late = reprocess_late
        self._writer = committer if committer is not None else GroupCommitter(index)
        self._started = False
        self._locks = _UidLocks(data.root / "locks")
        self._space = _FreeSpace(self._free_bytes, settings.min_free_bytes)

    def start(self) -> None:
        """Start the shared index writer (group commit across concurrent receives); idempotent."""
        if not self._started:
            self._writer.start()
            self._started = True

    def stop(self) -> None:
        """Stop the index writer once no transport is receiving any more; idempotent.

        Until the next :meth:`start`, instances are still recorded, each in a
        plain transaction of its own.
        """
        if not self._started:
            return
        self._writer.stop()
        self._started = False

    def receive(self, received: Received, source: Source) -> IngestResult:
        """Store one received instance durably and index it, or refuse it.

        Parameters
        ----------
        received : Received
            The temporary file and what the transport declared. The file is
            consumed: when this returns it is in the store or removed.
        source : Source
            Who sent it; ``source.calling`` is recorded with the instance.

        Returns
        -------
        Stored or Refused
            :class:`Stored` only after the file is fsynced, renamed into the
            store and its index row committed (PS3.4 B.2.3: success means
            stored). :class:`Refused` otherwise, with a reason and a detail
            free of patient data.

        Notes
        -----
        This never raises: a failure nobody foresaw is logged with its
        stack trace and returned as ``RefusalReason.INTERNAL_ERROR``, so one
        bad instance cannot end a transport's connection (PS3.7 C.4.2).
        Every call is counted in ``aigw_instances_received_total``; the
        transport logs refusals with the status it answers.
        """
        path = received.path
        try:
            result: IngestResult = self._receive(received, source)
        except _Refusal as exc:
            result = exc.refused
        except Exception as exc:
            log.exception(
                "ingest of an instance over %s from %s failed unexpectedly",
                source.transport.value,
                source.calling or source.address,
            )
            result = Refused(RefusalReason.INTERNAL_ERROR, f"unexpected failure in the gateway ({type(exc).__name__})")
        finally:
            # Refused, a duplicate, or a failure half-way: nothing may linger in incoming/.
            try:
                path.unlink(missing_ok=True)
            except OSError:
                log.exception("could not remove a received temporary file")
        outcome = result.outcome.value if isinstance(result, Stored) else result.reason.metric_outcome
        self.metrics.instances_received.labels(outcome=outcome, transport=source.transport.value).inc()
        return result

    # --------------------------------------------------------------- admission
    def admit(self, written: int, incoming: int = 0) -> Refused | None:
        """Whether ``incoming`` more bytes of an instance may be written, ``written`` being on disk already.

        A transport that streams an instance to disk asks before its first
        byte (``admit(0)``: is there space at all?) and before each chunk, so
        that it stops writing the moment the instance crosses
        ``max_instance_bytes`` or would take free space under
        ``min_free_bytes``; :meth:`receive` checks the finished file the same
        way. DIMSE carries no size ahead of the data (PS3.7 9.3.1.1), so
        this is the only place a limit can be kept before the disk fills.

        Returns
        -------
        Refused or None
            ``None`` to go on; else the refusal (INSTANCE_TOO_LARGE or
            OUT_OF_RESOURCES, both 0xA700 over DIMSE) the transport hands
            to :meth:`receive` as ``Received.refused``.
        """
        s = self.settings
        if written + incoming > s.max_instance_bytes:
            return Refused(
                RefusalReason.INSTANCE_TOO_LARGE,
                f"instance of at least {written + incoming} bytes exceeds max_instance_bytes={s.max_instance_bytes}",
            )
        free = self._space.free(incoming)
        if free - incoming < s.min_free_bytes:
            return Refused(
                RefusalReason.OUT_OF_RESOURCES,
                f"free space {free} bytes is under the watermark min_free_bytes={s.min_free_bytes}",
            )
        return None

    def refusing_for_space(self) -> bool:
        """Whether new instances are refused now because free space is under ``min_free_bytes`` (for /readyz)."""
        return self._free_bytes() < self.settings.min_free_bytes

    def _free_bytes(self) -> int:
        """Free bytes in the data dir (statvfs); keeps ``aigw_refusing_for_space`` up to date."""
        free = self.data.free_bytes()
        self.metrics.refusing_for_space.set(1 if free < self.settings.min_free_bytes else 0)
        return free

    # ------------------------------------------------------------------ checks
    def _receive(self, received: Received, source: Source) -> Stored:
        """The checks, then the store; a failed check raises :class:`_Refusal`."""
        if received.refused is not None:
            raise _Refusal(received.refused.reason, received.refused.detail)
        s = self.settings
        tmp = received.path
        size = tmp.stat().st_size
        refused = self.admit(size)
        if refused is not None:
            raise _Refusal(refused.reason, refused.detail)
        # What the transport declared, before the file is even parsed (for
        # C-STORE: the request's Affected SOP Instance/Class UID, PS3.7 9.1.1.1).
        declared_sop = None
        if received.sop_instance_uid is not None:
            declared_sop = _uid(received.sop_instance_uid, "AffectedSOPInstanceUID")
        sop_class = None
        if received.sop_class_uid is not None:
            sop_class = _uid(received.sop_class_uid, "AffectedSOPClassUID")
            self._check_sop_class(sop_class)
        declared_study = None
        if received.study_instance_uid is not None:
            declared_study = _uid(received.study_instance_uid, "declared StudyInstanceUID")

        try:
            meta = read_file_meta(tmp)
            ts = meta.transfer_syntax
            if ts not in _TRANSFER_SYNTAXES:
                raise _Refusal(RefusalReason.TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax is not supported")
            if received.transfer_syntax is not None and str(received.transfer_syntax) != ts:
                raise _Refusal(
                    RefusalReason.DATASET_MISMATCH,
                    "TransferSyntaxUID in the File Meta Information differs from the declared transfer syntax",
                )
            # Before success, and before pydicom parses anything: what is
            # acknowledged must read back (a deflated data set may inflate to
            # at most max_instance_bytes).
            check_structure(tmp, meta, max_inflated_bytes=s.max_instance_bytes)
        except MalformedDataSet as exc:
            raise _Refusal(RefusalReason.CANNOT_UNDERSTAND, f"data set is malformed: {exc}") from None
        ds = _read_header(tmp, meta)
        study_uid = _uid(_raw(ds, "StudyInstanceUID"), "StudyInstanceUID")
        series_uid = _uid(_raw(ds, "SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = _uid(_raw(ds, "SOPInstanceUID"), "SOPInstanceUID")
        own_class = _uid(_raw(ds, "SOPClassUID"), "SOPClassUID")
        if sop_class is None:
            # Nothing declared (STOW-RS): the data set's own class must be one we store.
            sop_class = own_class
            self._check_sop_class(sop_class)
        elif own_class != sop_class:
            # PS3.4 B.2.3: "Data Set does not match SOP Class" (0xA900), as DCMTK's storescp answers.
            raise _Refusal(
                RefusalReason.SOP_CLASS_MISMATCH,
                "SOPClassUID in the data set differs from AffectedSOPClassUID in the request",
            )
        if declared_sop is not None and sop_uid != declared_sop:
            raise _Refusal(
                RefusalReason.DATASET_MISMATCH,
                "SOPInstanceUID in the data set differs from AffectedSOPInstanceUID in the request",
            )
        if declared_study is not None and study_uid != declared_study:
            raise _Refusal(
                RefusalReason.DATASET_MISMATCH, "StudyInstanceUID in the data set differs from the declared study"
            )
        return self._store(tmp, ds, source, study_uid, series_uid, sop_uid, sop_class, ts, size, received.sha256)

    @staticmethod
    def _check_sop_class(sop_class: str) -> None:
        """Refuse a SOP class that is not a storage SOP class we accept (PS3.4 B.5)."""
        if sop_class not in _STORAGE_SOP_CLASSES:
            raise _Refusal(RefusalReason.SOP_CLASS_NOT_SUPPORTED, "SOP class is not a supported storage SOP class")

    # ------------------------------------------------------------------- store
    def _store(
        self,
        tmp: Path,
        ds: Dataset,
        source: Source,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class: str,
        ts: str,
        size: int,
        digest: str | None,
    ) -> Stored:
        """Hash (unless the transport did), fsync, rename and index a checked instance; then the completion hints."""
        headers = routing_headers(ds)
        now = time.time()

        def stored(outcome: RecordOutcome, path: Path, digest: str) -> Stored:
            return Stored(outcome, sop_uid, sop_class, series_uid, study_uid, ts, path, size, digest)

        with self._locks(sop_uid):
            digest = digest or sha256_file(tmp)
            existing = self.index.find_instance(sop_uid)
            if existing is not None and existing.sha256 == digest:
                # Idempotent: the same bytes again (a sender retry) are stored once.
                return stored(RecordOutcome.DUPLICATE, Path(existing.path), digest)
            if existing is not None:
                final = self.data.conflict_path(sop_uid, digest)
                log.warning(
                    "instance conflict: a different payload for a stored UID kept aside (sha256 %s...)", digest[:12]
                )
            else:
                final = self.data.instance_path(study_uid, series_uid, sop_uid)
            # Data fsync, rename, directory fsync (gateway.storage.install_file):
            # durable before the index row that makes it visible.
            install_file(tmp, final)
            rec = InstanceRecord(
                sop_instance_uid=sop_uid,
                series_uid=series_uid,
                study_uid=study_uid,
                sop_class_uid=sop_class,
                transfer_syntax=ts,
                path=final,
                size_bytes=size,
                sha256=digest,
                calling_ae=source.calling,
                modality=str(ds.get("Modality", "") or ""),
                headers=headers,
                expected_instances=count_hint(headers, sop_class),
            )
            recorded = self._writer.record(
                rec,
                now=now,
                quiet_seconds=self._quiet_seconds(headers, source.calling),
                reprocess_late=self._reprocess_late,
            )
        if recorded.outcome == RecordOutcome.STORED:
            self.metrics.bytes_received.inc(size)
            self.metrics.last_received.set(now)
            self._hint(series_uid, sop_class, recorded)
        return stored(recorded.outcome, final, digest)

    def _hint(self, series_uid: str, sop_class: str, recorded: Recorded) -> None:
        """Bring completion forward when the series says it is whole (count hint, whole slide pyramid).

        A failure here is logged, never a refusal: the instance is already
        stored, and the quiet-period timer still completes the series.
        """
        try:
            expected = recorded.expected_instances
            whole = bool(expected and recorded.instance_count >= expected)
            if not whole and is_slide(sop_class):
                insts = self.index.series_instances(series_uid)
                whole = slide_pyramid_complete([_json(i.headers) for i in insts])
            if whole:
                self.index.hint_complete([series_uid], now=time.time(), within=self._hint_quiet, cause="hint")
        except Exception:
            log.exception("completion hint check failed (the timer still applies)")


def _json(text: str) -> dict[str, Any]:
    return dict(json.loads(text))
