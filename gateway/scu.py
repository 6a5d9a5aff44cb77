"""Sending results: C-STORE SCU, or STOW-RS (:mod:`gateway.stow`), to the configured destinations.

Every output instance has one ``sends`` row per destination. Outcomes
(PS3.4 B.2.3, PS3.8 9.3.4):

* success or warning status: sent;
* transient (connection refused, timeout, abort, A-ASSOCIATE-RJ transient,
  0xA7xx out of resources): retried with exponential backoff;
* permanent (A-ASSOCIATE-RJ permanent, 0xA9xx, 0xCxxx, no matching
  presentation context): dead-letter list, with the reason;
* after ``send.max_attempts`` a transient failure also goes to the
  dead-letter list, so nothing loops forever.

A ``dicomweb`` destination goes through the same retry and dead-letter
bookkeeping; :mod:`gateway.stow` says how HTTP and per-instance STOW-RS
answers map onto it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from gateway._loop import PeriodicLoop
from gateway.config import Config, Destination, DestinationType
from gateway.index import Index, SendState
from gateway.jobs import backoff
from gateway.metrics import Metrics
from gateway.status import is_transient_store_status
from gateway.stow import StowClient, StowItem
from gateway.tls import TLSSetupError, client_context

__all__ = ["Sender", "classify_status"]

log = logging.getLogger(__name__)

_SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


def _no_delay(assoc: Any) -> None:
    """Switch off Nagle's algorithm, as DCMTK does: small DIMSE messages otherwise
    wait for delayed ACKs (about 5x slower on loopback)."""
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def classify_status(status: int) -> SendState | None:
    """SENT for success/warning, DEAD for permanent failures, None if worth retrying."""
    if status in _SUCCESS_OR_WARNING:
        return SendState.SENT
    if is_transient_store_status(status):
        return None
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in (0x0122, 0x0124, 0x0110, 0x0211):
        return SendState.DEAD
    return None


class Sender(PeriodicLoop):
    """Background loop that delivers pending sends, one association per destination batch."""

    name = "aigw-sender"

    def __init__(self, config: Config, index: Index, metrics: Metrics) -> None:
        self.config = config
        self.index = index
        self.metrics = metrics
        self.destinations = {d.name: d for d in config.destinations}
        # A STOW-RS destination that answered 503 or 429 to a whole batch gets
        # no further batch before this time, whatever other sends are due.
        self._paused_until: dict[str, float] = {}
        super().__init__(0.5)

    def run_once(self) -> int:
        due = self.index.due_sends(time.time())
        by_dest: dict[str, list[Any]] = defaultdict(list)
        for row in due:
            by_dest[row.destination].append(row)
        n = 0
        for name, rows in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                for row in rows:
                    self._dead(row, None, f"destination {name!r} is no longer configured")
                continue
            if dest.type == DestinationType.DICOMWEB:
                n += self._send_stow(dest, rows)
            else:
                n += self._send_batch(dest, rows)
        return n

    def _retry_or_dead(self, row: Any, status: int | None, reason: str, retry_after: float | None = None) -> float:
        """Schedule another attempt (or give up); returns when it is due (now when given up).

        ``retry_after`` is a server's own "not before" (HTTP Retry-After), kept
        within ``send.backoff_max_seconds`` so a server cannot park a send for days.
        """
        sc = self.config.send
        attempts = row.attempts + 1
        if attempts >= sc.max_attempts:
            self._dead(row, status, f"{reason} (gave up after {attempts} attempts)")
            return time.time()
        delay = backoff(attempts, sc.backoff_seconds, sc.backoff_max_seconds)
        if retry_after is not None:
            delay = max(delay, min(retry_after, sc.backoff_max_seconds))
        retry_at = time.time() + delay
        self.index.send_result(
            row.id, SendState.PENDING, now=time.time(), status=status, error=reason, retry_at=retry_at
        )
        self.metrics.sends.labels(destination=row.destination, outcome="retry").inc()
        log.warning(
            "send %d to %s failed (attempt %d of %d), next in %.0f s: %s",
            row.id, row.destination, attempts, sc.max_attempts, delay, reason,
        )
        return retry_at

    def _sent(self, row: Any, status: int | None) -> None:
        self.index.send_result(row.id, SendState.SENT, now=time.time(), status=status, error=None)
        self.metrics.sends.labels(destination=row.destination, outcome="sent").inc()

    def _send_stow(self, dest: Destination, rows: list[Any]) -> int:
        """Deliver rows to a dicomweb destination, ``dest.batch_size`` instances per STOW-RS request.

        Each instance is recorded on its own: one the response acknowledged is
        sent and never resent; a failed one is retried or dead-lettered as its
        own FailureReason (or the request's HTTP status) says.
        """
        if time.time() < self._paused_until.get(dest.name, 0.0):
            return 0
        client = StowClient(dest, self.config.send.timeout_seconds)
        sent = 0
        for start in range(0, len(rows), dest.batch_size):
            batch = rows[start : start + dest.batch_size]
            result = client.store([StowItem(r.sop_instance_uid, r.path) for r in batch])
            retry_times = []
            for row in batch:
                out = result.outcomes[row.sop_instance_uid]
                if out.state == SendState.SENT:
                    self._sent(row, out.status)
                    sent += 1
                elif out.state == SendState.DEAD:
                    self._dead(row, out.status, out.reason or "refused")
                else:
                    retry_times.append(self._retry_or_dead(row, out.status, out.reason or "", result.retry_after))
            if result.batch_failed:
                # The server is down or overloaded: the rest waits too.
                self._paused_until[dest.name] = min(retry_times, default=time.time())
                break
        if sent:
            log.info("sent %d instance(s) to %s over STOW-RS", sent, dest.name)
        return sent

    def _dead(self, row: Any, status: int | None, reason: str) -> None:
        self.index.send_result(row.id, SendState.DEAD, now=time.time(), status=status, error=reason)
        self.metrics.sends.labels(destination=row.destination, outcome="dead").inc()
        log.error("send %d to %s moved to the dead-letter list: %s", row.id, row.destination, reason)

    def _send_batch(self, dest: Destination, rows: list[Any]) -> int:
        sc = self.config.send
        ae = AE(ae_title=self.config.gateway.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = sc.timeout_seconds
        ae.maximum_pdu_size = sc.max_pdu_bytes
        loaded = []
        contexts: set[tuple[str, str]] = set()
        for row in rows:
            try:
                ds = dcmread(row.path)
            except Exception as exc:
                self._dead(row, None, f"output file unreadable: {type(exc).__name__}")
                continue
            loaded.append((row, ds))
            contexts.add((row.sop_class_uid, str(ds.file_meta.TransferSyntaxUID)))
        if not loaded:
            return 0
        # At most 128 presentation contexts per association (PS3.8 9.3.2.2):
        # SOP classes past the cap wait for the next pass instead of failing.
        proposed: set[str] = set()
        for sop_class in sorted({c for c, _ in contexts})[:120]:
            # The files' own syntaxes first: a receiver that takes the first syntax it
            # supports would otherwise pick Implicit VR, which a compressed file
            # cannot be sent in (nothing is transcoded).
            own = sorted({ts for c, ts in contexts if c == sop_class})
            fallback = [str(ts) for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts not in own]
            ae.add_requested_context(sop_class, own + fallback)
            proposed.add(sop_class)
        loaded = [(row, ds) for row, ds in loaded if row.sop_class_uid in proposed]
        assert dest.host is not None and dest.port is not None and dest.ae_title is not None  # dimse: validated
        try:
            # DICOM TLS (PS3.15 B.9): pynetdicom wraps the socket and checks the server's name.
            tls_args = client_context(dest) if dest.tls else None
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        except TLSSetupError as exc:  # our own files: the message names the key and the file
            for row, _ in loaded:
                self._retry_or_dead(row, None, str(exc))
            return 0
        except Exception as exc:  # DNS failure, socket errors
            for row, _ in loaded:
                self._retry_or_dead(row, None, f"cannot connect: {type(exc).__name__}")
            return 0
        if assoc.is_established:
            _no_delay(assoc)
        if not assoc.is_established:
            prim = getattr(assoc.acceptor, "primitive", None)
            if assoc.is_rejected and prim is not None:
                result = prim.result
                why = f"association rejected (result {result}, reason {prim.diagnostic})"
                for row, _ in loaded:
                    if result == 0x01:  # rejected-permanent
                        self._dead(row, None, why)
                    else:
                        self._retry_or_dead(row, None, why)
            else:
                what = "aborted" if assoc.is_aborted else "connection failed"
                for row, _ in loaded:
                    self._retry_or_dead(row, None, f"association {what}")
            return 0
        sent = 0
        try:
            for row, ds in loaded:
                if not assoc.is_established:
                    self._retry_or_dead(row, None, "association lost")
                    continue
                try:
                    rsp = assoc.send_c_store(ds)
                except ValueError as exc:  # no accepted presentation context for it
                    self._dead(row, None, f"not accepted by destination: {exc}")
                    continue
                except Exception as exc:
                    self._retry_or_dead(row, None, f"send failed: {type(exc).__name__}")
                    continue
                status = int(getattr(rsp, "Status", -1)) if rsp else -1
                if status < 0:
                    self._retry_or_dead(row, None, "no response (timeout or abort)")
                    continue
                verdict = classify_status(status)
                if verdict == SendState.SENT:
                    self._sent(row, status)
                    sent += 1
                elif verdict == SendState.DEAD:
                    self._dead(row, status, f"destination answered 0x{status:04X}")
                else:
                    self._retry_or_dead(row, status, f"destination answered 0x{status:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        if sent:
            log.info("sent %d instance(s) to %s", sent, dest.name)
        return sent
