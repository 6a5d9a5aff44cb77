"""Scale-out: jobs run on worker nodes, woken through a Celery broker (``jobs.executor = "celery"``).

Topology::

    scanners --C-STORE--> gateway node (aigw serve) --C-STORE--> PACS
                          SCP, completion, routing, sending;
                          announces runnable jobs by id
                              |                  ^
                     job ids  v                  | outputs + sends recorded in the index
                  RabbitMQ <prefix>.cpu / .gpu   |
                              |                  |
                              v                  |
                  worker nodes (aigw worker --device cpu|gpu)
                  claim the job in the index, run the pipeline, write outputs

          shared by every node: PostgreSQL (the index) and the data dir
          (one file system, mounted at the same absolute path everywhere)

The **gateway node** keeps everything but the pipelines: it receives and
stores instances, completes and routes series, and sends results. It does not
run jobs. When a job becomes runnable (new, due for a retry, or requeued
because its worker's lease ran out) it publishes the job id to the queue of
the pipeline's device class (``[jobs] devices``, default ``default_device``).

**Worker nodes** (``aigw worker --device cpu|gpu``) consume that queue. For
each message a worker claims the job in the index with the same lease logic
as the embedded pool (``SELECT ... FOR UPDATE SKIP LOCKED``), runs it with
the same :class:`~gateway.jobs.JobRunner` (so outputs, their deterministic
UIDs and the queued sends are identical), renews the lease while it runs,
and records the outcome. The gateway's sender then delivers the outputs.

**PostgreSQL is the source of truth; RabbitMQ is only a wake-up channel.**
A duplicated message finds the job running or done and is dropped; a lost
message is made up for because the gateway announces a job again whenever
its queue is empty while the job is still waiting. A worker killed mid-job
stops renewing its lease; the gateway requeues the job when the lease
expires and announces it again, and another worker runs it. Because output
UIDs are derived from the series, the pipeline and the model versions, and
sends are recorded once per output and destination, PACS gets each result
once. Celery is set up for this: late acknowledgement, prefetch of one,
requeue of a message whose worker was lost, no result backend.

Requirements: ``pip install 'aigw[scale]'``; ``gateway.database_url`` on
PostgreSQL and an absolute ``gateway.data_dir`` on shared storage (checked
at load); node clocks in sync (NTP), as leases compare times across nodes.
A job holds its message unacknowledged while it runs, so RabbitMQ's
``consumer_timeout`` (30 min by default) must exceed the longest job.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from prometheus_client import Counter, Gauge

from gateway._loop import PeriodicLoop
from gateway.config import Config, ConfigError, DeviceClass
from gateway.index import Index
from gateway.jobs import JobRunner, node_id, overdue_error, take_back_interrupted
from gateway.metrics import Metrics, dependency_checks

try:
    from celery import Celery
    from kombu import Exchange, Queue
except ImportError as exc:  # the optional 'scale' extra
    raise ConfigError(f"jobs.executor = 'celery' needs Celery: pip install 'aigw[scale]' ({exc})") from None

__all__ = ["JobPublisher", "TASK_NAME", "device_of", "make_app", "queue_name", "run_worker"]

log = logging.getLogger(__name__)

#: The one Celery task: its only argument is a job id from the index.
TASK_NAME = "aigw.run_job"

#: How often the gateway looks at its queues (broker health, lost wake-ups, missing workers).
_STATS_SECONDS = 5.0


def queue_name(config: Config, device: DeviceClass | str) -> str:
    """The broker queue of a device class, ``<queue_prefix>.<class>`` (``aigw.gpu``)."""
    return f"{config.jobs.queue_prefix}.{DeviceClass(device).value}"


def device_of(config: Config, pipeline: str) -> DeviceClass:
    """The device class whose workers run ``pipeline``'s jobs."""
    return config.jobs.devices.get(pipeline, config.jobs.default_device)


def make_app(config: Config) -> Celery:
    """The Celery application of gateway and workers: one task, one queue per device class."""
    jc = config.jobs
    exchange = Exchange(jc.queue_prefix, type="direct", durable=True)
    queues = [
        Queue(queue_name(config, d), exchange, routing_key=queue_name(config, d), durable=True) for d in DeviceClass
    ]
    app = Celery("aigw", broker=jc.broker_url, set_as_current=False)
    app.conf.update(
        # At-least-once delivery of wake-ups: a message leaves the queue only
        # once its job ran; a worker holds one message per free slot, so idle
        # workers are never starved by a busy one.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        # The index keeps outcomes; a result backend would be a second truth.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_serializer="json",
        accept_content=["json"],
        task_queues=queues,
        task_default_queue=queue_name(config, jc.default_device),
        task_default_exchange=jc.queue_prefix,
        task_default_routing_key=queue_name(config, jc.default_device),
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # A job that survives a broker reconnect keeps running: its message
        # comes back, finds the job leased and is dropped.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    app.task(name=TASK_NAME, ignore_result=True)(_run_job)
    return app


# ------------------------------------------------------------------ gateway side
class JobPublisher(PeriodicLoop):
    """The gateway's executor in scale-out mode: announces runnable jobs on the broker.

    It never runs a job. Each pass it requeues jobs whose lease expired and
    publishes the id of every due queued job it has not announced in its
    present form (new, retried, requeued). Every few seconds it also reads
    the queues: a job still waiting while its queue is empty lost its
    message and is announced again; a queue with jobs but no consumer is
    logged.
    """

    name = "aigw-publish"

    def __init__(self, index: Index, config: Config, metrics: Metrics) -> None:
        self.index = index
        self.config = config
        self.metrics = metrics
        self.app = make_app(config)
        self.broker_up = Gauge(
            "aigw_broker_up", "1 if the last exchange with the job broker succeeded", registry=metrics.registry
        )
        self.published = Counter(
            "aigw_job_wakeups_published_total",
            "Job ids published to worker queues, by device class and reason",
            ["device", "reason"],
            registry=metrics.registry,
        )
        for d in DeviceClass:
            for reason in ("new", "lost"):
                self.published.labels(device=d.value, reason=reason)
        # job id -> ((attempts, next_attempt_at) when announced, time announced)
        self._announced: dict[int, tuple[tuple[int, float], float]] = {}
        self._last_requeue = 0.0
        self._last_stats = 0.0
        self._last_warning: dict[str, float] = {}
        self._broker_error_logged = False
        super().__init__(0.25)

    def start(self) -> None:
        log.info(
            "jobs run on workers: announcing them on %s (queues %s)",
            _redact(self.config.jobs.broker_url or ""),
            ", ".join(queue_name(self.config, d) for d in DeviceClass),
        )
        super().start()

    def stop(self, timeout: float = 30, wait: bool = True) -> None:
        super().stop(timeout)
        # Not pool.force_close_all(): kombu shares connection pools per broker
        # URL across the apps of a process; they close with the process.
        self.app.close()

    def run_once(self) -> None:
        now = time.time()
        lease = self.config.jobs.lease_seconds
        if now - self._last_requeue > lease / 3:
            self._last_requeue = now
            n = take_back_interrupted(self.index, self.config, self.metrics)  # leases of dead workers
            if n:
                log.warning("requeued %d job(s) whose worker stopped renewing its lease", n)
        rows = self.index.runnable_jobs(now)
        live = {r.id for r in rows}
        for jid in [j for j in self._announced if j not in live]:
            del self._announced[jid]
        stats: dict[str, tuple[int, int]] | None = None
        if now - self._last_stats >= _STATS_SECONDS:
            self._last_stats = now
            stats = self._queue_stats()
        waiting: dict[str, int] = {}
        for row in rows:
            device = device_of(self.config, row.pipeline)
            queue = queue_name(self.config, device)
            waiting[queue] = waiting.get(queue, 0) + 1
            key = (int(row.attempts), float(row.next_attempt_at))
            seen = self._announced.get(row.id)
            if seen is None or seen[0] != key:
                reason = "new"
            elif stats is not None and stats.get(queue, (1, 0))[0] == 0 and now - seen[1] > lease:
                # Due for longer than a lease with nothing in its queue: the
                # message was lost (broker restart, a worker dropped it).
                reason = "lost"
            else:
                continue
            if not self._publish(row.id, queue):
                return  # broker down: try again next pass
            self._announced[row.id] = (key, now)
            self.published.labels(device=device.value, reason=reason).inc()
            if reason == "lost":
                log.warning("job %d: its wake-up was lost; announced again on %s", row.id, queue)
        if stats is not None:
            for queue, n in waiting.items():
                if stats.get(queue, (0, 1))[1] == 0 and now - self._last_warning.get(queue, 0.0) > 60:
                    self._last_warning[queue] = now
                    log.warning(
                        "%d job(s) wait on queue %s, which no worker consumes: start `aigw worker --device %s`",
                        n,
                        queue,
                        queue.rsplit(".", 1)[1],
                    )

    def _publish(self, job_id: int, queue: str) -> bool:
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id],
                queue=queue,
                routing_key=queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
            )
        except Exception as exc:
            self._broker(False, exc)
            return False
        self._broker(True)
        log.debug("job %d announced on %s", job_id, queue)
        return True

    def _queue_stats(self) -> dict[str, tuple[int, int]] | None:
        """(ready messages, consumers) of each device-class queue; None when the broker is unreachable."""
        out: dict[str, tuple[int, int]] = {}
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
                for d in DeviceClass:
                    name = queue_name(self.config, d)
                    ch = conn.channel()
                    try:
                        _, messages, consumers = ch.queue_declare(queue=name, passive=True)
                        out[name] = (int(messages), int(consumers))
                    except conn.channel_errors:
                        out[name] = (0, 0)  # not declared yet: nothing was ever published or consumed
                    finally:
                        try:
                            ch.close()
                        except Exception:
                            pass  # the broker already closed it (404 on a passive declare)
        except Exception as exc:
            self._broker(False, exc)
            return None
        self._broker(True)
        return out

    def _broker(self, ok: bool, exc: BaseException | None = None) -> None:
        self.broker_up.set(1 if ok else 0)
        if ok and self._broker_error_logged:
            log.info("job broker reachable again")
            self._broker_error_logged = False
        elif not ok and not self._broker_error_logged:
            # Once per outage: jobs wait in the index meanwhile, nothing is lost.
            log.error("job broker unreachable (%s: %s); jobs wait in the index", type(exc).__name__, exc)
            self._broker_error_logged = True


def _redact(url: str) -> str:
    """A broker URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


# ------------------------------------------------------------------- worker side
class _LeaseKeeper:
    """Renews a job's lease every third of the lease time while the job runs (the heartbeat).

    Past ``timeout_seconds`` it fails the job for good instead, as the embedded
    executor does (:meth:`gateway.jobs.LocalExecutor._abandon_overdue`): a
    pipeline that hangs must not keep its series from ever getting a result.
    The thread running it cannot be stopped; what it produces is dropped.
    """

    def __init__(
        self,
        index: Index,
        job_id: int,
        owner: str,
        lease_seconds: float,
        timeout_seconds: float = float("inf"),
        on_abandon: Callable[[], None] = lambda: None,
    ) -> None:
        self.index = index
        self.job_id = job_id
        self.owner = owner
        self.lease = lease_seconds
        self.timeout = timeout_seconds
        self.on_abandon = on_abandon
        self._started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"aigw-lease-{job_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._done.wait(min(self.lease / 3, max(0.0, self._started + self.timeout - time.monotonic()))):
            if time.monotonic() - self._started > self.timeout:
                error = overdue_error(self.timeout)
                if self.index.job_failed(self.job_id, self.owner, error, now=time.time(), retry_at=None):
                    self.on_abandon()
                    log.error("job %d failed for good: %s (its thread runs on until a restart)", self.job_id, error)
                return
            try:
                if not self.index.renew_lease(self.job_id, self.owner, time.time() + self.lease):
                    log.warning("job %d: lease lost; its outcome will be discarded", self.job_id)
                    return
            except Exception:
                # A database hiccup: the lease still has two thirds left, try again.
                log.warning("job %d: could not renew the lease", self.job_id, exc_info=True)


class WorkerNode:
    """What an ``aigw worker`` process holds: the index, the plugins and a :class:`JobRunner`."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        from gateway import __version__
        from gateway.models import ModelRegistry
        from gateway.plugins import discover
        from gateway.storage import DataDir

        root = config.gateway.data_dir
        if not root.is_dir():
            # DataDir would create an empty folder: a worker must see the gateway's files.
            raise ConfigError(
                f"gateway.data_dir: {root} does not exist on this node; mount the gateway's shared data dir there"
            )
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.configure(config)  # a GPU worker without a GPU must raise AigwGpuMissing
        self.data = DataDir(root)
        self.index = Index(config.database_url)
        self._checks = dependency_checks(self.index, self.data, config.metrics.cache_seconds)
        if not self.index.ping():
            raise ConfigError(f"gateway.database_url: cannot reach the index at {_redact(config.database_url)}")
        self.models = ModelRegistry(config.models.dir, config.models.providers)
        self.metrics.watch_models(self.models)
        self.plugins = discover(config, self.models)
        if self.plugins.config_errors:
            raise ConfigError("\n".join(self.plugins.config_errors))
        self.runner = JobRunner(
            config, self.index, self.data, self.models, self.plugins.available, self.metrics, __version__
        )
        self.node = node_id()
        self.metrics.prime(__version__, list(self.plugins.available) + list(self.plugins.unavailable), [])
        for name in self.plugins.available:
            self.metrics.pipeline_up.labels(pipeline=name).set(1)
        for name, why in self.plugins.unavailable.items():
            self.metrics.pipeline_up.labels(pipeline=name).set(0)
            log.warning("pipeline %s unavailable on this worker: %s", name, why)

    def readiness(self) -> dict[str, bool]:
        return self._checks()

    def handle(self, job_id: int) -> None:
        """Claim job ``job_id`` if it still waits, and run it under a renewed lease."""
        # One owner per claim: if a job comes back to this process after a
        # lost lease, the stale run cannot record over the new one.
        owner = f"{self.node}/{uuid.uuid4().hex[:8]}"
        lease = self.config.jobs.lease_seconds
        job = self.index.claim_job(owner, now=time.time(), lease_seconds=lease, job_id=job_id)
        if job is None:
            log.info("job %d is done, running elsewhere or not due: wake-up dropped", job_id)
            return
        log.info("job %d claimed (attempt %d)", job.id, job.attempts)
        failed = self.metrics.jobs.labels(pipeline=job.pipeline, outcome="failed")
        with _LeaseKeeper(self.index, job.id, owner, lease, self.config.jobs.timeout_seconds, failed.inc):
            self.runner.run(job, owner)

    def close(self) -> None:
        self.index.close()


_node: WorkerNode | None = None


def _run_job(job_id: int) -> None:
    """The Celery task: a wake-up for one job; the index decides whether there is work."""
    if _node is None:
        raise RuntimeError("aigw.run_job executes only inside `aigw worker`")
    _node.handle(int(job_id))


def run_worker(
    config: Config,
    devices: Sequence[DeviceClass | str] = (DeviceClass.CPU,),
    concurrency: int | None = None,
    metrics_port: int | None = None,
) -> int:
    """Run a worker until SIGTERM or SIGINT (then it finishes its running jobs); returns the exit code.

    Parameters
    ----------
    config : Config
        The shared configuration; ``jobs.executor`` must be ``"celery"``.
    devices : sequence of DeviceClass
        Device classes whose queues this worker consumes.
    concurrency : int, optional
        Jobs at once (default ``jobs.workers``), each in a thread as in the embedded pool.
    metrics_port : int, optional
        Serve ``/metrics``, ``/healthz`` and ``/readyz`` on this port (0: any free port); off without.
    """
    global _node
    if config.jobs.executor != "celery":
        raise ConfigError(f"jobs.executor: `aigw worker` needs executor = 'celery' (got '{config.jobs.executor}')")
    classes = sorted({DeviceClass(d) for d in devices}, key=lambda d: d.value)
    _node = node = WorkerNode(config)
    http: Any = None
    if metrics_port is not None:
        from gateway.metrics import MetricsServer

        http = MetricsServer(node.metrics, config.metrics.host, metrics_port, node.readiness, settings=config.metrics)
        http.start()
        log.info("worker metrics on http://%s:%d/metrics", config.metrics.host, http.port)
    node.runner.warm_up()  # before consuming, so the first job does not load the models
    app = make_app(config)
    queues = [queue_name(config, d) for d in classes]
    worker = app.Worker(
        hostname=f"aigw-{'-'.join(d.value for d in classes)}-{os.getpid()}@{socket.gethostname()}",
        queues=queues,
        concurrency=concurrency or config.jobs.workers,
        pool="threads",  # as the embedded pool: ONNX Runtime releases the GIL while it computes
        loglevel=config.logging.level,
        quiet=True,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
    )
    log.info(
        "worker %s consuming %s with %d job slot(s)", node.node, ", ".join(queues), concurrency or config.jobs.workers
    )
    try:
        worker.start()
    finally:
        if http is not None:
            http.stop()
        node.close()
        _node = None
    return int(worker.exitcode or 0)
