"""IVIM latency: from the last C-STORE of a clinical-size DWI series to its Parametric Maps in PACS.

What it measures
----------------
Issue 15's latency target: "the series [128x128 pixels, 20 slices, 11
b-values, 220 instances] from the last C-STORE to the Parametric Map at PACS
in quiet period + <= 3 s on this 2-core machine".

On loopback, with free ports and a temporary folder:

* a real Orthanc is the PACS, the gateway's only destination;
* ``aigw serve`` runs one route to the ``ivim`` pipeline with the exported
  network (``exported_models/``, warmed up at start as by default), a short
  quiet period (``--series-timeout``) and ``release_quiet_seconds``
  (``--release-quiet``): DCMTK ``storescu`` sends the series over one
  association and releases it, so the release hint completes the series
  ``release_quiet_seconds`` after the release, sooner than the quiet period;
* ``--runs`` series (synthetic IVIM DWI, ``pipelines/ivim/lab/synthetic.py``,
  each with its own seed and UIDs) are sent one after the other, each once
  the previous one's results are all in Orthanc.

Times are taken on this machine's clock by three observers:

* the gateway's index: the last instance's arrival (recorded just before the
  C-STORE response goes out, so it is at most the response time and the
  latency is not understated), the moment the series was completed (and by
  what: ``release`` or ``timer``), the job's start and end, and when each
  result's C-STORE to Orthanc was answered;
* a poller that asks Orthanc's REST API every ``--poll`` seconds for the
  Parametric Map series (SeriesDescription ``IVIM * map AI*``) and for its
  instance count, so "in Orthanc" is Orthanc's own word, late by at most one
  poll;
* the ``storescu`` process (its exit follows the last response and the
  release).

How to read the output
----------------------
One row per run: the phases after the last C-STORE (completion, dispatch,
the job, the sends), then the two latencies the target is about:

* ``after quiet``: last Parametric Map in Orthanc minus last C-STORE minus the
  quiet period that completed the series (``release_quiet_seconds`` when the
  release hint fired, the series timeout when the timer did);
* ``after completion``: last Parametric Map in Orthanc minus the moment the
  index marked the series complete (the completer's poll is then counted in
  the quiet period, not here).

Then the median over runs against the target (<= 3 s) for both. The first
run after a start also loads what the process loads once (highdicom's
standard tables); the summary says so when it differs. The machine is
shared with whatever else runs on it, so the figures are indicative.

The exit status is 0 when the median "after quiet" latency meets the target,
3 when it does not, 1 when the run itself failed (a peer did not start, a
result did not arrive) and 2 when a tool is missing. The work folder is kept
when the status is not 0.

Run it from the repository root with the virtualenv's Python::

    .venv/bin/python ops/bench/ivim_latency.py
    .venv/bin/python ops/bench/ivim_latency.py --runs 3 --no-derived-series
    .venv/bin/python ops/bench/ivim_latency.py --release-quiet 2 --series-timeout 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom.uid import ParametricMapStorage

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from _peers import (  # noqa: E402
    HOST,
    STORESCU_OPTIONS,
    BenchError,
    GatewayPeer,
    dcmtk,
    dcmtk_version,
    send_parallel,
)

from gateway.apps.viewer.orthanc import Orthanc  # noqa: E402
from gateway.index import Index  # noqa: E402

#: An 11-b-value body protocol (s/mm2), as in the issue's series.
BVALUES = (0.0, 10.0, 20.0, 30.0, 50.0, 80.0, 100.0, 200.0, 400.0, 600.0, 800.0)
#: Issue 15: Parametric Maps at PACS within quiet period + this many seconds.
TARGET_SECONDS = 3.0
#: The Series Description of every IVIM Parametric Map (pipelines/ivim/dicom.py), as an Orthanc wildcard.
PM_DESCRIPTION = "IVIM * map AI*"

EXIT_MET, EXIT_FAILED, EXIT_TOOLS, EXIT_NOT_MET = 0, 1, 2, 3


def write_config(path: Path, args: argparse.Namespace, pacs: Orthanc) -> None:
    """The gateway's TOML: one route to ivim, Orthanc as the destination."""
    path.write_text(
        f"""[gateway]
min_free_bytes = 0

[completion]
release_quiet_seconds = {args.release_quiet}

[[destinations]]
name = "pacs"
ae_title = "{pacs.ae_title}"
host = "{HOST}"
port = {pacs.dicom_port}

[[routes]]
name = "ivim-latency"
pipeline = "ivim"

[pipelines.ivim]
method = "net"
derived_series = {json.dumps(args.derived_series)}
uncertainty = {json.dumps(args.uncertainty)}
"""
    )


class ArrivalPoller:
    """Asks Orthanc, every ``interval`` s, how many Parametric Map series and instances it holds.

    ``when(n)`` is the first poll that saw at least ``n`` (Orthanc creates a
    series resource when it stores the series' first instance, and each IVIM
    map is one instance in its own series).
    """

    def __init__(self, pacs: Orthanc, interval: float, cpu: Callable[[], float | None]) -> None:
        self.pacs = pacs
        self.interval = interval
        self.cpu = cpu
        self.maps_seen: dict[int, float] = {}
        self.maps_cpu: dict[int, float | None] = {}  # the gateway's CPU seconds at that poll
        self.instances_seen: dict[int, float] = {}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orthanc-poller", daemon=True)

    def start(self) -> ArrivalPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        query = json.dumps({"Level": "Series", "Query": {"SeriesDescription": PM_DESCRIPTION}}).encode()
        while not self._stop.is_set():
            try:
                code, body = self.pacs._http("POST", f"{self.pacs.url}/tools/find", query, timeout=10)
                if code != 200:
                    raise RuntimeError(f"Orthanc /tools/find: HTTP {code}")
                n_maps = len(json.loads(body))
                n_inst = int(self.pacs.statistics()["CountInstances"])
            except Exception as exc:  # recorded; the waiting side reports it
                self.error = f"{type(exc).__name__}: {exc}"
                return
            now = time.time()
            if n_maps not in self.maps_seen:
                self.maps_seen[n_maps] = now
                self.maps_cpu[n_maps] = self.cpu()
            self.instances_seen.setdefault(n_inst, now)
            self._stop.wait(self.interval)

    @staticmethod
    def _first(seen: dict[int, float], n: int) -> float | None:
        times = [t for k, t in seen.items() if k >= n]
        return min(times) if times else None

    def maps_at(self, n: int) -> float | None:
        return self._first(self.maps_seen, n)

    def cpu_at(self, n: int) -> float | None:
        """The gateway's CPU seconds at the first poll that saw ``n`` maps or more."""
        seen = [k for k in self.maps_seen if k >= n]
        return self.maps_cpu[min(seen, key=lambda k: self.maps_seen[k])] if seen else None

    def instances_at(self, n: int) -> float | None:
        return self._first(self.instances_seen, n)


@dataclass
class Run:
    """The times of one series, all ``time.time()`` seconds."""

    number: int
    instances: int
    outputs: int
    maps: int
    storescu_exit: float
    last_arrival: float  # index: the last instance stored (before its C-STORE response)
    completed_at: float
    completed_by: str
    quiet: float  # the quiet period that completed it
    job_started: float
    job_read: float  # gateway log: the series read, the fit starts
    job_finished: float
    last_map_sent: float  # index: the last Parametric Map's C-STORE to Orthanc answered
    last_map_polled: float  # Orthanc's REST API: all maps there
    all_polled: float  # Orthanc's REST API: every result instance there
    cpu: float | None  # the gateway's CPU seconds from storescu's exit to the last map in Orthanc

    @property
    def after_quiet(self) -> float:
        return self.last_map_polled - self.last_arrival - self.quiet

    @property
    def after_completion(self) -> float:
        return self.last_map_polled - self.completed_at


def make_series(folder: Path, seed: int, args: argparse.Namespace) -> list[Path]:
    from pipelines.ivim.lab.synthetic import make_dwi_study

    study = make_dwi_study(folder, seed=seed, size=args.size, slices=args.slices, bvalues=BVALUES, directions=1)
    return study.paths


def one_run(
    number: int,
    files: list[Path],
    gw: GatewayPeer,
    pacs: Orthanc,
    poller: ArrivalPoller,
    args: argparse.Namespace,
    expected_maps: int,
) -> Run:
    """Send one series, wait until its results are all in Orthanc, and read the times."""
    maps_before = max(poller.maps_seen, default=0)
    inst_before = max(poller.instances_seen, default=0)
    sent = send_parallel(gw.port, gw.called_ae, [files], gw.workdir / f"send-{number}")
    storescu_exit = time.time()
    cpu0 = gw.cpu_seconds()
    if not sent.ok:
        raise BenchError(sent.failure())
    index = Index(f"sqlite:///{gw.data_dir / 'index.sqlite'}")
    try:
        end = time.monotonic() + args.timeout
        job = None
        while time.monotonic() < end:
            if poller.error:
                raise BenchError(f"polling Orthanc failed: {poller.error}")
            jobs = [j for j in index.list_jobs(limit=1000) if j.finished_at is not None]
            job = max(jobs, key=lambda j: j.id) if len(jobs) >= number else None
            if job is not None and job.state == "failed":
                raise BenchError(f"the IVIM job failed: {job.error}")
            if job is not None:
                sends = index.sends_for_job(job.id)
                n_out = len(sends)
                if (
                    sends
                    and all(s.sent_at is not None for s in sends)
                    and poller.instances_at(inst_before + n_out) is not None
                    and poller.maps_at(maps_before + expected_maps) is not None
                ):
                    break
            time.sleep(0.1)
        else:
            raise BenchError(f"the results of run {number} were not all in Orthanc within {args.timeout:.0f} s")
        assert job is not None and job.started_at is not None and job.finished_at is not None
        series = index.get_series(job.series_uid)
        if series is None or series.completed_at is None:
            raise BenchError("the index holds no completion time of the series")
        sends = index.sends_for_job(job.id)
        map_sends = [s.sent_at for s in sends if s.sop_class_uid == ParametricMapStorage and s.sent_at is not None]
        if len(map_sends) != expected_maps:
            raise BenchError(f"the job sent {len(map_sends)} Parametric Maps, expected {expected_maps}")
        by = series.completed_by or "timer"
        quiet = args.release_quiet if by == "release" else args.series_timeout
        last_map_polled = poller.maps_at(maps_before + expected_maps)
        all_polled = poller.instances_at(inst_before + len(sends))
        assert last_map_polled is not None and all_polled is not None
        cpu1 = poller.cpu_at(maps_before + expected_maps)
        return Run(
            number=number,
            instances=len(files),
            outputs=len(sends),
            maps=len(map_sends),
            storescu_exit=storescu_exit,
            last_arrival=series.last_arrival,
            completed_at=series.completed_at,
            completed_by=by,
            quiet=quiet,
            job_started=job.started_at,
            job_read=fit_started(gw.log, job.id),
            job_finished=job.finished_at,
            last_map_sent=max(map_sends),
            last_map_polled=last_map_polled,
            all_polled=all_polled,
            cpu=cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
        )
    finally:
        index.close()


def fit_started(log: Path, job_id: int) -> float:
    """When job ``job_id`` logged that it starts the fit (the series is read by then), from the gateway log."""
    pattern = re.compile(rf"^(\S+ \S+) INFO +\S+: \[job {job_id} ivim\] fitting ")
    for line in log.read_text(errors="replace").splitlines():
        m = pattern.match(line)
        if m:
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise BenchError(f"the gateway log has no fit line of job {job_id}")


def report(runs: Sequence[Run]) -> bool:
    """Print one row per run and the medians against the target; True when the target is met."""
    header = (
        "run",
        "completed by",
        "last C-STORE->complete",
        "->job start",
        "job: read",
        "fit, maps, store",
        "->last map sent",
        "->in Orthanc",
        "all results",
        "after quiet",
        "after completion",
        "gateway CPU",
    )
    rows = []
    for r in runs:
        rows.append(
            (
                str(r.number),
                f"{r.completed_by} ({r.quiet:g} s)",
                f"{r.completed_at - r.last_arrival:.2f} s",
                f"{r.job_started - r.completed_at:.2f} s",
                f"{r.job_read - r.job_started:.2f} s",
                f"{r.job_finished - r.job_read:.2f} s",
                f"{r.last_map_sent - r.job_finished:.2f} s",
                f"{r.last_map_polled - r.last_map_sent:+.2f} s",
                f"{r.all_polled - r.last_arrival - r.quiet:.2f} s",
                f"{r.after_quiet:.2f} s",
                f"{r.after_completion:.2f} s",
                f"{r.cpu:.2f} s" if r.cpu is not None else "-",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(
        "\n(times after the last C-STORE; the job reads the series, then fits, builds the maps and writes its"
        " outputs; 'all results' is every output, derived MR series included, in Orthanc, minus the quiet period;"
        " 'gateway CPU' is the gateway's CPU seconds, all its threads, from storescu's exit to the last map in"
        " Orthanc: far below the latency, the machine was busy with other work; storescu exited"
        f" {statistics.median(r.storescu_exit - r.last_arrival for r in runs) * 1000:.0f} ms after the last"
        " arrival)"
    )
    quiet = statistics.median(r.after_quiet for r in runs)
    completion = statistics.median(r.after_completion for r in runs)
    met = quiet <= TARGET_SECONDS
    print(
        f"\nlast Parametric Map in Orthanc, median of {len(runs)}: quiet period + {quiet:.2f} s"
        f" (target <= {TARGET_SECONDS:g} s): {'MET' if met else 'NOT MET'}"
    )
    print(
        f"from completion (index): {completion:.2f} s (target <= {TARGET_SECONDS:g} s):"
        f" {'MET' if completion <= TARGET_SECONDS else 'NOT MET'}"
    )
    if len(runs) > 1:
        rest = statistics.median(r.after_quiet for r in runs[1:])
        print(f"first run after the start: {runs[0].after_quiet:.2f} s; later runs: median {rest:.2f} s")
    return met


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="series sent one after the other (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the first series (default 1)")
    ap.add_argument("--size", type=int, default=128, help="rows and columns (default 128)")
    ap.add_argument("--slices", type=int, default=20, help="slices (default 20)")
    ap.add_argument("--series-timeout", type=float, default=2.0, help="quiet period of a series, s (default 2)")
    ap.add_argument("--release-quiet", type=float, default=0.5, help="[completion] release_quiet_seconds (default 0.5)")
    ap.add_argument(
        "--no-derived-series",
        dest="derived_series",
        action="store_false",
        help="[pipelines.ivim] derived_series = false (Parametric Maps only)",
    )
    ap.add_argument(
        "--no-uncertainty",
        dest="uncertainty",
        action="store_false",
        help="[pipelines.ivim] uncertainty = false (four maps, no standard deviations)",
    )
    ap.add_argument("--poll", type=float, default=0.05, help="Orthanc poll interval, s (default 0.05)")
    ap.add_argument("--timeout", type=float, default=120.0, help="limit on the wait for one run's results, s")
    ap.add_argument("--tmp", type=Path, default=None, help="work folder parent (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.size < 8 or args.slices < 2:
        ap.error("need --runs >= 1, --size >= 8, --slices >= 2")
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    try:
        for tool in ("storescu", "echoscu"):
            dcmtk(tool)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TOOLS

    root = Path(tempfile.mkdtemp(prefix="aigw-bench-ivim-", dir=args.tmp))
    try:
        # Each peer is stopped when the block ends, in the reverse order of its start.
        with ExitStack() as peers:
            status = measure(args, root, peers)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = EXIT_FAILED
    if args.keep or status != EXIT_MET:
        print(f"kept {root} (the gateway's log: {root / 'gateway' / 'aigw.log'})")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return status


def measure(args: argparse.Namespace, root: Path, peers: ExitStack) -> int:
    """Generate the series, start Orthanc and the gateway, send and time every run, and report."""
    t = time.perf_counter()
    series = [make_series(root / f"series-{k}", args.seed + k, args) for k in range(args.runs)]
    print(
        f"generated {args.runs} DWI series of {len(series[0])} instances ({args.size}x{args.size},"
        f" {args.slices} slices, {len(BVALUES)} b-values, 1 direction) in {time.perf_counter() - t:.1f} s"
    )
    expected_maps = 7 if args.uncertainty else 4
    print(
        f"gateway: series timeout {args.series_timeout:g} s, release_quiet_seconds {args.release_quiet:g},"
        f" ivim method net, uncertainty {str(args.uncertainty).lower()} ({expected_maps} Parametric Maps),"
        f" derived_series {str(args.derived_series).lower()}"
    )
    print(f"DCMTK: {dcmtk_version()}; storescu {' '.join(STORESCU_OPTIONS)}, one association per series")
    print(f"CPU cores visible: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")
    pacs = Orthanc(root / "orthanc")
    peers.callback(pacs.stop, graceful=False)
    pacs.start()
    config = root / "aigw.toml"
    write_config(config, args, pacs)
    t = time.perf_counter()
    gw = GatewayPeer(root / "gateway", args.series_timeout, config)
    peers.callback(gw.stop)
    gw.start(timeout=180)
    print(f"gateway up (models warmed) in {time.perf_counter() - t:.1f} s\n")
    poller = ArrivalPoller(pacs, args.poll, gw.cpu_seconds).start()
    peers.callback(poller.stop)
    runs = [one_run(k + 1, files, gw, pacs, poller, args, expected_maps) for k, files in enumerate(series)]
    met = report(runs)
    print(f"load average after: {os.getloadavg()[0]:.2f} (a shared machine: treat the figures as indicative)")
    return EXIT_MET if met else EXIT_NOT_MET


if __name__ == "__main__":
    sys.exit(main())
