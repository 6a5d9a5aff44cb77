"""One large instance: the gateway's memory and speed receiving a ~1 GB slide.

What it measures
----------------
1. Writes a VL Whole Slide Microscopy Image (1.2.840.10008.5.1.4.1.1.77.1.6,
   Explicit VR Little Endian, native 8-bit RGB, TILED_FULL frames of
   512x512x3) of about ``--gb`` GiB without holding it in memory: pydicom
   writes the header, then the Pixel Data element (7FE0,0010) OB is appended
   by hand (tag, VR, 4-byte length) and the frames are streamed in chunks.
2. Starts ``aigw serve`` with a fresh data dir and sends the file with DCMTK's
   ``storescu`` over one association.
3. Reports the gateway process's peak resident memory (``VmHWM`` in
   ``/proc/PID/status``) before sending and after the instance was
   acknowledged, the time from the start of storescu to its exit (which is
   after the gateway's success response, so it includes the gateway's
   hashing, fsync and indexing), and MB/s.
4. Checks the stored file under ``DATA_DIR/store`` holds the same data set,
   byte for byte: the gateway writes its own file meta group, so the SHA-256
   of the bytes after each file's meta group is compared (the end of the
   group is found from its group length, (0002,0000)).

How to read the output
----------------------
``peak RSS < 400 MB: PASS`` means the gateway streamed the instance to disk
instead of holding it (MB here is 10^6 bytes). ``data set identical: yes``
means bit-exact storage. The exit status is 0 when both hold, 1 when the run
itself failed (a peer did not start, the send failed, the stored data set
differs or is missing), 3 when everything worked but the peak RSS was 400 MB
or more.

The files (the source and the gateway's copy, about 2x ``--gb`` in all) go to
a temporary folder that is removed at the end; the free space is checked
first (``df -h``), including the gateway's own 2 GB free-space watermark.

Run it from the repository root with the virtualenv's Python::

    .venv/bin/python ops/bench/bigfile.py
    .venv/bin/python ops/bench/bigfile.py --gb 2.0 --tmp /var/tmp
    .venv/bin/python ops/bench/bigfile.py --listener-processes 2 --senders 2

With ``--listener-processes N`` the gateway runs N listener processes on the
port (``[gateway] listener_processes``) and the peak is taken per process
(the gateway's own and each listener's ``VmHWM``): the bound holds when every
process stays under it. ``--senders K`` writes K slides (each its own UIDs)
and sends them at once, one association each, so that several processes (or
one process several times) stream a 1 GB instance at the same moment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository root, for pipelines.*
from _peers import (  # noqa: E402
    DCMTK_ENV,
    STORESCU_OPTIONS,
    BenchError,
    GatewayPeer,
    dcmtk,
    dcmtk_version,
    descendants,
    send_parallel,
    vm_kib,
)

import pipelines.wsimil.lab.wsi as wsi  # noqa: E402

TILE = 512
FRAME_BYTES = TILE * TILE * 3
RSS_LIMIT_BYTES = 400 * 10**6
#: The gateway refuses instances below this free space (gateway.min_free_bytes default).
GATEWAY_FREE_WATERMARK = 2 * 1024**3
_CHUNK = 8 * 1024**2


@dataclass(frozen=True)
class Slide:
    path: Path
    frames: int
    tiles_across: int
    tiles_down: int
    size: int
    sop_instance_uid: str


def slide_header(frames: int, across: int, down: int, seed: int) -> Dataset:
    """The WSI data set without Pixel Data: one native level of ``across`` x ``down`` 512-pixel tiles at 40x."""
    identity = wsi.SlideIdentity.derived(
        f"bench-bigfile-{seed}",
        patient=("BENCH^BIGFILE", "AIGWBENCH02"),
        acquired=dt.datetime.now(),
        manufacturer="aigw benchmark",
        model_name="synthetic slide",
        device_serial_number="aigw-bench",
        series_description="BENCH WSI",
        container_id="BENCH-SLIDE-1",
        specimen_id="BENCH-SPECIMEN-1",
    )
    spacing_mm = 0.00025  # 0.25 um/pixel, a 40x scan
    return wsi.slide_header(
        identity,
        sop_instance_uid=identity.uid("instance"),
        instance_number=1,
        total_columns=across * TILE,
        total_rows=down * TILE,
        tile_columns=TILE,
        tile_rows=TILE,
        frames=frames,
        spacing_mm=spacing_mm,
        origin_mm=(20.0, 40.0),
        imaged_size_mm=(across * TILE * spacing_mm, down * TILE * spacing_mm),
        compression=wsi.Compression.NONE,
        staining=False,
    )


def _tiles(seed: int, count: int = 16) -> list[bytes]:
    """A few tissue-coloured noisy tiles; frames cycle through them."""
    rng = np.random.default_rng(seed)
    base = np.array([[233, 150, 190], [120, 60, 160], [245, 240, 245]], dtype=np.int16)  # eosin, haematoxylin, glass
    out = []
    for _ in range(count):
        mix = rng.dirichlet([2, 1, 3])
        colour = (mix @ base).astype(np.int16)
        noise = rng.integers(-20, 21, size=(TILE, TILE, 3), dtype=np.int16)
        out.append(np.clip(colour + noise, 0, 255).astype(np.uint8).tobytes())
    return out


def write_slide(folder: Path, gib: float, seed: int) -> Slide:
    """Write the slide: pydicom header, then Pixel Data streamed in chunks."""
    target = max(1, math.ceil(gib * 1024**3 / FRAME_BYTES))
    across = math.ceil(math.sqrt(target))
    down = math.ceil(target / across)
    frames = across * down  # TILED_FULL: every tile of the matrix, row by row
    length = frames * FRAME_BYTES
    if length >= 0xFFFFFFFF:
        raise BenchError(f"{length} bytes of pixel data do not fit a 32-bit element length (use --gb < 4)")
    ds = slide_header(frames, across, down, seed)
    path = folder / f"slide-{seed}.dcm"
    tiles = _tiles(seed)
    with open(path, "wb") as fh:
        dcmwrite(fh, ds, enforce_file_format=True)
        # (7FE0,0010) OB, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length (PS3.5 7.1.2)
        fh.write(b"\xe0\x7f\x10\x00" + b"OB" + b"\x00\x00" + length.to_bytes(4, "little"))
        buf = bytearray()
        for f in range(frames):
            tile = bytearray(tiles[f % len(tiles)])
            tile[:4] = f.to_bytes(4, "little")  # every frame differs
            buf += tile
            if len(buf) >= _CHUNK:
                fh.write(buf)
                buf.clear()
        fh.write(buf)
    return Slide(path, frames, across, down, path.stat().st_size, str(ds.SOPInstanceUID))


def dataset_offset(path: Path) -> int:
    """Offset of the data set: after the preamble, 'DICM' and the file meta group (PS3.10 7.1)."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM":
        raise BenchError(f"{path}: no DICOM preamble")
    if head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
        raise BenchError(f"{path}: the file meta group does not start with (0002,0000) UL")
    return 144 + int.from_bytes(head[140:144], "little")


def sha256_from(path: Path, offset: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class RssSampler(threading.Thread):
    """Samples the largest VmRSS among the gateway's processes while the instances are sent, for the timeline."""

    def __init__(self, pids: Sequence[int], interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                largest = max(vm_kib(pid, "VmRSS") for pid in self.pids)
            except (OSError, BenchError):
                return
            self.samples.append((time.perf_counter() - self._t0, largest))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _gateway_pids(pid: int, listener_processes: int, timeout: float = 30.0) -> list[int]:
    """The gateway and its listener processes, once all ``listener_processes - 1`` of them run."""
    deadline = time.monotonic() + timeout
    while True:
        kids = descendants(pid)
        if len(kids) >= listener_processes - 1:
            return [pid, *kids]
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(kids)} of {listener_processes - 1} listener processes started")
        time.sleep(0.2)


def _mb(kib: int) -> float:
    return kib * 1024 / 1e6


def _df(path: Path) -> str:
    try:
        return subprocess.run(["df", "-h", str(path)], capture_output=True, text=True, timeout=10).stdout.rstrip()
    except (OSError, subprocess.TimeoutExpired):
        return "(df failed)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="pixel data size in GiB (default 1.0; < 4)")
    ap.add_argument(
        "--tmp",
        type=Path,
        default=None,
        help="work folder parent (default: the system temp dir); needs ~2x --gb + 2 GiB free",
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the tiles and the derived UIDs")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (the 1 GB files)")
    ap.add_argument(
        "--listener-processes", type=int, default=1, metavar="N", help="[gateway] listener_processes (default 1)"
    )
    ap.add_argument("--senders", type=int, default=1, metavar="K", help="slides sent at once, one association each")
    args = ap.parse_args(argv)
    if not 0 < args.gb < 4:
        ap.error("--gb must be > 0 and < 4 (a native Pixel Data element has a 32-bit length)")
    if not 1 <= args.listener_processes <= 64 or not 1 <= args.senders <= 16:
        ap.error("--listener-processes is 1 to 64 and --senders 1 to 16")

    try:
        for tool in ("storescu", "echoscu"):
            dcmtk(tool)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    parent = args.tmp or Path(tempfile.gettempdir())
    print(_df(parent))
    need = int(2 * args.senders * args.gb * 1024**3 + GATEWAY_FREE_WATERMARK + 512 * 1024**2)
    free = shutil.disk_usage(parent).free
    if free < need:
        print(
            f"error: {parent} has {free / 1e9:.1f} GB free; this run needs {need / 1e9:.1f} GB"
            " (source + stored copy + the gateway's 2 GiB watermark)",
            file=sys.stderr,
        )
        return 1

    root = Path(tempfile.mkdtemp(prefix="aigw-bench-bigfile-", dir=parent))
    gw: GatewayPeer | None = None
    try:
        slides = []
        for k in range(args.senders):
            t0 = time.perf_counter()
            slide = write_slide(root, args.gb, args.seed + k)
            slides.append(slide)
            print(
                f"wrote {slide.path}: {slide.size:,} bytes ({slide.size / 1e9:.3f} GB) in "
                f"{time.perf_counter() - t0:.1f} s: VL WSI, {slide.frames} frames of {TILE}x{TILE}x3"
                f" ({slide.tiles_across}x{slide.tiles_down} tiles, TILED_FULL, "
                f"{slide.tiles_across * TILE}x{slide.tiles_down * TILE} pixels)"
            )
        print(
            f"DCMTK: {dcmtk_version()}; storescu {' '.join(STORESCU_OPTIONS)}; "
            + (" ".join(f"{k}={v}" for k, v in DCMTK_ENV.items()) or "Nagle on")
        )

        gw = GatewayPeer(root / "aigw", listener_processes=args.listener_processes)
        gw.start()
        pids = _gateway_pids(gw.pid, args.listener_processes)
        before = {pid: (vm_kib(pid, "VmHWM"), vm_kib(pid, "VmRSS")) for pid in pids}
        print(
            f"aigw pid {gw.pid} listening on 127.0.0.1:{gw.port} with {len(pids)} process(es); before sending: "
            + "; ".join(f"pid {pid} VmHWM {_mb(h):.1f} MB, VmRSS {_mb(r):.1f} MB" for pid, (h, r) in before.items())
        )

        sampler = RssSampler(pids)
        sampler.start()
        try:
            res = send_parallel(gw.port, gw.called_ae, [[sl.path] for sl in slides], root / "senders", timeout=1800)
        finally:
            sampler.stop()
        if not res.ok:
            raise BenchError(f"the send failed:\n{res.failure()}\n--- aigw log:\n{gw.log_tail()}")
        total = sum(sl.size for sl in slides)
        after = {pid: (vm_kib(pid, "VmHWM"), vm_kib(pid, "VmRSS")) for pid in pids}
        print(
            f"{len(slides)} sent at once and acknowledged in {res.seconds:.1f} s: {total / res.seconds / 1e6:.1f} MB/s "
            "(storescu start to the last exit, including the gateway's hash, fsync and index)"
        )
        for pid, (hwm, rss) in after.items():
            role = "gateway" if pid == gw.pid else "listener process"
            print(f"after acknowledgement, {role} {pid}: VmHWM {_mb(hwm):.1f} MB, VmRSS {_mb(rss):.1f} MB")
        if sampler.samples:
            peak_t, peak = max(sampler.samples, key=lambda s: s[1])
            print(
                f"VmRSS sampled every {sampler.interval} s during the send: {len(sampler.samples)} samples, "
                f"largest process {_mb(peak):.1f} MB at {peak_t:.1f} s"
            )

        stored = sorted((gw.data_dir / "store").rglob("*.dcm"))
        if len(stored) != len(slides):
            raise BenchError(
                f"expected {len(slides)} stored instance(s) under {gw.data_dir / 'store'}, found {len(stored)}"
            )
        t1 = time.perf_counter()
        stored_hashes = {}
        for path in stored:
            off = dataset_offset(path)
            stored_hashes[sha256_from(path, off)] = path.stat().st_size - off
        same = True
        for sl in slides:
            off = dataset_offset(sl.path)
            src_hash, src_len = sha256_from(sl.path, off), sl.size - off
            ok = stored_hashes.get(src_hash) == src_len
            same &= ok
            print(f"source data set {sl.path.name}: {src_len:,} bytes, sha256 {src_hash}: {'stored' if ok else 'NOT'}"
                  " byte-identical")
        print(f"data sets identical: {'yes' if same else 'NO'} (compared in {time.perf_counter() - t1:.1f} s)")

        print()
        worst = max(hwm for hwm, _ in after.values())
        print(
            f"peak RSS {_mb(worst):.1f} MB (VmHWM of the largest process; "
            f"{_mb(max(h for h, _ in before.values())):.1f} MB before sending; "
            f"all processes together {_mb(sum(h for h, _ in after.values())):.1f} MB)"
        )
        rss_ok = worst * 1024 < RSS_LIMIT_BYTES
        print(f"peak RSS < {RSS_LIMIT_BYTES // 10**6} MB in every process: {'PASS' if rss_ok else 'FAIL'}")
        print(f"throughput: {total / res.seconds / 1e6:.1f} MB/s")
        if not same:
            raise BenchError("a stored data set differs from the one sent")
        return 0 if rss_ok else 3
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if gw is not None:
            gw.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            print(f"removed {root}")


if __name__ == "__main__":
    sys.exit(main())
