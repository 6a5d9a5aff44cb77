"""The DICOMweb HTTP server: STOW-RS routes, bearer authentication, uvicorn in the service's process.

Identity works as for DIMSE: each configured token, or client certificate
(mutual TLS, by its subject's common name), names a source, which ingest
records as the instance's calling AE, so routes' ``calling_ae`` and
``[gateway] allow_ae`` / ``allow_hosts`` apply to both transports. Tokens are
configured only as their SHA-256 and compared with
:func:`hmac.compare_digest` (RFC 6750 bearer tokens). HTTPS uses the same
BCP 195 context as the DICOM TLS port (:func:`gateway.tls.server_context`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any, ClassVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.config import DicomWebSettings, GatewaySettings, ListenerTLS
from gateway.frontdoor import RefusalLog
from gateway.ingest import Ingest, Source, Transport
from gateway.metrics import Metrics
from gateway.storage import DataDir
from gateway.tls import server_context
from gateway.uids import InvalidUID, checked_uid

from .store import DICOM_JSON, DICOM_MEDIA_TYPE, RequestRefused, ingest_parts, receive_parts, store_response

__all__ = ["DicomWebServer", "hash_token"]

log = logging.getLogger(__name__)

_STOP_GRACE_SECONDS = 5  # requests still running at stop get this long, then are cancelled (files removed)
#: Where a request's verified client certificate's subject CN sits in its ASGI scope.
_CLIENT_CN = "aigw.client_common_name"


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a bearer token is configured (``[[dicomweb.tokens]] sha256``)."""
    return hashlib.sha256(token.strip().encode("utf-8")).hexdigest()


class _CountResponses:
    """ASGI middleware: ``aigw_http_requests_total{code}`` for every response sent."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: AsgiMessage) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(code=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def common_name(peercert: dict[str, Any]) -> str | None:
    """The subject's one commonName of a verified peer certificate (:meth:`ssl.SSLSocket.getpeercert`).

    A subject with no or several common names authenticates as nobody, rather
    than as whichever of them happened to come first.
    """
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if len(names) == 1 else None


# uvicorn reads a request head for as long as the client takes and accepts any
# number of connections, so clients that connect and send a header a minute
# (slowloris), or never finish a TLS handshake, hold a file descriptor each
# until the process has none left; then the DICOM listener, which shares the
# process, cannot accept or store either. So the listening socket caps the
# connections open at once (_CappedListener) and the protocol times the
# request head (_GatewayH11).


@dataclass(frozen=True)
class _Refusals:
    """Where the receiver's own refusals (503, 408) are counted and logged."""

    count: Callable[[str], None]  # the status code, for aigw_http_requests_total
    log: RefusalLog

    def __call__(self, peer: str, status: str, detail: str) -> None:
        self.count(status[:3])
        self.log(peer, f"http_{status[:3]}", detail)


def _refusal(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode("ascii")


class _CountedSocket(socket.socket):
    """An accepted connection that gives its place back to its listener when it is closed."""

    _release: Callable[[], None] | None = None

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        super().close()


class _CappedListener(socket.socket):
    """The receiver's listening socket: at most ``limit`` accepted connections open at once.

    asyncio accepts through this object's :meth:`accept`, before any TLS
    handshake, so connections that stall in the handshake count too. One over
    the limit is closed at once, after a 503 on plain HTTP (a TLS client could
    not read one).
    """

    def setup(self, limit: int, tls: bool, refusals: _Refusals) -> None:
        self._limit = limit
        self._tls = tls
        self._refusals = refusals
        self._open = 0
        self._lock = threading.Lock()

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            fd, addr = self._accept()  # type: ignore[attr-defined]  # BlockingIOError once none is waiting
            conn = _CountedSocket(self.family, self.type, self.proto, fileno=fd)
            with self._lock:
                admitted = self._open < self._limit
                if admitted:
                    self._open += 1
            if admitted:
                conn._release = self._released
                return conn, addr
            self._refusals(str(addr[0]), "503 Service Unavailable", "max_connections reached")
            if not self._tls:
                try:
                    conn.setblocking(False)
                    conn.send(_refusal("503 Service Unavailable"))  # a few bytes into an empty buffer
                except OSError:
                    pass
            conn.close()

    def _released(self) -> None:
        with self._lock:
            self._open -= 1


class _GatewayH11(H11Protocol):
    """uvicorn's h11 protocol that times the request head and passes on the client certificate's CN.

    A request head (request line and headers) must be complete within
    ``header_seconds`` of the connection or of the previous answer, else 408
    and close. uvicorn does not fill the ASGI TLS extension, and the
    certificate is known only to the transport, so each connection (one
    protocol instance) wraps the app it hands its requests to.
    """

    #: Set on the subclass that :meth:`DicomWebServer.start` makes for its server.
    header_seconds: ClassVar[float]
    refusals: ClassVar[_Refusals]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._timed_cycle: object = None
        self._arm_head_timer()
        peer = transport.get_extra_info("peercert")  # {} or None unless the handshake verified one
        name = common_name(peer) if peer else None
        if name is not None:
            inner = self.app

            async def app(scope: Scope, receive: Receive, send: Send) -> None:
                scope.setdefault("extensions", {})[_CLIENT_CN] = name
                await inner(scope, receive, send)

            self.app = app

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._timed_cycle = self.cycle  # a request head is complete once uvicorn makes a new cycle
        self._head_timer = self.loop.call_later(self.header_seconds, self._head_expired)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.cycle is self._timed_cycle and not self.transport.is_closing():
            peer = self.client[0] if self.client else "-"
            self.refusals(peer, "408 Request Timeout", f"no complete request head within {self.header_seconds:g} s")
            self.transport.write(_refusal("408 Request Timeout"))
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._timed_cycle:
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_head_timer()  # for the next request on a kept-alive connection
        # Last: it may start a pipelined request at once, whose new cycle disarms the timer.
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


#: An error found before the whole body was read is answered after up to this
#: much more of the body has been read and dropped, as nginx's lingering close
#: does: closing with bytes unread makes the kernel reset the connection, and a
#: client that is still sending then sees a broken pipe instead of the answer.
_DRAIN_BYTES = 64 * 1024**2
_DRAIN_SECONDS = 2.0


class _Body:
    """A request's ASGI ``receive`` that notes whether the body was begun and read to its end."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.started = False
        self.ended = False

    async def __call__(self) -> AsgiMessage:
        self.started = True
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.ended = True
        return message

    async def drain(self, request: Request) -> None:
        """Read and drop what is left of the body, within :data:`_DRAIN_BYTES` and :data:`_DRAIN_SECONDS`."""
        if self.ended:
            return
        if not self.started and "100-continue" in request.headers.get("expect", "").lower():
            return  # the client sends the body only when told to continue, and never will be
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > _DRAIN_BYTES:
            return  # it could not be drained in time anyway
        loop = asyncio.get_running_loop()
        deadline, left = loop.time() + _DRAIN_SECONDS, _DRAIN_BYTES
        while not self.ended and left > 0:
            try:
                message = await asyncio.wait_for(self(), deadline - loop.time())
            except TimeoutError:
                return
            left -= len(message.get("body", b""))


def _error(status: int, detail: str, close: bool = False, headers: dict[str, str] | None = None) -> Response:
    """A plain-text error; ``close`` when the body was not read (the connection cannot be reused)."""
    h = dict(headers or {})
    if close:
        h["Connection"] = "close"
    return Response(detail + "\n", status_code=status, media_type="text/plain", headers=h)


class DicomWebServer:
    """STOW-RS on uvicorn, in a thread of the service's process.

    Parameters
    ----------
    settings : DicomWebSettings
        ``[dicomweb]``: address, tokens, TLS and limits.
    gateway : GatewaySettings
        ``allow_ae`` and ``allow_hosts`` apply here as to associations.
    ingest : Ingest
        The service's ingest, shared with the DIMSE listener.
    data : DataDir
        Parts are streamed into its ``incoming`` folder.
    metrics : Metrics
        ``aigw_http_requests_total``; ingest counts the instances.
    """

    def __init__(
        self, settings: DicomWebSettings, gateway: GatewaySettings, ingest: Ingest, data: DataDir, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.ingest = ingest
        self.data = data
        self.metrics = metrics
        self._tokens = [(t.sha256.encode("ascii"), t.source) for t in settings.tokens]
        self._certificates = {c.common_name: c.source for c in settings.certificates}
        self._ssl: ssl.SSLContext | None = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            # Built here, so that an unusable file fails the start with its key named.
            self._ssl = server_context(
                ListenerTLS(
                    cert_file=settings.tls_cert,
                    key_file=settings.tls_key,
                    ca_file=settings.tls_ca_file,
                    require_client_cert=settings.require_client_cert,
                ),
                section="dicomweb",
                keys=("tls_cert", "tls_key", "tls_ca_file"),
            )
        self._networks = [ipaddress.ip_network(h, strict=False) for h in gateway.allow_hosts]
        self._refusals = _Refusals(lambda code: metrics.http_requests.labels(code=code).inc(), RefusalLog(log))
        routes = [
            Route("/studies", self._stow, methods=["POST"]),
            Route("/studies/{study}", self._stow, methods=["POST"]),
        ]
        self.app = _CountResponses(Starlette(routes=routes), metrics)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30) -> int:
        """Bind and serve (non-blocking); returns the bound port.

        Raises
        ------
        OSError
            When the address cannot be bound.
        RuntimeError
            When the server does not come up within ``timeout`` seconds.
        """
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose
        # protocol says TCP, and without it each answer's second write waits for the
        # client's delayed ACK (40 ms per request, measured by ops/bench/stow.py).
        sock = _CappedListener(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setup(s.max_connections, self._ssl is not None, self._refusals)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port))
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            http=self._protocol(),
            ws="none",
            lifespan="off",
            log_config=None,  # the service configures logging; a library never does
            access_log=False,  # paths carry study UIDs; requests are logged by outcome instead
            server_header=False,
            ssl_context_factory=None if self._ssl is None else self._use_context,
            timeout_graceful_shutdown=_STOP_GRACE_SECONDS,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="aigw-dicomweb", daemon=True
        )
        self._thread.start()
        done = threading.Event()
        for _ in range(int(timeout * 20)):
            if self._server.started or not self._thread.is_alive():
                break
            done.wait(0.05)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"DICOMweb server on {s.host}:{self.port} did not start")
        scheme = "https" if self._ssl else "http"
        log.info("DICOMweb STOW-RS on %s://%s:%d/studies", scheme, s.host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop serving; requests in progress get a few seconds to finish, then their files are removed."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_GRACE_SECONDS + 10)
        self._server = None
        self._thread = None

    @property
    def is_up(self) -> bool:
        return self._server is not None and self._server.started and not self._server.should_exit

    def _protocol(self) -> type[_GatewayH11]:
        """The protocol class of this server: :class:`_GatewayH11` with this server's settings."""
        attrs = {"header_seconds": self.settings.header_timeout_seconds, "refusals": self._refusals}
        return type("_ServerH11", (_GatewayH11,), attrs)

    def _use_context(self, config: uvicorn.Config, default: object) -> ssl.SSLContext:
        assert self._ssl is not None
        return self._ssl

    # ---------------------------------------------------------------- requests
    def _authenticate(self, request: Request) -> str | Response:
        """The request's source name, or the 401/403 answer (RFC 6750 3).

        A bearer token decides when one is sent; otherwise a verified client
        certificate whose CN is configured; otherwise the anonymous source if allowed.
        """
        s = self.settings
        header = request.headers.get("authorization")
        client_cn = request.scope.get("extensions", {}).get(_CLIENT_CN)
        source: str | None = None
        if header is None and client_cn is not None:
            source = self._certificates.get(client_cn)
            if source is None:
                return _error(403, "this client certificate is not in [[dicomweb.certificates]]", True)
        elif header is None:
            if not s.allow_anonymous:
                return _error(401, "authentication required", True, {"WWW-Authenticate": 'Bearer realm="aigw"'})
            source = s.anonymous_source
        else:
            scheme, _, token = header.partition(" ")
            digest = hash_token(token).encode("ascii") if scheme.lower() == "bearer" and token.strip() else b""
            for known, name in self._tokens:
                # Every entry is compared, so the time taken says nothing about which one matched.
                if hmac.compare_digest(digest, known) and source is None:
                    source = name
            if source is None:
                challenge = 'Bearer realm="aigw", error="invalid_token"'
                return _error(401, "invalid bearer token", True, {"WWW-Authenticate": challenge})
        if self.gateway.allow_ae and source not in self.gateway.allow_ae:
            return _error(403, "this source is not in [gateway] allow_ae", True)
        if self._networks:
            try:
                addr = ipaddress.ip_address(request.client.host if request.client else "")
            except ValueError:
                return _error(403, "peer address not allowed", True)
            if not any(addr in n for n in self._networks):
                return _error(403, "peer address not allowed", True)
        return source

    async def _stow(self, request: Request) -> Response:
        """STOW-RS Store Instances (PS3.18 10.5): ``POST /studies[/{study}]``."""
        body = _Body(request.receive)
        response = await self._store(request, body)
        if response.status_code >= 400 and response.status_code != 408:  # a 408's client is not sending
            await body.drain(request)
        return response

    async def _store(self, request: Request, body: _Body) -> Response:
        who = self._authenticate(request)
        if isinstance(who, Response):
            return who
        address = request.client.host if request.client else ""
        study = request.path_params.get("study")
        if study is not None:
            try:
                study = checked_uid(study, "StudyInstanceUID of the target resource")
            except InvalidUID as exc:
                return _error(400, str(exc), True)
        ctype = Message()
        ctype["content-type"] = request.headers.get("content-type", "")
        # PS3.18 10.5.1.2: multipart/related; type="application/dicom"; boundary=...
        if ctype.get_content_type() != "multipart/related":
            return _error(415, 'Content-Type must be multipart/related; type="application/dicom"', True)
        part_type = str(ctype.get_param("type") or DICOM_MEDIA_TYPE).split(";", 1)[0].strip().lower()
        if part_type != DICOM_MEDIA_TYPE:
            return _error(415, f"multipart/related of {part_type} is not supported; only {DICOM_MEDIA_TYPE}", True)
        boundary = ctype.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            return _error(400, "Content-Type has no boundary parameter", True)
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return _error(413, f"request body exceeds max_request_bytes={limit}", True)
        source = Source(Transport.DICOMWEB, who, address)
        try:
            parts = await receive_parts(
                body,
                boundary.encode("latin-1"),
                self.data.incoming,
                limit,
                self.settings.request_timeout_seconds,
                self.metrics,
            )
        except RequestRefused as exc:
            log.warning("STOW-RS request from %s refused with HTTP %d: %s", who, exc.status, exc.detail)
            return _error(exc.status, exc.detail, True)
        results = await ingest_parts(self.ingest, parts, study, source)
        status, answer = store_response(results)
        failed = sum(r.failure is not None for r in results)
        log.info(
            "STOW-RS from %s: %d part(s), %d stored, %d failed; HTTP %d",
            who,
            len(results),
            len(results) - failed,
            failed,
            status,
        )
        return Response(json.dumps(answer), status_code=status, media_type=DICOM_JSON)
