"""The gateway service: wires the stages together and runs them.

One process, in the embedded default: pynetdicom's listener threads, the
completion loop, the local job pool, the sender and the metrics endpoint.
All state lives in the index, so a restart takes every stage up where it
stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.completion import Completer
from gateway.config import Config, MetricsAuth
from gateway.index import Index, JobState, SendState
from gateway.jobs import JobRunner, LocalExecutor
from gateway.listeners import ListenerPool, receive_path
from gateway.metrics import Metrics, MetricsServer, dependency_checks
from gateway.models import ModelRegistry
from gateway.plugins import PluginSet, discover
from gateway.routing import Router
from gateway.scu import Sender
from gateway.storage import DataDir

if TYPE_CHECKING:
    from gateway.dicomweb import DicomWebServer
    from gateway.distributed import JobPublisher

__all__ = ["Gateway"]


@contextmanager
def _naming_address(host: str, port: int) -> Iterator[None]:
    """Re-raise a bind failure with the address in it ("Address already in use: 0.0.0.0:11112")."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), f"{host}:{port}") from None

log = logging.getLogger(__name__)

_ANY_ADDRESS = ("0.0.0.0", "::", "")


def exposure_warnings(config: Config) -> list[str]:
    """What the configuration leaves open to anyone who can reach the host, with the keys that close it.

    The built-in defaults listen for DICOM on every interface and accept any
    calling AE (so that a first ``aigw serve`` receives at once); this says so
    instead of changing them under existing users.
    """
    out = []
    g, m = config.gateway, config.metrics
    if g.host in _ANY_ADDRESS and not g.allow_ae and not g.allow_hosts:
        out.append(
            f"the DICOM listener on {g.host or '*'}:{g.port} accepts associations from any address and any calling"
            ' AE title; restrict it with [gateway] allow_hosts = ["10.20.0.0/16"] (the scanner networks;'
            ' AIGW_ALLOW_HOSTS) and/or allow_ae = ["MRI_3T"] (AIGW_ALLOW_AE), or host = "127.0.0.1"'
        )
    if m.enabled and not _is_loopback(m.host) and m.auth == MetricsAuth.NONE:
        out.append(
            f"/metrics on {m.host or '*'}:{m.port} answers anyone without credentials; set [metrics] auth ="
            ' "bearer" with credential_file or credential_sha256 (AIGW_METRICS_AUTH,'
            ' AIGW_METRICS_CREDENTIAL_FILE), or host = "127.0.0.1"'
        )
    return out


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _warn_exposure(config: Config) -> None:
    """Warn once per start, in the log and on stderr (unless the log already goes there)."""
    import sys

    to_stderr = not any(getattr(h, "stream", None) is sys.stderr for h in logging.getLogger().handlers)
    for text in exposure_warnings(config):
        log.warning("open to the network: %s", text)
        if to_stderr:
            print(f"aigw: warning: open to the network: {text}", file=sys.stderr)


class Gateway:
    """The whole service; ``start()`` returns once every stage is up."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.configure(config)  # the site expectations the alert rules compare against
        self.data = DataDir(config.gateway.data_dir)
        self.index = Index(config.database_url)
        self._slow_checks = dependency_checks(self.index, self.data, config.metrics.cache_seconds)
        self.models = ModelRegistry(config.models.dir, config.models.providers)
        self.metrics.watch_models(self.models)
        self.plugins: PluginSet = discover(config, self.models)
        self.router = Router(
            config.routes,
            self.plugins.available,
            self.plugins.unavailable,
            default_quiet_seconds=config.completion.series_timeout_seconds,
        )
        problems = self.plugins.config_errors + self.router.check()
        if problems:
            from gateway.config import ConfigError

            raise ConfigError("\n".join(problems))
        self.listeners: ListenerPool | None = None
        if config.gateway.listener_count() > 1:
            self.listeners = ListenerPool(config, on_lost=self._listener_lost)
        # One ingest for every transport (DESIGN invariant 6); each listener maps its refusals.
        # With more listener processes, this one is row 0 of the caps they share.
        self.ingest, self.scp = receive_path(
            config,
            config.gateway,
            self.data,
            self.index,
            self.metrics,
            self.router.quiet_seconds,
            self.listeners.table.row(0) if self.listeners is not None else None,
        )
        # STOW-RS, the second transport of the same ingest (PS3.18 10.5), when enabled.
        self.dicomweb: DicomWebServer | None = None
        if config.dicomweb.enabled:
            from gateway.dicomweb import DicomWebServer

            self.dicomweb = DicomWebServer(config.dicomweb, config.gateway, self.ingest, self.data, self.metrics)
        dest_names = [d.name for d in config.destinations]
        self.completer = Completer(self.index, self.router, config.completion, self.metrics, dest_names)
        self.runner = JobRunner(
            config, self.index, self.data, self.models, self.plugins.available, self.metrics, __version__
        )
        self.executor: LocalExecutor | JobPublisher
        if config.jobs.executor == "celery":
            # Scale-out: jobs run on `aigw worker` nodes; this node only announces them.
            from gateway.distributed import JobPublisher

            self.executor = JobPublisher(self.index, config, self.metrics)
        else:
            self.executor = LocalExecutor(self.runner, self.index, config, self.metrics)
        self.sender = Sender(config, self.index, self.metrics)
        self.runner.sends_queued = self.sender.wake
        self.http: MetricsServer | None = None
        self._stopped = threading.Event()
        self.metrics.prime(__version__, list(self.plugins.available) + list(self.plugins.unavailable), dest_names)
        for name in self.plugins.available:
            self.metrics.pipeline_up.labels(pipeline=name).set(1)
        for name in self.plugins.unavailable:
            self.metrics.pipeline_up.labels(pipeline=name).set(0)

    # ------------------------------------------------------------------ health
    def readiness(self) -> dict[str, bool]:
        return {
            **self._slow_checks(),
            "listener": self.scp.is_up,
            **({"listener_processes": self.listeners.alive()} if self.listeners is not None else {}),
            # False while new instances get 0xA700 for space ("refusing for space").
            "free_space_above_watermark": not self.ingest.refusing_for_space(),
            **({"dicomweb": self.dicomweb.is_up} if self.dicomweb is not None else {}),
        }

    def liveness(self) -> str | None:
        """Why only a restart can help (``/healthz`` 503), or None."""
        if isinstance(self.executor, LocalExecutor) and self.executor.stuck:
            return "[jobs] workers threads are held by jobs abandoned for running past timeout_seconds; restart"
        return None

    def _listener_lost(self, number: int) -> None:
        """A listener process died: the associations it held were cut, so their series wait (abort grace)."""
        grace = self.config.completion.abort_grace_seconds
        n = self.index.defer_completion(None, now=time.time(), within=grace)
        log.info("listener process %d lost: %d open series wait at least %.0f s for their senders", number, n, grace)

    def refresh_gauges(self) -> None:
        counts = self.index.counts()
        self.metrics.queue_depth.set(counts["jobs"].get(JobState.QUEUED.value, 0))
        self.metrics.jobs_running.set(counts["jobs"].get(JobState.RUNNING.value, 0))
        self.metrics.send_backlog.set(counts["sends"].get(SendState.PENDING.value, 0))
        self.metrics.deadletter.set(counts["sends"].get(SendState.DEAD.value, 0))
        self.metrics.free_bytes.set(self.data.free_bytes())
        self.ingest.refusing_for_space()  # keeps aigw_refusing_for_space current between stores

    # --------------------------------------------------------------- lifecycle
    def start(self) -> None:
        _warn_exposure(self.config)
        left = self.data.clean_incoming()
        if left:
            log.info("removed %d partial upload(s) that were never acknowledged", left)
        # A restart cut every association that was open: none of their senders
        # said it was done, so no open series may complete on what it has yet.
        grace = self.config.completion.abort_grace_seconds
        deferred = self.index.defer_completion(None, now=time.time(), within=grace)
        if deferred:
            log.info("restart: %d open series wait at least %.0f s for their senders to resume", deferred, grace)
        if self.config.metrics.enabled:
            m = self.config.metrics
            with _naming_address(m.host, m.port):
                self.http = MetricsServer(
                    self.metrics,
                    m.host,
                    m.port,
                    self.readiness,
                    refresh=self.refresh_gauges,
                    settings=m,
                    listeners=None if self.listeners is None else self.listeners.expositions,
                    liveness=self.liveness,
                )
            self.http.start()
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.http.port)
        self.refresh_gauges()
        if isinstance(self.executor, LocalExecutor):
            # Jobs run here: load models before the first one. With the distributed
            # executor they run on workers, which warm up themselves.
            self.runner.warm_up()
        self.executor.start()
        self.sender.start()
        self.completer.start()
        self.ingest.start()
        with _naming_address(self.config.gateway.host, self.config.gateway.port):
            self.scp.start()
        if self.listeners is not None:
            assert self.scp.port is not None
            self.listeners.start(self.scp.port, self.scp.tls_port)
        if self.dicomweb is not None:
            with _naming_address(self.config.dicomweb.host, self.config.dicomweb.port):
                self.dicomweb.start()
        log.info(
            "aigw %s ready: pipelines %s; %s",
            __version__,
            ", ".join(sorted(self.plugins.available)) or "none",
            f"destinations {', '.join(d.name for d in self.config.destinations)}"
            if self.config.destinations
            else f"no destination: results go to {self.data.root / 'outbox'}",
        )

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping")
        if self.listeners is not None:
            self.listeners.stop()
        self.scp.stop()
        if self.dicomweb is not None:
            self.dicomweb.stop()
        self.ingest.stop()  # after every transport: none is receiving any more
        self.completer.stop()
        self.executor.stop(wait=True)
        self.sender.stop()
        if self.http is not None:
            self.http.stop()
        self.index.close()

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly."""
        stop = threading.Event()

        def _handler(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)
        self.start()
        try:
            while not stop.wait(15):
                try:
                    self.refresh_gauges()
                    self.data.clean_incoming(older_than=max(3600.0, 4 * self.config.gateway.network_timeout_seconds))
                except Exception:
                    log.exception("housekeeping failed")
        finally:
            self.stop()

    @property
    def metrics_port(self) -> int | None:
        return self.http.port if self.http else None

    @property
    def dicom_port(self) -> int | None:
        return self.scp.port

    @property
    def dicomweb_port(self) -> int | None:
        return self.dicomweb.port if self.dicomweb is not None else None

