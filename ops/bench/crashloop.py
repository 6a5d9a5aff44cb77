"""Crash loop: kill -9 the gateway during ingest; every series must end with one current result in PACS.

What it measures
----------------
Issue 16's last target: "In a kill -9 loop during ingest, every series ends
with one current result in PACS, and any earlier partial result is marked
superseded", and, on the way, "acknowledged means durable" under the same loop.

On loopback, with free ports and a temporary folder:

* a real Orthanc is the PACS, the gateway's only destination;
* ``aigw serve`` runs one route to the chosen pipeline: ``ivim`` (the exported
  model in ``exported_models/``) or ``test-invert`` (the test plugin, fast and
  independent of any trained model);
* ``--series`` synthetic IVIM DWI series (``pipelines/ivim/lab/synthetic.py``,
  small: 32x32 pixels, 4 slices, 8 b-values, 3 directions by default) are
  released at seeded random moments over ``--duration`` seconds and sent by
  ``--senders`` parallel senders, each series over one association of DCMTK
  ``storescu``, as a scanner does. A sender whose ``storescu`` fails (the
  gateway died under it, or was down) waits a seeded random delay and sends
  the whole series again until ``storescu`` exits 0;
* a killer sends the gateway SIGKILL (``kill -9``) ``--kills`` times at seeded
  random moments of the same window, and restarts it at once on the same port and
  data dir. At each moment it waits (up to 3 s) for an association in
  mid-series (one instance answered, more to come) and kills up to 0.3 s
  later, so that most kills cut a series; a kill that finds every series
  sent is not made (the count says how many were).

The defaults make both endings happen. ``--abort-grace 5`` (the gateway's
default is 60 s) is shorter than a slow sender's way back (a restart of
about 2 s plus a re-send delay of 1 to 10 s), so some cut series complete on
what they have, their partial result goes to PACS, and the re-sent rest makes
a second version whose result must supersede it; the quick senders come back
within the grace, and their series give one result.

Then it waits until the index says the gateway is drained (no series
receiving, no job queued or running, no send pending) and reads PACS back.
A result version is the output of one job: a pipeline run on one version of
a source series (more instances after a result went out make a new version,
and its job's outputs say ``(supersedes vN)`` in Series Description and
reference the replaced series in Related Series Sequence (0008,1250)). The
gateway's index says which output series belong to which job; everything
about superseding is read from the instances as Orthanc holds them.

How to read the output
----------------------
The command line and the seed come first (the same seed gives the same data,
release times, kill times and resend delays; the moments at which they hit
the gateway still depend on the machine). Then, per series: the instances
sent, the versions the gateway made, the result versions in PACS and which of
them is current (superseded by none), and a verdict:

* ``one result``: exactly one result version reached PACS;
* ``superseded``: more than one, exactly one current, and every earlier one is
  named by a later result's ``(supersedes vN)`` and Related Series Sequence;
* ``AMBIGUOUS``: two or more results in PACS of which none says it
  supersedes the other (the bug of issue 16 item 14; target 0);
* ``NO RESULT``, ``STALE`` (the current result is not of the series' last
  version, that is not of all its instances), ``INCOMPLETE`` (a result
  version is only partly in PACS after the drain): also violations.

Then the counts: kills (and how many cut an open association), instances
acknowledged to senders against instances in the index (``lost``: an
instance acknowledged in an attempt that is not in the index with a receive
time before that attempt ended; target 0), the verdict counts, the time to
drain after the last send, and the gateway log lines of any violating series.

The exit status is 0 when every target is met, 3 when one is violated (this
is a correctness bench: the property is the output), 1 when the run itself
failed (a peer did not start, the drain timed out) and 2 when a tool is
missing. The work folder is kept when the status is not 0.

Run it from the repository root with the virtualenv's Python::

    .venv/bin/python ops/bench/crashloop.py --pipeline test-invert --seed 1
    .venv/bin/python ops/bench/crashloop.py                          # ivim, 12 series, 8 kills
    .venv/bin/python ops/bench/crashloop.py --series 24 --kills 16 --duration 80
    # kills aimed at running jobs, with slow jobs (the test plugin's sleep knob):
    .venv/bin/python ops/bench/crashloop.py --pipeline test-invert --aim job --job-sleep 6 --kills 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import KeyObjectSelectionDocumentStorage

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from _peers import (  # noqa: E402
    BENCH_AE,
    HOST,
    STORESCU_OPTIONS,
    BenchError,
    GatewayPeer,
    dcmtk,
    dcmtk_env,
    dcmtk_version,
)

from gateway.apps.viewer.orthanc import Orthanc  # noqa: E402
from gateway.index import Index, JobState, SendState, SeriesState  # noqa: E402
from gateway.uids import short_ref  # noqa: E402

#: The protocol's b-values (s/mm2); ``--bvalues N`` takes the first N.
BVALUES = (0.0, 10.0, 20.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1000.0, 1200.0)
#: The test plugin (tests/plugins/invert) and its analytic model.
INVERT_PLUGIN = "tests.plugins.invert:InvertPipeline"
PIPELINES = ("ivim", "test-invert")
#: How long the killer waits for its target (a series in transfer, a running job) before it kills anyway.
WAIT_FOR_TARGET_SECONDS = 3.0
#: The kill comes up to this long after the target shows.
MAX_KILL_JITTER_SECONDS = 0.3
#: Least time the restarted gateway is up before the next kill.
MIN_UP_SECONDS = 0.5
#: storescu timeouts: connection (-to), ACSE (-ta) and DIMSE (-td), so a frozen gateway cannot hang a sender.
STORESCU_TIMEOUTS = ("-to", "5", "-ta", "10", "-td", "30")
# storescu -v prints one "Sending file" per instance and, when the SCP answered,
# "Received Store Response (<status>)"; Success and Warning mean stored (PS3.4 B.2.3).
_SENDING = re.compile(r"Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"Received Store Response \((\w+)")
_SUPERSEDES = re.compile(r"\(supersedes v(\d+)\)$")

EXIT_MET, EXIT_FAILED, EXIT_TOOLS, EXIT_VIOLATED = 0, 1, 2, 3


# ----------------------------------------------------------------- the series
@dataclass
class SourceSeries:
    """One synthetic DWI series and what happened to its sends."""

    number: int
    series_uid: str
    files: list[Path]
    sop_uid: dict[str, str]  # file path -> SOP Instance UID
    release: float  # seconds after the start of ingest
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class Attempt:
    """One storescu run: one association (or a failed try to open one)."""

    start: float  # time.time()
    end: float
    returncode: int
    acknowledged: list[str]  # SOP Instance UIDs answered Success or Warning


def make_series(folder: Path, args: argparse.Namespace, rng: random.Random) -> list[SourceSeries]:
    """Write ``args.series`` DWI series under ``folder``, each with its own seeded noise and UIDs."""
    from pipelines.ivim.lab.synthetic import make_dwi_study

    releases = sorted(rng.uniform(0.0, args.duration) for _ in range(args.series))
    out = []
    for k, release in enumerate(releases):
        study = make_dwi_study(
            folder / f"s{k:03d}",
            seed=args.seed * 1000 + k,
            size=args.size,
            slices=args.slices,
            bvalues=BVALUES[: args.bvalues],
            directions=args.directions,
        )
        sop_uid = {}
        series_uid = ""
        for path in study.paths:
            ds = dcmread(path, stop_before_pixels=True)
            sop_uid[str(path)] = str(ds.SOPInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
        out.append(SourceSeries(k + 1, series_uid, study.paths, sop_uid, release))
    return out


def acknowledged(log_text: str, sop_uid: dict[str, str]) -> list[str]:
    """SOP Instance UIDs that a ``storescu -v`` log shows answered Success or Warning."""
    out: list[str] = []
    current: str | None = None
    for line in log_text.splitlines():
        m = _SENDING.search(line)
        if m:
            current = sop_uid.get(m.group(1))
            continue
        m = _RESPONSE.search(line)
        if m and current is not None:
            if m.group(1) in ("Success", "Warning"):
                out.append(current)
            current = None
    return out


# --------------------------------------------------------------- the gateway
class CrashGateway(GatewayPeer):
    """``aigw serve`` that can be killed with SIGKILL and restarted on the same port and data dir.

    Every start logs to its own file (``aigw-01.log``, ``aigw-02.log``, ...),
    so each incarnation's log survives the next one.
    """

    def __init__(self, workdir: Path, series_timeout: float, config: Path) -> None:
        super().__init__(workdir, series_timeout, config)
        self.incarnation = 0

    def start(self, timeout: float = 90.0) -> CrashGateway:
        self.incarnation += 1
        self.log = self.workdir / f"aigw-{self.incarnation:02d}.log"
        super().start(timeout)
        return self

    def environment(self) -> dict[str, str]:
        # The test plugin is imported as tests.plugins.invert: the repository root must be importable.
        env = super().environment()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def kill9(self) -> None:
        """SIGKILL the gateway's process group, as a crash or the OOM killer would."""
        if self.proc is None:
            raise BenchError("kill -9 of a gateway that is not running")
        proc, self.proc = self.proc, None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> list[Path]:
        return sorted(self.workdir.glob("aigw-*.log"))

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'index.sqlite'}"


def write_config(path: Path, args: argparse.Namespace, pacs: Orthanc, models: Path | None) -> None:
    """The gateway's TOML: one route to the chosen pipeline, Orthanc as the destination."""
    plugin = f'plugins = ["{INVERT_PLUGIN}"]\n' if args.pipeline == "test-invert" else ""
    models_toml = f'[models]\ndir = "{models}"\n' if models is not None else ""
    if args.pipeline == "test-invert":
        options = f"\n[pipelines.test-invert]\nsleep_seconds = {args.job_sleep}\n"
    else:
        options = f'\n[pipelines.ivim]\nmethod = "{args.ivim_method}"\n'
    path.write_text(
        f"""{plugin}
[gateway]
min_free_bytes = 0

[completion]
release_quiet_seconds = {args.release_quiet}
abort_grace_seconds = {args.abort_grace}

[jobs]
workers = {args.workers}
backoff_seconds = 0.5
backoff_max_seconds = 2
iocm_rejection_notes = {json.dumps(args.iocm)}

[send]
backoff_seconds = 0.5
backoff_max_seconds = 2
timeout_seconds = 10

{models_toml}
[[destinations]]
name = "pacs"
ae_title = "{pacs.ae_title}"
host = "{HOST}"
port = {pacs.dicom_port}

[[routes]]
name = "crashloop"
pipeline = "{args.pipeline}"
{options}"""
    )


# --------------------------------------------------------------- the senders
class Senders:
    """Scanners: threads that send each series over one association, re-sending it whole until it goes through."""

    def __init__(
        self,
        series: list[SourceSeries],
        n: int,
        port: int,
        called_ae: str,
        logdir: Path,
        seed: int,
        resend_delay: tuple[float, float],
        deadline: float,
    ) -> None:
        self.series = series
        self.port = port
        self.called_ae = called_ae
        self.logdir = logdir
        self.resend_delay = resend_delay
        self.deadline = deadline
        self._next = 0
        self._lock = threading.Lock()
        self._logs: set[Path] = set()  # logs of the storescu processes running now
        self._stop = threading.Event()
        self.errors: list[str] = []
        self.t0 = 0.0
        self.last_success = 0.0
        self._threads = [
            threading.Thread(
                target=self._run, args=(random.Random(f"{seed}-sender-{k}"),), name=f"sender-{k}", daemon=True
            )
            for k in range(n)
        ]
        logdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.t0 = time.time()
        for t in self._threads:
            t.start()

    def transferring(self) -> int:
        """Associations open now that have had at least one instance answered (mid-series)."""
        with self._lock:
            logs = list(self._logs)
        n = 0
        for log in logs:
            try:
                n += b"Received Store Response" in log.read_bytes()
            except OSError:
                continue
        return n

    def stop(self) -> None:
        """Make every sender give up after its current attempt (the run failed)."""
        self._stop.set()

    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, end - time.monotonic()))
        if not self.done():
            raise BenchError(f"senders still running after {timeout:.0f} s")

    def _take(self) -> SourceSeries | None:
        with self._lock:
            if self._next >= len(self.series) or self.errors:
                return None
            s = self.series[self._next]
            self._next += 1
            return s

    def _run(self, rng: random.Random) -> None:
        while (s := self._take()) is not None:
            if self._stop.wait(max(0.0, self.t0 + s.release - time.time())):
                return
            try:
                self._send(s, rng)
            except Exception as exc:  # recorded; the main thread fails the run
                with self._lock:
                    self.errors.append(f"series {s.number}: {type(exc).__name__}: {exc}")
                return

    def _send(self, s: SourceSeries, rng: random.Random) -> None:
        cmd = [
            dcmtk("storescu"),
            "-v",
            "-aet",
            BENCH_AE,
            "-aec",
            self.called_ae,
            *STORESCU_OPTIONS,
            *STORESCU_TIMEOUTS,
            HOST,
            str(self.port),
            *map(str, s.files),
        ]
        while True:
            if self._stop.is_set():
                raise BenchError("stopped")
            if time.time() > self.deadline:
                raise BenchError(f"not delivered after {len(s.attempts)} attempt(s) before the deadline")
            log = self.logdir / f"s{s.number:03d}-a{len(s.attempts) + 1:02d}.log"
            start = time.time()
            with open(log, "wb") as fh:
                with self._lock:
                    self._logs.add(log)
                try:
                    rc = subprocess.run(
                        cmd, stdout=fh, stderr=subprocess.STDOUT, env=dcmtk_env(), timeout=300
                    ).returncode
                finally:
                    with self._lock:
                        self._logs.discard(log)
            end = time.time()
            s.attempts.append(Attempt(start, end, rc, acknowledged(log.read_text(errors="replace"), s.sop_uid)))
            if rc == 0:
                with self._lock:
                    self.last_success = max(self.last_success, end)
                return
            self._stop.wait(rng.uniform(*self.resend_delay))


# ---------------------------------------------------------------- the killer
@dataclass
class Kill:
    at: float  # time.time() of the SIGKILL
    transferring: int  # associations open mid-series at the kill
    running_jobs: int  # jobs running at the kill
    restart_seconds: float


def _jobs_in_flight(index: Index) -> tuple[int, int]:
    jobs = index.counts().get("jobs", {})
    return jobs.get(JobState.RUNNING.value, 0), jobs.get(JobState.QUEUED.value, 0)


def kill_loop(
    gw: CrashGateway, senders: Senders, times: Sequence[float], rng: random.Random, aim: str = "transfer"
) -> list[Kill]:
    """Kill -9 and restart the gateway at the given offsets from the start of ingest.

    ``aim="transfer"``: at each moment, wait for a series in mid-transfer and
    kill while the senders run. ``aim="job"``: wait for a running job instead,
    and go on killing after ingest while jobs are queued or running.
    """
    kills: list[Kill] = []
    ready_at = time.time()
    index = Index(gw.database_url)
    try:
        for offset in times:
            wait = max(senders.t0 + offset, ready_at + MIN_UP_SECONDS) - time.time()
            if wait > 0:
                time.sleep(wait)

            def target() -> bool:
                return senders.transferring() > 0 if aim == "transfer" else _jobs_in_flight(index)[0] > 0

            def over() -> bool:
                return senders.done() and (aim == "transfer" or not any(_jobs_in_flight(index)))

            # Aim at a random point shortly after the target shows (a series
            # with one instance answered, or a job that started).
            end = time.time() + WAIT_FOR_TARGET_SECONDS
            while not target() and time.time() < end and not over():
                time.sleep(0.02)
            if over():
                break  # nothing left to interrupt: later kills would not be "during ingest" (or jobs)
            time.sleep(rng.uniform(0.0, MAX_KILL_JITTER_SECONDS))
            if not gw.alive():
                raise BenchError(f"the gateway exited by itself:\n{gw.log_tail()}")
            transferring, running = senders.transferring(), _jobs_in_flight(index)[0]
            at = time.time()
            gw.kill9()
            gw.start()
            ready_at = time.time()
            kills.append(Kill(at, transferring, running, ready_at - at))
            print(
                f"  kill {len(kills)}: at {at - senders.t0:5.1f} s, {transferring} association(s) mid-series,"
                f" {running} job(s) running, back in {ready_at - at:.1f} s",
                flush=True,
            )
        return kills
    finally:
        index.close()


def drain(gw: CrashGateway, expected_series: int, timeout: float) -> dict[str, dict[str, int]]:
    """Wait until no series is receiving, no job is queued or running and no send is pending."""
    index = Index(gw.database_url)
    try:
        end = time.monotonic() + timeout
        counts: dict[str, dict[str, int]] = {}
        while time.monotonic() < end:
            if not gw.alive():
                raise BenchError(f"the gateway exited by itself during the drain:\n{gw.log_tail()}")
            counts = index.counts()
            series, jobs, sends = counts.get("series", {}), counts.get("jobs", {}), counts.get("sends", {})
            if (
                sum(series.values()) >= expected_series
                and not series.get(SeriesState.RECEIVING.value)
                and not jobs.get(JobState.QUEUED.value)
                and not jobs.get(JobState.RUNNING.value)
                and not sends.get(SendState.PENDING.value)
            ):
                return counts
            time.sleep(0.5)
        raise BenchError(f"not drained after {timeout:.0f} s: {counts}")
    finally:
        index.close()


# -------------------------------------------------------------- the analysis
class Outcome(str, Enum):
    """The verdict on one source series; the last four violate the target."""

    ONE = "one result"
    SUPERSEDED = "superseded"
    AMBIGUOUS = "AMBIGUOUS"
    NO_RESULT = "NO RESULT"
    STALE = "STALE"
    INCOMPLETE = "INCOMPLETE"


VIOLATIONS = (Outcome.AMBIGUOUS, Outcome.NO_RESULT, Outcome.STALE, Outcome.INCOMPLETE)


@dataclass
class ResultVersion:
    """The outputs of one job (one version of a source series) and what PACS holds of them."""

    job_id: int
    version: int
    state: str
    error: str | None
    series: dict[str, int]  # output series UID -> instances the job wrote (rejection notes left out)
    notes: int  # IOCM rejection notes the job wrote
    in_pacs: dict[str, int] = field(default_factory=dict)  # output series UID -> instances in PACS
    supersedes: set[int] = field(default_factory=set)  # the version its Series Description names
    related: set[str] = field(default_factory=set)  # the series its Related Series Sequence references
    marks_inconsistent: bool = False

    @property
    def present(self) -> bool:
        return any(self.in_pacs.values())

    @property
    def complete(self) -> bool:
        return all(self.in_pacs.get(uid, 0) >= n for uid, n in self.series.items())


@dataclass
class Verdict:
    series: SourceSeries
    final_version: int
    instances_indexed: int
    versions: list[ResultVersion]
    current: list[int]
    status: Outcome


def _orthanc_series(pacs: Orthanc) -> dict[str, list[dict[str, Any]]]:
    """SeriesInstanceUID -> the simplified tags of each of its instances, for everything PACS holds."""
    out: dict[str, list[dict[str, Any]]] = {}
    for sid in pacs.get("/series"):
        info = pacs.get(f"/series/{sid}")
        uid = info["MainDicomTags"]["SeriesInstanceUID"]
        out[uid] = [pacs.get(f"/instances/{iid}/simplified-tags") for iid in info["Instances"]]
    return out


def _claims(tags: dict[str, Any]) -> tuple[int | None, set[str]]:
    """The version an instance says it supersedes, and the series it references as related."""
    m = _SUPERSEDES.search(str(tags.get("SeriesDescription", "")).rstrip())
    related = {str(item.get("SeriesInstanceUID", "")) for item in tags.get("RelatedSeriesSequence") or []}
    return (int(m.group(1)) if m else None), related


def read_marks(rv: ResultVersion, held: dict[str, list[dict[str, Any]]]) -> None:
    """Fill in what PACS holds of one result version and what its instances say they supersede.

    Every instance of the result must say the same thing: when they disagree
    (some name an earlier version, some do not), no claim counts.
    """
    claims: set[tuple[int | None, frozenset[str]]] = set()
    for uid in rv.series:
        tags = held.get(uid, [])
        rv.in_pacs[uid] = len(tags)
        claims.update((v, frozenset(rel)) for v, rel in map(_claims, tags))
    if len(claims) > 1:
        rv.marks_inconsistent = True
    elif claims:
        ((claimed, related),) = claims
        rv.supersedes = {claimed} if claimed is not None else set()
        rv.related = set(related)


def judge(versions: Sequence[ResultVersion], final_version: int) -> tuple[list[int], Outcome]:
    """The current result versions of one source series in PACS, and the verdict.

    A version is superseded when a later result in PACS names it in its
    description ``(supersedes vN)`` and references every one of its series in
    PACS by Related Series Sequence; the current ones are those superseded by
    none.
    """
    present = [v for v in versions if v.present]
    by_version = {v.version: v for v in present}
    superseded: set[int] = set()
    for v in present:
        for old in v.supersedes:
            target = by_version.get(old)
            if target is not None and old < v.version and {u for u, n in target.in_pacs.items() if n} <= v.related:
                superseded.add(old)
    current = [v.version for v in present if v.version not in superseded]
    if not present:
        return current, Outcome.NO_RESULT
    if any(not v.complete for v in present):
        return current, Outcome.INCOMPLETE
    if len(current) > 1:
        return current, Outcome.AMBIGUOUS
    if not current or current[0] != final_version:
        return current, Outcome.STALE
    return current, Outcome.ONE if len(present) == 1 else Outcome.SUPERSEDED


def analyse(series: list[SourceSeries], gw: CrashGateway, pacs: Orthanc) -> tuple[list[Verdict], set[str]]:
    """Per source series: its result versions in PACS, which are current and the verdict; and PACS series
    that no job of the gateway wrote."""
    index = Index(gw.database_url)
    try:
        held = _orthanc_series(pacs)
        jobs = index.list_jobs(limit=1_000_000)
        explained: set[str] = set()
        verdicts = []
        for s in series:
            row = index.get_series(s.series_uid)
            versions = []
            mine = sorted((j for j in jobs if j.series_uid == s.series_uid), key=lambda j: (j.series_version, j.id))
            for job in mine:
                rv = ResultVersion(job.id, job.series_version, job.state, job.error, {}, 0)
                for o in index.job_outputs(job.id):
                    explained.add(o.series_uid)
                    if o.sop_class_uid == KeyObjectSelectionDocumentStorage:
                        rv.notes += 1
                    else:
                        rv.series[o.series_uid] = rv.series.get(o.series_uid, 0) + 1
                read_marks(rv, held)
                versions.append(rv)
            final = row.version if row is not None else 0
            current, outcome = judge(versions, final)
            verdicts.append(Verdict(s, final, row.instance_count if row else 0, versions, current, outcome))
        return verdicts, set(held) - explained
    finally:
        index.close()


def lost_instances(series: list[SourceSeries], gw: CrashGateway) -> tuple[int, int, list[str]]:
    """Acknowledged UIDs, those in the index, and those acknowledged but not durable.

    An instance acknowledged in an attempt must be in the index with a receive
    time before that attempt ended: a copy recorded later came from a re-send
    and would hide a loss.
    """
    index = Index(gw.database_url)
    try:
        acked: dict[str, float] = {}
        for s in series:
            for a in s.attempts:
                for uid in a.acknowledged:
                    acked[uid] = min(acked.get(uid, a.end), a.end)
        lost, stored = [], 0
        for uid, ended in acked.items():
            row = index.find_instance(uid)
            if row is not None:
                stored += 1
            if row is None or row.received_at > ended:
                lost.append(uid)
        return len(acked), stored, lost
    finally:
        index.close()


def evidence(gw: CrashGateway, uid: str, limit: int = 40) -> list[str]:
    """The gateway log lines (all incarnations) that name a series or its jobs."""
    ref = short_ref(uid)  # the gateway's log names a series by this digest, never by its UID
    lines: list[str] = []
    jobs: set[str] = set()
    for log in gw.logs():
        for line in log.read_text(errors="replace").splitlines():
            if ref in line:
                lines.append(f"{log.name}: {line}")
                jobs.update(re.findall(r"jobs? (\d+):", line))
            elif any(f"[job {j} " in line for j in jobs):
                lines.append(f"{log.name}: {line}")
    return lines[-limit:]


# -------------------------------------------------------------------- output
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _describe(v: ResultVersion) -> str:
    marks = f">v{','.join(map(str, sorted(v.supersedes)))}" if v.supersedes else ""
    return (
        f"v{v.version}{marks}" + ("" if v.complete else "(partial)") + ("(mixed marks)" if v.marks_inconsistent else "")
    )


def report(
    verdicts: list[Verdict],
    kills: list[Kill],
    lost: tuple[int, int, list[str]],
    unknown: set[str],
    gw: CrashGateway,
    drain_seconds: float,
    ingest_seconds: float,
    counts: dict[str, dict[str, int]],
) -> bool:
    """Print the per-series table and the figures; True when every target is met."""
    rows = []
    for v in verdicts:
        present = [r for r in v.versions if r.present]
        rows.append(
            (
                str(v.series.number),
                str(len(v.series.files)),
                str(v.instances_indexed),
                str(len(v.series.attempts)),
                str(sum(1 for a in v.series.attempts if a.returncode != 0 and a.acknowledged)),
                str(v.final_version),
                " ".join(_describe(r) for r in present) or "-",
                ",".join(f"v{c}" for c in v.current) or "-",
                v.status.value,
            )
        )
    _table(("series", "sent", "indexed", "attempts", "cut", "versions", "in PACS", "current", "verdict"), rows)
    print()
    acked, stored, lost_uids = lost
    status = {k: sum(1 for v in verdicts if v.status == k) for k in Outcome}
    cut = sum(1 for k in kills if k.transferring)
    in_job = sum(1 for k in kills if k.running_jobs)
    jobs = counts.get("jobs", {})
    print(
        f"series: {len(verdicts)}; kills: {len(kills)}"
        f" ({cut} with an association open mid-series, {in_job} with a job running)"
    )
    if kills:
        print(
            f"restart after kill -9: median {statistics.median(k.restart_seconds for k in kills):.1f} s,"
            f" max {max(k.restart_seconds for k in kills):.1f} s"
        )
    print(
        f"associations: {sum(len(v.series.attempts) for v in verdicts)}"
        f" ({sum(1 for v in verdicts for a in v.series.attempts if a.returncode != 0)} failed or cut)"
    )
    print(f"instances acknowledged to senders: {acked}; in the index: {stored}; lost: {len(lost_uids)} (target 0)")
    print(f"jobs: {', '.join(f'{k} {n}' for k, n in sorted(jobs.items()))}")
    errors = sorted({r.error or "?" for v in verdicts for r in v.versions if r.state == JobState.FAILED.value})
    if errors:
        # A pipeline that fails on its own (not because of the kills) leaves series without a result.
        print(f"jobs failed for good, errors: {'; '.join(e[:200] for e in errors)}")
    print(f"series with one result: {status[Outcome.ONE]}")
    print(f"series with a partial result later superseded: {status[Outcome.SUPERSEDED]}")
    print(f"series with two results where neither supersedes the other: {status[Outcome.AMBIGUOUS]} (target 0)")
    print(
        f"series with no result: {status[Outcome.NO_RESULT]}; whose current result is not of the last version:"
        f" {status[Outcome.STALE]}; with a result only partly in PACS: {status[Outcome.INCOMPLETE]} (targets 0)"
    )
    notes = sum(r.notes for v in verdicts for r in v.versions)
    if notes:
        print(f"IOCM rejection notes written by the jobs: {notes}")
    if unknown:
        print(f"series in PACS that no job wrote: {len(unknown)}")
    print(
        f"ingest (first release to last delivered series): {ingest_seconds:.1f} s;"
        f" time to drain after the last send: {drain_seconds:.1f} s"
    )
    ok = not lost_uids and all(status[k] == 0 for k in VIOLATIONS)
    for v in verdicts:
        if v.status in VIOLATIONS:
            print(
                f"\nseries {v.series.number} ({v.status.value}), jobs "
                + ", ".join(f"{r.job_id}:v{r.version}:{r.state}" for r in v.versions)
                + "; gateway log:"
            )
            for line in evidence(gw, v.series.series_uid):
                print(f"  {line}")
    return ok


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pipeline", choices=PIPELINES, default="ivim", help="route every series to this pipeline")
    ap.add_argument("--series", type=int, default=12, help="DWI series to send (default 12)")
    ap.add_argument("--senders", type=int, default=3, help="senders (scanners) in parallel (default 3)")
    ap.add_argument("--kills", type=int, default=8, help="kill -9 during ingest (default 8)")
    ap.add_argument("--duration", type=float, default=40.0, help="window of series releases and kills, s (default 40)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the data, releases, kill times and resend delays")
    ap.add_argument("--size", type=int, default=32, help="rows and columns of each image (default 32)")
    ap.add_argument("--slices", type=int, default=4, help="slices per series (default 4)")
    ap.add_argument(
        "--bvalues",
        type=int,
        default=8,
        choices=range(4, len(BVALUES) + 1),
        metavar="N",
        help=f"b-values per series, the first N of {BVALUES[:8]}... (default 8)",
    )
    ap.add_argument("--directions", type=int, default=3, choices=(1, 2, 3, 4), help="directions per b > 0 (default 3)")
    ap.add_argument(
        "--abort-grace",
        type=float,
        default=5.0,
        help="[completion] abort_grace_seconds (default 5; the gateway's own is 60)",
    )
    ap.add_argument("--series-timeout", type=float, default=2.0, help="quiet period of a series, s (default 2)")
    ap.add_argument("--release-quiet", type=float, default=0.5, help="[completion] release_quiet_seconds (0.5)")
    ap.add_argument(
        "--resend-delay",
        type=float,
        nargs=2,
        default=(1.0, 10.0),
        metavar=("MIN", "MAX"),
        help="a sender waits this long (uniform, s) before it re-sends a failed series (default 1 10)",
    )
    ap.add_argument(
        "--job-sleep",
        type=float,
        default=0.0,
        metavar="S",
        help="test-invert only: its sleep_seconds knob, a job that takes S s longer\n"
        "(a slow model: a wider window for a kill, or new instances, while a job runs)",
    )
    ap.add_argument(
        "--ivim-method",
        choices=("net", "lsq-segmented", "lsq-full"),
        default="net",
        help="ivim only: [pipelines.ivim] method (default net: the exported model)",
    )
    ap.add_argument(
        "--aim",
        choices=("transfer", "job"),
        default="transfer",
        help="what each kill waits for: a series in mid-transfer (default), or a running job\n"
        "(then kills go on after ingest while jobs are queued or running)",
    )
    ap.add_argument("--workers", type=int, default=1, help="[jobs] workers (default 1)")
    ap.add_argument("--iocm", action="store_true", help="[jobs] iocm_rejection_notes = true")
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="limit on the wait for the drain, s (300)")
    ap.add_argument("--tmp", type=Path, default=None, help="work folder parent (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder even when every target is met")
    args = ap.parse_args(argv)
    if args.series < 1 or args.senders < 1 or args.kills < 0 or args.duration <= 0:
        ap.error("need --series >= 1, --senders >= 1, --kills >= 0, --duration > 0")
    if args.job_sleep and args.pipeline != "test-invert":
        ap.error("--job-sleep is a knob of the test-invert pipeline")
    if args.ivim_method != "net" and args.pipeline != "ivim":
        ap.error("--ivim-method is an option of the ivim pipeline")
    if not 0 <= args.resend_delay[0] <= args.resend_delay[1]:
        ap.error("--resend-delay MIN MAX with 0 <= MIN <= MAX")
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    method = f" (method {args.ivim_method})" if args.pipeline == "ivim" else ""
    print(f"seed: {args.seed}; pipeline: {args.pipeline}{method}")
    try:
        for tool in ("storescu", "echoscu"):
            dcmtk(tool)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TOOLS

    root = Path(tempfile.mkdtemp(prefix="aigw-bench-crashloop-", dir=args.tmp))
    keep = args.keep
    gw: CrashGateway | None = None
    pacs: Orthanc | None = None
    try:
        rng = random.Random(args.seed)
        t = time.perf_counter()
        series = make_series(root / "series", args, rng)
        kill_times = sorted(rng.uniform(MIN_UP_SECONDS, args.duration) for _ in range(args.kills))
        n_inst = sum(len(s.files) for s in series)
        print(
            f"generated {len(series)} DWI series of {len(series[0].files)} instances ({args.size}x{args.size},"
            f" {args.slices} slices, {args.bvalues} b-values, {args.directions} directions) in"
            f" {time.perf_counter() - t:.1f} s: {n_inst} instances"
        )
        print(
            f"DCMTK: {dcmtk_version()}; storescu {' '.join(('-v', *STORESCU_OPTIONS, *STORESCU_TIMEOUTS))},"
            f" one association per series, {args.senders} senders, re-send after {args.resend_delay[0]:g}-"
            f"{args.resend_delay[1]:g} s"
        )
        print(
            f"gateway: abort_grace_seconds {args.abort_grace:g}, series timeout {args.series_timeout:g} s,"
            f" release_quiet_seconds {args.release_quiet:g}, jobs workers {args.workers},"
            f" iocm_rejection_notes {str(args.iocm).lower()}"
            + (f", test-invert sleep_seconds {args.job_sleep:g}" if args.job_sleep else "")
        )
        print(f"CPU cores visible: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")

        models = None
        if args.pipeline == "test-invert":
            from tests.plugins.invert.lab.model import build_model

            models = root / "models"
            build_model(models)
        pacs = Orthanc(root / "orthanc").start()
        config = root / "aigw.toml"
        write_config(config, args, pacs, models)
        gw = CrashGateway(root / "gateway", args.series_timeout, config).start()
        senders = Senders(
            series,
            args.senders,
            gw.port,
            gw.called_ae,
            root / "senders",
            args.seed,
            tuple(args.resend_delay),
            deadline=time.time() + args.duration + args.drain_timeout,
        )
        print()
        senders.start()
        try:
            kills = kill_loop(gw, senders, kill_times, rng, args.aim)
        except BaseException:
            senders.stop()
            raise
        finally:
            senders.join(timeout=args.duration + args.drain_timeout)
        if senders.errors:
            raise BenchError("a sender gave up: " + "; ".join(senders.errors))
        ingest_seconds = senders.last_success - senders.t0
        counts = drain(gw, len(series), args.drain_timeout)
        drain_seconds = time.time() - senders.last_success
        print()
        verdicts, unknown = analyse(series, gw, pacs)
        lost = lost_instances(series, gw)
        met = report(verdicts, kills, lost, unknown, gw, drain_seconds, ingest_seconds, counts)
        print(
            f"\ntarget 'every series ends with one current result in PACS, any earlier one superseded,"
            f" nothing acknowledged lost': {'MET' if met else 'NOT MET'}"
        )
        if not met:
            keep = True
        return EXIT_MET if met else EXIT_VIOLATED
    except BenchError as exc:
        keep = True
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if gw is not None:
            gw.stop()
        if pacs is not None:
            pacs.stop(graceful=False)
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
