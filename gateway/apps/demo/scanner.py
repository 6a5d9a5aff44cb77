"""``DEMO_SCANNER``: sends each demo series to the gateway as a modality does."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.apps.demo._console import PROGRESS_EVERY, Console
from gateway.apps.demo.series import SeriesRun
from gateway.index import SendState

__all__ = ["SCANNER_AE", "send_series"]

log = logging.getLogger(__name__)


SCANNER_AE = "DEMO_SCANNER"


def send_series(run: SeriesRun, port: int, called_ae: str, console: Console, label: str) -> None:
    """C-STORE one series on one association, as a modality does (PS3.4 B.2)."""
    from pynetdicom import AE

    from gateway.scu import classify_status

    ae = AE(ae_title=SCANNER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    proposed: dict[str, list[str]] = defaultdict(list)
    for sop_class, ts in zip(run.sop_class_uids, run.transfer_syntaxes):
        for syntax in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if syntax not in proposed[sop_class]:
                proposed[sop_class].append(syntax)
    for sop_class, syntaxes in list(proposed.items())[:128]:  # PS3.8 9.3.2.2: at most 128 contexts
        ae.add_requested_context(sop_class, syntaxes)
    run.send_started = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        run.send_finished = time.time()
        if assoc.is_rejected:
            run.send_error = (
                "the gateway rejected the association (see gateway.allow_ae, allow_hosts and"
                " require_called_ae in the configuration)"
            )
        else:
            what = "was aborted" if assoc.is_aborted else "could not be opened"
            run.send_error = f"the association to the gateway {what}"
        return
    _no_delay(assoc)
    last = time.monotonic()
    try:
        for k, path in enumerate(run.files, 1):
            if not assoc.is_established:
                run.send_error = "association lost while sending"
                break
            try:
                # A path, not a data set: pynetdicom reads it when it sends.
                rsp = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context
                run.send_error = f"the gateway did not accept {path.name}: {exc}"
                continue
            status = int(getattr(rsp, "Status", -1)) if rsp else -1
            if status >= 0 and classify_status(status) == SendState.SENT:
                run.accepted += 1
            else:
                why = "no response" if status < 0 else f"status 0x{status:04X}"
                run.send_error = f"the gateway refused {path.name}: {why}"
            if time.monotonic() - last > PROGRESS_EVERY:
                last = time.monotonic()
                console.say(f"{label}: sent {k}/{len(run.files)} instances")
    finally:
        if assoc.is_established:
            assoc.release()
        run.send_finished = time.time()


def _no_delay(assoc: Any) -> None:
    """Switch Nagle's algorithm off on an association's socket, as DCMTK does by default.

    pynetdicom writes a C-STORE request as separate PDUs (command, then data
    set); with Nagle on, each small write waits for the peer's delayed ACK,
    which caps a loopback sender at about 20 instances a second.
    """
    import socket

    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        log.debug("could not set TCP_NODELAY; sending at the slower pace")
