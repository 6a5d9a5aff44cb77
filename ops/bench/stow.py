"""STOW-RS ingest throughput: the gateway against Orthanc's DICOMweb plugin on the same instances.

What it measures
----------------
Received instances per second over DICOMweb Store Instances (PS3.18 10.5)
on loopback, into two receivers in the same run, with the same client:

* ``aigw``: ``aigw serve`` with a fresh data dir and ``[dicomweb]`` enabled
  (one bearer token); ``POST /studies``. Each part is streamed to a
  temporary file, then ingested like a C-STORE: header parsed, payload
  hashed, file fsynced and renamed into the store, folder fsynced, index
  committed (SQLite ``synchronous=FULL``), all before the answer.
* ``orthanc``: a throw-away Orthanc (``gateway/apps/viewer/orthanc.py``) with
  its DICOMweb plugin; ``POST /dicom-web/studies``. Orthanc >= 1.7.4 fsyncs
  each stored file (``SyncStorageArea``, default true) and indexes it in
  its SQLite database.

The instances are the synthetic uncompressed MR images of ``ingest.py``
(256x256 16-bit by default: about 130 KB each). The client is one
``http.client`` connection, kept alive, that POSTs ``multipart/related;
type="application/dicom"`` bodies of ``B`` instances each, one request after
the other, and reads each answer; the bodies are built before the clock
starts. A request counts only when the answer is HTTP 200 and its
ReferencedSOPSequence (0008,1199) lists ``B`` instances, and every receiver
must hold all N instances at the end (files on disk for aigw, Orthanc's
``/statistics``) or the run fails. Every receiver starts fresh for every
measurement.

``--big`` instead streams one instance of about ``--gb`` GiB (a VL Whole
Slide Microscopy image, native RGB, frames generated one by one; the header
is ``bigfile.py``'s) to aigw as a chunked request body from a generator, so
neither side's file exists on the client's disk. It reports the gateway's
peak resident memory (``VmHWM``) before and after, MB/s (request start to
answer, so it includes the gateway's hash, fsync and index), and compares
the SHA-256 of the stored file with that of the part sent.

How to read the output
----------------------
One row per receiver and instances per request: requests, instances,
seconds, instances/s and MB/s (the median over ``--repeat`` runs), and the
CPU seconds the receiving process used per instance (``/proc/PID/stat``
utime + stime, all threads). Then the ratio aigw/orthanc per ``B``. The
exit status is non-zero only when the run itself failed (a receiver did not
start, a request was refused, an instance is missing). With ``--big``: 0
when the stored file is identical and the peak RSS stayed under 400 MB, 1
when the run failed, 3 when it worked but the peak RSS was 400 MB or more.

Client, receivers and the kernel share the machine's cores: the numbers are
of the whole loopback system and noisy on a busy machine (``--repeat 3``).

Run it from the repository root with the virtualenv's Python::

    .venv/bin/python ops/bench/stow.py
    .venv/bin/python ops/bench/stow.py --instances 100 --batch 1 16 64 --repeat 3
    .venv/bin/python ops/bench/stow.py --big
    .venv/bin/python ops/bench/stow.py --big --gb 2.0 --tmp /var/tmp
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import math
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.filewriter import dcmwrite

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import HOST, BenchError, GatewayPeer, cpu_seconds, free_port, vm_kib  # noqa: E402
from bigfile import (  # noqa: E402  (bigfile also puts the repository root on sys.path)
    _CHUNK,
    FRAME_BYTES,
    GATEWAY_FREE_WATERMARK,
    RSS_LIMIT_BYTES,
    TILE,
    RssSampler,
    _df,
    _mb,
    _tiles,
    dataset_offset,
    sha256_from,
    slide_header,
)
from ingest import _print_table, make_instances  # noqa: E402

from gateway.apps.viewer.orthanc import Orthanc  # noqa: E402
from gateway.dicomweb import hash_token  # noqa: E402

BOUNDARY = "aigw-bench-stow-5f2a9c"
#: PS3.18 10.5.1.2: the request body of Store Instances.
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
_PART_HEAD = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
_CLOSE = f"--{BOUNDARY}--\r\n".encode("ascii")
#: ReferencedSOPSequence of the Store Instances response (PS3.18 I.2, DICOM JSON F.2).
_REFERENCED_SOP_SEQUENCE = "00081199"
#: The source name the benchmark's bearer token stands for.
BENCH_SOURCE = "BENCH"
#: Set TCP_NODELAY on the client's socket, as urllib3 (requests, dicomweb-client) does by default; ``--nagle``
#: turns it off. With Nagle's algorithm the tail of each request body waits for the receiver's delayed ACK.
CLIENT_NODELAY = True


class _Connection(http.client.HTTPConnection):
    """``http.client``'s connection, with TCP_NODELAY unless ``--nagle``."""

    def connect(self) -> None:
        super().connect()
        if CLIENT_NODELAY:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def multipart_body(parts: Sequence[bytes]) -> bytes:
    """A ``multipart/related`` body (RFC 2387) of one ``application/dicom`` part per file."""
    out = bytearray()
    for p in parts:
        # The CRLF after the content belongs to the next delimiter (RFC 2046 5.1.1).
        out += _PART_HEAD + p + b"\r\n"
    out += _CLOSE
    return bytes(out)


def referenced(body: bytes) -> int:
    """Number of instances in the ReferencedSOPSequence of a Store Instances response."""
    try:
        return len(json.loads(body).get(_REFERENCED_SOP_SEQUENCE, {}).get("Value", []))
    except (ValueError, AttributeError):
        return 0


# ------------------------------------------------------------------ receivers
class StowReceiver:
    """A STOW-RS receiver started fresh for one measurement."""

    name = "receiver"
    path = "/studies"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.headers: dict[str, str] = {"Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json"}

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        """Instances the receiver holds now."""
        raise NotImplementedError

    def log_tail(self) -> str:
        return ""


class AigwStow(StowReceiver):
    """``aigw serve`` with ``[dicomweb]`` on a free port and one bearer token."""

    name = "aigw"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        token = secrets.token_hex(32)
        self.headers["Authorization"] = f"Bearer {token}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "aigw.toml"
        config.write_text(
            "[dicomweb]\nenabled = true\n"
            f'host = "{HOST}"\nport = {self.port}\n'
            f'[[dicomweb.tokens]]\nsource = "{BENCH_SOURCE}"\nsha256 = "{hash_token(token)}"\n'
        )
        self.peer = GatewayPeer(workdir, config=config)

    @property
    def pid(self) -> int:
        return self.peer.pid

    @property
    def data_dir(self) -> Path:
        return self.peer.data_dir

    def start(self, timeout: float = 60.0) -> None:
        self.peer.start()  # returns once the DIMSE listener answers C-ECHO
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"aigw's DICOMweb port {self.port} did not open:\n{self.peer.log_tail()}")

    def stop(self) -> None:
        self.peer.stop()

    def stored(self) -> int:
        return self.peer.stored()

    def log_tail(self) -> str:
        return self.peer.log_tail()


class OrthancStow(StowReceiver):
    """A throw-away Orthanc with its DICOMweb plugin: ``POST /dicom-web/studies``."""

    name = "orthanc"
    path = "/dicom-web/studies"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        try:
            self.orthanc = Orthanc(workdir, dicomweb=True)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        self.port = self.orthanc.http_port

    @property
    def pid(self) -> int:
        if self.orthanc.proc is None:
            raise BenchError("orthanc is not running")
        return self.orthanc.proc.pid

    def start(self) -> None:
        try:
            self.orthanc.start()
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None

    def stop(self) -> None:
        self.orthanc.stop(graceful=False)  # a throw-away database need not be closed cleanly

    def stored(self) -> int:
        return int(self.orthanc.statistics()["CountInstances"])

    def log_tail(self) -> str:
        try:
            return "\n".join((self.workdir / "orthanc.log").read_text(errors="replace").splitlines()[-25:])
        except OSError:
            return "(no log)"


RECEIVERS: dict[str, type[StowReceiver]] = {"aigw": AigwStow, "orthanc": OrthancStow}


# ------------------------------------------------------------------ measuring
@dataclass
class Measurement:
    seconds: float
    cpu_seconds: float
    connections: int  # TCP connections the client opened (1 when keep-alive held)


def post_all(rx: StowReceiver, bodies: Sequence[bytes], counts: Sequence[int], timeout: float = 300.0) -> Measurement:
    """POST every body over one kept-alive connection; each answer must be 200 and reference its instances."""
    conn = _Connection(HOST, rx.port, timeout=timeout)
    connections = 0
    try:
        cpu0 = cpu_seconds(rx.pid)
        t0 = time.perf_counter()
        for i, (body, n) in enumerate(zip(bodies, counts)):
            if conn.sock is None:
                connections += 1  # http.client (re)connects on the next request
            conn.request("POST", rx.path, body=body, headers=rx.headers)
            r = conn.getresponse()
            answer = r.read()
            if r.status != 200 or referenced(answer) != n:
                raise BenchError(
                    f"{rx.name}: request {i + 1} of {n} instance(s) answered HTTP {r.status}, "
                    f"{referenced(answer)} referenced: {answer[:300]!r}\n--- {rx.name} log:\n{rx.log_tail()}"
                )
        seconds = time.perf_counter() - t0
        return Measurement(seconds, cpu_seconds(rx.pid) - cpu0, connections)
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{rx.name}: {type(exc).__name__}: {exc}\n--- {rx.name} log:\n{rx.log_tail()}") from None
    finally:
        conn.close()


def measure(name: str, work: Path, bodies: Sequence[bytes], counts: Sequence[int]) -> Measurement:
    """Start a fresh receiver, POST the bodies, check it holds every instance; returns the timing."""
    os.sync()  # write back the previous receiver's dirty pages before timing this one
    rx = RECEIVERS[name](work)
    try:
        rx.start()
        m = post_all(rx, bodies, counts)
        got, expected = rx.stored(), sum(counts)
        if got != expected:
            raise BenchError(f"{name}: holds {got} of {expected} instances sent\n--- {name} log:\n{rx.log_tail()}")
        return m
    finally:
        rx.stop()
        shutil.rmtree(work, ignore_errors=True)


def throughput(args: argparse.Namespace, root: Path) -> int:
    """The instances/s table of aigw and Orthanc for each batch size."""
    src = root / "instances"
    src.mkdir()
    t0 = time.perf_counter()
    files = make_instances(src, args.instances, args.size_kb, min(args.series, args.instances), args.seed)
    data = [f.read_bytes() for f in files]
    total = sum(map(len, data))
    print(
        f"generated {len(data)} MR instances in {time.perf_counter() - t0:.1f} s:"
        f" {total / len(data) / 1000:.1f} KB each, {total / 1e6:.1f} MB in all"
    )
    nodelay = "TCP_NODELAY" if CLIENT_NODELAY else "Nagle on"
    print(
        f"client: one http.client connection, keep-alive, {nodelay}, bodies built before timing, one request at a time"
    )
    print("aigw: serve --metrics-port 0 --series-timeout 5 --config ([dicomweb] enabled, one bearer token)")
    out = os.popen("Orthanc --version 2>/dev/null").readline().strip() or "Orthanc"
    print(f"orthanc: {out}, DICOMweb plugin, SQLite index, SyncStorageArea default (true)")
    print(f"CPU cores visible: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")
    print()

    cells = [(name, b) for b in args.batch for name in args.receivers]
    batches = {b: [data[i : i + b] for i in range(0, len(data), b)] for b in args.batch}
    results: dict[tuple[str, int], list[Measurement]] = {}
    n = 0
    for rep in range(args.repeat):
        for name, b in cells:
            n += 1
            bodies = [multipart_body(g) for g in batches[b]]
            counts = [len(g) for g in batches[b]]
            m = measure(name, root / f"run-{n:03d}-{name}-{b}", bodies, counts)
            results.setdefault((name, b), []).append(m)
            print(
                f"  run {rep + 1}/{args.repeat}: {name:8s} B={b:<3d} {m.seconds:7.2f} s "
                f"{len(data) / m.seconds:8.1f} inst/s, receiver CPU {m.cpu_seconds:.2f} s, "
                f"{m.connections} connection(s)",
                flush=True,
            )
    print()

    # The median run of each cell; CPU is the receiving process's own, per instance.
    secs = {cell: statistics.median(m.seconds for m in ms) for cell, ms in results.items()}
    cpu = {cell: statistics.median(m.cpu_seconds for m in ms) for cell, ms in results.items()}
    rate = {cell: len(data) / t for cell, t in secs.items()}
    header = ("receiver", "instances/request", "requests", "instances", "seconds", "instances/s", "MB/s")
    _print_table(
        (*header, "receiver CPU ms/instance"),
        [
            (c[0], str(c[1]), str(len(batches[c[1]])), str(len(data)), f"{secs[c]:.2f}", f"{rate[c]:.1f}")
            + (f"{total / secs[c] / 1e6:.1f}", f"{1000 * cpu[c] / len(data):.2f}")
            for c in cells
        ],
    )
    print()
    if {"aigw", "orthanc"} <= set(args.receivers):
        for b in args.batch:
            print(f"ratio aigw/orthanc, {b} instance(s) per request: {rate[('aigw', b)] / rate[('orthanc', b)]:.2f}")
    return 0


# ------------------------------------------------------------------ --big
@dataclass
class BigPart:
    """The one large part: its header bytes, frames and size; hashes are filled in while it is sent."""

    header: bytes
    frames: int
    seed: int
    dataset_offset: int
    size: int
    file_sha256: str = ""
    dataset_sha256: str = ""

    def body(self) -> Iterator[bytes]:
        """The request body, chunk by chunk: the part's file is generated, never held whole or written."""
        whole, dataset = hashlib.sha256(), hashlib.sha256()
        whole.update(self.header)
        dataset.update(self.header[self.dataset_offset :])
        yield _PART_HEAD + self.header
        tiles = _tiles(self.seed)
        per_chunk = max(1, _CHUNK // FRAME_BYTES)
        for first in range(0, self.frames, per_chunk):
            chunk = bytearray()
            for f in range(first, min(first + per_chunk, self.frames)):
                frame = bytearray(tiles[f % len(tiles)])
                frame[:4] = f.to_bytes(4, "little")  # every frame differs
                chunk += frame
            whole.update(chunk)
            dataset.update(chunk)
            yield bytes(chunk)
        yield b"\r\n" + _CLOSE
        self.file_sha256, self.dataset_sha256 = whole.hexdigest(), dataset.hexdigest()


def big_part(gib: float, seed: int) -> BigPart:
    """A VL WSI instance of about ``gib`` GiB: pydicom writes the header, the Pixel Data element is appended."""
    target = max(1, math.ceil(gib * 1024**3 / FRAME_BYTES))
    across = math.ceil(math.sqrt(target))
    down = math.ceil(target / across)
    frames = across * down  # TILED_FULL: every tile of the matrix
    length = frames * FRAME_BYTES
    if length >= 0xFFFFFFFF:
        raise BenchError(f"{length} bytes of pixel data do not fit a 32-bit element length (use --gb < 4)")
    buf = io.BytesIO()
    dcmwrite(buf, slide_header(frames, across, down, seed), enforce_file_format=True)
    # (7FE0,0010) OB, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length (PS3.5 7.1.2)
    header = buf.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + length.to_bytes(4, "little")
    # The data set starts after the preamble, "DICM" and the file meta group (PS3.10 7.1).
    offset = 144 + int.from_bytes(header[140:144], "little")
    return BigPart(header, frames, seed, offset, len(header) + length)


def big(args: argparse.Namespace, root: Path) -> int:
    """Stream one large part to aigw; memory, MB/s and the stored file's SHA-256."""
    part = big_part(args.gb, args.seed)
    print(
        f"one part of {part.size:,} bytes ({part.size / 1e9:.3f} GB): VL WSI, {part.frames} frames of "
        f"{TILE}x{TILE}x3, generated frame by frame into a chunked request body ({_CHUNK // FRAME_BYTES} frames "
        "per chunk)"
    )
    rx = AigwStow(root / "aigw")
    try:
        rx.start()
        before_hwm, before_rss = vm_kib(rx.pid, "VmHWM"), vm_kib(rx.pid, "VmRSS")
        print(
            f"aigw pid {rx.pid}, STOW-RS on http://{HOST}:{rx.port}/studies; before sending: "
            f"VmHWM {_mb(before_hwm):.1f} MB, VmRSS {_mb(before_rss):.1f} MB"
        )
        sampler = RssSampler([rx.pid])
        sampler.start()
        conn = _Connection(HOST, rx.port, timeout=600)
        try:
            t0 = time.perf_counter()
            conn.request("POST", rx.path, body=part.body(), headers=rx.headers, encode_chunked=True)
            r = conn.getresponse()
            answer = r.read()
            seconds = time.perf_counter() - t0
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"aigw: {type(exc).__name__}: {exc}\n--- aigw log:\n{rx.log_tail()}") from None
        finally:
            conn.close()
            sampler.stop()
        if r.status != 200 or referenced(answer) != 1:
            raise BenchError(f"aigw answered HTTP {r.status}: {answer[:300]!r}\n--- aigw log:\n{rx.log_tail()}")
        after_hwm, after_rss = vm_kib(rx.pid, "VmHWM"), vm_kib(rx.pid, "VmRSS")
        peak_t, peak = max(sampler.samples or [(0.0, after_rss)], key=lambda s: s[1])
        print(
            f"sent and acknowledged in {seconds:.1f} s: {part.size / seconds / 1e6:.1f} MB/s (request start to "
            "answer, including the gateway's hash, fsync and index; the client generates and hashes the frames "
            f"in the same time); after it VmHWM {_mb(after_hwm):.1f} MB, VmRSS {_mb(after_rss):.1f} MB; VmRSS "
            f"every {sampler.interval} s: {len(sampler.samples)} samples, max {_mb(peak):.1f} MB at {peak_t:.1f} s"
        )
        stored = sorted((rx.data_dir / "store").rglob("*.dcm"))
        if len(stored) != 1:
            raise BenchError(f"expected 1 stored instance under {rx.data_dir / 'store'}, found {len(stored)}")
        t1 = time.perf_counter()
        stored_file = sha256_from(stored[0], 0)
        stored_dataset = sha256_from(stored[0], dataset_offset(stored[0]))
        print(f"sent file:    {part.size:,} bytes, sha256 {part.file_sha256}")
        print(f"stored file:  {stored[0].stat().st_size:,} bytes, sha256 {stored_file}")
        print(
            f"file identical: {'yes' if stored_file == part.file_sha256 else 'NO'}; data set (after the file meta "
            f"group) identical: {'yes' if stored_dataset == part.dataset_sha256 else 'NO'} "
            f"(hashed in {time.perf_counter() - t1:.1f} s)"
        )
        print()
        print(f"peak RSS {_mb(after_hwm):.1f} MB (VmHWM; {_mb(before_hwm):.1f} MB before sending)")
        rss_ok = after_hwm * 1024 < RSS_LIMIT_BYTES
        print(f"peak RSS < {RSS_LIMIT_BYTES // 10**6} MB: {'PASS' if rss_ok else 'FAIL'}")
        print(f"throughput: {part.size / seconds / 1e6:.1f} MB/s")
        if stored_dataset != part.dataset_sha256:
            raise BenchError("the stored data set differs from the one sent")
        return 0 if rss_ok else 3
    finally:
        rx.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--instances", type=int, default=400, metavar="N", help="instances per measurement (default 400)")
    ap.add_argument(
        "--size-kb", type=int, default=131, metavar="K", help="approximate pixel data per instance in KB (default 131)"
    )
    ap.add_argument("--series", type=int, default=4, help="series the instances are spread over (default 4)")
    ap.add_argument(
        "--batch", type=int, nargs="+", default=[1, 16], metavar="B", help="instances per request (default 1 16)"
    )
    ap.add_argument("--receivers", nargs="+", default=list(RECEIVERS), choices=list(RECEIVERS), help="default: all")
    ap.add_argument("--repeat", type=int, default=2, help="measurements per cell; the median is shown (default 2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the pixel data and the derived UIDs")
    ap.add_argument(
        "--nagle",
        action="store_true",
        help="leave Nagle's algorithm on in the client (http.client's default; without\n"
        "this flag the client sets TCP_NODELAY, as urllib3 does)",
    )
    ap.add_argument("--big", action="store_true", help="instead: stream one --gb GiB part to aigw (memory, MB/s)")
    ap.add_argument("--gb", type=float, default=1.0, help="--big: pixel data size in GiB (default 1.0; < 4)")
    ap.add_argument("--tmp", type=Path, default=None, help="work folder parent (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if args.instances < 1 or args.repeat < 1 or args.size_kb < 1 or args.series < 1 or min(args.batch) < 1:
        ap.error("need --instances, --repeat, --size-kb, --series and every --batch >= 1")
    if not 0 < args.gb < 4:
        ap.error("--gb must be > 0 and < 4 (a native Pixel Data element has a 32-bit length)")
    args.receivers = [r for r in RECEIVERS if r in args.receivers]
    global CLIENT_NODELAY
    CLIENT_NODELAY = not args.nagle

    parent = args.tmp or Path(tempfile.gettempdir())
    if args.big:
        print(_df(parent))
        # The part goes to the gateway's incoming folder and is renamed into the store: one copy on disk.
        need = int(args.gb * 1024**3 + GATEWAY_FREE_WATERMARK + 512 * 1024**2)
        free = shutil.disk_usage(parent).free
        if free < need:
            print(f"error: {parent} has {free / 1e9:.1f} GB free; --big needs {need / 1e9:.1f} GB", file=sys.stderr)
            return 1
    root = Path(tempfile.mkdtemp(prefix="aigw-bench-stow-", dir=parent))
    try:
        return big(args, root) if args.big else throughput(args, root)
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
