"""``aigw demo``: the whole path on one machine, from scanner to PACS, with a report.

The demo starts the gateway in-process and, as the PACS (``DEMO_PACS``), a
real Orthanc with its DICOMweb plugin and the OHIF viewer in front of it,
all on free loopback ports (:mod:`gateway.viewer`). Every available pipeline
that implements :class:`gateway.contract.DemoCapable` writes a synthetic
study; the demo sends each series in with C-STORE on one association as a
scanner does (calling AE ``DEMO_SCANNER``), waits until the results are back
at ``DEMO_PACS``, opens the input and every result series in OHIF in
headless Chromium, and writes a self-contained ``report.html``: a summary
table, the viewer's screenshots and the pipelines' previews side by side,
the timings and where every DICOM file lies. With ``keep_open`` it then
prints the OHIF address and keeps serving until Ctrl-C, so a person can
look.

Where Orthanc, OHIF or Chromium are not installed (or ``viewer=False``),
the demo falls back to a built-in C-STORE SCP as ``DEMO_PACS`` and says in
the report that it has no viewer screenshots.

Layout of the demo folder::

    .aigw-demo                          marker: this folder belongs to the demo
    input/<pipeline>/                   the synthetic studies as sent
    gateway-data/                       the gateway's data dir (store, jobs, index)
    received/<series>/<sop>.dcm         what DEMO_PACS received, bit-exact
    screenshots/<n>-<pipeline>-*.png     OHIF screenshots: page, and .viewport.png crops
    viewer/                             Orthanc's database and log, the browser profile
    gateway.log                         the gateway's log for this run

Everything stays on the machine and nothing is downloaded, so the demo runs
offline. The exit status is 0 only if every series came back.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import platform
import shutil
import sys
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway import __version__
from gateway.config import Config, Destination, load_config
from gateway.index import JobState, SendState, SeriesState
from gateway.status import StorageStatus
from gateway.uids import InvalidUID, checked_uid, short_ref

if TYPE_CHECKING:
    from PIL import Image

    from gateway.contract import Pipeline
    from gateway.service import Gateway
    from gateway.viewer import Orthanc, Viewer

__all__ = ["DemoError", "ReceivingNode", "run_demo"]

log = logging.getLogger(__name__)

#: Written into the demo folder; only a folder holding it is ever emptied.
MARKER = ".aigw-demo"
PACS_AE = "DEMO_PACS"
SCANNER_AE = "DEMO_SCANNER"
#: Longest side of a preview picture in the report, in pixels.
PREVIEW_SIZE = 256
#: Seconds between progress lines while waiting.
PROGRESS_EVERY = 3.0

# Settings the demo imposes whatever the configuration file says: it must not
# touch a real data dir, database, port or PACS, and it must finish quickly.
# The file still contributes plugins, models, routes, pipeline options and
# identity.
_QUICK: Mapping[str, Any] = {
    # Each series arrives on its own association, so the release hint
    # (PS3.8 A-RELEASE) completes it; the timer is only the fallback.
    "completion.series_timeout_seconds": 3.0,
    "completion.release_quiet_seconds": 0.5,
    "completion.hint_quiet_seconds": 0.5,
    # A failing job gives up in seconds instead of minutes.
    "jobs.backoff_seconds": 1.0,
    "jobs.backoff_max_seconds": 4.0,
    "send.backoff_seconds": 1.0,
    "send.backoff_max_seconds": 4.0,
    "send.timeout_seconds": 30.0,
    # The demo writes a few megabytes; the 2 GiB production watermark would
    # refuse it on a nearly full laptop for no benefit.
    "gateway.min_free_bytes": 64 * 1024**2,
}


class DemoError(RuntimeError):
    """The demo cannot start (for example the demo folder belongs to something else)."""


# ---------------------------------------------------------------- console
class _Console:
    """Progress lines on stderr, prefixed with the time since the demo began."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, message: str) -> None:
        sys.stderr.write(f"[demo {self.elapsed():6.1f} s] {message}\n")
        sys.stderr.flush()
        log.info("%s", message)


# ------------------------------------------------------------ demo folder
def _prepare_out(out: Path) -> None:
    """Make ``out`` an empty demo folder, emptying only a previous demo's folder.

    Raises
    ------
    DemoError
        If ``out`` is a file, or a non-empty folder without the demo's marker:
        it may hold someone's data, so it is left alone.
    """
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(
                f"{out} is not empty and was not made by 'aigw demo' (no {MARKER} file in it); "
                "refusing to delete anything there: choose another --out or empty it yourself"
            )
        for child in out.iterdir():
            # A symlink is removed, never followed: only the demo's own files go.
            if child.is_symlink() or not child.is_dir():
                child.unlink()
            else:
                shutil.rmtree(child)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"made by aigw {__version__} demo; this folder is emptied by the next demo run\n")


@contextmanager
def _demo_logging(path: Path, level: str) -> Iterator[None]:
    """Send all log records to ``path`` for the duration, then restore the root logger.

    The console belongs to the progress lines; the gateway's own log, stack
    traces of failing jobs included, goes to the file the report points to.
    """
    from pynetdicom import _config as pnd_config

    root = logging.getLogger()
    pnd = logging.getLogger("pynetdicom")
    saved = (root.handlers[:], root.level, pnd.level)
    saved_ids = (pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom narrates every association at INFO, and its identifier
    # logging would put data set values in the log.
    pnd.setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    pnd_config.LOG_REQUEST_IDENTIFIERS = False
    pnd_config.LOG_RESPONSE_IDENTIFIERS = False
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        pnd.setLevel(saved[2])
        pnd_config.LOG_REQUEST_IDENTIFIERS, pnd_config.LOG_RESPONSE_IDENTIFIERS = saved_ids
        handler.close()


def _demo_config(config_path: Path | None, data_dir: Path, pacs_port: int) -> Config:
    """The effective configuration: the file (if any) with the demo's own settings on top."""
    overrides: dict[str, Any] = {
        "gateway.data_dir": str(data_dir),
        # Named explicitly so a database_url in the file (a site's PostgreSQL)
        # is never written to by the demo.
        "gateway.database_url": f"sqlite:///{data_dir / 'index.sqlite'}",
        "gateway.host": "127.0.0.1",
        "gateway.port": 0,
        "metrics.host": "127.0.0.1",
        "metrics.port": 0,
        "destinations": [Destination(name="demo_pacs", ae_title=PACS_AE, host="127.0.0.1", port=pacs_port)],
        **_QUICK,
    }
    return load_config(config_path, overrides)


# ------------------------------------------------------- receiving node
@dataclass(frozen=True)
class Received:
    """One instance DEMO_PACS stored."""

    sop_instance_uid: str
    series_uid: str
    path: Path
    at: float


def _file_received(root: Path, data: bytes | Path) -> Received:
    """File one received instance (bytes, or a file to copy) as ``<root>/<series>/<sop>.dcm``, atomically."""
    ds = dcmread(data if isinstance(data, Path) else io.BytesIO(data), stop_before_pixels=True)
    series = checked_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    sop = checked_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    final = root / series / f"{sop}.dcm"
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(f".{final.name}.part")
    if isinstance(data, Path):
        shutil.copyfile(data, part)
    else:
        part.write_bytes(data)
    os.replace(part, final)
    return Received(sop, series, final, time.time())


class ReceivingNode:
    """``DEMO_PACS``: a Storage SCP on loopback that files what it receives.

    Each instance is written bit-exact to ``<root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
    and its arrival time is recorded.

    Parameters
    ----------
    root : Path
        Folder for received instances.
    ae_title : str
        The node's AE title.
    """

    def __init__(self, root: Path, ae_title: str = PACS_AE) -> None:
        self.root = root
        self.ae_title = ae_title
        self.port: int | None = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._received: dict[str, Received] = {}

    def start(self) -> int:
        """Listen on a free loopback port (non-blocking); returns the port."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]

        self.root.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        # Every storage SOP class a gateway may send results in: the limit of
        # 128 presentation contexts binds a requestor only (PS3.8 9.3.2.2).
        for uid in _STORAGE_CLASSES.values():
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self._server.server_address[1])
        log.info("%s listening on 127.0.0.1:%d", self.ae_title, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def get(self, sop_instance_uid: str) -> Received | None:
        with self._lock:
            return self._received.get(sop_instance_uid)

    def count(self) -> int:
        with self._lock:
            return len(self._received)

    def _on_store(self, event: Any) -> int:
        try:
            self._store(event)
            return int(StorageStatus.SUCCESS)
        except InvalidUID as exc:
            log.warning("%s refused an instance: %s", self.ae_title, exc)
            return int(StorageStatus.CANNOT_DECODE)
        except (InvalidDicomError, EOFError, ValueError, KeyError, AttributeError) as exc:
            log.warning("%s refused an instance it cannot decode (%s)", self.ae_title, type(exc).__name__)
            return int(StorageStatus.CANNOT_DECODE)
        except Exception:
            # PS3.7 C.4.2: still a failure status, never a dropped association.
            log.exception("%s failed to store an instance", self.ae_title)
            return int(StorageStatus.UNEXPECTED_ERROR)

    def _store(self, event: Any) -> None:
        # The gateway in this process switches pynetdicom to streaming received
        # data sets to a temporary file (a process-wide setting), so both forms
        # of a C-STORE request arrive here.
        try:
            src = event.dataset_path
        except AttributeError:
            src = None
        if isinstance(src, Path):
            got = _file_received(self.root, src)
        else:
            got = _file_received(self.root, event.encoded_dataset(include_meta=True))
        with self._lock:
            self._received[got.sop_instance_uid] = got


class OrthancNode:
    """``DEMO_PACS`` as a real Orthanc: what it stores is mirrored into ``root`` for the report.

    Orthanc's change log (``/changes``, one entry per new instance) says what
    arrived; each new instance's file is copied, bit-exact as Orthanc keeps
    it, to ``<root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` and its arrival
    time is the time the demo first saw it (within one poll of 0.2 s).

    Parameters
    ----------
    orthanc : gateway.viewer.Orthanc
        A started Orthanc.
    root : Path
        Folder for the mirrored instances.
    """

    def __init__(self, orthanc: Orthanc, root: Path) -> None:
        self.orthanc = orthanc
        self.root = root
        self.ae_title = orthanc.ae_title
        self.port: int | None = orthanc.dicom_port
        self._lock = threading.Lock()
        self._received: dict[str, Received] = {}
        self._since = 0
        self._polled = 0.0

    def start(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        self._since = int(self.orthanc.get("/changes?last")["Last"])
        return self.orthanc.dicom_port

    def stop(self) -> None:
        """Nothing of its own to stop: the viewer owns Orthanc."""

    def get(self, sop_instance_uid: str) -> Received | None:
        self._sync()
        with self._lock:
            return self._received.get(sop_instance_uid)

    def count(self) -> int:
        self._sync()
        with self._lock:
            return len(self._received)

    def _sync(self) -> None:
        with self._lock:
            if time.monotonic() - self._polled < 0.2:
                return
            self._polled = time.monotonic()
            while True:
                page = self.orthanc.get(f"/changes?since={self._since}&limit=500")
                for change in page["Changes"]:
                    if change["ChangeType"] == "NewInstance":
                        self._mirror(str(change["ID"]))
                self._since = int(page["Last"])
                if page["Done"]:
                    return

    def _mirror(self, orthanc_id: str) -> None:
        got = _file_received(self.root, self.orthanc.file(orthanc_id))
        self._received[got.sop_instance_uid] = got


#: Either kind of DEMO_PACS.
Pacs = ReceivingNode | OrthancNode


# ------------------------------------------------------------- bookkeeping
@dataclass
class JobOutcome:
    """What the index says about one job of a demo series."""

    id: int
    pipeline: str
    state: str
    attempts: int
    outputs: int
    error: str | None
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class ViewerShot:
    """One series as OHIF showed it: the viewport crop and what is wrong with it, if anything."""

    title: str
    path: Path  # the viewport crop; the whole page lies next to it
    series_uid: str
    url: str
    problems: tuple[str, ...]
    seconds: float


@dataclass
class SeriesRun:
    """One demo series, from generation to results, with its timings."""

    pipeline: str
    series_uid: str
    files: list[Path]
    sop_class_uids: list[str] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)
    accepted: int = 0
    send_error: str | None = None
    send_started: float | None = None
    send_finished: float | None = None
    completed_at: float | None = None
    study_uid: str | None = None
    jobs: list[JobOutcome] = field(default_factory=list)
    outputs: list[Received] = field(default_factory=list)
    output_dirs: list[Path] = field(default_factory=list)
    status: str = "waiting"  # back, failed, timed out
    error: str | None = None
    previews: list[tuple[str, bytes]] = field(default_factory=list)
    preview_error: str | None = None
    screenshots: list[ViewerShot] = field(default_factory=list)
    screenshot_error: str | None = None

    @property
    def done(self) -> bool:
        return self.status != "waiting"

    @property
    def ok(self) -> bool:
        return self.status == "back"

    @property
    def ref(self) -> str:
        return short_ref(self.series_uid)

    # Timings, None where the stage did not happen.
    @property
    def send_seconds(self) -> float | None:
        return _diff(self.send_started, self.send_finished)

    @property
    def completion_seconds(self) -> float | None:
        return _diff(self.send_finished, self.completed_at)

    @property
    def job_seconds(self) -> float | None:
        starts = [j.started_at for j in self.jobs if j.started_at]
        ends = [j.finished_at for j in self.jobs if j.finished_at]
        return _diff(min(starts), max(ends)) if starts and ends else None

    @property
    def end_to_end_seconds(self) -> float | None:
        last = max((r.at for r in self.outputs), default=None)
        return _diff(self.send_started, last)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(0.0, b - a)


@dataclass
class PipelineNote:
    """A pipeline that did not send a demo study, and why."""

    name: str
    reason: str


def _demo_capable(pipeline: Pipeline) -> bool:
    # demo_preview is optional, so DemoCapable's isinstance check (which wants
    # both hooks) would turn away pipelines that only generate data.
    return callable(getattr(pipeline, "demo_study", None))


def _seed(name: str) -> int:
    """A seed per pipeline that is the same on every run (reproducible studies)."""
    return zlib.crc32(name.encode()) % 1_000_000 + 1


# --------------------------------------------------------------- sending
def _series_of(pipeline: str, files: Sequence[Path]) -> list[SeriesRun]:
    """Group a demo study's files by series, in the order the pipeline gave them."""
    runs: dict[str, SeriesRun] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        uid = checked_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        run = runs.setdefault(uid, SeriesRun(pipeline, uid, []))
        run.files.append(Path(f))
        run.sop_class_uids.append(str(ds.SOPClassUID))
        run.transfer_syntaxes.append(str(ds.file_meta.TransferSyntaxUID))
    return list(runs.values())


def _send_series(run: SeriesRun, port: int, called_ae: str, console: _Console, label: str) -> None:
    """C-STORE one series on one association, as a modality does (PS3.4 B.2)."""
    from pynetdicom import AE

    from gateway.scu import classify_status

    ae = AE(ae_title=SCANNER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    proposed: dict[str, list[str]] = defaultdict(list)
    for sop_class, ts in zip(run.sop_class_uids, run.transfer_syntaxes):
        for syntax in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if syntax not in proposed[sop_class]:
                proposed[sop_class].append(syntax)
    for sop_class, syntaxes in list(proposed.items())[:128]:  # PS3.8 9.3.2.2: at most 128 contexts
        ae.add_requested_context(sop_class, syntaxes)
    run.send_started = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        run.send_finished = time.time()
        if assoc.is_rejected:
            run.send_error = (
                "the gateway rejected the association (see gateway.allow_ae, allow_hosts and"
                " require_called_ae in the configuration)"
            )
        else:
            what = "was aborted" if assoc.is_aborted else "could not be opened"
            run.send_error = f"the association to the gateway {what}"
        return
    _no_delay(assoc)
    last = time.monotonic()
    try:
        for k, path in enumerate(run.files, 1):
            if not assoc.is_established:
                run.send_error = "association lost while sending"
                break
            try:
                # A path, not a data set: pynetdicom reads it when it sends.
                rsp = assoc.send_c_store(path)
            except ValueError as exc:  # no accepted presentation context
                run.send_error = f"the gateway did not accept {path.name}: {exc}"
                continue
            status = int(getattr(rsp, "Status", -1)) if rsp else -1
            if status >= 0 and classify_status(status) == SendState.SENT:
                run.accepted += 1
            else:
                why = "no response" if status < 0 else f"status 0x{status:04X}"
                run.send_error = f"the gateway refused {path.name}: {why}"
            if time.monotonic() - last > PROGRESS_EVERY:
                last = time.monotonic()
                console.say(f"{label}: sent {k}/{len(run.files)} instances")
    finally:
        if assoc.is_established:
            assoc.release()
        run.send_finished = time.time()


def _no_delay(assoc: Any) -> None:
    """Switch Nagle's algorithm off on an association's socket, as DCMTK does by default.

    pynetdicom writes a C-STORE request as separate PDUs (command, then data
    set); with Nagle on, each small write waits for the peer's delayed ACK,
    which caps a loopback sender at about 20 instances a second.
    """
    import socket

    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        log.debug("could not set TCP_NODELAY; sending at the slower pace")


# --------------------------------------------------------------- waiting
def _update(run: SeriesRun, gw: Gateway, pacs: Pacs, jobs_by_series: Mapping[str, list[Any]]) -> None:
    """Bring ``run`` up to date from the index and DEMO_PACS; sets its status once final."""
    if run.done:
        return
    if run.accepted == 0:
        run.status, run.error = "failed", run.send_error or "no instance was accepted by the gateway"
        return
    row = gw.index.get_series(run.series_uid)
    if row is None:
        return
    run.study_uid = row.study_uid
    run.completed_at = row.completed_at
    if row.state == SeriesState.UNROUTED.value:
        run.status = "failed"
        run.error = "the series completed but no route matched it (see 'aigw route explain' and [[routes]])"
        return
    if row.state != SeriesState.ROUTED.value:
        return
    jobs = [j for j in jobs_by_series.get(run.series_uid, []) if j.series_version == row.version]
    run.jobs = [
        JobOutcome(j.id, j.pipeline, j.state, j.attempts, j.outputs, j.error, j.started_at, j.finished_at)
        for j in sorted(jobs, key=lambda j: j.id)
    ]
    if not jobs:
        return
    outputs: list[Received] = []
    missing = 0
    for job in jobs:
        if job.state == JobState.FAILED.value:
            run.status = "failed"
            run.error = f"job {job.id} ({job.pipeline}) failed: {job.error or 'no reason recorded'}"
            return
        if job.state not in (JobState.SUCCEEDED.value, JobState.SENT.value):
            return
        for send in gw.index.sends_for_job(job.id):
            if send.state == SendState.DEAD.value:
                run.status = "failed"
                run.error = f"job {job.id}: a result could not be delivered to {PACS_AE}: {send.error}"
                return
            got = pacs.get(send.sop_instance_uid)
            if got is None:
                missing += 1
            else:
                outputs.append(got)
    if missing or any(j.state != JobState.SENT.value for j in jobs):
        return
    run.outputs = sorted(outputs, key=lambda r: (r.series_uid, r.path.name))
    run.output_dirs = sorted({r.path.parent for r in run.outputs})
    if not run.outputs:
        run.status, run.error = "failed", "the pipeline returned no output instances"
    elif run.accepted < len(run.files):
        # Results for part of a series are not the series coming back.
        run.status = "failed"
        run.error = f"only {run.accepted} of {len(run.files)} instances reached the gateway: {run.send_error}"
    else:
        run.status = "back"


def _wait(runs: list[SeriesRun], gw: Gateway, pacs: Pacs, timeout: float, console: _Console) -> None:
    """Poll until every series is back or failed, or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    last = 0.0
    while True:
        by_series: dict[str, list[Any]] = defaultdict(list)
        for j in gw.index.list_jobs(limit=100_000):
            by_series[j.series_uid].append(j)
        for run in runs:
            _update(run, gw, pacs, by_series)
        if all(r.done for r in runs):
            return
        now = time.monotonic()
        if now >= deadline:
            for run in runs:
                if not run.done:
                    run.status = "timed out"
                    run.error = f"no complete results after {timeout:.0f} s ({_stage(run)})"
            return
        if now - last >= PROGRESS_EVERY:
            last = now
            back = sum(r.ok for r in runs)
            failed = sum(r.done and not r.ok for r in runs)
            states: dict[str, int] = defaultdict(int)
            for r in runs:
                if not r.done:
                    states[_stage(r)] += 1
            pending = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
            console.say(
                f"waiting for results: {back}/{len(runs)} series back, {failed} failed"
                f"{'; ' + pending if pending else ''}; {pacs.count()} result instance(s) at {PACS_AE}"
                f" ({deadline - now:.0f} s left)"
            )
        time.sleep(0.2)


def _stage(run: SeriesRun) -> str:
    """Where a series that is not back yet stands, in words."""
    if run.completed_at is None:
        return "waiting for series completion"
    if not run.jobs:
        return "completed, no job yet"
    for j in run.jobs:
        if j.state == JobState.QUEUED.value and j.error:
            return f"job retrying after: {j.error[:80]}"
    states = sorted({j.state for j in run.jobs})
    if states == [JobState.SUCCEEDED.value]:
        return "results being sent"
    return "job " + "/".join(states)


# -------------------------------------------------------------- previews
def _to_image(ds: Any) -> Image.Image:
    """Render a data set's pixels (middle frame) as an 8-bit picture for the report."""
    from PIL import Image

    arr = np.asarray(ds.pixel_array)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    if samples > 1:
        # pydicom hands colour as RGB; stretch data of more than 8 bits to 0-255.
        rgb = arr.astype(np.float32)
        if arr.dtype != np.uint8:
            rgb *= 255.0 / (float(rgb.max()) or 1.0)
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    else:
        # Stored values, no modality LUT: a percentile window is the same
        # picture either way, as the rescale is linear.
        grey = arr.astype(np.float32)
        lo, hi = (float(v) for v in np.percentile(grey, [1, 99]))
        if hi <= lo:
            hi = lo + 1.0
        scaled = np.clip((grey - lo) / (hi - lo), 0.0, 1.0) * 255.0
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            scaled = 255.0 - scaled  # PS3.3 C.7.6.3.1.2: minimum value is white
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    scale = PREVIEW_SIZE / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return img.resize(size, resample)


def _has_pixels(path: Path) -> Any:
    """The data set at ``path`` if it holds pixel data, else None (values over 1 KB read on access)."""
    ds = dcmread(path, defer_size="1 KB")
    return ds if any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) else None


def _by_instance_number(paths: Sequence[Path]) -> list[Path]:
    def key(p: Path) -> tuple[int, str]:
        try:
            return (int(dcmread(p, stop_before_pixels=True).get("InstanceNumber") or 0), p.name)
        except Exception:
            # Only the order of the preview suffers; reading the file for the
            # picture reports a real problem.
            return (0, p.name)

    return sorted(paths, key=key)


def _default_preview(inputs: Sequence[Path], outputs: Sequence[Path]) -> list[tuple[str, Image.Image]]:
    """Middle input image and first output image with pixels, windowed 1st-99th percentile."""
    pictures = []
    ordered = _by_instance_number(inputs)
    if ordered:
        mid = ordered[len(ordered) // 2]
        pictures.append((f"input: {mid.name}", _to_image(dcmread(mid))))
    for path in _by_instance_number(outputs):
        ds = _has_pixels(path)
        if ds is not None:
            pictures.append((f"output: {str(ds.get('SeriesDescription', '') or path.name)}", _to_image(ds)))
            break
    return pictures


def _png(image: Any) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _make_previews(run: SeriesRun, pipeline: Pipeline | None) -> None:
    outputs = [r.path for r in run.outputs]
    hook = getattr(pipeline, "demo_preview", None)
    try:
        if callable(hook):
            pictures = list(hook(run.files, outputs))
        else:
            pictures = _default_preview(run.files, outputs)
            if outputs and len(pictures) < 2:
                run.preview_error = "the outputs hold no pixel data (for example structured reports)"
        run.previews = [(str(title), _png(img)) for title, img in pictures]
    except Exception as exc:
        log.exception("preview of demo series %s failed", run.ref)
        run.preview_error = f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------- the viewer
def _screenshots(runs: Sequence[SeriesRun], viewer: Viewer, folder: Path, console: _Console) -> None:
    """Open each series that came back, its input and every result series, in OHIF; screenshot each."""
    from gateway.viewer import ViewerMode

    fallback = ViewerMode.FALLBACK
    for i, run in enumerate(runs, 1):
        if not run.ok or run.study_uid is None:
            continue
        try:
            viewer.upload(run.files)  # the scanner's series, so the results are seen next to it
            results: dict[str, Path] = {}
            for received in run.outputs:
                results.setdefault(received.series_uid, received.path)
            heads = [dcmread(run.files[0], stop_before_pixels=True)]
            heads += sorted(
                (dcmread(p, stop_before_pixels=True) for p in results.values()),
                key=lambda h: (int(h.get("SeriesNumber") or 0), str(h.SeriesInstanceUID)),
            )
            source_modality = str(heads[0].get("Modality", ""))
            for k, head in enumerate(heads):
                kind = "input" if k == 0 else f"result {k}"
                what = str(head.get("SeriesDescription", "") or head.get("Modality", ""))
                png = folder / f"{i:02d}-{run.pipeline}-{'input' if k == 0 else f'result{k}'}.png"
                series_uid = str(head.SeriesInstanceUID)
                shot = viewer.screenshot_series(str(head.StudyInstanceUID), series_uid, png)
                problems = tuple(shot.stats.problems(**_look(str(head.get("Modality", "")), source_modality)))
                # Say so where OHIF could not show the type and the harness drew it instead.
                shown_by = "fallback picture (OHIF 3.13 cannot show it)" if shot.mode is fallback else "OHIF"
                title = f"{shown_by}, {kind}: {what}"
                png_shown = shot.viewport_png
                run.screenshots.append(ViewerShot(title, png_shown, series_uid, shot.url, problems, shot.seconds))
                note = f" - LOOKS WRONG: {'; '.join(problems)}" if problems else ""
                console.say(f"{run.pipeline}: {kind} '{what}' in the viewer ({shot.seconds:.1f} s){note}")
        except Exception as exc:
            log.exception("viewer screenshots of demo series %s failed", run.ref)
            run.screenshot_error = f"{type(exc).__name__}: {exc}"
            console.say(f"{run.pipeline}: viewer screenshots failed: {run.screenshot_error}")


def _look(modality: str, source_modality: str) -> dict[str, Any]:
    """Limits of :meth:`ImageStats.problems` that fit what a series looks like when shown well."""
    if modality == "SR":  # a page of text: mostly background, few grey levels
        return {"max_black": 0.995, "max_uniform": 0.995, "min_levels": 2, "min_std": 1.0}
    if "SM" in (modality, source_modality):  # brightfield: mostly white glass around the tissue
        return {"max_white": 0.98, "max_uniform": 0.98}
    return {}


def _start_viewer(root: Path, console: _Console) -> tuple[Viewer | None, str | None]:
    """Orthanc + OHIF + Chromium, or None and why not (the demo then runs without them)."""
    try:
        from gateway.viewer import Viewer

        viewer = Viewer(root, pacs_ae_title=PACS_AE).start()
    except Exception as exc:
        log.warning("viewer unavailable: %s", exc, exc_info=True)
        console.say(f"viewer unavailable, using the built-in receiving node without screenshots: {exc}")
        return None, f"{type(exc).__name__}: {exc}"
    console.say(f"PACS {PACS_AE}: Orthanc on 127.0.0.1:{viewer.orthanc.dicom_port}; viewer: {viewer.ohif.url}")
    return viewer, None


# ---------------------------------------------------------------- report
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{margin-bottom:.2em} .verdict{font-size:1.2em;padding:.6em 1em;border-radius:6px;display:inline-block}
.ok{background:#e3f6e5;color:#14591f} .bad{background:#fde7e7;color:#8a1111}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
section{border-top:1px solid #ddd;margin-top:2em;padding-top:1em}
figure{display:inline-block;margin:0 1em 1em 0;text-align:center} figure img{border:1px solid #999;image-rendering:auto}
figcaption{font-size:.9em;color:#555;max-width:256px;overflow-wrap:anywhere}
img.shot{max-width:360px} figure:has(img.shot) figcaption{max-width:360px}
code{background:#f6f6f6;padding:0 .2em;overflow-wrap:anywhere} .muted{color:#666}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _status_cell(run: SeriesRun) -> str:
    cls = "ok" if run.ok else "bad"
    text = "back" if run.ok else run.status.upper()
    return f'<td class="{cls}">{_e(text)}</td>'


def _write_report(
    report: Path,
    *,
    out: Path,
    config: Config | None,
    config_path: Path | None,
    runs: Sequence[SeriesRun],
    notes: Sequence[PipelineNote],
    unavailable: Mapping[str, str],
    verdict: str,
    ok: bool,
    started: float,
    duration: float,
    viewer_note: str | None = None,
) -> None:
    """Write the self-contained report (previews inline as data URIs)."""
    data_dir = config.gateway.data_dir if config is not None else out / "gateway-data"
    p: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>aigw demo report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>aigw demo report</h1>",
        f'<p class="verdict {"ok" if ok else "bad"}">{_e(verdict)}</p>',
        "<p class='muted'>"
        f"aigw {_e(__version__)} &middot; run {_e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started)))}"
        f" &middot; {duration:.1f} s in all &middot; {_e(platform.platform())}, {os.cpu_count() or '?'} CPU(s)"
        f" &middot; configuration: {_e(config_path or 'embedded defaults')}</p>",
        "<p>A scanner (<code>" + SCANNER_AE + "</code>) sent each synthetic series to the gateway with C-STORE,"
        " one association per series. The gateway stored it, completed it, ran the pipeline and sent the"
        " results to the PACS <code>" + PACS_AE + "</code>.</p>",
        f"<p class='muted'>{_e(viewer_note)}</p>" if viewer_note else "",
        "<h2>Summary</h2>",
        "<table><tr><th>Pipeline</th><th>Series</th><th>Instances in</th><th>Outputs back</th>"
        "<th>Send</th><th>Completion after send</th><th>Job</th><th>First sent &rarr; last result</th>"
        "<th>Status</th></tr>",
    ]
    for i, run in enumerate(runs, 1):
        p.append(
            f"<tr><td>{_e(run.pipeline)}</td>"
            f'<td><a href="#s{i}">series {i}</a> <span class="muted">({_e(run.ref)})</span></td>'
            f'<td class="num">{run.accepted}/{len(run.files)}</td><td class="num">{len(run.outputs)}</td>'
            f'<td class="num">{_secs(run.send_seconds)}</td><td class="num">{_secs(run.completion_seconds)}</td>'
            f'<td class="num">{_secs(run.job_seconds)}</td><td class="num">{_secs(run.end_to_end_seconds)}</td>'
            f"{_status_cell(run)}</tr>"
        )
    if not runs:
        p.append('<tr><td colspan="9" class="muted">no series: no available pipeline provides demo data</td></tr>')
    p.append("</table>")
    if notes or unavailable:
        p.append("<h2>Pipelines without a demo series</h2><ul>")
        for note in notes:
            p.append(f"<li><b>{_e(note.name)}</b>: {_e(note.reason)}</li>")
        for name, why in sorted(unavailable.items()):
            p.append(f"<li><b>{_e(name)}</b>: unavailable: {_e(why)}</li>")
        p.append("</ul>")

    for i, run in enumerate(runs, 1):
        p.append(f'<section id="s{i}"><h2>Series {i}: {_e(run.pipeline)}</h2>')
        if run.error:
            p.append(f'<p class="verdict bad">{_e(run.status)}: {_e(run.error)}</p>')
        if run.send_error and run.accepted:
            p.append(f"<p class='bad'>while sending: {_e(run.send_error)}</p>")
        if run.screenshots:
            p.append("<h3>In the viewer (OHIF over Orthanc's DICOMweb)</h3><div>")
            for shot in run.screenshots:
                b64 = base64.b64encode(shot.path.read_bytes()).decode("ascii")
                warn = f"<br><b class='bad'>looks wrong: {_e('; '.join(shot.problems))}</b>" if shot.problems else ""
                p.append(
                    f'<figure><img class="shot" alt="{_e(shot.title)}" src="data:image/png;base64,{b64}">'
                    f"<figcaption>{_e(shot.title)}<br><code>{_e(shot.path.name)}</code>{warn}</figcaption></figure>"
                )
            p.append("</div>")
        if run.screenshot_error:
            p.append(f"<p class='bad'>viewer screenshots failed: {_e(run.screenshot_error)}</p>")
        if run.previews:
            p.append("<h3>Previews</h3><div>")
            for title, png in run.previews:
                b64 = base64.b64encode(png).decode("ascii")
                p.append(
                    f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{b64}">'
                    f"<figcaption>{_e(title)}</figcaption></figure>"
                )
            p.append("</div>")
        if run.preview_error:
            p.append(f"<p class='muted'>no {'output ' if run.previews else ''}preview: {_e(run.preview_error)}</p>")
        p.append("<table>")
        rows: list[tuple[str, str]] = [
            ("SeriesInstanceUID", f"<code>{_e(run.series_uid)}</code>"),
            ("Instances sent / accepted", f"{len(run.files)} / {run.accepted}"),
            ("Send (one association)", _secs(run.send_seconds)),
            ("Series complete after last instance", _secs(run.completion_seconds)),
            ("Job run", _secs(run.job_seconds)),
            ("First instance sent &rarr; last result received", _secs(run.end_to_end_seconds)),
        ]
        for job in run.jobs:
            err = f"; error: {_e(job.error)}" if job.error else ""
            rows.append(
                (
                    f"Job {job.id}",
                    f"{_e(job.pipeline)}: {_e(job.state)}, {job.attempts} attempt(s), {job.outputs} output(s){err}",
                )
            )
        rows.append(("Input files", _paths_cell(sorted({f.parent for f in run.files}))))
        if run.study_uid:
            try:
                stored = data_dir.resolve() / "store" / checked_uid(run.study_uid) / checked_uid(run.series_uid)
                rows.append(("Stored by the gateway", _paths_cell([stored])))
            except InvalidUID:
                pass
        for job in run.jobs:
            rows.append((f"Job {job.id} work folder", _paths_cell([data_dir.resolve() / "jobs" / f"{job.id:08d}"])))
        rows.append(("Received by " + PACS_AE, _paths_cell(run.output_dirs) if run.output_dirs else "-"))
        p.extend(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        p.append("</table></section>")

    p.append("<section><h2>Where things are</h2><table>")
    for label, path in (
        ("Demo folder", out),
        ("Synthetic input studies", out / "input"),
        ("Gateway data dir (store, jobs, index)", data_dir),
        (f"Results received by {PACS_AE}", out / "received"),
        ("Gateway log", out / "gateway.log"),
    ):
        p.append(f"<tr><th>{_e(label)}</th><td>{_paths_cell([path])}</td></tr>")
    p.append("</table>")
    p.append(
        "<p>Look at the jobs with <code>aigw jobs list --data-dir "
        f"{_e(Path(data_dir).resolve())}</code>.</p></section></body></html>"
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_name(f".{report.name}.part")
    tmp.write_text("\n".join(p), encoding="utf-8")
    os.replace(tmp, report)


def _paths_cell(paths: Sequence[Path]) -> str:
    return "<br>".join(f"<code>{_e(Path(x).resolve())}</code>" for x in paths) or "-"


# ------------------------------------------------------------------- main
def run_demo(
    out: Path,
    report: Path,
    timeout: float,
    config_path: Path | None = None,
    *,
    viewer: bool = True,
    keep_open: bool = False,
) -> int:
    """Run the end-to-end demo and write the report.

    Parameters
    ----------
    out : Path
        Demo folder. Emptied first if a previous demo made it; a non-empty
        folder the demo did not make is refused.
    report : Path
        Where to write ``report.html``.
    timeout : float
        Seconds to wait for results after the last series was sent.
    config_path : Path, optional
        A gateway configuration file for plugins, models, routes and pipeline
        options. The demo overrides ports, data dir, database, destinations
        and timing settings so it never touches a real installation.
    viewer : bool
        Use Orthanc with OHIF as the PACS and screenshot every result in the
        viewer (the default); False uses the built-in receiving node.
    keep_open : bool
        After the report, print the viewer's address and keep Orthanc and
        OHIF serving until Ctrl-C.

    Returns
    -------
    int
        0 if every series came back, 1 if any did not or no pipeline has demo
        data, 2 if the demo could not start.
    """
    from gateway.service import Gateway

    console = _Console()
    started = time.time()
    out = Path(out).resolve()
    report = Path(report).resolve()
    # Read the file before touching anything: a ConfigError names file, key
    # and reason, and the demo folder is left as it was.
    level = load_config(config_path).logging.level
    try:
        _prepare_out(out)
    except DemoError as exc:
        print(f"aigw demo: {exc}", file=sys.stderr)
        return 2
    runs: list[SeriesRun] = []
    notes: list[PipelineNote] = []
    config: Config | None = None
    gw: Gateway | None = None
    seen: Viewer | None = None
    pacs: Pacs | None = None
    with _demo_logging(out / "gateway.log", level):
        try:
            log.info("aigw %s demo in %s", __version__, out)
            viewer_note: str | None = "viewer screenshots switched off (--no-viewer)"
            if viewer:
                seen, why = _start_viewer(out / "viewer", console)
                viewer_note = f"no viewer screenshots: the viewer could not start ({why})" if why else None
            if seen is not None:
                pacs = OrthancNode(seen.orthanc, out / "received")
                pacs.start()
            else:
                pacs = ReceivingNode(out / "received")
                pacs.start()
                console.say(f"receiving node {PACS_AE} listening on 127.0.0.1:{pacs.port}")
            assert pacs.port is not None
            config = _demo_config(config_path, out / "gateway-data", pacs.port)
            gw = Gateway(config)
            available = gw.plugins.available
            unavailable = dict(gw.plugins.unavailable)
            capable = {n: p for n, p in sorted(available.items()) if _demo_capable(p)}
            notes = [
                PipelineNote(n, "no demo data (the pipeline has no demo_study hook)")
                for n in sorted(available)
                if n not in capable
            ]

            def write_report(verdict: str, ok: bool) -> None:
                _write_report(
                    report,
                    out=out,
                    config=config,
                    config_path=config_path,
                    runs=runs,
                    notes=notes,
                    unavailable=unavailable,
                    verdict=verdict,
                    ok=ok,
                    started=started,
                    duration=console.elapsed(),
                    viewer_note=viewer_note,
                )

            if not capable:
                verdict = "demo not run: no available pipeline provides demo data"
                _explain_nothing_to_do(available, unavailable, gw.models.root)
                write_report(verdict, False)
                print(f"report: {report}", file=sys.stderr)
                return 1

            gw.start()
            console.say(
                f"gateway {config.gateway.ae_title} listening on 127.0.0.1:{gw.dicom_port}; "
                f"pipelines: {', '.join(capable)}"
            )

            for name, pipeline in capable.items():
                folder = out / "input" / name
                console.say(f"{name}: generating the demo study")
                try:
                    files = list(pipeline.demo_study(folder, _seed(name)))  # type: ignore[attr-defined]
                    if not files:
                        raise ValueError("demo_study returned no files")
                    series = _series_of(name, files)
                except Exception as exc:
                    log.exception("demo_study of %s failed", name)
                    notes.append(PipelineNote(name, f"demo_study failed: {type(exc).__name__}: {exc}"))
                    continue
                console.say(f"{name}: {len(files)} file(s) in {len(series)} series")
                runs.extend(series)

            assert gw.dicom_port is not None
            for i, run in enumerate(runs, 1):
                label = f"series {i}/{len(runs)} ({run.pipeline}, {len(run.files)} instances)"
                _send_series(run, gw.dicom_port, config.gateway.ae_title, console, label)
                console.say(
                    f"{label}: sent in {_secs(run.send_seconds)}" + (f" - {run.send_error}" if run.send_error else "")
                )

            if runs:
                _wait(runs, gw, pacs, timeout, console)
            for run in runs:
                if run.outputs or run.files:
                    _make_previews(run, available.get(run.pipeline))
            if seen is not None:
                _screenshots(runs, seen, out / "screenshots", console)

            failed_gen = [n for n in notes if n.reason.startswith("demo_study failed")]
            back = sum(r.ok for r in runs)
            ok = bool(runs) and back == len(runs) and not failed_gen
            verdict = _verdict(runs, failed_gen, ok, console.elapsed())
            write_report(verdict, ok)
            for run in runs:
                if not run.ok:
                    print(f"  {run.pipeline} series {run.ref}: {run.status}: {run.error}", file=sys.stderr)
            for note in failed_gen:
                print(f"  {note.name}: {note.reason}", file=sys.stderr)
            print(f"report: {report}", file=sys.stderr)
            print(verdict)
            if keep_open:
                _keep_open(seen, runs, gw, console)
            return 0 if ok else 1
        except KeyboardInterrupt:
            console.say(f"interrupted: stopping the gateway and {PACS_AE}")
            raise
        finally:
            # Also on Ctrl-C: no listener or worker thread outlives the demo.
            if gw is not None:
                try:
                    gw.stop()  # also closes the index of a gateway that never started
                except Exception:
                    log.exception("stopping the gateway failed")
            if pacs is not None:
                pacs.stop()
            if seen is not None:
                seen.stop()


def _keep_open(viewer: Viewer | None, runs: Sequence[SeriesRun], gw: Gateway, console: _Console) -> None:
    """Keep serving until Ctrl-C, so a person can look at the results in OHIF."""
    if viewer is None:
        console.say("--keep-open: there is no viewer to keep open (see the report)")
        return
    print(f"OHIF viewer: {viewer.ohif.url}/  (study list; Orthanc: {viewer.orthanc.url}/)", file=sys.stderr)
    for run in runs:
        for shot in run.screenshots:
            if shot.url:
                print(f"  {run.pipeline}: {shot.title}: {shot.url}", file=sys.stderr)
    print(
        f"gateway {gw.config.gateway.ae_title} on 127.0.0.1:{gw.dicom_port} sends results there; Ctrl-C stops all",
        file=sys.stderr,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.say("stopping")


def _verdict(runs: Sequence[SeriesRun], failed_gen: Sequence[PipelineNote], ok: bool, seconds: float) -> str:
    back = sum(r.ok for r in runs)
    if ok:
        return f"demo OK: {back}/{len(runs)} series came back with results in {seconds:.1f} s"
    problems = [f"{len(runs) - back} of {len(runs)} series did not come back"]
    if failed_gen:
        problems.append(f"{len(failed_gen)} pipeline(s) could not generate demo data")
    return f"demo FAILED: {'; '.join(problems)} ({seconds:.1f} s)"


def _explain_nothing_to_do(available: Mapping[str, Any], unavailable: Mapping[str, str], models_dir: Path) -> None:
    lines = ["aigw demo: no available pipeline provides demo data, so there is nothing to send."]
    if available:
        lines.append(f"  available without demo data: {', '.join(sorted(available))}")
    for name, why in sorted(unavailable.items()):
        lines.append(f"  unavailable: {name}: {why}")
    if not available and not unavailable:
        lines.append(
            "  no pipeline plugin is installed: install a pipeline package (entry point group"
            " 'aigw.pipelines') or name one with plugins = [\"module:factory\"] in a file given with --config"
        )
    lines.append(f"  models dir: {models_dir}")
    print("\n".join(lines), file=sys.stderr)
