"""Benchmark of the wsi-mil pipeline through real DICOM: accuracy, speed and memory.

Usage::

    python -m pipelines.wsimil.lab.bench [--n 200] [--e2e] [--large-mm 16]

1. Accuracy on ``--n`` held-out synthetic slides (seeds
   :data:`~pipelines.wsimil.lab.evaluate.BENCH_BASE` + i, never used by training,
   the manifest's evaluation or the tests): each slide is written as a DICOM
   pyramid (JPEG, base 1 um/pixel, 256-pixel tiles, label, overview,
   thumbnail), read back through wsidicom by the pipeline's own reader and
   scored; slide-level AUC, Dice of the thresholded tile probabilities
   against the true tumour mask on the tile grid, instance-level AUC of the
   attention, false-positive tiles on negative slides.
2. Speed: encoder tiles per second on one CPU thread, and read + decode +
   embed tiles per second per slide.
3. ``--e2e``: one slide through a running gateway (``aigw serve``) to a DCMTK
   storescp: seconds from the last instance acknowledged to the SEG and SR
   received (completion, job, sending).
4. ``--large-mm``: peak resident memory of scoring a large slide (a square
   of that many millimetres at 0.5 um/pixel, TILED_SPARSE) next to a small
   one, each in a fresh process.

Figures go to stdout as JSON; the README and the model card quote them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines._lab import cpu_session
from pipelines.wsimil.infer import ENCODER, HEAD, score_slide
from pipelines.wsimil.lab.evaluate import BENCH_BASE, SlideOutcome, make_scene, summarise, throughput
from pipelines.wsimil.lab.metrics import TRUTH_FRACTION, slide_tiles
from pipelines.wsimil.lab.scene import SlideScene
from pipelines.wsimil.lab.wsi import write_slide
from pipelines.wsimil.preprocess import TILE_PX, open_slide

ROOT = Path(__file__).resolve().parents[3]
MODELS = ROOT / "exported_models"


def tile_truth(scene: SlideScene, rc: np.ndarray, tile_mpp: float) -> np.ndarray:
    """True tumour tiles at ``rc`` (at least TRUTH_FRACTION of the tile's pixels in the mask)."""
    rows, cols = int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1
    px = tile_mpp / TILE_PX
    mask = scene.tumour_mask(0, 0, cols * TILE_PX, rows * TILE_PX, px)
    frac = mask.reshape(rows, TILE_PX, cols, TILE_PX).mean(axis=(1, 3))
    return frac[rc[:, 0], rc[:, 1]] >= TRUTH_FRACTION


def accuracy(n: int, models: Path) -> dict[str, Any]:
    """Score ``n`` benchmark slides written as JPEG DICOM pyramids and read back as the service reads them."""
    enc = cpu_session(models / f"{ENCODER}.onnx", threads=1)
    head = cpu_session(models / f"{HEAD}.onnx", threads=1)
    outcomes: list[SlideOutcome] = []
    tiles = seconds = write_s = 0.0
    with tempfile.TemporaryDirectory(prefix="aigw-wsi-bench-") as tmp:
        for i in range(n):
            scene = make_scene(i, BENCH_BASE)
            folder = Path(tmp) / str(i)
            t0 = time.perf_counter()
            files = write_slide(scene, folder, base_mpp=1.0, tile=256, compression="jpeg")
            write_s += time.perf_counter() - t0
            reader = open_slide(files.paths)
            try:
                score = score_slide(reader, enc, head)
            finally:
                reader.close()
            for p in files.paths:
                p.unlink()
            if score.mil is None:
                print(f"slide {scene.seed}: no tissue, skipped", file=sys.stderr)
                continue
            tiles += len(score.rc)
            seconds += score.seconds
            outcomes.append(
                SlideOutcome(
                    scene.seed,
                    scene.has_tumour,
                    score.mil.slide_probability,
                    score.mil.attention,
                    score.mil.tile_probability,
                    tile_truth(scene, score.rc, score.grid.tile_mpp),
                )
            )
            if (i + 1) % 25 == 0:
                print(f"{i + 1}/{n} slides", file=sys.stderr)
    out = summarise(outcomes)
    out["seeds"] = [BENCH_BASE, BENCH_BASE + n - 1]
    out["read_embed_tiles_per_s"] = round(tiles / max(seconds, 1e-9))
    out["mean_tissue_tiles_per_slide"] = round(tiles / max(len(outcomes), 1))
    out["mean_write_seconds_per_slide"] = round(write_s / max(n, 1), 2)
    sample, _, _, _ = slide_tiles(make_scene(0, BENCH_BASE))
    out["throughput_single_thread"] = throughput(models / f"{ENCODER}.onnx", models / f"{HEAD}.onnx", sample)
    return out


def _peak_child(side_um: float, base_mpp: float, folder: Path, models: Path) -> dict[str, Any]:
    """Write a slide, then score it in a fresh process and report that process's peak RSS."""
    scene = SlideScene(BENCH_BASE - 1, side_um, side_um, tumour=True)
    t0 = time.perf_counter()
    files = write_slide(scene, folder, base_mpp=base_mpp, tile=256, compression="jpeg", sparse=True)
    write_s = time.perf_counter() - t0
    code = (
        "import json,resource,sys,time;from pathlib import Path;"
        "from pipelines.wsimil.lab.bench import _score_files;"
        "print(json.dumps(_score_files(sys.argv[1:-1], Path(sys.argv[-1]))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, files.paths), str(models)], capture_output=True, text=True, check=True
    )
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    base = files.levels[0]
    out.update(
        base_pixels=f"{base.columns}x{base.rows}",
        base_mpp=base_mpp,
        bytes_on_disk=sum(p.stat().st_size for p in files.paths),
        write_seconds=round(write_s, 1),
    )
    return out


def _score_files(paths: list[str], models: Path) -> dict[str, Any]:
    """Score one slide's files in this process; the peak RSS before and after reading it."""
    enc = cpu_session(models / f"{ENCODER}.onnx", threads=1)
    head = cpu_session(models / f"{HEAD}.onnx", threads=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = open_slide([Path(p) for p in paths])
    try:
        score = score_slide(reader, enc, head)
    finally:
        reader.close()
    return {
        "tissue_tiles": len(score.rc),
        "seconds": round(score.seconds, 1),
        "tiles_per_s": round(len(score.rc) / max(score.seconds, 1e-9)),
        "peak_rss_mb_before_reading": round(before / 1024, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def memory(large_mm: float, models: Path) -> dict[str, Any]:
    """Peak memory of scoring a small and a ``large_mm`` square slide, each in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="aigw-wsi-mem-") as tmp:
        small = _peak_child(2000.0, 0.5, Path(tmp) / "small", models)
        large = _peak_child(large_mm * 1000.0, 0.5, Path(tmp) / "large", models)
    return {"small_slide": small, "large_slide": large}


def end_to_end(models: Path) -> dict[str, Any]:
    """One slide through ``aigw serve`` to storescp: last instance acknowledged -> SEG and SR received."""
    sys.path.insert(0, str(ROOT / "ops" / "bench"))
    from _peers import GatewayPeer, StorescpPeer, dcmtk  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory(prefix="aigw-wsi-e2e-") as tmp:
        root = Path(tmp)
        scene = make_scene(0, BENCH_BASE)
        files = write_slide(scene, root / "slide", base_mpp=1.0, tile=256, compression="jpeg")
        pacs = StorescpPeer(root / "pacs").start()
        try:
            config = root / "aigw.toml"
            config.write_text(
                f'[models]\ndir = "{models}"\n\n[[destinations]]\nname = "pacs"\n'
                f'ae_title = "{pacs.called_ae}"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            )
            gw = GatewayPeer(root / "gw", series_timeout=30.0, config=config).start()
            try:
                send = [
                    dcmtk("storescu"),
                    "-R",
                    "-xy",
                    "-aec",
                    gw.called_ae,
                    "127.0.0.1",
                    str(gw.port),
                    *map(str, files.paths),
                ]
                subprocess.run(send, check=True, capture_output=True, timeout=300)
                t0 = time.perf_counter()
                while pacs.stored() < 2:
                    if time.perf_counter() - t0 > 300:
                        raise RuntimeError("no SEG and SR after 300 s:\n" + gw.log_tail())
                    time.sleep(0.05)
                return {
                    "slide": f"{files.levels[0].columns}x{files.levels[0].rows} at 1.0 um/pixel, {len(files.paths)} "
                    "instances",
                    "last_instance_to_seg_and_sr_received_s": round(time.perf_counter() - t0, 2),
                }
            finally:
                gw.stop()
        finally:
            pacs.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="held-out slides for accuracy (0: skip)")
    ap.add_argument("--models", type=Path, default=MODELS)
    ap.add_argument("--e2e", action="store_true", help="time one slide through aigw serve to storescp")
    ap.add_argument("--large-mm", type=float, default=0.0, help="peak memory on a slide this many mm square")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {}
    if args.n:
        report["accuracy"] = accuracy(args.n, args.models)
        print(json.dumps(report["accuracy"], indent=2), flush=True)
    if args.e2e:
        report["end_to_end"] = end_to_end(args.models)
        print(json.dumps(report["end_to_end"], indent=2), flush=True)
    if args.large_mm:
        report["memory"] = memory(args.large_mm, args.models)
        print(json.dumps(report["memory"], indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
