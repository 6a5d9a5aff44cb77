"""Storage SCP and Verification SCP: receive instances durably and bit-exact.

pynetdicom streams each C-STORE data set into a temporary file under
``<data_dir>/incoming`` while the P-DATA PDUs arrive
(``STORE_RECV_CHUNKED_DATASET``), so a 1 GB slide is never held in memory.
The handler then checks it, fsyncs it and renames it into the store, records
it in the index, and only then answers success (PS3.4 B.2.3). Every failure
maps to a specific status; nothing raised here can end the listener.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]

from gateway.completion import count_hint, is_slide, slide_pyramid_complete
from gateway.config import GatewaySettings
from gateway.headers import routing_headers
from gateway.index import GroupCommitter, Index, InstanceRecord, Recorded, RecordOutcome
from gateway.metrics import Metrics
from gateway.status import Rejection, RejectReason, StorageStatus
from gateway.storage import DataDir, install_file, sha256_file
from gateway.uids import InvalidUID, checked_uid

__all__ = ["StorageSCP", "StoreRefused"]

log = logging.getLogger(__name__)


class StoreRefused(Exception):
    """A C-STORE is refused with a specific status and a metric outcome."""

    def __init__(self, status: StorageStatus, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome


@dataclass
class _AssocState:
    calling_ae: str
    series: set[str]


class _UidLocks:
    """Striped locks so two associations storing the same UID serialise."""

    def __init__(self, stripes: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def __call__(self, key: str) -> threading.Lock:
        return self._locks[int(hashlib.blake2s(key.encode(), digest_size=2).hexdigest(), 16) % len(self._locks)]


def _pixel_data_complete(path: Path, offset: int, size: int, little_endian: bool) -> bool:
    """Check the top-level Pixel Data element is whole (truncated uploads are refused).

    ``offset`` is where header parsing stopped (the Pixel Data tag). For a
    defined length the value must fit in the file; for encapsulated data the
    item headers are walked by seeking (never reading fragment bodies) to the
    sequence delimiter (PS3.5 A.4).
    """
    if not little_endian:
        return True  # retired big endian: no structural check
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(12)
        if len(head) < 8 or head[:4] not in (b"\xe0\x7f\x10\x00",):
            return True  # no top-level pixel data where expected: nothing to check
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
            length = int.from_bytes(head[8:12], "little")
            pos = offset + 12
        else:  # implicit VR
            length = int.from_bytes(head[4:8], "little")
            pos = offset + 8
        if length != 0xFFFFFFFF:
            return pos + length <= size
        while True:  # encapsulated: walk items to the sequence delimiter
            fh.seek(pos)
            item = fh.read(8)
            if len(item) < 8:
                return False
            tag = item[:4]
            ilen = int.from_bytes(item[4:8], "little")
            if tag == b"\xfe\xff\xdd\xe0":
                return True
            if tag != b"\xfe\xff\x00\xe0" or pos + 8 + ilen > size:
                return False
            pos += 8 + ilen


class StorageSCP:
    """The DICOM listener: association policy, C-ECHO and C-STORE."""

    def __init__(
        self,
        settings: GatewaySettings,
        data: DataDir,
        index: Index,
        metrics: Metrics,
        quiet_seconds: Callable[[dict[str, Any], str], float],
        release_quiet_seconds: float | None,
        hint_quiet_seconds: float,
        reprocess_late: bool,
    ) -> None:
        self.settings = settings
        self.data = data
        self.index = index
        self.metrics = metrics
        self._quiet_seconds = quiet_seconds
        self._release_quiet = release_quiet_seconds
        self._hint_quiet = hint_quiet_seconds
        self._reprocess_late = reprocess_late
        self._locks = _UidLocks()
        self._writer = GroupCommitter(index)
        self._assocs: dict[int, _AssocState] = {}
        self._assoc_lock = threading.Lock()
        self._server: Any = None
        self._saved_tempdir: str | None = None
        self._saved_chunked = False
        self._networks = [ipaddress.ip_network(h, strict=False) for h in settings.allow_hosts]
        self.port: int | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> int:
        """Start listening (non-blocking); returns the bound port."""
        s = self.settings
        # Stream data sets to files on the data dir's filesystem so the final
        # rename is atomic and the payload is never held in memory.
        self._saved_chunked = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._saved_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.data.incoming)
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_bytes
        # Our own policy in EVT_REQUESTED enforces the limit with a counted
        # rejection; pynetdicom's check is kept one above as a backstop.
        ae.maximum_associations = s.max_associations + 1
        ae.network_timeout = s.network_timeout_seconds
        ae.acse_timeout = s.network_timeout_seconds
        ae.dimse_timeout = s.network_timeout_seconds
        for uid in _STORAGE_CLASSES.values():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES[:3])
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._writer.start()
        self._server = ae.start_server((s.host, s.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        log.info("DICOM listener %s on %s:%d", s.ae_title, s.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            _config.STORE_RECV_CHUNKED_DATASET = self._saved_chunked
            self._writer.stop()
        if self._saved_tempdir is not None or tempfile.tempdir == str(self.data.incoming):
            tempfile.tempdir = self._saved_tempdir

    @property
    def is_up(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------ associations
    def _policy(self, assoc: Any) -> Rejection | None:
        s = self.settings
        calling = _calling_ae(assoc)
        if s.allow_ae and calling not in s.allow_ae:
            return RejectReason.CALLING_AE_NOT_RECOGNISED
        if s.require_called_ae:
            req_called = (assoc.requestor.primitive.called_ae_title or "").strip()
            if req_called != s.ae_title:
                return RejectReason.CALLED_AE_NOT_RECOGNISED
        if self._networks:
            try:
                addr = ipaddress.ip_address(assoc.requestor.address)
            except ValueError:
                return RejectReason.ADDRESS_NOT_ALLOWED
            if not any(addr in n for n in self._networks):
                return RejectReason.ADDRESS_NOT_ALLOWED
        with self._assoc_lock:
            if len(self._assocs) >= s.max_associations:
                return RejectReason.TOO_MANY_ASSOCIATIONS
        return None

    def _on_requested(self, event: evt.Event) -> None:
        try:
            rejection = self._policy(event.assoc)
        except Exception:
            log.exception("association policy check failed; rejecting")
            rejection = RejectReason.TOO_MANY_ASSOCIATIONS
        if rejection is not None:
            self.metrics.associations_rejected.labels(reason=rejection.label).inc()
            # The calling AE is a configured/network value, not patient data.
            log.warning(
                "association from %s (%s) rejected: %s",
                _calling_ae(event.assoc),
                event.assoc.requestor.address,
                rejection.label,
            )
            event.assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            # As pynetdicom does for its own rejections: wait for the DUL to
            # send the A-ASSOCIATE-RJ before the socket is shut down.
            event.assoc.kill()
            return
        try:
            _prefer_requestor_order(event.assoc)
        except Exception:
            log.exception("could not apply the sender's transfer syntax preference; using ours")

    def _on_established(self, event: evt.Event) -> None:
        with self._assoc_lock:
            self._assocs[id(event.assoc)] = _AssocState(
                calling_ae=(event.assoc.requestor.ae_title or "").strip(), series=set()
            )
            self.metrics.associations_open.set(len(self._assocs))
        self.metrics.associations_accepted.inc()

    def _on_released(self, event: evt.Event) -> None:
        state = self._pop_assoc(event)
        if state is not None and state.series and self._release_quiet is not None:
            try:
                self.index.hint_complete(state.series, now=time.time(), within=self._release_quiet, cause="release")
            except Exception:
                log.exception("could not apply the association-release completion hint")

    def _on_closed(self, event: evt.Event) -> None:
        self._pop_assoc(event)

    def _pop_assoc(self, event: evt.Event) -> _AssocState | None:
        with self._assoc_lock:
            state = self._assocs.pop(id(event.assoc), None)
            self.metrics.associations_open.set(len(self._assocs))
        return state

    # ------------------------------------------------------------------ DIMSE
    def _on_echo(self, event: evt.Event) -> int:
        return int(StorageStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        tmp: Path | None = None
        try:
            tmp = Path(event.dataset_path)
            outcome = self._store(event, tmp)
            self.metrics.instances_received.labels(outcome=outcome.value).inc()
            return int(StorageStatus.SUCCESS)
        except StoreRefused as exc:
            self.metrics.instances_received.labels(outcome=exc.outcome).inc()
            log.warning("C-STORE refused with 0x%04X: %s", int(exc.status), exc)
            return int(exc.status)
        except Exception:
            # PS3.7 C.4.2: a failure we did not foresee is still a failure status,
            # never a dropped association.
            self.metrics.instances_received.labels(outcome="error").inc()
            log.exception("C-STORE failed unexpectedly; answered 0x%04X", int(StorageStatus.UNEXPECTED_ERROR))
            return int(StorageStatus.UNEXPECTED_ERROR)
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink(missing_ok=True)

    def _store(self, event: evt.Event, tmp: Path) -> RecordOutcome:
        s = self.settings
        size = tmp.stat().st_size
        if size > s.max_instance_bytes:
            raise StoreRefused(
                StorageStatus.OUT_OF_RESOURCES,
                "refused_size",
                f"instance of {size} bytes exceeds max_instance_bytes={s.max_instance_bytes}",
            )
        free = self.data.free_bytes()
        if free < s.min_free_bytes:
            raise StoreRefused(
                StorageStatus.OUT_OF_RESOURCES,
                "refused_space",
                f"free space {free} bytes is under the watermark min_free_bytes={s.min_free_bytes}",
            )
        req: Any = event.request  # a C-STORE request primitive
        try:
            sop_uid = checked_uid(req.AffectedSOPInstanceUID, "AffectedSOPInstanceUID")
            sop_class = checked_uid(req.AffectedSOPClassUID, "AffectedSOPClassUID")
        except InvalidUID as exc:
            raise StoreRefused(StorageStatus.CANNOT_DECODE, "invalid", str(exc)) from None

        try:
            with open(tmp, "rb") as fh:
                ds = dcmread(fh, stop_before_pixels=True)
                stop = fh.tell()
            ts = ds.file_meta.TransferSyntaxUID
        except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, TypeError, AttributeError) as exc:
            raise StoreRefused(
                StorageStatus.CANNOT_DECODE, "invalid", f"data set cannot be decoded ({type(exc).__name__})"
            ) from None
        except Exception as exc:  # pydicom raises a variety of errors on garbage
            raise StoreRefused(
                StorageStatus.CANNOT_DECODE, "invalid", f"data set cannot be decoded ({type(exc).__name__})"
            ) from None
        try:
            study_uid = checked_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = checked_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            ds_sop = checked_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        except InvalidUID as exc:
            raise StoreRefused(StorageStatus.CANNOT_DECODE, "invalid", str(exc)) from None
        if ds_sop != sop_uid:
            raise StoreRefused(
                StorageStatus.CANNOT_DECODE,
                "invalid",
                "SOPInstanceUID in the data set differs from AffectedSOPInstanceUID in the request",
            )
        if not _pixel_data_complete(tmp, stop, size, little_endian=ts != "1.2.840.10008.1.2.2"):
            raise StoreRefused(StorageStatus.CANNOT_DECODE, "invalid", "data set is truncated (pixel data incomplete)")

        headers = routing_headers(ds)
        calling_ae = (event.assoc.requestor.ae_title or "").strip()
        now = time.time()
        with self._locks(sop_uid):
            digest = sha256_file(tmp)
            existing = self.index.find_instance(sop_uid)
            if existing is not None and existing.sha256 == digest:
                # Idempotent: the same bytes again (a sender retry) are stored once.
                return RecordOutcome.DUPLICATE
            if existing is not None:
                final = self.data.conflict_path(sop_uid, digest)
                log.warning(
                    "instance conflict: a different payload for a stored UID kept aside (sha256 %s...)", digest[:12]
                )
            else:
                final = self.data.instance_path(study_uid, series_uid, sop_uid)
            install_file(tmp, final)
            rec = InstanceRecord(
                sop_instance_uid=sop_uid,
                series_uid=series_uid,
                study_uid=study_uid,
                sop_class_uid=sop_class,
                transfer_syntax=str(ts),
                path=final,
                size_bytes=size,
                sha256=digest,
                calling_ae=calling_ae,
                modality=str(ds.get("Modality", "") or ""),
                headers=headers,
                expected_instances=count_hint(headers, sop_class),
            )
            recorded = self._writer.record(
                rec,
                now=now,
                quiet_seconds=self._quiet_seconds(headers, calling_ae),
                reprocess_late=self._reprocess_late,
            )
        if recorded.outcome == RecordOutcome.STORED:
            self.metrics.bytes_received.inc(size)
            self.metrics.last_received.set(now)
            self._after_store(event, series_uid, sop_class, recorded)
        return recorded.outcome

    def _after_store(self, event: evt.Event, series_uid: str, sop_class: str, recorded: Recorded) -> None:
        with self._assoc_lock:
            st = self._assocs.get(id(event.assoc))
            if st is not None:
                st.series.add(series_uid)
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


def _calling_ae(assoc: Any) -> str:
    """Calling AE title; at EVT_REQUESTED only the A-ASSOCIATE-RQ primitive has it."""
    prim = getattr(assoc.requestor, "primitive", None)
    title = getattr(prim, "calling_ae_title", None) or assoc.requestor.ae_title or ""
    return str(title).strip()


def _prefer_requestor_order(assoc: Any) -> None:
    """Accept, per presentation context, the sender's first supported transfer syntax.

    pynetdicom picks the first syntax in the acceptor's list; we reorder our
    lists to follow the sender's proposal so that a sender is never pushed
    into converting its data (PS3.8 9.3.2.2 leaves the choice to us).
    """
    from pynetdicom.presentation import PresentationContext

    order: dict[str, list[str]] = {}
    for cx in assoc.requestor.requested_contexts:
        pref = order.setdefault(cx.abstract_syntax, [])
        pref.extend(ts for ts in cx.transfer_syntax if ts not in pref)
    contexts = []
    for cx in assoc.acceptor.supported_contexts:
        proposed = order.get(cx.abstract_syntax)
        if not proposed:
            continue  # not proposed: no need to offer it
        new = PresentationContext()
        new.abstract_syntax = cx.abstract_syntax
        new.transfer_syntax = [ts for ts in proposed if ts in cx.transfer_syntax]
        new.scu_role, new.scp_role = cx.scu_role, cx.scp_role
        contexts.append(new)
    assoc.acceptor.supported_contexts = contexts


def _json(text: str) -> dict[str, Any]:
    return dict(json.loads(text))

