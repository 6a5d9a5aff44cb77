"""Prometheus metrics and the HTTP endpoints ``/metrics``, ``/healthz``, ``/readyz``.

Names follow Prometheus conventions: one ``aigw_`` prefix, base units,
``_total`` on counters, ``_info`` for build data. Labels come only from
bounded sets (pipeline names, configured destinations and AE titles, fixed
outcome and reason enums), never from UIDs or patient data. Label
combinations known at start are exported as zero so alerts and rate()
work from the first scrape.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import queue
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway._gpu import GpuCollector

if TYPE_CHECKING:
    from gateway.config import Config, MetricsSettings
    from gateway.index import Index
    from gateway.models import ModelRegistry
    from gateway.storage import DataDir

__all__ = [
    "JOB_OUTCOMES",
    "SEND_OUTCOMES",
    "STORE_OUTCOMES",
    "Metrics",
    "MetricsServer",
    "Throttled",
    "dependency_checks",
]

log = logging.getLogger(__name__)

#: Outcomes of a received instance, the ``outcome`` label of instances_received.
STORE_OUTCOMES = ("stored", "duplicate", "conflict", "refused_space", "refused_size", "invalid", "error")
#: How it arrived, the ``transport`` label of instances_received (gateway.ingest.Transport values).
TRANSPORTS = ("dimse", "dicomweb")
#: HTTP statuses the DICOMweb receiver answers, the ``code`` label of http_requests (PS3.18 10.5.3.1, 8.5).
HTTP_CODES = ("200", "202", "400", "401", "403", "404", "405", "408", "409", "413", "415", "500", "503")
JOB_OUTCOMES = ("succeeded", "failed", "retried")
SEND_OUTCOMES = ("sent", "retry", "dead")
COMPLETION_CAUSES = ("timer", "hint", "release", "forced")

#: ONNX Runtime execution providers that need a GPU.
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class _ModelInfoCollector:
    """``aigw_model_info{model, version, provider} 1`` for each model whose session is loaded, read at scrape.

    Labels stay bounded: model names and versions come from the manifests in
    the models directory, providers from the few ONNX Runtime was built with.
    """

    def __init__(self) -> None:
        self.models: ModelRegistry | None = None  # set by Metrics.watch_models

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "aigw_model_info",
            "1 for each loaded model session, with the execution provider it runs on",
            labels=["model", "version", "provider"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        loaded = self.models.loaded() if self.models is not None else {}
        for name, (version, provider) in sorted(loaded.items()):
            family.add_metric([name, version, provider], 1)
        yield family


class Metrics:
    """Every metric of the gateway, on an injectable registry.

    Parameters
    ----------
    registry : CollectorRegistry, optional
        Where the metrics live; default a new one (tests pass their own).
    nvml : module, optional
        pynvml's API for the GPU metrics; default ``pynvml`` itself (tests pass a fake).
    """

    def __init__(self, registry: CollectorRegistry | None = None, nvml: Any = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Gauge("aigw_build_info", "Build information", ["version"], registry=r)
        self.instances_received = Counter(
            "aigw_instances_received_total",
            "Instances received (C-STORE requests, STOW-RS parts) by outcome and transport",
            ["outcome", "transport"],
            registry=r,
        )
        self.http_requests = Counter(
            "aigw_http_requests_total", "DICOMweb (STOW-RS) requests answered, by HTTP status", ["code"], registry=r
        )
        self.bytes_received = Counter("aigw_received_bytes_total", "Bytes of instances stored", registry=r)
        self.associations_open = Gauge("aigw_associations_open", "Associations currently open", registry=r)
        self.connections_open = Gauge(
            "aigw_connections_open",
            "DICOM connections open now: before the association request and after it (compare with max_connections)",
            registry=r,
        )
        self.associations_accepted = Counter(
            "aigw_associations_accepted_total", "Associations accepted", registry=r
        )
        self.associations_rejected = Counter(
            "aigw_associations_rejected_total", "Associations rejected by reason", ["reason"], registry=r
        )
        self.series_completed = Counter(
            "aigw_series_completed_total", "Series completed, by what completed them", ["cause"], registry=r
        )
        self.series_unrouted = Counter(
            "aigw_series_unrouted_total", "Complete series that matched no route", registry=r
        )
        self.jobs = Counter(
            "aigw_jobs_total", "Job attempts finished, by pipeline and outcome", ["pipeline", "outcome"], registry=r
        )
        self.job_duration = Histogram(
            "aigw_job_duration_seconds",
            "Wall time of a job attempt (load, inference, DICOM writing)",
            ["pipeline"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.job_latency = Histogram(
            "aigw_series_to_result_seconds",
            "Time from series completion to results stored for sending",
            ["pipeline"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "aigw_inference_duration_seconds",
            "Time spent in ONNX Runtime session.run per job",
            ["pipeline"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pipeline_flags = Counter(
            "aigw_pipeline_flags_total",
            "Events a pipeline flagged for attention (e.g. slices failing a consistency check)",
            ["pipeline", "kind"],
            registry=r,
        )
        self.queue_depth = Gauge("aigw_jobs_queued", "Jobs waiting to run", registry=r)
        self.jobs_running = Gauge("aigw_jobs_running", "Jobs running", registry=r)
        self.jobs_abandoned = Gauge(
            "aigw_jobs_abandoned",
            "Threads still running a job failed for running past [jobs] timeout_seconds (at [jobs] workers: stuck)",
            registry=r,
        )
        self.sends = Counter(
            "aigw_send_attempts_total", "C-STORE sends by destination and outcome", ["destination", "outcome"],
            registry=r,
        )
        self.send_backlog = Gauge("aigw_sends_pending", "Output instances waiting to be sent", registry=r)
        self.deadletter = Gauge("aigw_deadletter_size", "Sends in the dead-letter list", registry=r)
        self.free_bytes = Gauge("aigw_data_dir_free_bytes", "Free bytes on the data dir filesystem", registry=r)
        self.pipeline_up = Gauge(
            "aigw_pipeline_available", "1 if the pipeline plugin is loaded and its models verified", ["pipeline"],
            registry=r,
        )
        self.last_received = Gauge(
            "aigw_last_instance_received_timestamp_seconds", "Unix time of the last stored instance", registry=r
        )
        # Site expectations from the configuration (see configure()), exported so
        # that one set of alert rules serves every site: the rules compare the
        # live values above with these instead of hard-coding thresholds.
        self.expected_max_silence = Gauge(
            "aigw_expected_max_silence_seconds",
            "Longest expected time without a stored instance ([metrics] max_silence_seconds; 0: no alert)",
            registry=r,
        )
        self.min_free_bytes = Gauge(
            "aigw_data_dir_min_free_bytes",
            "Free space under which new instances are refused with 0xA700 ([gateway] min_free_bytes)",
            registry=r,
        )
        self.refusing_for_space = Gauge(
            "aigw_refusing_for_space",
            "1 while free space in the data dir is under min_free_bytes: new instances get 0xA700, /readyz not ready",
            registry=r,
        )
        self.gpu_expected = Gauge(
            "aigw_gpu_expected", "1 if the configuration expects a GPU (see [metrics] expect_gpu)", registry=r
        )
        # GPU use and memory (aigw_gpu_*), read through NVML on each scrape.
        r.register(GpuCollector(nvml))
        # process_start_time_seconds lets the silence alert count from the start
        # of a process that has not received anything yet.
        ProcessCollector(registry=r)
        # aigw_model_info, filled from the model registry at each scrape (see watch_models).
        self._model_info = _ModelInfoCollector()
        r.register(self._model_info)

    def watch_models(self, models: ModelRegistry) -> None:
        """Export ``aigw_model_info`` for the sessions that ``models`` has loaded."""
        self._model_info.models = models

    def prime(self, version: str, pipelines: Iterable[str], destinations: Iterable[str]) -> None:
        """Export known label combinations as zero so series exist from the start."""
        self.build_info.labels(version=version).set(1)
        for o in STORE_OUTCOMES:
            for t in TRANSPORTS:
                self.instances_received.labels(outcome=o, transport=t)
        for code in HTTP_CODES:
            self.http_requests.labels(code=code)
        from gateway.status import AbortReason, RejectReason

        for rej in (*RejectReason.ALL, *AbortReason.ALL):
            self.associations_rejected.labels(reason=rej.label)
        for c in COMPLETION_CAUSES:
            self.series_completed.labels(cause=c)
        for p in pipelines:
            for o in JOB_OUTCOMES:
                self.jobs.labels(pipeline=p, outcome=o)
            self.job_duration.labels(pipeline=p)
            self.job_latency.labels(pipeline=p)
            self.inference_duration.labels(pipeline=p)
        for d in destinations:
            for o in SEND_OUTCOMES:
                self.sends.labels(destination=d, outcome=o)

    def configure(self, config: Config) -> None:
        """Export the site expectations that the alert rules compare against.

        ``aigw_gpu_expected`` is 1 when ``[metrics] expect_gpu`` is true, or when
        it is unset and ``[models] providers`` names a GPU execution provider
        explicitly (``"auto"`` falls back to the CPU by design, so it expects nothing).
        """
        m = config.metrics
        self.expected_max_silence.set(m.max_silence_seconds)
        self.min_free_bytes.set(config.gateway.min_free_bytes)
        providers = config.models.providers
        expected = m.expect_gpu
        if expected is None:
            expected = providers != "auto" and any(p in _GPU_PROVIDERS for p in providers)
        self.gpu_expected.set(1 if expected else 0)


class _Conn:
    """One client connection of :class:`MetricsServer`: what it sent so far, what it still has to read."""

    __slots__ = ("sock", "inbox", "outbox", "deadline", "busy")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.inbox = b""
        self.outbox = b""
        self.deadline = deadline
        self.busy = False  # a worker is answering it: neither read nor timed out meanwhile


def _http_response(code: int, body: bytes, ctype: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    head = [f"HTTP/1.1 {code} {HTTPStatus(code).phrase}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in extra]
    head.append("Connection: close")  # one request per connection: nothing idles between scrapes
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


#: What a listener process (gateway.listeners) adds to the gateway's own samples: the families
#: its receive path moves, summed over the processes, or the largest value for those that hold
#: one state for all (a timestamp, a 0/1 flag).
_LISTENER_SUMMED = frozenset(
    {
        "aigw_instances_received",
        "aigw_received_bytes",
        "aigw_associations_open",
        "aigw_associations_accepted",
        "aigw_associations_rejected",
        "aigw_connections_open",
    }
)
_LISTENER_MAXED = frozenset({"aigw_last_instance_received_timestamp_seconds", "aigw_refusing_for_space"})


def merge_expositions(own: bytes, listeners: Sequence[bytes]) -> bytes:
    """The gateway's exposition with the listener processes' receive-path samples added in.

    Every family of ``own`` stays as it is, in its order; of each listener's
    exposition only the families in ``_LISTENER_SUMMED`` (added to the same
    name and labels) and ``_LISTENER_MAXED`` (the largest kept) count.
    A listener's text that does not parse is left out, not the scrape.
    """
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families = {f.name: f for f in text_string_to_metric_families(own.decode())}
    values = {n: {(x.name, tuple(sorted(x.labels.items()))): x.value for x in f.samples} for n, f in families.items()}
    for text in listeners:
        try:
            theirs = list(text_string_to_metric_families(text.decode()))
        except ValueError:
            log.warning("a listener process's metrics did not parse; left out of this scrape")
            continue
        for fam in theirs:
            if fam.name not in values or (fam.name not in _LISTENER_SUMMED and fam.name not in _LISTENER_MAXED):
                continue
            mine = values[fam.name]
            for x in fam.samples:
                key = (x.name, tuple(sorted(x.labels.items())))
                if fam.name in _LISTENER_MAXED:
                    mine[key] = max(mine.get(key, x.value), x.value)
                else:
                    mine[key] = mine.get(key, 0.0) + x.value
    merged = []
    for name, fam in families.items():
        out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        out.samples = [Sample(n, dict(labels), v) for (n, labels), v in values[name].items()]
        merged.append(out)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merged))
    return generate_latest(registry)


class _Fixed:
    """A collector of families computed beforehand (merge_expositions renders through the library)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


_T = TypeVar("_T")


class Throttled(Generic[_T]):
    """``fn()``'s last answer, computed again at most every ``seconds`` however often it is asked.

    A scrape or probe loop must not become a load on the database or the
    disk. A call that raises counts as a run, so a sick dependency rests: the
    exception reaches that caller, and the others until the next run get the
    last good answer (``default`` before the first).
    """

    def __init__(
        self, fn: Callable[[], _T], seconds: float, default: _T, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fn = fn
        self._seconds = seconds
        self._value = default
        self._clock = clock
        self._at: float | None = None
        self._lock = threading.Lock()

    def __call__(self) -> _T:
        with self._lock:
            now = self._clock()
            if self._at is None or now - self._at >= self._seconds:
                self._at = now
                self._value = self._fn()
            return self._value


def dependency_checks(index: Index, data: DataDir, seconds: float) -> Throttled[dict[str, bool]]:
    """The readiness checks that cost a write transaction and a file write, run at most every ``seconds``.

    ``/readyz`` is open to anyone who reaches the port, and on SQLite the
    write transaction takes the lock that ingest needs.
    """
    return Throttled(
        lambda: {"database": index.ping(), "data_dir_writable": data.is_writable()},
        seconds,
        {"database": False, "data_dir_writable": False},
    )


class MetricsServer:
    """A small HTTP server: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (ready).

    Its cost stays bounded whatever clients do (a slow or half-sent request, a
    flood of connections, scrapes in a tight loop):

    * one selector thread reads every request and writes every answer, so a
      connection that sends slowly costs a socket and a buffer, never a thread;
      answers are computed on a pool of ``_WORKERS`` threads;
    * at most ``max_connections`` are open; a new one beyond that closes the
      oldest that has not finished sending its request (so a flood of half-sent
      requests cannot lock out the scraper), or itself when every open one is
      being answered;
    * a client has ``read_timeout_seconds`` from connecting to send its request
      head (at most 16 KiB), and as long again to read the answer;
    * the index-derived gauges (``refresh``) are recomputed at most every
      ``cache_seconds``, so scrapes never query the database more often;
    * ``/metrics`` asks for HTTP basic (RFC 7617) or bearer (RFC 6750)
      credentials when ``[metrics] auth`` says so, compared as SHA-256 digests in
      constant time. ``/healthz`` and ``/readyz`` stay open: Kubernetes and
      Docker probes carry no credentials, and they tell nothing but up or down.

    Parameters
    ----------
    metrics : Metrics
        The registry to expose.
    host, port : str, int
        Where to listen (port 0: a free one, see :attr:`port`).
    readiness : callable
        The checks of ``/readyz``, by name.
    liveness : callable, optional
        Why the process needs a restart (``/healthz`` answers 503 with it), or
        None while it is alive (always, by default).
    refresh : callable, optional
        Brings the index-derived gauges up to date; called at most every ``cache_seconds``.
    settings : MetricsSettings, optional
        ``[metrics]``: auth, credential, cache_seconds, max_connections, read_timeout_seconds.
    listeners : callable, optional
        The expositions of the listener processes (:mod:`gateway.listeners`), merged into ``/metrics``.
    """

    _WORKERS = 4
    _MAX_HEAD = 16 * 1024

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        readiness: Callable[[], dict[str, bool]],
        refresh: Callable[[], None] | None = None,
        settings: MetricsSettings | None = None,
        listeners: Callable[[], list[bytes]] | None = None,
        liveness: Callable[[], str | None] | None = None,
    ) -> None:
        from gateway.config import MetricsSettings

        self._listeners = listeners
        self._liveness = liveness

        self._registry = metrics.registry
        self._readiness = readiness
        self._settings = settings or MetricsSettings()
        self._refresh = None if refresh is None else Throttled(refresh, self._settings.cache_seconds, None)
        self._warned_credential = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((host, port))
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._conns: OrderedDict[socket.socket, _Conn] = OrderedDict()  # oldest first
        self._answered: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(self._WORKERS, thread_name_prefix="aigw-metrics-worker")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="aigw-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._selector.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    # ------------------------------------------------------------ the selector
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the pair is full (the loop wakes anyway) or closed (stopping)
            pass

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._turn()
            except Exception:  # never let the endpoint die silently; the next turn starts afresh
                log.exception("metrics endpoint loop failed")
                time.sleep(0.1)

    def _turn(self) -> None:
        """One round of the selector: accept, read, write, and close what timed out."""
        now = time.monotonic()
        deadlines = [c.deadline for c in self._conns.values() if not c.busy]
        timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
        for key, events in self._selector.select(min(timeout, 1.0)):
            sock = key.fileobj
            if sock is self._listener:
                self._accept()
            elif sock is self._wake_r:
                self._drain_answers()
            elif (conn := self._conns.get(sock)) is not None:  # type: ignore[call-overload]
                if events & selectors.EVENT_READ:
                    self._read(conn)
                elif events & selectors.EVENT_WRITE:
                    self._write(conn)
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if not c.busy and c.deadline <= now]:
            self._close(conn)  # too slow to send its request or to read its answer

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.warning("metrics endpoint: accept failed (out of file descriptors?)", exc_info=True)
                return
            if len(self._conns) >= self._settings.max_connections:
                waiting = next((c for c in self._conns.values() if not c.busy and not c.outbox), None)
                if waiting is None:  # every open connection is being answered: refuse the newcomer
                    sock.close()
                    continue
                self._close(waiting)
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self._settings.read_timeout_seconds)
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbox += data
        end = conn.inbox.find(b"\r\n\r\n")
        if end < 0 and len(conn.inbox) > self._MAX_HEAD:
            self._respond(conn, _http_response(431, b"request head too large\n", "text/plain"))
        elif end >= 0:
            conn.busy = True
            self._selector.unregister(conn.sock)
            self._pool.submit(self._answer, conn, conn.inbox[:end])

    def _respond(self, conn: _Conn, data: bytes) -> None:
        conn.busy = False
        conn.outbox = data
        conn.deadline = time.monotonic() + self._settings.read_timeout_seconds
        try:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        except KeyError:
            self._selector.register(conn.sock, selectors.EVENT_WRITE)

    def _drain_answers(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                conn, data = self._answered.get_nowait()
            except queue.Empty:
                return
            if conn.sock in self._conns:
                self._respond(conn, data)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -------------------------------------------------------------- the pool
    def _answer(self, conn: _Conn, head: bytes) -> None:
        try:
            data = self._handle(head)
        except Exception:
            log.exception("metrics endpoint failed")
            data = _http_response(500, b"internal error\n", "text/plain")
        self._answered.put((conn, data))
        self._wake()

    def _handle(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _http_response(400, b"bad request\n", "text/plain")
        method, target, _ = parts
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if method not in ("GET", "HEAD"):
            return _http_response(405, b"method not allowed\n", "text/plain", [("Allow", "GET, HEAD")])
        path = target.split("?", 1)[0]
        if path == "/metrics":
            if not self._authorized(headers.get("authorization", "")):
                challenge = f'{self._settings.auth.value.capitalize()} realm="aigw metrics"'
                return _http_response(401, b"unauthorized\n", "text/plain", [("WWW-Authenticate", challenge)])
            if self._refresh is not None:
                self._refresh()
            body = generate_latest(self._registry)
            if self._listeners is not None:
                body = merge_expositions(body, self._listeners())
            ctype = CONTENT_TYPE_LATEST
        elif path == "/healthz":
            reason = self._liveness() if self._liveness is not None else None
            if reason is not None:
                body = json.dumps({"status": "stuck", "reason": reason}).encode() + b"\n"
                reply = _http_response(503, body, "application/json")
                return reply[: len(reply) - len(body)] if method == "HEAD" else reply
            body, ctype = b'{"status":"alive"}\n', "application/json"
        elif path == "/readyz":
            checks = self._readiness()
            ok = all(checks.values())
            body = json.dumps({"ready": ok, "checks": checks}).encode() + b"\n"
            reply = _http_response(200 if ok else 503, body, "application/json")
            return reply[: len(reply) - len(body)] if method == "HEAD" else reply
        else:
            return _http_response(404, b"not found\n", "text/plain")
        reply = _http_response(200, body, ctype)
        return reply[: len(reply) - len(body)] if method == "HEAD" else reply

    def _authorized(self, header: str) -> bool:
        """Whether the ``Authorization`` header carries the configured credential (always, with auth "none")."""
        from gateway.config import MetricsAuth

        s = self._settings
        if s.auth == MetricsAuth.NONE:
            return True
        scheme, _, value = header.strip().partition(" ")
        value = value.strip()
        if s.auth == MetricsAuth.BASIC:
            if scheme.lower() != "basic":
                return False
            try:
                user, sep, secret = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            user_ok = hmac.compare_digest(user.encode(), s.username.encode())
            given = secret if sep else ""
        else:
            if scheme.lower() != "bearer":
                return False
            user_ok, given = True, value
        expected = self._expected_digest()
        if expected is None:
            return False
        return user_ok & hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected)

    def _expected_digest(self) -> bytes | None:
        s = self._settings
        if s.credential_sha256 is not None:
            return bytes.fromhex(s.credential_sha256)
        assert s.credential_file is not None  # MetricsSettings checks that one of the two is set
        try:
            secret = s.credential_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            secret = ""
            reason = exc.strerror or type(exc).__name__
        else:
            reason = "empty"
        if not secret:
            if not self._warned_credential:
                self._warned_credential = True
                log.error(
                    "metrics.credential_file %s: %s; /metrics answers 401 until it holds the secret",
                    s.credential_file,
                    reason,
                )
            return None
        self._warned_credential = False
        return hashlib.sha256(secret.encode()).digest()
