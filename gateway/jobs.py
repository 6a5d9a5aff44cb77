"""Jobs: run a pipeline on a complete series, at least once, with idempotent effects.

State machine (``jobs.state`` in the index)::

    queued --claim--> running --outputs stored--> succeeded --all sent--> sent
     |  ^                |
     |  +-retry/backoff--+--permanent error or attempts exhausted--> failed
     +--a later version of the series queued before it ran--> superseded

The versions of one series and route run in order: a job waits while an
earlier version runs, and one that a later version overtook never runs
(``gateway.index.jobs``), so each series ends with one current result.

A claim takes a lease that the worker renews while the job runs; a job whose
lease ran out (its process died) is queued again. Output UIDs derive from the
series, its version, the pipeline and the model versions
(:func:`gateway.uids.derived_uid`), so a job that runs twice produces the same
instances and PACS never receives duplicates.

:class:`JobRunner` runs one job anywhere; :class:`LocalExecutor` is the
embedded pool that feeds it. The distributed executor
(:mod:`gateway.distributed`, ``jobs.executor = "celery"``) replaces the pool
and calls the same runner on worker nodes.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from pydicom import Dataset

from gateway._loop import PeriodicLoop
from gateway.config import Config, DeviceClass
from gateway.contract import Identity, InputError, Pipeline, RunContext, WarmUpCapable
from gateway.index import Index, OutputRow
from gateway.metrics import Metrics
from gateway.models import ModelRegistry, TimedSession
from gateway.storage import DataDir, write_durably
from gateway.supersede import mark_superseding, rejection_note, superseded
from gateway.uids import checked_uid, derived_uid, short_ref

__all__ = ["DeviceSlots", "JobRunner", "LocalExecutor", "backoff", "job_device", "node_id"]

log = logging.getLogger(__name__)


def node_id() -> str:
    """Owner id of this process for job leases: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, +-20%."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return float(delay * random.uniform(0.8, 1.2))


def job_device(sessions: Iterable[TimedSession]) -> DeviceClass:
    """The device class of a job: GPU when one of its sessions prefers CUDA or TensorRT, else CPU."""
    return DeviceClass.GPU if any(s.device == DeviceClass.GPU.value for s in sessions) else DeviceClass.CPU


class DeviceSlots:
    """Limits on jobs running at once per device class in this process (``[jobs] max_concurrent_per_device``).

    The worker pool already bounds jobs in total; this bounds those that share
    a GPU, whose memory and streams several concurrent jobs would contend for.
    A class without a limit is not held back.

    Parameters
    ----------
    limits : mapping of DeviceClass to int
        Jobs at once for each limited class.
    """

    def __init__(self, limits: Mapping[DeviceClass, int]) -> None:
        self._limits = {DeviceClass(d): int(n) for d, n in limits.items()}
        self._sems = {d: threading.BoundedSemaphore(n) for d, n in self._limits.items()}
        self._lock = threading.Lock()
        self._waiting: dict[DeviceClass, int] = {d: 0 for d in DeviceClass}

    def limit(self, device: DeviceClass) -> int | None:
        """Jobs at once for ``device``, None when unlimited."""
        return self._limits.get(device)

    def waiting(self, device: DeviceClass) -> int:
        """Jobs blocked right now waiting for a ``device`` slot."""
        with self._lock:
            return self._waiting[device]

    @contextmanager
    def hold(self, device: DeviceClass, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold a slot of ``device`` for the block; ``on_wait`` is called once if the job has to wait."""
        sem = self._sems.get(device)
        if sem is None:
            yield
            return
        if not sem.acquire(blocking=False):
            if on_wait is not None:
                on_wait()
            with self._lock:
                self._waiting[device] += 1
            try:
                sem.acquire()
            finally:
                with self._lock:
                    self._waiting[device] -= 1
        try:
            yield
        finally:
            sem.release()


#: Runs of a job cut short by its process's death that are started again at
#: once; after them each waits an exponential backoff: a kill -9 or a restart
#: costs no delay, a job that keeps killing its process lets the service run
#: between the crashes.
IMMEDIATE_RESTARTS = 2


def take_back_interrupted(
    index: Index, config: Config, metrics: Metrics, *, owner_prefix: str | None = None, expired_only: bool = True
) -> int:
    """Queue again the running jobs whose process died; fail those started ``[jobs] max_starts`` times.

    Returns how many were queued again. Each failed one is logged and counted
    as failed: a job that kills its process must not keep the service in a crash loop.
    """
    jc = config.jobs

    def delay(attempts: int) -> float:
        if attempts <= IMMEDIATE_RESTARTS:
            return 0.0
        return backoff(attempts - IMMEDIATE_RESTARTS, jc.backoff_seconds, jc.backoff_max_seconds)

    queued, failed = index.requeue_running(
        now=time.time(), owner_prefix=owner_prefix, expired_only=expired_only, max_starts=jc.max_starts, delay=delay
    )
    for job in failed:
        metrics.jobs.labels(pipeline=job.pipeline, outcome="failed").inc()
        _JobLog(log, {"job": job.id, "pipeline": job.pipeline}).error(
            "failed for good: started %d times and its process died during the last run (a crash, kill -9 or "
            "out of memory); 'aigw jobs retry %d' runs it again",
            job.attempts,
            job.id,
        )
    return queued


def overdue_error(timeout: float) -> str:
    """The error recorded for a job failed for running past ``[jobs] timeout_seconds``, on any executor."""
    return f"ran longer than [jobs] timeout_seconds = {timeout:g}; abandoned, not started again"


class _JobLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[job {self.extra['job']} {self.extra['pipeline']}] {msg}", kwargs  # type: ignore[index]


def _finalise(ds: Dataset) -> None:
    """Make a pipeline's dataset writable as a DICOM file (PS3.10 file meta)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = meta or FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.setdefault("ImplementationClassUID", PYDICOM_IMPLEMENTATION_UID)
    ds.file_meta = meta


class JobRunner:
    """Runs one claimed job: pipeline, outputs on disk, sends queued."""

    def __init__(
        self,
        config: Config,
        index: Index,
        data: DataDir,
        models: ModelRegistry,
        pipelines: dict[str, Pipeline],
        metrics: Metrics,
        version: str,
    ) -> None:
        self.config = config
        self.index = index
        self.data = data
        self.models = models
        self.pipelines = pipelines
        self.metrics = metrics
        self.identity = Identity(
            manufacturer=config.identity.manufacturer,
            model_name=config.identity.model_name,
            software_version=version,
            device_serial_number=config.identity.device_serial_number,
            institution_name=config.identity.institution_name,
        )
        self.device_slots = DeviceSlots(config.jobs.max_concurrent_per_device)
        #: Called once a job's sends are queued: the service wakes its sender, so a
        #: result leaves at once instead of at the sender's next poll (up to 0.5 s).
        self.sends_queued: Callable[[], None] = lambda: None
        unknown = sorted(set(config.models.batch_sizes) - set(models.manifests()))
        if unknown:
            log.warning("[models] batch_sizes names no model in %s: %s", models.root, ", ".join(unknown))

    def warm_up(self) -> dict[str, str | None]:
        """Load and run once every model of the available pipelines (``[models] warmup``); never raises.

        Returns
        -------
        dict
            Model name -> None when warmed up, else why not (see :meth:`ModelRegistry.warm_up`).
        """
        if not self.config.models.warmup:
            return {}
        batches: dict[str, int] = {}
        for name, pipeline in sorted(self.pipelines.items()):
            try:
                for spec in pipeline.models():
                    # At the batch size jobs will use, so that ONNX Runtime sizes its buffers now.
                    size = self.config.models.batch_sizes.get(spec.name, spec.batch_size)
                    batches[spec.name] = max(batches.get(spec.name, 1), size)
            except Exception as exc:
                log.warning("pipeline %s: models() raised %s: %s; not warmed up", name, type(exc).__name__, exc)
        results = self.models.warm_up(batches, io_binding=self.config.models.io_binding)
        for name, pipeline in sorted(self.pipelines.items()):
            if isinstance(pipeline, WarmUpCapable):
                try:
                    pipeline.warm_up()
                except Exception as exc:
                    log.warning("pipeline %s: warm_up() raised %s: %s; its first job loads it", name,
                                type(exc).__name__, exc)
        return results

    def run(self, job: Any, owner: str) -> None:
        """Execute ``job`` (a claimed row) and record its outcome; never raises."""
        jlog = _JobLog(log, {"job": job.id, "pipeline": job.pipeline})
        t0 = time.time()
        inference = 0.0
        try:
            pipeline = self.pipelines.get(job.pipeline)
            if pipeline is None:
                raise RuntimeError(f"pipeline {job.pipeline!r} is not available on this node")
            series = self.index.assemble(job.series_uid)
            if series is None or not series.instances:
                raise InputError("series has no stored instances")
            specs = list(pipeline.models())
            io_binding = self.config.models.io_binding
            sessions = {s.name: TimedSession(self.models.session(s.name), io_binding=io_binding) for s in specs}
            sizes = self.config.models.batch_sizes
            batch_sizes = {s.name: sizes.get(s.name, s.batch_size) for s in specs}
            model_versions = {s.name: self.models.get(s.name).version for s in specs}
            uid_parts = (
                job.series_uid,
                job.series_version,
                job.pipeline,
                tuple(sorted(model_versions.items())),
            )
            workdir = self.data.job_dir(job.id)
            ctx = RunContext(
                sessions=sessions,
                uid=lambda key: derived_uid(*uid_parts, key),
                identity=self.identity,
                workdir=workdir,
                log=jlog,
                progress=lambda f, m: jlog.debug("progress %.0f%% %s", 100 * f, m),
                model_versions=model_versions,
                flag=lambda kind, n: self.metrics.pipeline_flags.labels(pipeline=job.pipeline, kind=kind[:32]).inc(n),
                batch_sizes=batch_sizes,
            )
            jlog.info(
                "running on series %s v%d (%d instances)",
                short_ref(job.series_uid),
                job.series_version,
                series.instance_count,
            )
            device = job_device(sessions.values())
            with self.device_slots.hold(
                device,
                on_wait=lambda: jlog.info(
                    "waiting for a %s slot ([jobs] max_concurrent_per_device = %s)",
                    device.value,
                    self.device_slots.limit(device),
                ),
            ):
                outputs = list(pipeline.run(series, ctx))
            inference = sum(s.seconds for s in sessions.values())
            earlier = self.index.earlier_results(job.series_uid, job.pipeline, job.series_version)
            if earlier:
                # More instances arrived after a result went out: this one replaces it,
                # and a reader who sees both in PACS must be able to tell which counts.
                replaced = superseded(self.index.job_outputs(earlier[-1].id))
                mark_superseding(outputs, earlier[-1].series_version, replaced)
                jlog.info("result supersedes the one of series version %d", earlier[-1].series_version)
                if replaced and self.config.jobs.iocm_rejection_notes:
                    note = rejection_note(
                        replaced, self.identity, ctx.uid("iocm-rejection"), ctx.uid("iocm-rejection-series")
                    )
                    if note is not None:
                        outputs.append(note)  # last: PACS hides the old result once the new one is in
            if not self.index.renew_lease(job.id, owner, time.time() + self.config.jobs.lease_seconds):
                # Another worker took it over, or it was abandoned for running too long:
                # its outputs must not reach the outbox or PACS beside the real ones.
                jlog.warning("no longer this worker's job (lease lost, or abandoned): its outputs are dropped")
                return
            stored = self._store_outputs(job.id, outputs)
            dests = [d.name for d in self.config.destinations]
            if not self.index.job_succeeded(job.id, owner, stored, dests, now=time.time()):
                jlog.warning("lost the lease before finishing; another worker owns the job")
                return
            if dests:
                self.sends_queued()
            self.metrics.jobs.labels(pipeline=job.pipeline, outcome="succeeded").inc()
            self.metrics.job_latency.labels(pipeline=job.pipeline).observe(max(0.0, time.time() - t0))
            jlog.info(
                "succeeded: %d output instances in %.2f s (inference %.2f s)", len(stored), time.time() - t0, inference
            )
        except InputError as exc:
            self._fail(job, owner, f"input rejected: {exc}", permanent=True, jlog=jlog)
        except Exception as exc:
            jlog.exception("failed")
            self._fail(job, owner, f"{type(exc).__name__}: {exc}", permanent=False, jlog=jlog)
        finally:
            self.metrics.job_duration.labels(pipeline=job.pipeline).observe(time.time() - t0)
            if inference:
                self.metrics.inference_duration.labels(pipeline=job.pipeline).observe(inference)

    def _fail(
        self, job: Any, owner: str, error: str, *, permanent: bool, jlog: logging.LoggerAdapter[logging.Logger]
    ) -> None:
        jc = self.config.jobs
        retry_at = None
        if not permanent and job.attempts < jc.max_attempts:
            retry_at = time.time() + backoff(job.attempts, jc.backoff_seconds, jc.backoff_max_seconds)
        self.index.job_failed(job.id, owner, error, now=time.time(), retry_at=retry_at)
        outcome = "retried" if retry_at is not None else "failed"
        self.metrics.jobs.labels(pipeline=job.pipeline, outcome=outcome).inc()
        if retry_at is None:
            jlog.error("failed for good after %d attempt(s): %s", job.attempts, error)
        else:
            jlog.warning("attempt %d failed, retry in %.0f s: %s", job.attempts, retry_at - time.time(), error)

    def _store_outputs(self, job_id: int, outputs: Sequence[Dataset]) -> list[OutputRow]:
        """Write outputs durably; without destinations they go to the outbox.

        The outbox is read by people and scripts, so a job's folder appears
        there whole or not at all: the files are written next to the job's
        work and the folder is renamed in once every file is durable.
        """
        if self.config.destinations:
            folder = final = self.data.job_dir(job_id) / "out"
        else:
            final = self.data.outbox_dir(job_id)
            folder = self.data.outbox_staging(job_id)
        stored = []
        for ds in outputs:
            if not isinstance(ds, Dataset):
                raise TypeError(f"pipeline returned {type(ds).__name__}, expected pydicom Dataset")
            sop = checked_uid(ds.get("SOPInstanceUID"), "output SOPInstanceUID")
            sop_class = checked_uid(ds.get("SOPClassUID"), "output SOPClassUID")
            study = checked_uid(ds.get("StudyInstanceUID"), "output StudyInstanceUID")
            series = checked_uid(ds.get("SeriesInstanceUID"), "output SeriesInstanceUID")
            _finalise(ds)
            with write_durably(folder / f"{sop}.dcm") as fh:
                ds.save_as(fh, enforce_file_format=True)
            stored.append(OutputRow(sop, sop_class, study, series, str(final / f"{sop}.dcm")))
        if folder != final:
            self.data.publish_outbox(folder, final)
        return stored


class LocalExecutor(PeriodicLoop):
    """The embedded worker pool: claims queued jobs and runs them in threads."""

    name = "aigw-dispatch"

    def __init__(self, runner: JobRunner, index: Index, config: Config, metrics: Metrics) -> None:
        self.runner = runner
        self.index = index
        self.config = config
        self.metrics = metrics
        self.owner = node_id()
        workers = config.jobs.workers
        # Threads for as many jobs again as workers: a job abandoned for running
        # past timeout_seconds keeps its thread (Python cannot stop one), and its
        # slot goes to the next job.
        self._pool = ThreadPoolExecutor(max_workers=2 * workers, thread_name_prefix="aigw-job")
        self._slots = threading.Semaphore(workers)
        self._running: dict[int, tuple[float, str]] = {}  # job id -> (monotonic start, pipeline)
        self._abandoned: set[int] = set()
        self._lock = threading.Lock()
        self._last_renew = 0.0
        super().__init__(0.25)

    def start(self) -> None:
        # Embedded mode: every job still 'running' under this host was owned by
        # a previous process of ours that died; take it up again now.
        host = self.owner.split(":")[0] + ":"
        n = take_back_interrupted(self.index, self.config, self.metrics, owner_prefix=host, expired_only=False)
        if n:
            log.warning("requeued %d job(s) interrupted by a previous shutdown or crash", n)
        super().start()

    def stop(self, timeout: float = 30, wait: bool = True) -> None:
        super().stop(timeout)
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def run_once(self) -> None:
        """Renew leases of running jobs, requeue dead nodes' jobs, fill free slots."""
        lease = self.config.jobs.lease_seconds
        now = time.time()
        if now - self._last_renew > lease / 3:
            self._last_renew = now
            with self._lock:
                running = list(self._running)
            for jid in running:
                self.index.renew_lease(jid, self.owner, now + lease)
            take_back_interrupted(self.index, self.config, self.metrics)  # leases of dead nodes
        self._abandon_overdue()
        while self._slots.acquire(blocking=False):
            job = self.index.claim_job(self.owner, now=time.time(), lease_seconds=lease)
            if job is None:
                self._slots.release()
                break
            with self._lock:
                self._running[job.id] = (time.monotonic(), job.pipeline)
            self._pool.submit(self._run, job)

    @property
    def stuck(self) -> bool:
        """True once abandoned jobs hold ``workers`` threads: the spares are used up; a restart frees them."""
        with self._lock:
            return len(self._abandoned) >= self.config.jobs.workers

    def _abandon_overdue(self) -> None:
        """Fail the jobs running past ``[jobs] timeout_seconds`` and give their slots to the next jobs.

        A pipeline that hangs (a deadlock in a runtime, an input that makes it
        loop) would otherwise hold its worker for ever, and with it every job
        behind it. Its thread cannot be stopped, so it runs on; at most
        ``workers`` such threads are kept, then :attr:`stuck` tells the health checks.
        """
        timeout = self.config.jobs.timeout_seconds
        now = time.monotonic()
        with self._lock:
            overdue = [
                (jid, pipeline)
                for jid, (t0, pipeline) in self._running.items()
                if now - t0 > timeout and jid not in self._abandoned
            ]
            room = self.config.jobs.workers - len(self._abandoned)
        for jid, pipeline in overdue[: max(room, 0)]:
            error = overdue_error(timeout)
            if not self.index.job_failed(jid, self.owner, error, now=time.time(), retry_at=None):
                continue  # finished, or no longer ours, in the meantime
            with self._lock:
                self._abandoned.add(jid)
            self._slots.release()
            self.metrics.jobs.labels(pipeline=pipeline, outcome="failed").inc()
            _JobLog(log, {"job": jid, "pipeline": pipeline}).error(
                "failed for good: %s (its thread runs on; 'aigw jobs retry %d' runs it again)", error, jid
            )
        with self._lock:
            self.metrics.jobs_abandoned.set(len(self._abandoned))

    def _run(self, job: Any) -> None:
        try:
            self.runner.run(job, self.owner)
        finally:
            with self._lock:
                self._running.pop(job.id, None)
                abandoned = job.id in self._abandoned
                self._abandoned.discard(job.id)
            if abandoned:
                # Its slot was given away when it was abandoned; what it produced was not recorded.
                _JobLog(log, {"job": job.id, "pipeline": job.pipeline}).warning("abandoned run ended after all")
            else:
                self._slots.release()
            self.wake()
