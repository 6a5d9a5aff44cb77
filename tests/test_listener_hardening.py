"""The listener under hostile traffic: stalled, malformed, idle and oversized connections.

A real gateway process (``make_gateway``) is attacked over loopback with raw
bytes while DCMTK's echoscu plays the legitimate scanner. The attacks come
from 127.0.0.2 and up where the per-address cap matters (all of 127/8 is
loopback on Linux); echoscu always connects from 127.0.0.1.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.frontdoor import RefusalLog, check_associate_rq, escape
from gateway.status import Abort, AbortReason, RejectReason
from tests.conftest import GatewayProcess, mr_series, need, storescu, wait_for

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
MakeGateway = Callable[..., GatewayProcess]


# ------------------------------------------------------------------ raw PDUs
def item(kind: int, value: bytes) -> bytes:
    """One PS3.8 9.3.2 item: type, reserved, 2-byte length, value."""
    return struct.pack(">BBH", kind, 0, len(value)) + value


def context(cid: int, abstract: str | None = VERIFICATION, syntaxes: Sequence[str] = (IMPLICIT,)) -> bytes:
    subs = (item(0x30, abstract.encode()) if abstract else b"") + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, bytes([cid, 0, 0, 0]) + subs)


def associate_rq(contexts: Sequence[bytes] = (), *, version: int = 1, user: bytes | None = None) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) from ATTACKER to AIGW; valid with the defaults."""
    body = struct.pack(">HH", version, 0) + b"AIGW".ljust(16) + b"ATTACKER".ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    body += b"".join(contexts or [context(1)])
    body += item(0x50, item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.3.4")) if user is None else user
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def truncated_rq() -> bytes:
    """A complete PDU whose last item claims more bytes than the PDU holds."""
    pdu = bytearray(associate_rq())
    pdu[-4 - 2 : -4] = b""  # drop 2 bytes inside the user information item, keep its length field
    struct.pack_into(">L", pdu, 2, len(pdu) - 6)
    return bytes(pdu)


def read_pdu(sock: socket.socket, timeout: float) -> tuple[int, bytes] | None:
    """The next PDU as (type, body); ``None`` once the peer has closed or reset."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while len(buf) < 6:
            chunk = sock.recv(6 - len(buf))
            if not chunk:
                return None
            buf += chunk
        kind, _, length = struct.unpack(">BBL", buf)
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
    except (ConnectionResetError, BrokenPipeError):
        return None
    return kind, body


def abort_body(abort: Abort) -> bytes:
    """The A-ABORT PDU body: two reserved bytes, source, reason (PS3.8 Table 9-26)."""
    assert abort.source is not None and abort.reason is not None
    return bytes([0, 0, abort.source, abort.reason])


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes ``sock`` (after whatever it sends) within ``timeout``."""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            sock.settimeout(max(end - time.monotonic(), 0.01))
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def associate(port: int, source: str = "127.0.0.1") -> socket.socket:
    """An established association (Verification) over a raw socket."""
    sock = connect(port, source)
    sock.sendall(associate_rq())
    reply = read_pdu(sock, 5)
    assert reply is not None and reply[0] == 0x02, f"expected A-ASSOCIATE-AC, got {reply!r}"
    return sock


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list to put sockets in; all of them are closed on the way out."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()


# ------------------------------------------------------------------ the peer
def echo(gw: GatewayProcess) -> tuple[subprocess.CompletedProcess[str], float]:
    """C-ECHO with DCMTK's echoscu from 127.0.0.1; the result and the seconds it took."""
    start = time.monotonic()
    cmd = [need("echoscu"), "-aet", "SCANNER", "-aec", "AIGW", "-to", "5", "-ta", "5", "-td", "5"]
    done = subprocess.run([*cmd, "127.0.0.1", str(gw.port)], capture_output=True, text=True, timeout=30)
    return done, time.monotonic() - start


def assert_echo_fast(gw: GatewayProcess) -> None:
    done, seconds = echo(gw)
    assert done.returncode == 0, f"C-ECHO failed: {done.stdout}{done.stderr}"
    assert seconds < 1.0, f"C-ECHO took {seconds:.2f} s"


def proc_status(gw: GatewayProcess, field: str) -> int:
    assert gw.proc is not None
    text = Path(f"/proc/{gw.proc.pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)", text, re.M)
    assert match, field
    return int(match.group(1))


def rejected(gw: GatewayProcess, label: str) -> float:
    return gw.metrics().get(f'aigw_associations_rejected_total{{reason="{label}"}}', 0.0)


def log_lines(gw: GatewayProcess, label: str) -> list[str]:
    return [line for line in gw.log().splitlines() if f"refused ({label})" in line]


def hardened(make_gateway: MakeGateway, **gateway: object) -> GatewayProcess:
    settings: dict[str, object] = {"artim_timeout_seconds": 2, "idle_timeout_seconds": 3}
    return make_gateway(gateway={**settings, **gateway})


# --------------------------------------------------------------------- tests
def test_stalled_connections_hold_no_slot_and_close_at_artim(make_gateway: MakeGateway) -> None:
    gw = hardened(make_gateway)
    with sockets() as held:
        opened = []
        for _ in range(17):  # one more than max_associations (16)
            s = connect(gw.port)
            s.sendall(associate_rq()[:6])  # the header of a request, then nothing
            held.append(s)
            opened.append(time.monotonic())
        assert_echo_fast(gw)
        lasted = []
        for s, t0 in zip(held, opened, strict=True):
            assert closed_within(s, 2 + 1.5), "a stalled connection outlived ARTIM"
            lasted.append(time.monotonic() - t0)
    assert max(lasted) <= 2 + 1.0, f"held {max(lasted):.2f} s with ARTIM 2 s"
    assert min(lasted) >= 2 - 0.1, f"closed after {min(lasted):.2f} s, before ARTIM"
    wait_for(lambda: rejected(gw, "artim_expired") == 17, 5, "17 counted ARTIM expiries")
    assert len(log_lines(gw, "artim_expired")) == 1, "logged once per peer and minute"
    assert_echo_fast(gw)


MALFORMED = {
    "even context id": (associate_rq([context(2)]), AbortReason.MALFORMED_REQUEST),
    "no transfer syntax": (associate_rq([context(1, syntaxes=())]), AbortReason.MALFORMED_REQUEST),
    "no abstract syntax": (associate_rq([context(1, abstract=None)]), AbortReason.MALFORMED_REQUEST),
    "truncated item": (truncated_rq(), AbortReason.MALFORMED_REQUEST),
    "no maximum length": (associate_rq(user=item(0x50, item(0x52, b"1.2.3"))), AbortReason.MALFORMED_REQUEST),
    "unknown item": (associate_rq([context(1), item(0x33, b"x")]), AbortReason.UNRECOGNISED_ITEM),
    "P-DATA first": (struct.pack(">BBL", 0x04, 0, 6) + bytes(6), AbortReason.UNEXPECTED_PDU),
    "unknown PDU type": (struct.pack(">BBL", 0x0A, 0, 4) + bytes(4), AbortReason.UNRECOGNISED_PDU),
    "4 GB request": (struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0), AbortReason.PDU_TOO_LARGE),
}


def test_malformed_requests_are_aborted_and_never_reach_pynetdicom(make_gateway: MakeGateway) -> None:
    gw = hardened(make_gateway)
    # The builder makes valid requests, so each malformed one differs only by its defect.
    with sockets() as held:
        held.append(associate(gw.port))
    expected: dict[str, int] = {}
    for name, (pdu, abort) in MALFORMED.items():
        with sockets() as held:
            for _ in range(17):
                s = connect(gw.port)
                held.append(s)
                s.sendall(pdu)
                reply = read_pdu(s, 2)
                assert reply == (0x07, abort_body(abort)), f"{name}: {reply!r}"
                assert closed_within(s, 1), f"{name}: not closed after the A-ABORT"
        expected[abort.label] = expected.get(abort.label, 0) + 17
        assert_echo_fast(gw)
    with sockets() as held:  # well formed, wrong protocol version: A-ASSOCIATE-RJ permanent (PS3.8 9.3.4)
        s = connect(gw.port)
        held.append(s)
        s.sendall(associate_rq(version=2))
        rj = RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED
        assert read_pdu(s, 2) == (0x03, bytes([0, rj.result, rj.source, rj.diagnostic]))
    expected[rj.label] = 1
    for label, n in expected.items():
        assert rejected(gw, label) == n, label
        assert len(log_lines(gw, label)) == 1, f"{label}: logged once per peer and minute"
    assert "Traceback" not in gw.log()
    # Only the valid association and one echo per kind got through to pynetdicom.
    assert gw.metrics()["aigw_associations_accepted_total"] == 1 + len(MALFORMED)
    assert_echo_fast(gw)


def test_idle_connections_cost_no_threads_and_caps_turn_the_rest_away(make_gateway: MakeGateway) -> None:
    gw = hardened(make_gateway, artim_timeout_seconds=30, max_connections=240, max_connections_per_address=32)
    threads_before = proc_status(gw, "Threads")
    with sockets() as held:
        for i in range(200):
            held.append(connect(gw.port, f"127.0.0.{2 + i // 20}"))  # 20 from each of 10 addresses
        time.sleep(0.5)
        assert proc_status(gw, "Threads") <= threads_before + 2, "idle connections made threads"
        assert_echo_fast(gw)
        # The echo's connection holds a slot until the front door sees its thread end.
        wait_for(lambda: gw.metrics()["aigw_connections_open"] == 200, 5, "the echo's slot to be released")
        # Per address: 32 from one address are held, the 33rd is turned away at once.
        for _ in range(32):
            held.append(connect(gw.port, "127.0.0.100"))
        extra = connect(gw.port, "127.0.0.100")
        held.append(extra)
        cap = RejectReason.TOO_MANY_FROM_ADDRESS
        assert read_pdu(extra, 2) == (0x03, bytes([0, cap.result, cap.source, cap.diagnostic]))
        # In total: 232 held, 8 more reach max_connections (240), the next is turned away.
        for _ in range(8):
            held.append(connect(gw.port, "127.0.0.101"))
        total = RejectReason.TOO_MANY_CONNECTIONS
        extra = connect(gw.port, "127.0.0.102")
        held.append(extra)
        assert read_pdu(extra, 2) == (0x03, bytes([0, total.result, total.source, total.diagnostic]))
        assert proc_status(gw, "Threads") <= threads_before + 2
        # The 240 held ones were not refused: they just wait for ARTIM.
        assert rejected(gw, cap.label) == 1 and rejected(gw, total.label) == 1
    assert rejected(gw, "artim_expired") == 0
    time.sleep(0.3)  # the front door sees the 240 closes
    assert_echo_fast(gw)


def test_a_sender_turned_away_over_a_cap_reads_the_rejection_not_a_reset(make_gateway: MakeGateway) -> None:
    # The rejection is sent at the accept, while the sender's A-ASSOCIATE-RQ is
    # on its way. Closing at once would reset the connection under it: its
    # send fails or the rejection is lost, and it sees an abort (seen with
    # pynetdicom as a sender), not the transient refusal that says retry later.
    gw = hardened(make_gateway, max_connections_per_address=1)
    cap = RejectReason.TOO_MANY_FROM_ADDRESS
    with sockets() as held:
        held.append(associate(gw.port))
        for _ in range(3):
            extra = connect(gw.port)
            held.append(extra)
            extra.sendall(associate_rq())
            time.sleep(0.3)  # long after the rejection was sent
            extra.sendall(associate_rq())  # a sender that has not read it yet
            assert read_pdu(extra, 2) == (0x03, bytes([0, cap.result, cap.source, cap.diagnostic]))
            assert closed_within(extra, 4), "a turned-away connection is kept only briefly"
        assert gw.metrics()["aigw_connections_open"] == 1, "a turned-away connection held a slot"
    assert rejected(gw, cap.label) == 3


def test_declared_4gb_pdu_is_aborted_before_its_body(make_gateway: MakeGateway) -> None:
    gw = hardened(make_gateway)
    hwm_before = proc_status(gw, "VmHWM")  # kB
    with sockets() as held:
        s = associate(gw.port)
        held.append(s)
        s.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))

        def stream() -> None:  # the body the attacker promised, as fast as loopback takes it
            chunk = bytes(1 << 20)
            try:
                for _ in range(400):
                    s.sendall(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=stream, daemon=True)
        t0 = time.monotonic()
        sender.start()
        reply = read_pdu(s, 5)
        seconds = time.monotonic() - t0
        abort = AbortReason.PDU_TOO_LARGE
        assert reply == (0x07, abort_body(abort)), reply
        assert seconds < 1.0, f"aborted after {seconds:.2f} s"
        sender.join(10)
        assert not sender.is_alive(), "the gateway kept reading the body"
    growth_mb = (proc_status(gw, "VmHWM") - hwm_before) / 1024
    assert growth_mb < 50, f"peak RSS grew {growth_mb:.0f} MB"
    assert rejected(gw, abort.label) == 1
    wait_for(lambda: gw.metrics()["aigw_associations_open"] == 0, 3, "the aborted association's slot")
    assert_echo_fast(gw)


def test_idle_and_slow_associations_are_aborted(make_gateway: MakeGateway) -> None:
    gw = hardened(make_gateway, idle_timeout_seconds=2)
    with sockets() as held:
        idle = associate(gw.port)
        slow = associate(gw.port)
        held += [idle, slow]
        t0 = time.monotonic()
        slow.sendall(struct.pack(">BBL", 0x04, 0, 1000))  # a PDU header, then one byte every 0.5 s

        def trickle() -> None:
            try:
                while time.monotonic() - t0 < 10:
                    slow.send(b"\0")
                    time.sleep(0.5)
            except OSError:
                pass

        threading.Thread(target=trickle, daemon=True).start()
        assert closed_within(idle, 2 + 2), "an idle association outlived idle_timeout_seconds"
        assert closed_within(slow, 2 + 2 - (time.monotonic() - t0)), "a PDU trickled in beyond idle_timeout_seconds"
    wait_for(lambda: gw.metrics()["aigw_associations_open"] == 0, 3, "the slots of the timed-out associations")
    assert rejected(gw, AbortReason.IDLE_TIMEOUT.label) == 2, "each timeout is counted"
    assert len(log_lines(gw, AbortReason.IDLE_TIMEOUT.label)) == 1, "logged once per peer and minute"
    assert_echo_fast(gw)


def test_association_limit_rejections_are_counted_and_logged(make_gateway: MakeGateway) -> None:
    gw = hardened(make_gateway, max_associations=2)
    with sockets() as held:
        held += [associate(gw.port), associate(gw.port)]
        for _ in range(3):
            done, _ = echo(gw)
            assert done.returncode != 0
            assert "Local Limit Exceeded" in done.stdout + done.stderr, done.stdout + done.stderr
    assert rejected(gw, "local_limit_exceeded") == 3
    assert len(log_lines(gw, "local_limit_exceeded")) == 1
    # The holders are gone (closed without a release): their slots come back.
    wait_for(lambda: echo(gw)[0].returncode == 0, 5, "C-ECHO after the holders closed")


def test_a_series_still_stores_through_the_front_door(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = hardened(make_gateway, max_pdu_bytes=16384)  # many PDUs per instance, each at the negotiated bound
    files = mr_series(tmp_path / "in", n=3)
    done = storescu(gw.port, files)
    assert done.returncode == 0, done.stdout + done.stderr
    stored = {k: v for k, v in gw.metrics().items() if k.startswith('aigw_instances_received_total{outcome="stored"')}
    assert sum(stored.values()) == 3, stored
    assert rejected(gw, "pdu_too_large") == 0


# ------------------------------------------------------------ unit checks
def test_checker_accepts_pynetdicom_encoded_requests() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "SCANNER"
    primitive.called_ae_title = "AIGW"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 2)
    contexts = [build_context(VERIFICATION), build_context("1.2.840.10008.5.1.4.1.1.4")]
    for i, cx in enumerate(contexts):
        cx.context_id = 2 * i + 1
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    assert check_associate_rq(pdu.encode()) is None
    assert check_associate_rq(associate_rq()) is None
    for name, (bad, abort) in MALFORMED.items():
        if bad[0] == 0x01 and len(bad) > 6:
            assert check_associate_rq(bad) is not None and check_associate_rq(bad)[0] == abort, name  # type: ignore[index]


def test_refusal_log_is_rate_limited_and_escaped(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.refusals")
    refusals = RefusalLog(logger, period_seconds=0.3, max_peers=4)
    with caplog.at_level(logging.WARNING, logger="tests.refusals"):
        for _ in range(5):
            refusals("127.0.0.2", "artim_expired", "x")
        refusals("127.0.0.3", "artim_expired", "x")
        time.sleep(0.35)
        refusals("127.0.0.2", "artim_expired", "x")
        for i in range(10):  # more peers than the table keeps: still logged, table bounded
            refusals(f"10.0.0.{i}", "malformed_request", "x")
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "127.0.0.2" in m]) == 2
    assert "4 more since the last report" in lines[2]
    assert len(lines) == 13
    assert len(refusals._last) <= 4
    assert escape('EVIL\r\n"AE"\x00\xe9') == 'EVIL\\r\\n\\"AE\\"\\x00\\xe9'


def test_aborts_table_matches_the_front_door() -> None:
    from tests.test_conformance import _first_int, doc_table

    documented = {
        (_first_int(r["Source"]), _first_int(r["Reason"]), r["Metric label"]) for r in doc_table("scp-aborts")
    }
    code = {(a.source, a.reason, a.label) for a in AbortReason.ALL if a.source is not None}
    assert documented == code, f"only in the statement {documented - code}; only in the code {code - documented}"
