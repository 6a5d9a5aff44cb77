"""Scale-out through real peers: ``aigw serve`` with ``executor = "celery"``, ``aigw worker``
processes, RabbitMQ as the wake-up channel, PostgreSQL as the shared index, Orthanc as PACS.

Covers a worker killed with SIGKILL mid-job (the job is taken up by the other
worker, results reach PACS once), lost and duplicated wake-up messages, and
the configuration checks of the mode. Every test gets a fresh PostgreSQL
database and its own queue names on the session's throw-away PostgreSQL and
RabbitMQ (conftest.py, tests/services.py); a missing binary fails the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_config
from gateway.index import Index
from tests.conftest import (
    REPO,
    GatewayProcess,
    Orthanc,
    free_port,
    http_get,
    mr_series,
    storescu,
    wait_for,
    wait_sent,
)
from tests.services import Server

pytestmark = pytest.mark.peers

LEASE = 5  # seconds: the smallest the schema allows, so a killed worker's job comes back fast


class Broker:
    """The test's own queues on the RabbitMQ server: ``<prefix>.cpu`` / ``<prefix>.gpu``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"aigw-test-{uuid.uuid4().hex[:10]}"

    def _channel_call(self, fn: Callable[[Any], Any]) -> Any:
        from kombu import Connection

        with Connection(self.url, connect_timeout=5) as conn:
            ch = conn.channel()
            try:
                return fn(ch)
            finally:
                ch.close()

    def ready_messages(self, device: str = "cpu") -> int:
        """Messages waiting in a queue (0 if the queue does not exist yet)."""
        try:
            return int(self._channel_call(lambda ch: ch.queue_declare(f"{self.prefix}.{device}", passive=True)[1]))
        except Exception:
            return 0

    def purge(self, device: str = "cpu") -> int:
        return int(self._channel_call(lambda ch: ch.queue_purge(f"{self.prefix}.{device}")) or 0)

    def delete(self) -> None:
        def drop(ch: Any) -> None:
            for device in ("cpu", "gpu"):
                ch.queue_delete(f"{self.prefix}.{device}")
            ch.exchange_delete(self.prefix)

        try:
            self._channel_call(drop)
        except Exception:
            pass  # best effort: names are unique per test anyway


@pytest.fixture
def broker(rabbitmq: Server) -> Iterator[Broker]:
    """This test's queues on the session's RabbitMQ (``rabbitmq`` in conftest.py)."""
    b = Broker(rabbitmq.url)
    try:
        yield b
    finally:
        b.delete()


class WorkerProcess:
    """``aigw worker`` as a subprocess on the gateway's configuration file."""

    def __init__(self, config: Path, log_path: Path, device: str = "cpu", metrics_port: int | None = None) -> None:
        self.log_path = log_path
        self.metrics_port = metrics_port
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        log = open(log_path, "ab")
        extra = ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "worker", "--config", str(config), "--device", device, *extra],
            stdout=log,
            stderr=log,
            env=env,
            cwd=log_path.parent,
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return " ready." in self.log()

        wait_for(ready, timeout, "the worker to connect", interval=0.2)
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(gw: GatewayProcess, device: str = "cpu", metrics_port: int | None = None) -> WorkerProcess:
        w = WorkerProcess(gw.config, tmp_path / f"worker{len(started)}.log", device, metrics_port)
        started.append(w)
        return w

    try:
        yield start
    finally:
        for w in started:
            w.stop()


def scaleout_gateway(
    make_gateway: Callable[..., GatewayProcess],
    pg_url: str,
    broker: Broker,
    orthanc: Orthanc,
    sleep_seconds: float,
) -> GatewayProcess:
    gw = make_gateway(
        destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
        gateway={"database_url": pg_url},
        extra_toml=f"[pipelines.test-invert]\nsleep_seconds = {sleep_seconds}\n",
        start=False,
    )
    text = gw.config.read_text()
    assert text.count("[jobs]\n") == 1
    gw.config.write_text(
        text.replace(
            "[jobs]\n",
            f'[jobs]\nexecutor = "celery"\nbroker_url = "{broker.url}"\nqueue_prefix = "{broker.prefix}"\n'
            f"lease_seconds = {LEASE}\n",
        )
    )
    return gw.start()


def jobs(pg_url: str) -> list[Any]:
    idx = Index(pg_url)
    try:
        return sorted(idx.list_jobs(limit=1000), key=lambda j: j.id)
    finally:
        idx.close()


def sends(pg_url: str, job_ids: list[int]) -> list[Any]:
    idx = Index(pg_url)
    try:
        return [s for j in job_ids for s in idx.sends_for_job(j)]
    finally:
        idx.close()


def pacs_series(orthanc: Orthanc) -> dict[str, list[str]]:
    """SeriesInstanceUID -> SOPInstanceUIDs of each instance Orthanc holds in it."""
    out: dict[str, list[str]] = {}
    for iid in orthanc.get("/instances"):
        tags = orthanc.get(f"/instances/{iid}/simplified-tags")
        out.setdefault(tags["SeriesInstanceUID"], []).append(tags["SOPInstanceUID"])
    return out


def owner_pid(job: Any) -> int | None:
    """The process id in a job's lease owner (``host:pid/claim``)."""
    if not job.owner:
        return None
    return int(job.owner.split("/", 1)[0].rsplit(":", 1)[1])


def test_worker_killed_mid_job_results_reach_pacs_once(
    pg_url: str,
    broker: Broker,
    tmp_path: Path,
    orthanc: Orthanc,
    make_gateway: Callable[..., GatewayProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # (Database and queues come first so that they are torn down last, after the processes.)
    t0 = time.time()
    gw = scaleout_gateway(make_gateway, pg_url, broker, orthanc, sleep_seconds=3)
    workers = [start_worker(gw), start_worker(gw)]
    for w in workers:
        w.wait_ready()
    n_series, per_series = 4, 2
    for k in range(n_series):
        r = storescu(gw.port, mr_series(tmp_path / f"in{k}", n=per_series, seed=21 + k))
        assert r.returncode == 0, r.stderr

    pids = {w.pid: w for w in workers}
    victim_job = wait_for(
        lambda: [j for j in jobs(pg_url) if j.state == "running" and owner_pid(j) in pids],
        60,
        "a worker to run a job",
    )[0]
    victim = pids[owner_pid(victim_job) or 0]
    victim.kill9()
    survivor = next(w for w in workers if w is not victim)

    expected = n_series * per_series
    wait_for(
        lambda: len(js := jobs(pg_url)) == n_series and all(j.state == "sent" for j in js),
        90,
        f"every job sent (worker logs:\n{survivor.log()[-2000:]})",
        interval=0.5,
    )
    time.sleep(2)  # a duplicate run or send would show up now

    final = jobs(pg_url)
    assert [j.state for j in final] == ["sent"] * n_series
    by_id = {j.id: j for j in final}
    assert by_id[victim_job.id].attempts == 2, final  # killed once, then run by the survivor
    assert owner_pid(by_id[victim_job.id]) == survivor.pid
    assert all(j.attempts == 1 for j in final if j.id != victim_job.id), final
    assert all(j.outputs == per_series for j in final)

    # The index queued one send per output and destination, each delivered once.
    rows = sends(pg_url, list(by_id))
    assert len(rows) == expected and len({(s.sop_instance_uid, s.destination) for s in rows}) == expected
    assert all(s.state == "sent" and s.attempts == 1 for s in rows)
    assert wait_sent(gw, "orthanc", expected) == expected

    # PACS holds each output series once, with each instance once.
    held = pacs_series(orthanc)
    assert len(held) == n_series
    assert all(len(uids) == per_series == len(set(uids)) for uids in held.values()), held
    assert sorted(u for uids in held.values() for u in uids) == sorted(s.sop_instance_uid for s in rows)
    assert "requeued 1 job(s) whose worker stopped renewing its lease" in gw.log()
    assert time.time() - t0 < 120


def test_lost_and_duplicated_wakeups_neither_lose_nor_repeat_a_job(
    pg_url: str,
    broker: Broker,
    tmp_path: Path,
    orthanc: Orthanc,
    make_gateway: Callable[..., GatewayProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    # (Database and queues come first so that they are torn down last, after the processes.)
    gw = scaleout_gateway(make_gateway, pg_url, broker, orthanc, sleep_seconds=0)
    # No worker yet: the job's wake-up waits in the durable queue; then it is lost.
    assert storescu(gw.port, mr_series(tmp_path / "in", n=2, seed=31)).returncode == 0
    wait_for(lambda: broker.ready_messages() == 1, 30, "the job's wake-up in the queue")
    assert broker.purge() == 1
    assert [j.state for j in jobs(pg_url)] == ["queued"]

    worker = start_worker(gw, metrics_port=free_port()).wait_ready()
    job = wait_for(lambda: [j for j in jobs(pg_url) if j.state == "sent"], 60, "the job announced again and run")[0]
    assert job.attempts == 1
    assert "wake-up was lost; announced again" in gw.log()
    m = gw.metrics()
    assert m['aigw_job_wakeups_published_total{device="cpu",reason="lost"}'] == 1
    assert m['aigw_job_wakeups_published_total{device="cpu",reason="new"}'] == 1

    # Duplicated wake-ups for a finished job are dropped by the index claim.
    from gateway.distributed import TASK_NAME, make_app

    app = make_app(load_config(gw.config))
    for _ in range(3):
        app.send_task(TASK_NAME, args=[job.id], queue=f"{broker.prefix}.cpu", routing_key=f"{broker.prefix}.cpu")
    app.close()
    wait_for(lambda: worker.log().count(f"job {job.id} is done, running elsewhere or not due") == 3, 30, "drops")
    (again,) = jobs(pg_url)
    assert (again.state, again.attempts, again.finished_at) == ("sent", 1, job.finished_at)
    assert len(sends(pg_url, [job.id])) == 2
    assert wait_sent(gw, "orthanc", 2) == 2
    assert sum(len(u) for u in pacs_series(orthanc).values()) == 2
    # The worker's own Prometheus endpoint counts the job it ran.
    code, body = http_get(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    assert code == 200 and 'aigw_jobs_total{outcome="succeeded",pipeline="test-invert"} 1.0' in body.decode()
    assert http_get(f"http://127.0.0.1:{worker.metrics_port}/readyz")[0] == 200


def test_celery_executor_requires_shared_state(tmp_path: Path) -> None:
    cfg = tmp_path / "aigw.toml"

    def load(gateway: str, jobs: str) -> str:
        cfg.write_text(f'[gateway]\n{gateway}\n[jobs]\nexecutor = "celery"\n{jobs}\n')
        with pytest.raises(ConfigError) as err:
            load_config(cfg, environ={})
        return str(err.value)

    pg = 'database_url = "postgresql+psycopg://aigw@db/aigw"'
    assert "jobs.broker_url is required" in load(f'{pg}\ndata_dir = "/srv/aigw"', "")
    broker = 'broker_url = "amqp://rabbit//"'
    msg = load('data_dir = "/srv/aigw"', broker)
    assert "gateway.database_url must be a PostgreSQL URL" in msg and str(cfg) in msg
    assert "gateway.data_dir must be an absolute path" in load(f'{pg}\ndata_dir = "aigw-data"', broker)
    ok = load_config(cfg, environ={"AIGW_DATABASE_URL": "postgresql+psycopg://x/y", "AIGW_DATA_DIR": "/srv/aigw"})
    assert ok.jobs.executor == "celery" and ok.jobs.default_device.value == "cpu"
    # The embedded default needs none of it, and a worker refuses to run against it.
    local = tmp_path / "local.toml"
    local.write_text("[jobs]\nworkers = 1\n")
    assert load_config(local, environ={}).jobs.executor == "local"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "worker", "--config", str(local)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "jobs.executor" in r.stderr, r.stderr


def test_publisher_routes_by_device_class_and_announces_each_state_once(
    pg_url: str, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.config import Config
    from gateway.distributed import JobPublisher
    from gateway.index import InstanceRecord
    from gateway.metrics import Metrics

    cfg = Config.model_validate(
        {
            "gateway": {"database_url": pg_url, "data_dir": str(tmp_path / "data")},
            "jobs": {
                "executor": "celery",
                "broker_url": broker.url,
                "queue_prefix": broker.prefix,
                "devices": {"big": "gpu"},
                "lease_seconds": 60,
            },
        }
    )
    idx = Index(pg_url)
    pub = JobPublisher(idx, cfg, Metrics())
    try:
        now = time.time()
        rec = InstanceRecord(
            "7.1",
            "7.7",
            "7",
            "1.2.840.10008.5.1.4.1.1.4",
            "1.2.840.10008.1.2.1",
            tmp_path / "x.dcm",
            1,
            "a" * 64,
            "SCANNER",
            "MR",
            {"Modality": "MR"},
        )
        idx.record_instance(rec, now=now, quiet_seconds=0, reprocess_late=True)
        ids = idx.mark_routed("7.7", 1, [("r1", "small"), ("r2", "big")], now=now, completed_by="timer")
        assert ids is not None and len(ids) == 2
        with caplog.at_level("WARNING", logger="gateway.distributed"):
            pub.run_once()
            pub.run_once()  # nothing changed: nothing announced again
        assert (broker.ready_messages("cpu"), broker.ready_messages("gpu")) == (1, 1)
        assert "which no worker consumes: start `aigw worker --device gpu`" in caplog.text
        # A job whose worker died comes back queued: it is announced again.
        job = idx.claim_job("dead-node:1/x", now=time.time(), lease_seconds=60, job_id=ids[1])
        assert job is not None and job.pipeline == "big"
        assert idx.claim_job("other:2/y", now=time.time(), lease_seconds=60, job_id=ids[1]) is None
        assert idx.requeue_running(now=time.time(), expired_only=False) == (1, [])
        pub.run_once()
        assert (broker.ready_messages("cpu"), broker.ready_messages("gpu")) == (1, 2)
    finally:
        pub.stop()
        idx.close()


def test_a_worker_fails_a_job_that_runs_past_the_timeout() -> None:
    """A hung job on an ``aigw worker``: its lease keeper fails it instead of renewing for ever."""
    from gateway.distributed import _LeaseKeeper

    class _Index:
        def __init__(self) -> None:
            self.renewed = 0
            self.failed: list[str] = []

        def renew_lease(self, job_id: int, owner: str, until: float) -> bool:
            self.renewed += 1
            return True

        def job_failed(self, job_id: int, owner: str, error: str, **kwargs: object) -> bool:
            self.failed.append(error)
            return True

    index, abandoned = _Index(), []
    keeper = _LeaseKeeper(index, 7, "w/1", 0.3, timeout_seconds=0.5, on_abandon=lambda: abandoned.append(1))  # type: ignore[arg-type]
    with keeper:
        wait_for(lambda: index.failed, 5, "the job to be failed")
        time.sleep(0.3)  # no renewal after that
        renewed = index.renewed
        time.sleep(0.3)
        assert index.renewed == renewed
    assert len(index.failed) == 1 and "timeout_seconds = 0.5" in index.failed[0] and abandoned == [1]
    assert renewed >= 2  # renewed every lease/3 until then
