"""Ingest throughput: the gateway against DCMTK's storescp on the same files.

What it measures
----------------
Received instances per second over C-STORE on loopback, for 1 and for 4
concurrent associations, into three receivers in the same run:

* ``storescp``: DCMTK's reference Storage SCP, forking one child per
  association and writing each instance as received (the options are printed).
  It does not fsync, so its files are in the page cache when it answers.
  The DCMTK tools run with ``TCP_NODELAY=1``: DCMTK >= 3.6.2 leaves Nagle's
  algorithm on otherwise, and storescp then waits on delayed ACKs (about
  40 ms per instance on Linux); ``--nagle`` keeps DCMTK's default.
* ``aigw``: ``aigw serve`` with a fresh data dir and no configuration. Before
  it answers success it parses the header, hashes the payload, fsyncs the
  file, renames it into the store, fsyncs the folder and commits the index
  (SQLite, ``synchronous=FULL``): "acknowledged means durable".
* ``pynetdicom``: ``_null_scp.py``, a pynetdicom AE set up like the gateway's
  listener whose handler only renames the received temporary file and
  answers. It is the floor under any pynetdicom-based receiver on this
  machine: the gap between it and storescp is pynetdicom's, the gap between
  it and aigw is the gateway's own work.

The instances are synthetic uncompressed MR images (Explicit VR Little Endian,
256x256 16-bit by default: about 130 KB each, distinct UIDs, a few series).
With ``k`` associations, ``k`` DCMTK ``storescu`` processes each send a
contiguous quarter (a ``k``-th) of the files over one association; the time
runs from the start of the first storescu to the exit of the last. Every
receiver starts fresh for every measurement and must have stored all N files
(counted on disk) or the run fails.

How to read the output
----------------------
One row per receiver and association count: instances, seconds, instances/s
and MB/s (the median over ``--repeat`` runs), and for the Python receivers
the CPU their process used per instance (storescp forks, so it has none).
Then the ratios aigw/storescp and aigw/pynetdicom per
association count, and whether the target "aigw >= 0.5x storescp with 4
associations" is met. Missing the target is reported, not an error: the exit
status is non-zero only when the run itself failed (a peer did not start, a
send failed, a receiver stored fewer files than were sent).

Senders and receivers share the machine's cores, so the numbers are of the
whole loopback system, and they are noisy on a busy machine: use
``--repeat 3`` for a steadier median.

Run it from the repository root with the virtualenv's Python::

    .venv/bin/python ops/bench/ingest.py
    .venv/bin/python ops/bench/ingest.py --instances 800 --repeat 3
    .venv/bin/python ops/bench/ingest.py --receivers storescp aigw --associations 4
    .venv/bin/python ops/bench/ingest.py --profile /tmp/aigw-ingest.txt  # needs py-spy
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import (  # noqa: E402
    DCMTK_ENV,
    STORESCU_OPTIONS,
    BenchError,
    GatewayPeer,
    PynetdicomPeer,
    StorescpPeer,
    _Peer,
    dcmtk,
    dcmtk_version,
    send_parallel,
)

TARGET_RATIO = 0.5
TARGET_ASSOCIATIONS = 4


# ------------------------------------------------------------------- instances
def _uid(*parts: object) -> UID:
    """A UID derived from the run seed and the parts (the same seed gives the same UIDs)."""
    return generate_uid(entropy_srcs=["aigw-bench-ingest", *map(str, parts)])


def make_instances(folder: Path, count: int, size_kb: int, n_series: int, seed: int) -> list[Path]:
    """Write ``count`` synthetic MR instances of about ``size_kb`` KB; return their paths in order."""
    side = max(16, int(round(math.sqrt(size_kb * 1000 / 2))))
    rng = np.random.default_rng(seed)
    now = dt.datetime.now()
    study_uid = _uid(seed, "study")
    frame_uid = _uid(seed, "frame-of-reference")
    paths = []
    for i in range(count):
        s = i * n_series // count  # contiguous blocks: each association sends mostly one series
        in_series = i - (s * count + n_series - 1) // n_series
        sop_uid = _uid(seed, "instance", i)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = "aigw benchmark"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = f"BENCH T2 AX {s + 1}"
        ds.PatientName = "BENCH^INGEST"
        ds.PatientID = "AIGWBENCH01"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = "3"
        ds.RepetitionTime = "4000"
        ds.EchoTime = "90"
        ds.MagneticFieldStrength = "1.5"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = _uid(seed, "series", s)
        ds.StudyID = "1"
        ds.SeriesNumber = s + 1
        ds.InstanceNumber = in_series + 1
        ds.ImagePositionPatient = [-120.0, -120.0, 3.0 * in_series]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = 3.0 * in_series
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = side
        ds.PixelSpacing = [0.9375, 0.9375]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, size=(side, side), dtype=np.uint16).tobytes()
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(files: Sequence[Path], k: int) -> list[list[Path]]:
    """``k`` contiguous groups of (nearly) equal size."""
    n = len(files)
    return [list(files[j * n // k : (j + 1) * n // k]) for j in range(k)]


# ------------------------------------------------------------------ profiling
class Profiler:
    """py-spy recording the gateway while it receives (optional)."""

    def __init__(self, out: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).is_file():
            raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.exe = exe
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, pid: int) -> None:
        fmt = "flamegraph" if self.out.suffix == ".svg" else "raw"
        cmd = [self.exe, "record", "--pid", str(pid), "--rate", "200", "--format", fmt, "-o", str(self.out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches before the first instance arrives
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise BenchError(f"py-spy exited at start: {err.strip()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ measuring
RECEIVERS: dict[str, type[_Peer]] = {"storescp": StorescpPeer, "pynetdicom": PynetdicomPeer, "aigw": GatewayPeer}


@dataclass
class Measurement:
    seconds: float
    cpu_seconds: float | None  # the receiver's own CPU while the senders ran


def measure(
    peer: _Peer, groups: list[list[Path]], expected: int, work: Path, profiler: Profiler | None = None
) -> Measurement:
    """Start ``peer``, send the groups in parallel, check the count; returns the timing."""
    os.sync()  # write back the previous receiver's dirty pages before timing this one
    try:
        peer.start()
        if profiler is not None:
            profiler.start(peer.pid)
        try:
            cpu0 = peer.cpu_seconds()
            res = send_parallel(peer.port, peer.called_ae, groups, work / "senders")
            cpu1 = peer.cpu_seconds()
        finally:
            if profiler is not None:
                profiler.stop()
        got = peer.stored()
        if not res.ok:
            raise BenchError(f"{peer.name}: a sender failed:\n{res.failure()}\n--- {peer.name} log:\n{peer.log_tail()}")
        if got != expected:
            raise BenchError(
                f"{peer.name}: {got} of {expected} instances stored after the senders finished"
                f"\n--- {peer.name} log:\n{peer.log_tail()}"
            )
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        return Measurement(res.seconds, cpu)
    finally:
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--instances", type=int, default=1500, metavar="N", help="instances per measurement (default 1500)")
    ap.add_argument(
        "--size-kb",
        type=int,
        default=131,
        metavar="K",
        help="approximate pixel data per instance in KB (default 131: 256x256 16-bit)",
    )
    ap.add_argument("--series", type=int, default=4, help="series the instances are spread over (default 4)")
    ap.add_argument(
        "--associations",
        type=int,
        nargs="+",
        default=[1, 4],
        metavar="K",
        help="concurrent association counts to measure (default: 1 4)",
    )
    ap.add_argument(
        "--receivers",
        nargs="+",
        default=list(RECEIVERS),
        choices=list(RECEIVERS),
        help="receivers to measure (default: all; the ratio needs storescp and aigw)",
    )
    ap.add_argument("--repeat", type=int, default=2, help="measurements per cell; the median is shown (default 2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the pixel data and the derived UIDs")
    ap.add_argument("--tmp", type=Path, default=None, help="work folder parent (default: the system temp dir)")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="FILE",
        help="record aigw with py-spy during its last measurement with the most\n"
        "associations (FILE.svg: flame graph, anything else: collapsed stacks)",
    )
    ap.add_argument(
        "--nagle",
        action="store_true",
        help="leave Nagle's algorithm on in DCMTK (its default; without this flag the\n"
        "DCMTK tools run with TCP_NODELAY=1)",
    )
    ap.add_argument(
        "--listener-processes",
        type=int,
        nargs="+",
        default=[1],
        metavar="P",
        help="measure aigw with each of these [gateway] listener_processes (default 1); P > 1 is shown as aigw/Pp",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (generated instances)")
    args = ap.parse_args(argv)
    if args.instances < max(args.associations) or args.repeat < 1 or args.size_kb < 1 or args.series < 1:
        ap.error("need --instances >= associations, --repeat >= 1, --size-kb >= 1, --series >= 1")
    if args.nagle:
        DCMTK_ENV.pop("TCP_NODELAY", None)
    receivers = [r for r in RECEIVERS if r in args.receivers]
    try:
        for tool in ("storescu", "storescp", "echoscu"):
            dcmtk(tool)
        profiler = Profiler(args.profile.resolve()) if args.profile and "aigw" in receivers else None
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="aigw-bench-ingest-", dir=args.tmp))
    try:
        src = root / "instances"
        src.mkdir()
        t0 = time.perf_counter()
        files = make_instances(src, args.instances, args.size_kb, min(args.series, args.instances), args.seed)
        total = sum(f.stat().st_size for f in files)
        print(
            f"generated {len(files)} MR instances in {time.perf_counter() - t0:.1f} s:"
            f" {total / len(files) / 1000:.1f} KB each, {total / 1e6:.1f} MB in all, under {src}"
        )
        print(f"DCMTK: {dcmtk_version()} ({dcmtk('storescu')})")
        print(f"storescu options: {' '.join(STORESCU_OPTIONS)} (one storescu = one association for all its files)")
        print("DCMTK environment: " + (" ".join(f"{k}={v}" for k, v in DCMTK_ENV.items()) or "none (Nagle on)"))
        print(f"storescp options: {' '.join(StorescpPeer.OPTIONS)} (no fsync)")
        print("pynetdicom: ops/bench/_null_scp.py (gateway's AE set-up, handler renames the temp file; no fsync)")
        print(
            "aigw: serve --host 127.0.0.1 --metrics-port 0 --series-timeout 5, fresh data dir, no config"
            " (fsync + rename + dir fsync + SQLite FULL per instance)"
        )
        print(f"CPU cores visible: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")
        print()

        results: dict[tuple[str, int], list[Measurement]] = {}
        peers: dict[str, Callable[[Path], _Peer]] = {}
        for name in receivers:
            if name != "aigw":
                peers[name] = RECEIVERS[name]
                continue
            for p in args.listener_processes:
                peers["aigw" if p == 1 else f"aigw/{p}p"] = functools.partial(GatewayPeer, listener_processes=p)
        cells = [(name, k) for k in args.associations for name in peers]
        n = 0
        for rep in range(args.repeat):
            for name, k in cells:
                n += 1
                work = root / f"run-{n:03d}-{name}-{k}"
                prof = profiler if name == "aigw" and k == max(args.associations) and rep == args.repeat - 1 else None
                m = measure(peers[name](work), split(files, k), len(files), work, prof)
                results.setdefault((name, k), []).append(m)
                cpu = f", receiver CPU {m.cpu_seconds:.2f} s" if m.cpu_seconds is not None else ""
                print(
                    f"  run {rep + 1}/{args.repeat}: {name:10s} {k} assoc: {m.seconds:7.2f} s "
                    f"{len(files) / m.seconds:8.1f} inst/s{cpu}",
                    flush=True,
                )
        print()

        rate: dict[tuple[str, int], float] = {}
        rows = []
        for name, k in cells:
            ms = results[(name, k)]
            secs = statistics.median(m.seconds for m in ms)
            rate[(name, k)] = len(files) / secs
            cpus = [m.cpu_seconds for m in ms if m.cpu_seconds is not None]
            cpu_ms = f"{1000 * statistics.median(cpus) / len(files):.2f}" if cpus else "-"
            rows.append(
                (
                    name,
                    str(k),
                    str(len(files)),
                    f"{secs:.2f}",
                    f"{rate[(name, k)]:.1f}",
                    f"{total / secs / 1e6:.1f}",
                    cpu_ms,
                )
            )
        _print_table(
            ("receiver", "associations", "instances", "seconds", "instances/s", "MB/s", "receiver CPU ms/instance"),
            rows,
        )
        print()
        ours = [name for name in peers if name.startswith("aigw")]
        for mine in ours:
            for base in ("storescp", "pynetdicom"):
                if base in peers:
                    for k in args.associations:
                        print(f"ratio {mine}/{base}, {k} association(s): {rate[(mine, k)] / rate[(base, k)]:.2f}")
        if "aigw" in peers and len(ours) > 1:
            # Scaling: throughput per listener process relative to one process, per association count.
            for mine in ours[1:]:
                procs = int(mine.split("/")[1].rstrip("p"))
                for k in args.associations:
                    speedup = rate[(mine, k)] / rate[("aigw", k)]
                    per = speedup / procs
                    print(f"scaling {mine} vs aigw, {k} association(s): {speedup:.2f}x ({per:.0%} per process)")
        if "storescp" in peers and TARGET_ASSOCIATIONS in args.associations:
            for mine in ours:
                ratio = rate[(mine, TARGET_ASSOCIATIONS)] / rate[("storescp", TARGET_ASSOCIATIONS)]
                verdict = "MET" if ratio >= TARGET_RATIO else "NOT MET"
                print(
                    f"target {mine} >= {TARGET_RATIO}x storescp with {TARGET_ASSOCIATIONS} associations: "
                    f"{verdict} ({ratio:.2f}x)"
                )
        if profiler is not None:
            print(f"py-spy profile of aigw ({max(args.associations)} associations): {args.profile}")
        return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
