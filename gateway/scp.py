"""Storage SCP and Verification SCP: the DIMSE transport of ingest.

pynetdicom streams each C-STORE data set into a temporary file under
``<data_dir>/incoming`` while the P-DATA PDUs arrive
(``STORE_RECV_CHUNKED_DATASET``), so a 1 GB slide is never held in memory.
The handler hands that file to :class:`gateway.ingest.Ingest`, which checks
it, fsyncs it, renames it into the store and indexes it; success is answered
only after that (PS3.4 B.2.3). What stays here is DIMSE's own: association
policy (PS3.8 9.3.4), the status for each refusal reason
(:data:`STATUS_FOR_REFUSAL`), per-association state and the release hint.
Every failure maps to a specific status; nothing raised here can end the
listener.
"""

from __future__ import annotations

import ipaddress
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway._admission import StreamAdmission
from gateway.config import GatewaySettings
from gateway.frontdoor import FrontDoor, FrontDoorLimits, RefusalLog, escape
from gateway.index import Index, RecordOutcome
from gateway.ingest import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    Ingest,
    Received,
    RefusalReason,
    Refused,
    Source,
    Transport,
)
from gateway.metrics import Metrics
from gateway.slots import Slots
from gateway.status import Rejection, RejectReason, StorageStatus
from gateway.storage import DataDir
from gateway.tls import server_context

__all__ = ["STATUS_FOR_REFUSAL", "StorageSCP"]

log = logging.getLogger(__name__)


#: The C-STORE status answered for each ingest refusal (PS3.4 B.2.3, PS3.7 9.1.1.1.9).
#: Every :class:`~gateway.ingest.RefusalReason` has one; docs/conformance.md
#: section 5.3 lists them.
STATUS_FOR_REFUSAL: dict[RefusalReason, StorageStatus] = {
    # 0xA7xx tells the sender to retry later or elsewhere (a transient refusal).
    RefusalReason.INSTANCE_TOO_LARGE: StorageStatus.OUT_OF_RESOURCES,
    RefusalReason.OUT_OF_RESOURCES: StorageStatus.OUT_OF_RESOURCES,
    RefusalReason.CANNOT_UNDERSTAND: StorageStatus.CANNOT_DECODE,
    # Negotiation accepts only storage SOP classes, and pynetdicom hands this
    # handler only C-STOREs of one (uid_to_service_class): a backstop here.
    RefusalReason.SOP_CLASS_NOT_SUPPORTED: StorageStatus.SOP_CLASS_NOT_SUPPORTED,
    # Negotiation accepts only syntaxes ingest parses: a backstop here too.
    RefusalReason.TRANSFER_SYNTAX_NOT_SUPPORTED: StorageStatus.CANNOT_DECODE,
    # The data set's SOP Instance UID (or study, or syntax) differs from what was declared.
    RefusalReason.DATASET_MISMATCH: StorageStatus.CANNOT_DECODE,
    # PS3.4 B.2.3 "Data Set does not match SOP Class": the data set's SOP Class UID
    # differs from the request's Affected SOP Class UID (DCMTK's storescp answers the same).
    RefusalReason.SOP_CLASS_MISMATCH: StorageStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    RefusalReason.INTERNAL_ERROR: StorageStatus.UNEXPECTED_ERROR,
}


@dataclass
class _AssocState:
    calling_ae: str
    series: set[str]


class StorageSCP:
    """The DICOM listener: association policy, C-ECHO and C-STORE.

    Parameters
    ----------
    settings : GatewaySettings
        Listener address, AE title, allow-lists and limits.
    data : DataDir
        Its ``incoming`` folder receives the streamed data sets.
    index : Index
        For the association-release completion hint.
    metrics : Metrics
        Association counters; ingest counts the instances.
    quiet_seconds, hint_quiet_seconds, reprocess_late
        Passed to the :class:`~gateway.ingest.Ingest` this listener builds
        and runs when ``ingest`` is not given; ignored otherwise.
    release_quiet_seconds : float or None
        How soon a series completes once the association that delivered it
        is released; ``None`` for no release hint.
    ingest : Ingest, optional
        An ingest shared with other transports; its owner starts and stops it.
    abort_grace_seconds : float or None
        How long the series of an association that ends without a release
        (abort, dropped connection) stay open at least; ``None`` leaves their
        deadlines as they are.
    slots : Slots, optional
        This process's row of the connection and association caps that all
        listener processes share (:mod:`gateway.slots`); by default the caps
        count this listener alone.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        data: DataDir,
        index: Index,
        metrics: Metrics,
        quiet_seconds: Callable[[dict[str, Any], str], float] | None = None,
        release_quiet_seconds: float | None = None,
        hint_quiet_seconds: float = 1.0,
        reprocess_late: bool = True,
        *,
        ingest: Ingest | None = None,
        abort_grace_seconds: float | None = None,
        slots: Slots | None = None,
    ) -> None:
        self.settings = settings
        self.data = data
        self.index = index
        self.metrics = metrics
        self._release_quiet = release_quiet_seconds
        self._abort_grace = abort_grace_seconds
        self._slots = slots
        self._owns_ingest = ingest is None
        if ingest is None:
            if quiet_seconds is None:
                raise TypeError("StorageSCP needs either ingest or quiet_seconds")
            ingest = Ingest(settings, data, index, metrics, quiet_seconds, hint_quiet_seconds, reprocess_late)
        self.ingest = ingest
        # Size and free-space limits kept while each data set streams in (gateway._admission).
        self._admission = StreamAdmission(ingest.admit, data.incoming, drop_limit=settings.max_instance_bytes)
        self._assocs: dict[int, _AssocState] = {}
        self._assoc_lock = threading.Lock()
        self._server: FrontDoor | None = None
        self._refusals = RefusalLog(log)
        self._saved_tempdir: str | None = None
        self._saved_chunked = False
        self._networks = [ipaddress.ip_network(h, strict=False) for h in settings.allow_hosts]
        self.port: int | None = None
        self.tls_port: int | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> int:
        """Start listening (non-blocking); returns the bound port."""
        s = self.settings
        # Stream data sets to files on the data dir's filesystem so the final
        # rename is atomic and the payload is never held in memory.
        self._saved_chunked = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._admission.install()
        self._saved_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.data.incoming)
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_bytes
        # Our own policy in EVT_REQUESTED enforces the limit with a counted
        # rejection; pynetdicom's check is kept one above as a backstop.
        ae.maximum_associations = s.max_associations + 1
        # The DUL idle timer (Association aborts when it expires; the front door
        # counts it); the front door's socket timeout bounds a read stalled mid-PDU.
        ae.network_timeout = s.idle_timeout_seconds
        # pynetdicom's ARTIM timer (PS3.8 9.1.5), which also bounds Sta13: a
        # peer told RJ, A-ABORT or A-RELEASE-RP must close this soon.
        ae.acse_timeout = s.artim_timeout_seconds
        ae.dimse_timeout = s.network_timeout_seconds
        # Exactly what ingest understands, so nothing negotiated is refused later.
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
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
        if self._owns_ingest:
            self.ingest.start()
        # The front door accepts, enforces ARTIM, connection caps and a valid
        # A-ASSOCIATE-RQ, then hands the association to pynetdicom.
        # DICOM TLS (PS3.15 B.9) on its own port, through the same front door.
        tls = None if s.tls is None else ((s.host, s.tls.port), server_context(s.tls))
        self._server = FrontDoor(
            ae,
            (s.host, s.port),
            FrontDoorLimits.from_settings(s),
            handlers,
            self._count_rejection,
            self._refusals,
            tls,
            reuse_port=s.listener_count() > 1,  # gateway.listeners: the other processes bind the same ports
            slots=self._slots,
        )
        self.port = self._server.start()
        # Read at scrape time: the selector thread owns the count, so it needs no lock.
        server = self._server
        self.metrics.connections_open.set_function(lambda: server.connections)
        self.tls_port = self._server.tls_port
        log.info("DICOM listener %s on %s:%d", s.ae_title, s.host, self.port)
        if self.tls_port is not None:
            log.info("DICOM TLS listener %s on %s:%d", s.ae_title, s.host, self.tls_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
            _config.STORE_RECV_CHUNKED_DATASET = self._saved_chunked
            self._admission.uninstall()
            if self._owns_ingest:
                self.ingest.stop()
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
            self._count_rejection(rejection.label)
            # The calling AE is a configured/network value, not patient data,
            # but the peer chose its bytes: escaped.
            self._refusals(
                str(event.assoc.requestor.address), rejection.label, f'calling AE "{escape(_calling_ae(event.assoc))}"'
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

    def _count_rejection(self, label: str) -> None:
        self.metrics.associations_rejected.labels(reason=label).inc()

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
        # Reached with state still held only when the association ended without
        # a release: an A-ABORT or a dropped connection. The sender did not say
        # it was done, so its series get the abort grace instead of a hint.
        state = self._pop_assoc(event)
        if state is not None and state.series and self._abort_grace is not None:
            try:
                n = self.index.defer_completion(state.series, now=time.time(), within=self._abort_grace)
                if n:
                    log.info("association ended without release: %d series wait %.0f s more", n, self._abort_grace)
            except Exception:
                log.exception("could not re-arm the completion of an interrupted association's series")

    def _pop_assoc(self, event: evt.Event) -> _AssocState | None:
        with self._assoc_lock:
            state = self._assocs.pop(id(event.assoc), None)
            self.metrics.associations_open.set(len(self._assocs))
        self._admission.discard(event.assoc)  # a data set cut off half-way: its partial file goes now
        return state

    # ------------------------------------------------------------------ DIMSE
    def _on_echo(self, event: evt.Event) -> int:
        return int(StorageStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        """Hand the received file to ingest and answer its outcome as a C-STORE status.

        Success only for :class:`~gateway.ingest.Stored`, that is once the
        instance is fsynced and indexed (PS3.4 B.2.3); each refusal gets its
        status from :data:`STATUS_FOR_REFUSAL`.
        """
        tmp: Path | None = None
        try:
            tmp = Path(event.dataset_path)
            req: Any = event.request  # a C-STORE request primitive
            stream = self._admission.take(tmp)
            received = Received(
                path=tmp,
                sop_class_uid=req.AffectedSOPClassUID,
                sop_instance_uid=req.AffectedSOPInstanceUID,
                transfer_syntax=event.context.transfer_syntax,
                # A limit crossed while it streamed (0xA700), and its hash, taken on the way in.
                refused=None if stream is None else stream.refused,
                sha256=None if stream is None else stream.sha256,
            )
            requestor = event.assoc.requestor
            source = Source(Transport.DIMSE, (requestor.ae_title or "").strip(), str(requestor.address))
        except Exception:
            # PS3.7 C.4.2: a failure we did not foresee is still a failure status,
            # never a dropped association.
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            self.metrics.instances_received.labels(
                outcome=RefusalReason.INTERNAL_ERROR.metric_outcome, transport=Transport.DIMSE.value
            ).inc()
            status = STATUS_FOR_REFUSAL[RefusalReason.INTERNAL_ERROR]
            log.exception("C-STORE failed unexpectedly; answered 0x%04X", int(status))
            return int(status)
        result = self.ingest.receive(received, source)
        if isinstance(result, Refused):
            status = STATUS_FOR_REFUSAL[result.reason]
            if result.reason is RefusalReason.INTERNAL_ERROR:
                log.error("C-STORE failed unexpectedly; answered 0x%04X", int(status))
            else:
                log.warning("C-STORE refused with 0x%04X: %s", int(status), result.detail)
            return int(status)
        if result.outcome == RecordOutcome.STORED:
            # The series this association delivered, for the release hint.
            with self._assoc_lock:
                st = self._assocs.get(id(event.assoc))
                if st is not None:
                    st.series.add(result.series_uid)
        return int(StorageStatus.SUCCESS)


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

