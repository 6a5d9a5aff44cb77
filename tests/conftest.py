"""Real peers for the tests: the gateway as a subprocess, DCMTK as the scanner,
Orthanc as the PACS. Everything on loopback, on free ports, in temp folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydicom import Dataset

# Orthanc lives with the viewer harness; the tests keep importing it from here.
from gateway.apps.viewer import Orthanc, Viewer, free_port
from tests.pki import PKI, make_pki
from tests.services import ExternalServer, PostgresServer, RabbitMQServer, Server, ServiceError

if TYPE_CHECKING:
    from gateway.index import Index  # for the annotation; GatewayProcess.index() imports it when called

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "tests.plugins.invert:InvertPipeline"


# DCMTK leaves Nagle's algorithm on unless told; without this every DIMSE
# message from storescu waits ~40 ms for a delayed ACK.
os.environ.setdefault("TCP_NODELAY", "1")


def need(tool: str) -> str:
    """Path of a system tool; never pynetdicom's same-named apps in the virtualenv."""
    search = os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if not Path(d).resolve().is_relative_to(Path(sys.prefix).resolve())
    )
    path = shutil.which(tool, path=search)
    if path is None:
        pytest.fail(f"{tool} is not installed: run the README's test command (it installs dcmtk, orthanc, ...)")
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    value = predicate()
    if not value:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
    return value


def wait_sent(gw: GatewayProcess, destination: str, n: int, timeout: float = 30) -> int:
    """The gateway's count of sends to ``destination`` that succeeded, once it reaches ``n``.

    A peer holds an instance before its answer reaches the gateway, which
    counts the send only after recording it: checking the count as soon as the
    peer has the instances races that. The caller compares the returned count
    with ``n``, so a count that went past it still fails.
    """
    key = f'aigw_send_attempts_total{{destination="{destination}",outcome="sent"}}'
    wait_for(lambda: gw.metrics().get(key, 0) >= n, timeout, f"{n} send(s) to {destination} counted")
    return int(gw.metrics().get(key, 0))


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def storescu(
    port: int, files: Sequence[Path | str], *, aet: str = "SCANNER", aec: str = "AIGW", extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK's storescu (one association); returns the completed process."""
    cmd = [need("storescu"), "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


class GatewayProcess:
    """``aigw serve`` as a subprocess with a generated TOML config."""

    def __init__(
        self,
        root: Path,
        models_dir: Path,
        extra_toml: str = "",
        destinations: Sequence[str] = (),
        series_timeout: float = 2,
        release_quiet: float | None = 0.5,
        gateway: dict[str, Any] | None = None,
        completion: dict[str, Any] | None = None,
        jobs: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.port = free_port()
        self.metrics_port = free_port()
        self.data_dir = root / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        dest = "".join(
            f'\n[[destinations]]\nname = "{d.split("@")[0].lower()}"\nae_title = "{d.split("@")[0]}"\n'
            f'host = "127.0.0.1"\nport = {d.split(":")[-1]}\n'
            for d in destinations
        )
        table = {
            "ae_title": "AIGW",
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(self.data_dir),
            "min_free_bytes": 0,
            **(gateway or {}),
        }
        # JSON scalars and arrays are valid TOML values.
        gateway_toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
        completion_toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (completion or {}).items())
        jobs_toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (jobs or {}).items())
        self.config = root / "aigw.toml"
        self.config.write_text(
            f"""plugins = ["{PLUGIN}"]

[gateway]
{gateway_toml}

[metrics]
port = {self.metrics_port}

[models]
dir = "{models_dir}"

[completion]
series_timeout_seconds = {series_timeout}
{"release_hint = false" if release_quiet is None else f"release_quiet_seconds = {release_quiet}"}
{completion_toml}

[jobs]
backoff_seconds = 0.5
backoff_max_seconds = 2
{jobs_toml}

[send]
backoff_seconds = 0.5
backoff_max_seconds = 2
timeout_seconds = 10
{dest}
{extra_toml}
"""
        )
        self.log_path = root / "gateway.log"

    def start(self, timeout: float = 60) -> GatewayProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.root,
        )
        wait_for(self._ready, timeout, "the gateway to be ready")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        code, body = http_get(f"http://127.0.0.1:{self.metrics_port}/readyz")
        if code == 503:
            # Up, but refusing for space: a test may start a gateway under its watermark on purpose.
            checks = json.loads(body).get("checks", {})
            return [name for name, ok in checks.items() if not ok] == ["free_space_above_watermark"]
        return code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    def metrics(self) -> dict[str, float]:
        code, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert code == 200
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def index(self) -> Index:
        from gateway.index import Index

        return Index(f"sqlite:///{self.data_dir / 'index.sqlite'}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.plugins.invert.lab.model import build_model

    folder = tmp_path_factory.mktemp("models")
    build_model(folder)
    return folder


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """The throw-away CA and certificates of tests/pki.py, for the TLS tests."""
    need("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        yield server
    finally:
        server.stop(graceful=False)  # its data dies with the test's folder


@pytest.fixture(scope="session")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    """One Orthanc + OHIF + headless Chromium for all viewer tests (each test uploads its own studies)."""
    try:
        harness = Viewer(tmp_path_factory.mktemp("viewer")).start()
    except RuntimeError as e:  # a missing binary or viewer: the message names the setup command
        pytest.fail(str(e))
    try:
        yield harness
    finally:
        harness.stop()


def _own_server(factory: Callable[[], PostgresServer | RabbitMQServer]) -> Iterator[Server]:
    try:
        server = factory().start()
    except ServiceError as e:  # a missing binary: the message names the setup command
        pytest.fail(str(e))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """A throw-away PostgreSQL for the session (tests/services.py; about 1 s to start).

    ``AIGW_TEST_PG_URL`` (a ``postgresql+psycopg://`` URL of a database that a
    superuser may connect to) uses that server instead.
    """
    external = os.environ.get("AIGW_TEST_PG_URL")
    if external:
        yield ExternalServer(external)
    else:
        yield from _own_server(PostgresServer)


@pytest.fixture
def pg_url(pg_server: Server) -> Iterator[str]:
    """A fresh database on ``pg_server`` for one test, dropped afterwards (its SQLAlchemy URL)."""
    import uuid

    import psycopg

    dsn = pg_server.url.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        where = " (AIGW_TEST_PG_URL)" if isinstance(pg_server, ExternalServer) else ""
        pytest.fail(f"no PostgreSQL server at {pg_server.url}{where}: {exc}")
    name = f"aigw_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_server.url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[Server]:
    """A throw-away RabbitMQ node for the session (tests/services.py), started when a test
    first needs it: about 4-7 s on a 2-core machine. ``AIGW_TEST_BROKER_URL`` uses that
    broker instead."""
    external = os.environ.get("AIGW_TEST_BROKER_URL")
    if not external:
        yield from _own_server(RabbitMQServer)
        return
    from kombu import Connection

    try:
        with Connection(external, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        pytest.fail(f"no RabbitMQ broker at AIGW_TEST_BROKER_URL={external}: {type(exc).__name__}: {exc}")
    yield ExternalServer(external)


@pytest.fixture
def make_gateway(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(
        extra_toml: str = "",
        destinations: Sequence[str] = (),
        start: bool = True,
        models: Path | None = None,
        **kw: Any,
    ) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / f"gw{len(started)}", models or models_dir, extra_toml, destinations, **kw)
        started.append(gw)
        return gw.start() if start else gw

    try:
        yield make
    finally:
        for gw in started:
            gw.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return make_gateway()


def save_all(datasets: Sequence[Dataset], folder: Path, prefix: str = "") -> list[Path]:
    """Write data sets as DICOM files ``<prefix><k>.dcm`` in ``folder``; returns the paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        path = folder / f"{prefix}{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def mr_series(folder: Path, n: int = 4, description: str = "T1 SE", seed: int = 1) -> list[Path]:
    """A small synthetic MR series (uncompressed) written from pydicom's MR_small."""
    import numpy as np
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    base = dcmread(str(get_testdata_file("MR_small.dcm")))
    series_uid = f"2.25.{seed}000{n}"
    paths = []
    rng = np.random.default_rng(seed)
    for k in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"2.25.{seed}000{n}{k + 1:04d}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = description
        ds.ImagePositionPatient = [0.0, 0.0, float(k * 5)]
        ds.PixelData = rng.integers(0, 4000, size=(ds.Rows, ds.Columns), dtype=np.uint16).astype("<i2").tobytes()
        path = folder / f"mr{k + 1:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
