"""The listener's front door: connections, ARTIM and the A-ASSOCIATE-RQ, before pynetdicom.

pynetdicom's server gives every accepted connection two threads and reads
from it without a deadline, so a peer that connects and stalls, or sends a
request pynetdicom cannot handle, holds an association slot. Here one
selector thread accepts every connection instead, at the cost of a few
bytes each, and enforces before any thread exists:

* caps on open connections, in total and per source address; a connection
  over a cap gets an A-ASSOCIATE-RJ (transient, local limit exceeded) at
  once and holds no slot, and its request is read and dropped until the
  peer closes, for a few seconds at most, so that it is not reset under the
  rejection;
* ARTIM (PS3.8 9.1.5): a whole A-ASSOCIATE-RQ must arrive within
  ``artim_seconds`` of the accept, or the connection is closed (PS3.8 9.2,
  state Sta2, event Evt18, action AA-2);
* the A-ASSOCIATE-RQ itself (:func:`check_associate_rq`, PS3.8 9.3.2): a
  malformed one gets an A-ABORT (action AA-1), a wrong protocol version an
  A-ASSOCIATE-RJ (PS3.8 9.3.4), and neither reaches pynetdicom;
* the association limit, counted like every other refusal;
* on the DICOM TLS port (PS3.15 B.9), the TLS handshake, done here without
  blocking and within ARTIM; a failed one (unknown CA, expired certificate,
  a plain client) is closed and counted as ``tls_handshake_failed``. From
  then on the TLS socket is read exactly as a plain one.

Only a complete, valid request is handed to pynetdicom's association
machinery (:class:`_HandoffServer`), with the bytes already read replayed
first by :class:`_BoundedSocket`. That adapter also keeps the established
association bounded: a PDU whose length field exceeds the maximum length we
negotiated (PS3.8 9.3.1, PS3.7 D.1) is answered with an A-ABORT before its
body is read, and one PDU must arrive within ``idle_seconds``. A connection
therefore holds at most one PDU of ``max_pdu_bytes`` in memory (pynetdicom
decodes it and streams the data set to a file).

Every refusal is counted by a bounded label (:class:`~gateway.status.RejectReason`,
:class:`~gateway.status.AbortReason`) and logged by :class:`RefusalLog` at
most once per peer, reason and minute, without the peer's raw bytes.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

from gateway._wakeup import Wakeup, event_driven
from gateway.slots import Caps, Slots, SlotTable
from gateway.status import Abort, AbortReason, Rejection, RejectReason

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.presentation import PresentationContext

    from gateway.config import GatewaySettings

__all__ = ["MAX_RQ_LENGTH", "FrontDoor", "FrontDoorLimits", "RefusalLog", "check_associate_rq", "escape"]

log = logging.getLogger(__name__)

#: Largest PDU-length field accepted in an A-ASSOCIATE-RQ. 128 presentation
#: contexts of 64-character UIDs with a dozen transfer syntaxes each fit in
#: about 40 kB; DCMTK's limit is of the same order.
MAX_RQ_LENGTH = 65_536
#: Protocol version to the last reserved field (PS3.8 Table 9-11, bytes 7-74).
_RQ_FIXED = 68
#: How often the selector loop wakes with nothing to do: to notice ended
#: associations and a stop request.
_TICK_SECONDS = 0.25
#: A connection turned away over a cap is kept, holding no slot, until its
#: peer closes, for at most this long and at most this many at a time (a
#: flood of them is closed at once). Closing at once while the peer's
#: A-ASSOCIATE-RQ is arriving resets the connection, and the peer then sees
#: an abort instead of the A-ASSOCIATE-RJ that tells it to retry later.
_TURNED_AWAY_LINGER_SECONDS = 5.0
_TURNED_AWAY_MAX = 256

Verdict = Rejection | Abort


def escape(raw: bytes | str, limit: int = 64) -> str:
    """Printable ASCII for a peer-supplied value, so that a log line is never forged."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    return text[:limit].encode("unicode_escape").decode("ascii").replace('"', '\\"')


def reject_pdu(rejection: Rejection) -> bytes:
    """Encode an A-ASSOCIATE-RJ PDU (PS3.8 9.3.4, Table 9-21)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, rejection.result, rejection.source, rejection.diagnostic)


def abort_pdu(abort: Abort) -> bytes:
    """Encode an A-ABORT PDU (PS3.8 9.3.8, Table 9-26); empty for a close without a PDU."""
    if abort.source is None or abort.reason is None:
        return b""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, abort.source, abort.reason)


def verdict_pdu(verdict: Verdict) -> bytes:
    return reject_pdu(verdict) if isinstance(verdict, Rejection) else abort_pdu(verdict)


# ---------------------------------------------------------------- validation
class _Bad(Exception):
    def __init__(self, verdict: Verdict, detail: str) -> None:
        super().__init__(detail)
        self.verdict = verdict
        self.detail = detail


def _items(data: memoryview, what: str) -> Iterator[tuple[int, memoryview]]:
    """Split ``data`` into (type, value) items: type, reserved, 2-byte length (PS3.8 9.3.2)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise _Bad(AbortReason.MALFORMED_REQUEST, f"{what}: truncated item header")
        kind, _, length = struct.unpack_from(">BBH", data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise _Bad(AbortReason.MALFORMED_REQUEST, f"{what}: item 0x{kind:02X} runs past the end")
        yield kind, data[offset + 4 : end]
        offset = end


def _check_context(value: memoryview, ids: set[int]) -> None:
    """A presentation context item (PS3.8 9.3.2.2): odd unique ID, one abstract, >= 1 transfer syntax."""
    if len(value) < 4:
        raise _Bad(AbortReason.MALFORMED_REQUEST, "presentation context item shorter than 4 bytes")
    cid = value[0]
    if cid % 2 == 0:
        raise _Bad(AbortReason.MALFORMED_REQUEST, f"presentation context ID {cid} is even (odd, 1 to 255)")
    if cid in ids:
        raise _Bad(AbortReason.MALFORMED_REQUEST, f"presentation context ID {cid} is proposed twice")
    ids.add(cid)
    counts: Counter[int] = Counter()
    for kind, sub in _items(value[4:], f"presentation context {cid}"):
        if kind not in (0x30, 0x40):
            raise _Bad(AbortReason.UNRECOGNISED_ITEM, f"presentation context {cid}: sub-item 0x{kind:02X}")
        if not sub:
            raise _Bad(AbortReason.MALFORMED_REQUEST, f"presentation context {cid}: empty syntax name")
        counts[kind] += 1
    if counts[0x30] != 1:
        raise _Bad(AbortReason.MALFORMED_REQUEST, f"presentation context {cid}: {counts[0x30]} abstract syntaxes")
    if counts[0x40] < 1:
        raise _Bad(AbortReason.MALFORMED_REQUEST, f"presentation context {cid}: no transfer syntax")


def _check_user_information(value: memoryview) -> None:
    """The user information item (PS3.8 9.3.2.3) must carry a 4-byte maximum length (PS3.7 D.1)."""
    lengths = [len(sub) for kind, sub in _items(value, "user information") if kind == 0x51]
    if lengths != [4]:
        raise _Bad(AbortReason.MALFORMED_REQUEST, "user information without one 4-byte maximum length")


def check_associate_rq(pdu: bytes) -> tuple[Verdict, str] | None:
    """Check a whole A-ASSOCIATE-RQ PDU (header included) against PS3.8 9.3.2.

    The front door uses :func:`_checked_associate_rq`, which also returns
    pynetdicom's decoding of an acceptable request.

    Parameters
    ----------
    pdu : bytes
        The PDU as received: type 0x01, reserved, 4-byte length, body.

    Returns
    -------
    tuple or None
        ``None`` if pynetdicom may negotiate it, otherwise the refusal and a
        description without the peer's bytes. Structural errors are aborts
        (PS3.8 9.2 action AA-1: invalid PDU); an unsupported protocol version
        is an A-ASSOCIATE-RJ (PS3.8 9.3.4).
    """
    found = _checked_associate_rq(pdu)
    return found if isinstance(found, tuple) else None


def _checked_associate_rq(pdu: bytes) -> tuple[Verdict, str] | A_ASSOCIATE_RQ:
    """:func:`check_associate_rq`, returning the decoded PDU (its primitive built) when it passes."""
    try:
        if len(pdu) < 6 + _RQ_FIXED:
            raise _Bad(AbortReason.MALFORMED_REQUEST, f"A-ASSOCIATE-RQ of {len(pdu)} bytes, under the fixed fields")
        kind, _, length = struct.unpack_from(">BBL", pdu)
        if kind != 0x01 or length != len(pdu) - 6:
            raise _Bad(AbortReason.MALFORMED_REQUEST, "not one whole A-ASSOCIATE-RQ")
        body = memoryview(pdu)[6:]
        counts: Counter[int] = Counter()
        ids: set[int] = set()
        for kind, value in _items(body[_RQ_FIXED:], "A-ASSOCIATE-RQ"):
            if kind == 0x10:
                if not value:
                    raise _Bad(AbortReason.MALFORMED_REQUEST, "empty application context name")
            elif kind == 0x20:
                _check_context(value, ids)
            elif kind == 0x50:
                _check_user_information(value)
            else:
                raise _Bad(AbortReason.UNRECOGNISED_ITEM, f"unknown item type 0x{kind:02X}")
            counts[kind] += 1
        if counts[0x10] != 1 or counts[0x50] != 1 or not ids:
            raise _Bad(
                AbortReason.MALFORMED_REQUEST,
                f"{counts[0x10]} application context(s), {len(ids)} presentation context(s), "
                f"{counts[0x50]} user information item(s); 1, at least 1 and 1 expected",
            )
        (version,) = struct.unpack_from(">H", body)
        if not version & 0x0001:  # bit 0: protocol version 1, the only one (PS3.8 Table 9-11)
            return RejectReason.PROTOCOL_VERSION_NOT_SUPPORTED, f"protocol version 0x{version:04X}"
    except _Bad as e:
        return e.verdict, e.detail
    # Defence in depth: what passed must also decode in pynetdicom, whose
    # failures here would otherwise end the association thread uncounted.
    try:
        rq = A_ASSOCIATE_RQ()
        rq.decode(pdu)
        primitive = rq.to_primitive()
    except Exception as e:
        return AbortReason.MALFORMED_REQUEST, f"pynetdicom cannot decode it ({type(e).__name__})"
    # pynetdicom decodes the replayed request again and builds its primitive
    # again (_decoded_once); for a sender that proposes every storage SOP class
    # those two were a third of an association's CPU. This one is handed over.
    rq.to_primitive = lambda: primitive  # type: ignore[method-assign]
    return rq


# ------------------------------------------------------------------- logging
class RefusalLog:
    """Log a refusal at most once per peer address, reason and period.

    An attacker's thousand connections a second make one line a minute, with
    the count of those not reported. The table of last reports is bounded.
    """

    def __init__(self, logger: logging.Logger, period_seconds: float = 60.0, max_peers: int = 4096) -> None:
        self._log = logger
        self._period = period_seconds
        self._max = max_peers
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, address: str, label: str, detail: str) -> None:
        now = time.monotonic()
        key = (address, label)
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self._period:
                self._last[key] = (last[0], last[1] + 1)
                return
            suppressed = last[1] if last is not None else 0
            self._last.pop(key, None)
            if len(self._last) >= self._max:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self._period}
                while len(self._last) >= self._max:  # all recent: forget the oldest
                    del self._last[next(iter(self._last))]
            self._last[key] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        self._log.warning("connection from %s refused (%s): %s%s", escape(address), label, detail, more)


# ------------------------------------------------------------------ limits
@dataclass(frozen=True)
class FrontDoorLimits:
    """What one connection may cost; see :class:`gateway.config.GatewaySettings`."""

    artim_seconds: float
    idle_seconds: float
    max_connections: int
    max_per_address: int
    max_associations: int
    #: Largest PDU-length field after negotiation: our Maximum Length
    #: Received (PS3.7 D.1), the bound of a P-DATA-TF's variable field.
    max_pdu_length: int

    @classmethod
    def from_settings(cls, s: GatewaySettings) -> FrontDoorLimits:
        return cls(
            artim_seconds=s.artim_timeout_seconds,
            idle_seconds=s.idle_timeout_seconds,
            max_connections=s.max_connections,
            max_per_address=s.max_connections_per_address,
            max_associations=s.max_associations,
            max_pdu_length=s.max_pdu_bytes,
        )


# ----------------------------------------------------------------- handoff
@dataclass
class _Handoff:
    """What the front door passes to pynetdicom's request handler as its ``request``."""

    sock: socket.socket
    replay: bytes
    door: FrontDoor
    #: pynetdicom's decoding of ``replay`` (the A-ASSOCIATE-RQ), done by the check.
    request: A_ASSOCIATE_RQ | None = None
    assoc: Association | None = None


class _BoundedSocket(AssociationSocket):
    """pynetdicom's socket wrapper with the A-ASSOCIATE-RQ replayed and every later PDU bounded.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type, reserved, length) and
    then ``recv(length)``, and polls :attr:`ready` with ``select`` before it.
    So :attr:`ready` is true while replayed bytes remain, :meth:`recv` serves
    them first, and a header whose length exceeds the bound is answered with
    an A-ABORT and returned as nothing: the DUL sees a closed connection
    (Evt17) and ends the association, and the body is never read.
    """

    def __init__(
        self, original: AssociationSocket, replay: bytes, door: FrontDoor, address: str, wakeup: Wakeup
    ) -> None:
        # Take over the wrapper pynetdicom built rather than run its __init__
        # again, which would queue a second transport-connection event (Evt5).
        self.__dict__.update(original.__dict__)
        self._replay = bytearray(replay)
        self._door = door
        self._peer = address
        self._header_next = True
        #: Set by the first abort of ours; a second path to the same end (the
        #: idle timer and a stalled read expire together) is not counted again.
        self._aborted = threading.Lock()
        self._wakeup = wakeup
        self._ended = False

    @property
    def ready(self) -> bool:
        if self._replay or self._ended:
            return True
        if self.socket is None or not self._is_connected:
            return False
        try:
            # Blocks until data, a reply to send, or a tick: see gateway._wakeup.
            return self._wakeup.wait_readable(self.socket)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # what pynetdicom's ready() does: the connection is gone
            return False

    def close(self) -> None:
        super().close()
        self._wakeup.close()

    def recv(self, nr_bytes: int) -> bytearray:
        _reading.socket = self  # the DUL thread reads only this association's socket
        if self._ended:
            return bytearray()  # after our A-ABORT: the DUL sees a closed connection and ends
        header = self._header_next and nr_bytes == 6
        replayed = bool(self._replay)
        data = self._read(nr_bytes)
        if not header:
            self._header_next = True
            return data
        self._header_next = len(data) < 6
        if len(data) == 6 and not replayed:
            kind, _, length = struct.unpack(">BBL", data)
            if length > self._door.limits.max_pdu_length:
                self._refuse(kind, length)
                return bytearray()
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes``; fewer if the peer closes, stalls or takes over ``idle_seconds`` for them."""
        out = self._replay[:nr_bytes]
        del self._replay[:nr_bytes]
        sock = self.socket
        assert sock is not None
        deadline = time.monotonic() + self._door.limits.idle_seconds
        while len(out) < nr_bytes:
            try:
                # The socket's timeout (idle_seconds, set at handoff) bounds each call, the deadline the PDU.
                chunk = sock.recv(min(nr_bytes - len(out), 1 << 20))
            except TimeoutError:
                self._abort(AbortReason.IDLE_TIMEOUT, f"sent nothing for {self._door.limits.idle_seconds:.0f} s")
                return out
            except OSError:
                return out
            if not chunk:
                return out
            out += chunk
            if len(out) < nr_bytes and time.monotonic() > deadline:
                self._abort(AbortReason.IDLE_TIMEOUT, f"took over {self._door.limits.idle_seconds:.0f} s for one PDU")
                return out
        return out

    def _refuse(self, kind: int, length: int) -> None:
        limit = self._door.limits.max_pdu_length
        self._abort(AbortReason.PDU_TOO_LARGE, f"PDU type 0x{kind:02X} declares {length} bytes (at most {limit})")

    def count_abort(self, abort: Abort, detail: str) -> bool:
        """Count and log the association's end, once; False if it was counted already."""
        if not self._aborted.acquire(blocking=False):
            return False
        self._door.refused(self._peer, abort, detail)
        return True

    def _abort(self, abort: Abort, detail: str) -> None:
        """Count, log, send the A-ABORT and close our side; pynetdicom sees the short read and ends."""
        if not self.count_abort(abort, detail):
            return
        self._ended = True
        try:
            assert self.socket is not None
            self.socket.sendall(abort_pdu(abort))
            # FIN after the A-ABORT; pynetdicom closes the socket as the association ends.
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass


#: The association socket the current thread reads: each pynetdicom DUL thread serves one.
_reading = threading.local()


def abort_association(abort: Abort, detail: str) -> bool:
    """Abort the association whose PDUs this thread is decoding (A-ABORT, counted, logged); False outside one.

    For code that pynetdicom calls while it decodes a PDU (the data set stream
    of :mod:`gateway._admission`): the next read of the association ends it.
    """
    sock: _BoundedSocket | None = getattr(_reading, "socket", None)
    if sock is None:
        return False
    sock._abort(abort, detail)
    return True


def _decoded_once(assoc: Association, replay: bytes, request: A_ASSOCIATE_RQ) -> None:
    """Let the DUL take the front door's decoding of the request instead of decoding its bytes again.

    ``DULServiceProvider._decode_pdu(bytestream)`` is replaced for its first
    call only, and only if the bytes are the replayed request; it triggers the
    same two events pynetdicom's does (EVT_DATA_RECV, EVT_PDU_RECV) and gives
    event Evt6 (A-ASSOCIATE-RQ PDU received, PS3.8 9.2). Any other call
    goes to pynetdicom's own method.
    """
    dul = assoc.dul
    original = dul._decode_pdu

    def decode(bytestream: bytearray) -> tuple[Any, str]:
        dul._decode_pdu = original  # type: ignore[method-assign]
        if bytes(bytestream) != replay:
            return original(bytestream)
        evt.trigger(assoc, evt.EVT_DATA_RECV, {"data": replay})
        evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": request})
        return request, "Evt6"

    dul._decode_pdu = decode  # type: ignore[method-assign]


class _HandoffHandler(RequestHandler):
    """pynetdicom's request handler, given a :class:`_Handoff` instead of a bare socket."""

    def setup(self) -> None:
        self._handoff: _Handoff = self.request  # type: ignore[assignment]
        self.request = self._handoff.sock

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        original = assoc.dul.socket
        assert original is not None
        # What Association.set_socket does, which refuses to replace a socket.
        door = self._handoff.door
        sock = _BoundedSocket(original, self._handoff.replay, door, self.client_address[0], event_driven(assoc))
        assoc.dul.socket = sock
        if self._handoff.request is not None:
            _decoded_once(assoc, self._handoff.replay, self._handoff.request)
        # pynetdicom's idle timer aborts a silent association (A-ABORT) and says
        # so only at ERROR without the peer; asked once before that abort, this counts and logs it.
        expired = assoc.dul.idle_timer_expired

        def idle_timer_expired() -> bool:
            if not expired():
                return False
            sock.count_abort(AbortReason.IDLE_TIMEOUT, f"sent nothing for {door.limits.idle_seconds:.0f} s")
            return True

        assoc.dul.idle_timer_expired = idle_timer_expired  # type: ignore[method-assign]
        self._handoff.assoc = assoc
        return assoc


class _SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, shared by its associations instead of deep-copied.

    pynetdicom deep-copies them for every association it creates
    (``RequestHandler._create_association``): for our 170 storage SOP classes
    of 45 transfer syntaxes each that took 47 ms, two thirds of the CPU of a
    C-ECHO association, so a scanner that opens one association per image
    was held to a few images a second. Nothing changes these objects:
    EVT_REQUESTED replaces the list with new contexts built from the proposal
    (:func:`gateway.scp._prefer_requestor_order`), and negotiation builds its
    own result contexts. A deep copy is therefore a new list of the same ones.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


class _HandoffServer(AssociationServer):
    """pynetdicom's association server, used for its binding and handler set-up, never its accept loop."""

    #: The kernel's queue of connections not yet accepted; the selector
    #: drains it at once, so this only absorbs bursts.
    request_queue_size = 128

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: None = None,
        evt_handlers: list[Any] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port
        shared = _SharedContexts(contexts)
        super().__init__(ae, address, ae_title, shared, ssl_context, evt_handlers, request_handler=_HandoffHandler)

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:
            # Several listener processes on one port: the kernel spreads new connections over them.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


# ----------------------------------------------------------------- the door
@dataclass
class _Conn:
    """A connection the front door holds: negotiating, or closing after a refusal."""

    sock: socket.socket
    peer: tuple[str, int]
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    need: int = 6
    closing: bool = False
    #: A TLS connection whose handshake is not done yet.
    handshaking: bool = False
    #: False for a connection turned away over a cap: it counts against none.
    holds_slot: bool = True


@dataclass
class _Listener:
    """A listening socket and, for the DICOM TLS port, its SSL context."""

    sock: socket.socket
    ssl_context: ssl.SSLContext | None = None


class FrontDoor:
    """Accept DICOM connections on one thread; hand valid requests to pynetdicom.

    Parameters
    ----------
    ae : pynetdicom.AE
        The configured application entity (contexts, timeouts, PDU size).
    address : tuple
        ``(host, port)`` to listen on; port 0 picks a free one.
    limits : FrontDoorLimits
        Caps and timeouts.
    evt_handlers : list
        pynetdicom event handlers bound to every association.
    count : callable
        Called with a refusal's metric label once per refusal.
    refusals : RefusalLog, optional
        Where refusals are logged; shared with the association policy.
    tls : tuple, optional
        ``((host, port), ssl_context)``: a DICOM TLS port beside the plain one,
        with the same caps and limits (PS3.15 B.9).
    reuse_port : bool
        Bind with ``SO_REUSEPORT``, so that other listener processes can bind
        the same ports (:mod:`gateway.listeners`).
    slots : Slots, optional
        Where connections and associations are counted against the caps in
        ``limits``: this process's row of a table shared by every listener
        process (:mod:`gateway.slots`); by default a table of its own.
    """

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        limits: FrontDoorLimits,
        evt_handlers: list[Any],
        count: Callable[[str], None],
        refusals: RefusalLog | None = None,
        tls: tuple[tuple[str, int], ssl.SSLContext] | None = None,
        reuse_port: bool = False,
        slots: Slots | None = None,
    ) -> None:
        self.limits = limits
        if slots is None:
            slots = SlotTable(Caps(limits.max_connections, limits.max_per_address, limits.max_associations)).row(0)
        self._slots = slots
        self._count = count
        self.refusals = refusals or RefusalLog(log)
        self._server = ae.make_server(
            address, evt_handlers=evt_handlers, server_class=_HandoffServer, reuse_port=reuse_port
        )
        assert self._server.socket is not None  # bound and listening
        self._listen: socket.socket = self._server.socket
        self._listen.setblocking(False)
        self.port = int(self._server.server_address[1])
        self._listeners = [_Listener(self._listen)]
        #: The DICOM TLS port, if any; bound here, so that a port in use fails the start.
        self.tls_port: int | None = None
        if tls is not None:
            try:
                tls_sock = socket.create_server(
                    tls[0], backlog=_HandoffServer.request_queue_size, reuse_port=reuse_port
                )
            except OSError:
                self._server.server_close()
                raise
            tls_sock.setblocking(False)
            self._listeners.append(_Listener(tls_sock, tls[1]))
            self.tls_port = int(tls_sock.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._turned_away = 0  # of self._conns, those that hold no slot
        self._live: list[tuple[Association, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aigw-frontdoor", daemon=True)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> int:
        """Start the selector thread; returns the bound port."""
        for listener in self._listeners:
            self._sel.register(listener.sock, selectors.EVENT_READ, listener)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop accepting and close every connection not yet handed off; associations run on."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for conn in list(self._conns.values()):
            self._close(conn)
        self._sel.close()
        for listener in self._listeners[1:]:
            listener.sock.close()
        self._server.server_close()

    @property
    def connections(self) -> int:
        """Connections open now: held here or handed off."""
        return len(self._conns) - self._turned_away + len(self._live)

    def refused(self, peer: str, verdict: Verdict, detail: str) -> None:
        """Count and log one refusal (thread-safe)."""
        self._count(verdict.label)
        self.refusals(peer, verdict.label, detail)

    # ----------------------------------------------------------------- loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                wait = min((c.deadline for c in self._conns.values()), default=now + _TICK_SECONDS) - now
                for key, _ in self._sel.select(min(max(wait, 0.0), _TICK_SECONDS)):
                    if isinstance(key.data, _Listener):
                        self._accept(key.data)
                    else:
                        self._service(key.data)
                self._expire(time.monotonic())
                self._prune()
            except Exception:
                # Nothing a peer sends may end the listener; a bug is logged and the loop goes on.
                log.exception("front door loop failed; continuing")
                time.sleep(_TICK_SECONDS)

    def _accept(self, listener: _Listener) -> None:
        for _ in range(64):  # then let established connections have a turn
            try:
                sock, peer = listener.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of file descriptors: the backlog waits
                self.refusals("-", "accept_failed", f"accept failed: {e.strerror}")
                time.sleep(_TICK_SECONDS)
                return
            sock.setblocking(False)
            address = str(peer[0])
            # Before a TLS handshake no DICOM can be spoken: over a cap, the TLS port only closes.
            plain = listener.ssl_context is None
            cap = self._slots.open(address)  # counted in every listener process's total
            if cap == "max_connections":
                self._turn_away(sock, peer, RejectReason.TOO_MANY_CONNECTIONS, cap, plain)
            elif cap is not None:
                self._turn_away(sock, peer, RejectReason.TOO_MANY_FROM_ADDRESS, cap, plain)
            else:
                if listener.ssl_context is not None:
                    # The handshake runs in the selector loop (_handshake), bounded by ARTIM.
                    sock = listener.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                conn = _Conn(sock, (address, int(peer[1])), time.monotonic() + self.limits.artim_seconds)
                conn.handshaking = not plain
                self._conns[sock.fileno()] = conn
                self._sel.register(sock, selectors.EVENT_READ, conn)

    def _turn_away(self, sock: socket.socket, peer: Any, rejection: Rejection, cap: str, answer: bool) -> None:
        """Refuse a connection over a cap: A-ASSOCIATE-RJ transient (if ``answer``), nothing held.

        The peer's request is then read and dropped until it closes, as after
        any refusal (Sta13), but within :data:`_TURNED_AWAY_LINGER_SECONDS`.
        """
        address = str(peer[0])
        self.refused(address, rejection, f"{cap} reached")
        try:
            if answer:
                sock.send(reject_pdu(rejection))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            answer = False
        if not answer or self._turned_away >= _TURNED_AWAY_MAX:
            sock.close()
            return
        deadline = time.monotonic() + min(self.limits.artim_seconds, _TURNED_AWAY_LINGER_SECONDS)
        conn = _Conn(sock, (address, int(peer[1])), deadline, closing=True, holds_slot=False)
        self._conns[sock.fileno()] = conn
        self._turned_away += 1
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _service(self, conn: _Conn) -> None:
        """Serve a readable (or, in a handshake, writable) connection.

        A TLS socket may hold decrypted bytes that the selector cannot see
        (``pending``), so it is read until it has none left.
        """
        if conn.handshaking and not self._handshake(conn):
            return
        while True:
            self._read(conn)
            sock = conn.sock
            if not (isinstance(sock, ssl.SSLSocket) and sock.fileno() in self._conns and sock.pending()):
                return

    def _handshake(self, conn: _Conn) -> bool:
        """One step of a TLS handshake (PS3.15 B.9); true once it is done."""
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            return False
        except ssl.SSLWantWriteError:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            return False
        except (ssl.SSLError, OSError) as exc:
            # The library's reason (e.g. CERTIFICATE_VERIFY_FAILED, WRONG_VERSION_NUMBER), never the peer's bytes.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.refused(conn.peer[0], AbortReason.TLS_HANDSHAKE_FAILED, f"TLS handshake failed: {escape(str(reason))}")
            self._close(conn)
            return False
        conn.handshaking = False
        self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        return True

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65_536 if conn.closing else conn.need - len(conn.buf))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)  # the peer closed (or reset): nothing to answer
            return
        if conn.closing:
            return  # Sta13: read and discard until the peer closes or ARTIM expires
        conn.buf += data
        if len(conn.buf) < conn.need:
            return
        if conn.need == 6:
            kind, _, length = struct.unpack(">BBL", conn.buf)
            if kind == 0x07:  # A-ABORT before a request: close (PS3.8 9.2, Sta2 Evt16, AA-2)
                self._close(conn)
            elif kind in (0x02, 0x03, 0x04, 0x05, 0x06):
                self._refuse(conn, AbortReason.UNEXPECTED_PDU, f"PDU type 0x{kind:02X} before an A-ASSOCIATE-RQ")
            elif kind != 0x01:
                self._refuse(conn, AbortReason.UNRECOGNISED_PDU, f"unknown PDU type 0x{kind:02X}")
            elif length > MAX_RQ_LENGTH:
                self._refuse(
                    conn, AbortReason.PDU_TOO_LARGE, f"A-ASSOCIATE-RQ declares {length} bytes (at most {MAX_RQ_LENGTH})"
                )
            elif length < _RQ_FIXED:
                self._refuse(conn, AbortReason.MALFORMED_REQUEST, f"A-ASSOCIATE-RQ declares {length} bytes")
            else:
                conn.need = 6 + length
            return
        found = _checked_associate_rq(bytes(conn.buf))
        if isinstance(found, tuple):
            self._refuse(conn, *found)
        elif not self._slots.associate():
            self._refuse(conn, RejectReason.TOO_MANY_ASSOCIATIONS, "max_associations reached")
        else:
            self._handoff(conn, found)

    def _refuse(self, conn: _Conn, verdict: Verdict, detail: str) -> None:
        """Answer with an A-ASSOCIATE-RJ or A-ABORT, then wait for the peer to close (PS3.8 9.2, Sta13)."""
        self.refused(conn.peer[0], verdict, detail)
        pdu = verdict_pdu(verdict)
        try:
            if pdu:
                conn.sock.send(pdu)  # 10 bytes into an empty send buffer
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.buf = bytearray()
        conn.closing = True
        conn.deadline = time.monotonic() + self.limits.artim_seconds

    def _handoff(self, conn: _Conn, request: A_ASSOCIATE_RQ) -> None:
        """Give a valid request to pynetdicom: its socket, the bytes read and their decoding, its own threads."""
        self._sel.unregister(conn.sock)
        del self._conns[conn.sock.fileno()]
        address = conn.peer[0]
        handoff = _Handoff(conn.sock, bytes(conn.buf), self, request)
        try:
            conn.sock.setblocking(True)
            # Bounds every blocking call pynetdicom makes on it, reads and sends alike.
            conn.sock.settimeout(self.limits.idle_seconds)
            self._server.finish_request(handoff, conn.peer)  # type: ignore[arg-type]
        except Exception:
            log.exception("could not hand the association from %s to pynetdicom", escape(address))
        if handoff.assoc is None:
            self._slots.dissociate()
            self._slots.close(address)
            conn.sock.close()
            return
        self._live.append((handoff.assoc, address))

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            if not conn.closing:
                self.refused(
                    conn.peer[0], AbortReason.ARTIM_EXPIRED, f"no A-ASSOCIATE-RQ within {self.limits.artim_seconds:g} s"
                )
            self._close(conn)

    def _prune(self) -> None:
        """Release the slots of associations whose threads have ended, on whatever path."""
        live = []
        for assoc, address in self._live:
            if assoc.is_alive():
                live.append((assoc, address))
            else:
                self._slots.dissociate()
                self._slots.close(address)
        self._live = live

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            if conn.holds_slot:
                self._slots.close(conn.peer[0])
            else:
                self._turned_away -= 1
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
