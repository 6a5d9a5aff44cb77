"""Where the gateway's CPU goes per received instance: a py-spy profile of ``aigw serve`` under C-STORE load.

What it measures
----------------
The same load as ``ops/bench/ingest.py`` (synthetic uncompressed MR instances
of about 130 kB, sent by DCMTK ``storescu`` over 1 and over 4 concurrent
associations to a fresh ``aigw serve`` with no configuration), with py-spy
sampling the gateway process while it receives. Each sampled stack of an
active thread (py-spy leaves out threads that sleep in a system call) is put
into one category by the modules and functions on it (:data:`RULES`, highest priority first; a stack no rule matches is
"other"):

* ``pynetdicom``: PDU and DIMSE decoding, the chunked data set written to
  ``incoming/``, the rest of the per-association reactor and DUL threads;
* ``pynetdicom polling``: stacks whose innermost frame is one of
  pynetdicom's reactor loops (``time.sleep(0.001)`` between polls) or its
  socket ``ready()`` select, two such loops per association;
* ``front door``: ``gateway/frontdoor.py``, the acceptor and the bounded
  socket adapter every PDU is read through;
* ``header parse``: ``gateway/structure.py``'s walk, pydicom ``dcmread`` of
  the header and the routing headers;
* ``hashing``: ``sha256_file``;
* ``fsync + rename``: ``install_file`` and ``fsync_dir`` (data fsync, rename,
  directory fsync) in ``gateway/storage.py``;
* ``index``: ``gateway/index`` and sqlite3 (lookups, the group commit);
* ``hints``: count hints and the release hint, ``gateway/completion.py``;
* ``metrics``: prometheus_client and ``gateway/metrics.py``;
* ``logging``: the logging package and ``gateway/_logging.py``;
* ``admission``: the free-space and size checks (``gateway/_admission.py``,
  ``Ingest.admit``: a ``statvfs`` per chunk written);
* ``gateway, rest``: the rest of ``gateway/scp.py`` and ``gateway/ingest.py``
  (handler glue, checks, UID locks);
* ``background``: the gateway's own loops (completion, jobs), the HTTP servers.

The CPU is exact per thread: ``/proc/PID/task/TID/stat`` polled every 20 ms
while the senders run (:class:`ThreadCpu`). py-spy (``--threads``) says which
thread each sample came from, and each thread's CPU is shared out over the
categories of its own samples; the table shows CPU milliseconds per instance
and the share of the whole. The sum over threads is checked against the
process's CPU (``/proc/PID/stat``, last row). Within one thread the split is
as good as py-spy's notion of "active": a thread on a core, runnable, or in
uninterruptible disk wait, so in the association thread "fsync + rename" gets
a share for the time its fsyncs wait for the disk (an upper bound on their
CPU). py-spy samples from outside the process (``--nonblocking``: it does not
stop the gateway) but on the same cores, so a profiled run is somewhat slower
than ``ingest.py``'s; its own CPU is not counted.

Run it from the repository root (needs py-spy: ``.venv/bin/pip install py-spy``;
py-spy must be allowed to read the gateway's memory: same user, ptrace not
restricted by Yama)::

    .venv/bin/python ops/bench/profile_ingest.py
    .venv/bin/python ops/bench/profile_ingest.py --instances 800 --associations 1 2 4 --top 15
    .venv/bin/python ops/bench/profile_ingest.py --keep-profiles /tmp/prof  # raw collapsed stacks
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the gateway package, for install_cost
from _peers import BenchError, GatewayPeer, dcmtk, send_parallel  # noqa: E402
from ingest import Profiler, _print_table, make_instances, split  # noqa: E402

#: (category, file path substring, function-name regex or None); a stack goes to
#: the first category (in this order) that any of its frames matches. The
#: order makes the specific win over the general: a log call inside the index
#: writer is logging, the index lookup inside a completion hint is the hint,
#: the pydicom parse inside pynetdicom's DIMSE decoding is pynetdicom's (no
#: rule names pydicom itself, so it takes the category of its caller).
RULES: tuple[tuple[str, str, str | None], ...] = (
    ("logging", "/logging/", None),
    ("logging", "gateway/_logging.py", None),
    ("metrics", "prometheus_client/", None),
    ("metrics", "gateway/metrics.py", None),
    ("hints", "gateway/completion.py", None),
    ("hints", "gateway/ingest.py", r"_hint$"),
    ("hints", "gateway/scp.py", r"release|hint"),
    ("hashing", "gateway/storage.py", r"sha256"),
    ("hashing", "/hashlib.py", None),
    ("fsync + rename", "gateway/storage.py", r"install_file|fsync_dir|write_durably"),
    ("header parse", "gateway/structure.py", None),
    ("header parse", "gateway/headers.py", None),
    ("header parse", "gateway/ingest.py", r"_read_header|_raw$"),
    ("index", "gateway/index/", None),
    ("index", "/sqlite3/", None),
    ("index", "sqlalchemy/", None),
    ("background", "gateway/_loop.py", None),
    ("background", "gateway/jobs.py", None),
    ("background", "gateway/service.py", None),
    ("background", "gateway/dicomweb/", None),
    ("background", "uvicorn/", None),
    ("background", "/asyncio/", None),
    ("front door", "gateway/frontdoor.py", None),
    ("admission", "gateway/_admission.py", None),
    ("admission", "gateway/ingest.py", r"admit$|_free_bytes$"),
    ("gateway, rest", "gateway/", None),
    ("pynetdicom", "pynetdicom/", None),
)
#: pynetdicom's reactor loops (DUL and association) poll with ``time.sleep(0.001)``
#: and ``select`` on the socket; a stack whose innermost frame is one of these
#: is that polling, whatever called it.
POLLING = ("pynetdicom polling", "pynetdicom/", re.compile(r"(^|\.)_?run_reactor$|^AssociationSocket\.ready$"))
CATEGORIES = [POLLING[0], *dict.fromkeys(c for c, _, _ in RULES), "other"]
_COMPILED = [(cat, sub, re.compile(fn) if fn else None) for cat, sub, fn in RULES]
#: Innermost frames that are waits, not work (a thread blocked on a lock or a
#: selector that py-spy caught as it woke): their samples are left out of the
#: split, so a thread's CPU is not shared out to its waiting.
WAITS = re.compile(
    r"^(Condition\.wait|Event\.wait|Thread\.join|Queue\.get|\w*Selector\.select) \((threading|queue|selectors)\.py"
)
#: One py-spy frame: ``function (file:line)`` (the line is absent for some frames).
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def parse_frame(frame: str) -> tuple[str, str]:
    """``(function, file)`` of a py-spy frame, with the file's separators made ``/``."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), ""
    return m["func"], m["file"].replace(os.sep, "/")


def categorize(frames: Sequence[str]) -> str:
    """The category of one stack (root first, as py-spy writes it): the best-ranked rule any frame matches."""
    parsed = [parse_frame(f) for f in frames]
    if parsed and POLLING[1] in parsed[-1][1] and POLLING[2].search(parsed[-1][0]):
        return POLLING[0]
    for cat, sub, fn in _COMPILED:
        for func, file in parsed:
            if sub in file and (fn is None or fn.search(func)):
                return cat
    return "other"


@dataclass
class Profile:
    """Samples per thread and category of one profiled run, and the leaf frames of its "other" stacks."""

    samples: dict[int, Counter[str]] = field(default_factory=dict)
    other_leaves: Counter[str] = field(default_factory=Counter)
    waits: int = 0

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.samples.values())


_THREAD = re.compile(r"^thread \((?:0x)?(?P<tid>[0-9A-Fa-f]+)\)")


def read_collapsed(path: Path) -> Profile:
    """Read py-spy's raw output (``--threads``): one ``thread (TID): name;frame;... count`` line per stack."""
    prof = Profile()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        m = _THREAD.match(parts[0])
        tid = int(m["tid"]) if m else -1
        frames = [f for f in parts if f and not f.startswith("process ") and not f.startswith("thread ")]
        if frames and WAITS.match(frames[-1]):
            prof.waits += int(count)
            continue
        cat = categorize(frames)
        prof.samples.setdefault(tid, Counter())[cat] += int(count)
        if cat == "other" and frames:
            prof.other_leaves[frames[-1]] += int(count)
    return prof


class ThreadCpu:
    """CPU seconds of each thread of a process over a window, polled from ``/proc/PID/task/TID/stat``.

    Association threads end while the run goes on, and their counters go with
    them, so the poller keeps the last value it saw of every thread; what a
    thread used after the last poll before its exit (at most one interval) is
    lost.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="thread-cpu", daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")
        self._poll(initial=True)

    def _poll(self, initial: bool = False) -> None:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for name in tids:
            try:
                with open(f"/proc/{self.pid}/task/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread just ended
            tid, cpu = int(name), (int(fields[11]) + int(fields[12])) / self._tick
            # A thread first seen after the start was created in the window: it started from 0.
            self.first.setdefault(tid, cpu if initial else 0.0)
            self.last[tid] = cpu

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> ThreadCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def used(self) -> dict[int, float]:
        """CPU seconds per thread id in the window."""
        return {tid: self.last[tid] - self.first[tid] for tid in self.last}


class Spy(Profiler):
    """:class:`ingest.Profiler` at a chosen rate, per thread (``--threads``), not stopping the gateway."""

    def __init__(self, out: Path, rate: int) -> None:
        super().__init__(out)
        self.rate = rate

    def start(self, pid: int) -> None:
        cmd = [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--nonblocking", "--threads"]
        cmd += ["--format", "raw", "-o", str(self.out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached before the first instance arrives
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise BenchError(f"py-spy exited at start (ptrace not allowed?): {err.strip()}")

    def stop(self) -> None:
        super().stop()
        if not self.out.is_file():
            raise BenchError("py-spy wrote no profile")


@dataclass
class Run:
    associations: int
    instances: int
    seconds: float
    cpu_seconds: float
    profile: Profile
    rate: int
    thread_cpu: dict[int, float]

    def cpu_by_category(self) -> dict[str, float]:
        """Each thread's CPU shared out over the categories of its samples ("unsampled threads" without any)."""
        out: dict[str, float] = defaultdict(float)
        for tid, cpu in self.thread_cpu.items():
            samples = self.profile.samples.get(tid)
            if not samples:
                out["unsampled threads"] += cpu
                continue
            n = sum(samples.values())
            for cat, k in samples.items():
                out[cat] += cpu * k / n
        return out


def profile_run(files: list[Path], k: int, work: Path, rate: int, out: Path) -> Run:
    """Send ``files`` over ``k`` associations to a fresh gateway under py-spy; check all were stored."""
    os.sync()  # the previous run's dirty pages are not this run's work
    peer = GatewayPeer(work)
    spy = Spy(out, rate)
    try:
        peer.start()
        spy.start(peer.pid)
        try:
            cpu0 = peer.cpu_seconds()
            with ThreadCpu(peer.pid) as threads:
                res = send_parallel(peer.port, peer.called_ae, split(files, k), work / "senders")
            cpu1 = peer.cpu_seconds()
        finally:
            spy.stop()
        if not res.ok:
            raise BenchError(f"a sender failed:\n{res.failure()}\n--- aigw log:\n{peer.log_tail()}")
        if (got := peer.stored()) != len(files):
            raise BenchError(f"{got} of {len(files)} instances stored\n--- aigw log:\n{peer.log_tail()}")
        assert cpu0 is not None and cpu1 is not None  # the gateway is one process
        return Run(k, len(files), res.seconds, cpu1 - cpu0, read_collapsed(out), rate, threads.used())
    finally:
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)


def install_cost(folder: Path, size: int, n: int = 100) -> tuple[float, float]:
    """CPU and wall seconds per call of the gateway's ``install_file`` (fsync, rename, directory fsync).

    The same function on files of the instances' size in the same filesystem
    as the runs' data dirs: the CPU (``time.thread_time``) is what the sampled
    "fsync + rename" share is an upper bound of, the wall time is the wait that
    the association thread spends there before the C-STORE response.
    """
    from gateway.storage import install_file

    payload = os.urandom(size)
    (folder / "store").mkdir(parents=True, exist_ok=True)
    cpu = wall = 0.0
    for i in range(n):
        tmp = folder / f"{i}.tmp"
        tmp.write_bytes(payload)
        c0, w0 = time.thread_time(), time.perf_counter()
        install_file(tmp, folder / "store" / f"{i // 50}" / f"{i}.dcm")
        cpu += time.thread_time() - c0
        wall += time.perf_counter() - w0
    return cpu / n, wall / n


def report(runs: Sequence[Run], top: int) -> None:
    """The breakdown (CPU ms per instance and % per category, per run), then "other"'s leaves."""
    header = ["category"]
    for r in runs:
        header += [f"{r.associations} assoc: CPU ms/inst", "%"]
    split_cpu = [r.cpu_by_category() for r in runs]
    rows = []
    for cat in [*CATEGORIES, "unsampled threads"]:
        row = [cat]
        for r, cpu in zip(runs, split_cpu):
            share = cpu.get(cat, 0.0)
            row += [_ms(share, r), f"{100 * share / max(sum(cpu.values()), 1e-9):.1f}"]
        rows.append(row)
    rows.append(["total (threads)", *(c for r, u in zip(runs, split_cpu) for c in (_ms(sum(u.values()), r), "100"))])
    rows.append(["process CPU", *(c for r in runs for c in (_ms(r.cpu_seconds, r), ""))])
    _print_table(header, rows)
    print()
    for r in runs:
        print(
            f"{r.associations} association(s): {r.instances} instances in {r.seconds:.2f} s"
            f" ({r.instances / r.seconds:.0f} inst/s under py-spy), gateway CPU {r.cpu_seconds:.2f} s,"
            f" {r.profile.total} active-thread samples over {len(r.profile.samples)} threads"
            f" (and {r.profile.waits} on lock or selector waits, left out)"
        )
    for r in runs:
        if top and r.profile.other_leaves:
            print(f"\ntop 'other' leaf frames, {r.associations} association(s), % of samples:")
            for frame, n in r.profile.other_leaves.most_common(top):
                print(f"  {100 * n / max(r.profile.total, 1):5.1f}%  {frame}")


def _ms(seconds: float, run: Run) -> str:
    return f"{1000 * seconds / run.instances:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--instances", type=int, default=400, metavar="N", help="instances per run (default 400)")
    ap.add_argument("--size-kb", type=int, default=131, metavar="K", help="pixel data per instance in KB (default 131)")
    ap.add_argument("--series", type=int, default=4, help="series the instances are spread over (default 4)")
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4], metavar="K", help="default: 1 4")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the pixel data and the derived UIDs")
    ap.add_argument("--top", type=int, default=8, help="leaf frames of 'other' to list (default 8, 0: none)")
    ap.add_argument("--keep-profiles", type=Path, default=None, metavar="DIR", help="keep py-spy's raw output here")
    args = ap.parse_args(argv)
    if args.instances < max(args.associations) or args.size_kb < 1 or args.series < 1 or args.rate < 1:
        ap.error("need --instances >= associations, --size-kb >= 1, --series >= 1, --rate >= 1")
    root = Path(tempfile.mkdtemp(prefix="aigw-bench-profile-"))
    try:
        for tool in ("storescu", "echoscu"):
            dcmtk(tool)
        Spy(root / "probe", args.rate)  # fails early without py-spy
        src = root / "instances"
        src.mkdir()
        files = make_instances(src, args.instances, args.size_kb, min(args.series, args.instances), args.seed)
        size = sum(f.stat().st_size for f in files) / len(files)
        print(f"{len(files)} MR instances of {size / 1000:.1f} KB; py-spy at {args.rate} Hz; {os.cpu_count()} cores")
        runs = []
        for k in args.associations:
            out = root / f"profile-{k}.txt"
            runs.append(profile_run(files, k, root / f"run-{k}", args.rate, out))
            if args.keep_profiles is not None:
                args.keep_profiles.mkdir(parents=True, exist_ok=True)
                shutil.copy(out, args.keep_profiles / out.name)
        print()
        report(runs, args.top)
        cpu, wall = install_cost(root / "install-cost", int(size))
        print(
            f"\ninstall_file alone (fsync, rename, directory fsync; {int(size)} bytes, this filesystem):"
            f" {1000 * cpu:.2f} ms CPU, {1000 * wall:.2f} ms wall per instance"
        )
        return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
