"""Prometheus metrics and the HTTP endpoints ``/metrics``, ``/healthz``, ``/readyz``.

Names follow Prometheus conventions: one ``aigw_`` prefix, base units,
``_total`` on counters, ``_info`` for build data. Labels come only from
bounded sets (pipeline names, configured destinations and AE titles, fixed
outcome and reason enums), never from UIDs or patient data. Label
combinations known at start are exported as zero so alerts and rate()
work from the first scrape.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

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
    from gateway.config import Config
    from gateway.models import ModelRegistry

__all__ = ["Metrics", "MetricsServer", "STORE_OUTCOMES", "JOB_OUTCOMES", "SEND_OUTCOMES"]

log = logging.getLogger(__name__)

#: Outcomes of a received C-STORE, the ``outcome`` label of instances_received.
STORE_OUTCOMES = ("stored", "duplicate", "conflict", "refused_space", "refused_size", "invalid", "error")
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
            "aigw_instances_received_total", "C-STORE requests by outcome", ["outcome"], registry=r
        )
        self.bytes_received = Counter("aigw_received_bytes_total", "Bytes of instances stored", registry=r)
        self.associations_open = Gauge("aigw_associations_open", "Associations currently open", registry=r)
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
            self.instances_received.labels(outcome=o)
        from gateway.status import RejectReason

        for rej in RejectReason.ALL:
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


class MetricsServer:
    """A small HTTP server: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (ready)."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        readiness: Callable[[], dict[str, bool]],
        refresh: Callable[[], None] | None = None,
    ) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        if refresh is not None:
                            refresh()
                        self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                    elif path == "/healthz":
                        self._reply(200, b'{"status":"alive"}\n', "application/json")
                    elif path == "/readyz":
                        checks = readiness()
                        ok = all(checks.values())
                        body = json.dumps({"ready": ok, "checks": checks}).encode() + b"\n"
                        self._reply(200 if ok else 503, body, "application/json")
                    else:
                        self._reply(404, b"not found\n", "text/plain")
                except Exception:
                    log.exception("metrics endpoint %s failed", path)
                    self._reply(500, b"internal error\n", "text/plain")

            def _reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # scrapes every few seconds would flood the log

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="aigw-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
