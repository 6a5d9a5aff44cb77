"""Model inference speed per execution provider: CPU, and CUDA and TensorRT where a GPU exists.

What it measures
----------------
For every model in the models directory, one realistic batch built from the
model's manifest (input names, shapes, dtypes), run the way a job runs it,
through :class:`gateway.models.TimedSession`:

=================  ==========================================  ===============
model              batch                                       items
=================  ==========================================  ===============
wsi-mil-encoder    ``tiles [256, 3, 32, 32]``                  256 tiles
wsi-mil-head       ``embeddings [1000, 64]`` (one slide)       1000 embeddings
lf2hf-net          ``image [8, 1, 128, 128]`` + ``cond [8, 8]``   8 slices
ivim-net           ``signal, bvalues, mask [65536, 20]``       65536 voxels
=================  ==========================================  ===============

(the batch sizes the pipelines use; another model gets ``--batch`` items and
32 for its other symbolic dimensions). Inputs are synthetic but in range:
tiles in [0, 1], a diffusion protocol of 12 b-values with decaying signals,
a 0.064 T T1w conditioning vector.

Execution providers, each in a fresh session:

* ``CPU``: ``CPUExecutionProvider``, plain ``run``;
* ``CUDA``: ``CUDAExecutionProvider``, plain ``run``;
* ``CUDA+IOB``: the same through IO binding, as the gateway runs it with
  ``[models] io_binding = true``;
* ``TensorRT+IOB``: ``TensorrtExecutionProvider`` (then CUDA, CPU) through IO
  binding, only where ONNX Runtime and ``libnvinfer`` offer it.

The GPU columns need a CUDA device (the driver is asked, as the gateway
does); without one the CPU figures are printed with "GPU: no CUDA device on
this machine", and the exit status is 0. A provider that ONNX Runtime cannot
start (it silently falls back to the next one) is reported as skipped.

How to read the output
----------------------
Per model and provider: ``items/s`` (batch items x runs / total time of the
timed runs), the median and 95th percentile of the time per batch in ms,
and ``first s``, the time to create the session and run it once, which is
what ``[models] warmup`` takes off the first job (TensorRT builds its engines
here). Times are wall time around ``run``, host to host: on a GPU they
include the copies of inputs and outputs. A table first, then the same
figures as JSON (also written to ``--json FILE``).

Run it from the repository root with the virtualenv's Python::

    .venv/bin/python ops/bench/gpu.py
    .venv/bin/python ops/bench/gpu.py --repeat 50 --json /tmp/aigw-gpu.json
    .venv/bin/python ops/bench/gpu.py --models wsi-mil-encoder --providers cpu --threads 1

Figures for a whole job (reading DICOM, pre-processing, writing results) come
from each pipeline's own benchmark (``python -m pipelines.<name>.lab.bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from gateway.models import (  # noqa: E402
    ModelManifest,
    ModelRegistry,
    TimedSession,
    _cuda_device_count,
    choose_providers,
    default_models_dir,
)

#: Column name -> (ONNX Runtime providers in preference order, IO binding).
PROVIDERS: dict[str, tuple[list[str], bool]] = {
    "CPU": (["CPUExecutionProvider"], False),
    "CUDA": (["CUDAExecutionProvider", "CPUExecutionProvider"], False),
    "CUDA+IOB": (["CUDAExecutionProvider", "CPUExecutionProvider"], True),
    "TensorRT+IOB": (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], True),
}

#: Batch of the first (symbolic) dimension and size of other symbolic dimensions, per model.
BATCHES: dict[str, tuple[int, dict[str, int]]] = {
    "wsi-mil-encoder": (256, {}),
    "wsi-mil-head": (1000, {}),
    "lf2hf-net": (8, {"H": 128, "W": 128}),
    "ivim-net": (65536, {}),
}

#: A clinical IVIM protocol (s/mm2), padded to the network's 20 entries.
_IVIM_B = np.array([0, 10, 20, 30, 50, 80, 100, 150, 200, 400, 600, 800], np.float32)


@dataclass
class Result:
    """Speed of one model on one execution provider."""

    model: str
    provider: str
    batch: int
    items_per_s: float | None = None
    median_ms: float | None = None
    p95_ms: float | None = None
    first_s: float | None = None
    runs: int = 0
    skipped: str | None = None


def make_inputs(manifest: ModelManifest, batch: int | None, rng: np.random.Generator) -> tuple[dict[str, Any], int]:
    """A realistic batch for the model and its number of items (the first dimension)."""
    n, named = BATCHES.get(manifest.name, (batch or 64, {}))
    if batch is not None:
        n = batch
    feeds: dict[str, Any] = {}
    for spec in manifest.inputs:
        dims = []
        for i, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(n)
            else:
                dims.append(named.get(str(d), 32))
        feeds[spec.name] = rng.random(dims, dtype=np.float64).astype(spec.dtype)
    if manifest.name == "ivim-net":
        k = len(_IVIM_B)
        width = feeds["signal"].shape[1]
        diff = rng.uniform(0.5e-3, 3e-3, (n, 1))
        frac = rng.uniform(0.0, 0.5, (n, 1))
        pseudo = rng.uniform(5e-3, 0.1, (n, 1))
        s = 1000 * (frac * np.exp(-_IVIM_B * pseudo) + (1 - frac) * np.exp(-_IVIM_B * diff))
        signal = np.zeros((n, width), np.float32)
        signal[:, :k] = s + rng.normal(0, 20, s.shape)
        # The protocol once per call ([1, width], broadcast over the voxels: ivim-net 2.0).
        bvalues = np.zeros((1, width), np.float32)
        bvalues[:, :k] = _IVIM_B
        mask = np.zeros((1, width), np.float32)
        mask[:, :k] = 1
        feeds.update(signal=signal, bvalues=bvalues, mask=mask)
    elif manifest.name == "lf2hf-net":
        # log10(B0 / 0.2) at 0.064 T, T1w, noise term, intensity percentiles.
        cond = np.array([np.log10(0.064 / 0.2), 1, 0, 0.3, 0.2, 0.5, 1.2, 1.6], np.float32)
        feeds["cond"] = np.broadcast_to(cond, feeds["cond"].shape).copy()
    elif manifest.name == "wsi-mil-head":
        feeds["embeddings"] = rng.normal(0, 1, feeds["embeddings"].shape).astype(np.float32)
    return feeds, n


def _session(path: Path, providers: list[str], threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def measure(
    name: str,
    path: Path,
    column: str,
    feeds: dict[str, Any],
    items: int,
    *,
    repeat: int,
    warmup: int,
    max_seconds: float,
    threads: int | None,
    clock: Callable[[], float] = time.perf_counter,
) -> Result:
    """Time ``repeat`` runs (fewer past ``max_seconds``, at least 3) after ``warmup`` untimed ones."""
    providers, io_binding = PROVIDERS[column]
    result = Result(name, column, items)
    t0 = clock()
    try:
        raw = _session(path, providers, threads)
    except Exception as exc:
        result.skipped = f"session: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return result
    if raw.get_providers()[0] != providers[0]:
        # ONNX Runtime falls back to the next provider instead of failing.
        result.skipped = f"{providers[0]} did not start (runs on {raw.get_providers()[0]})"
        return result
    session = TimedSession(raw, io_binding=io_binding)
    session.run(None, feeds)
    result.first_s = clock() - t0
    for _ in range(max(0, warmup - 1)):
        session.run(None, feeds)
    times: list[float] = []
    start = clock()
    while len(times) < repeat and (len(times) < 3 or clock() - start < max_seconds):
        t = clock()
        session.run(None, feeds)
        times.append(clock() - t)
    arr = np.asarray(times)
    result.runs = len(times)
    result.items_per_s = items * len(times) / float(arr.sum())
    result.median_ms = float(np.median(arr) * 1000)
    result.p95_ms = float(np.percentile(arr, 95) * 1000)
    return result


def _machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "cuda_devices": _cuda_device_count(),
        "gpus": [],
    }
    if info["cuda_devices"]:
        try:
            import pynvml

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                gpu = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                info["gpus"].append(gpu.decode() if isinstance(gpu, bytes) else str(gpu))
        except Exception as exc:
            info["gpus"].append(f"unknown ({type(exc).__name__})")
    return info


def gpu_columns(requested: list[str] | None) -> tuple[list[str], str | None]:
    """The GPU columns this machine can run, and why there are none when so."""
    import onnxruntime as ort

    if _cuda_device_count() == 0:
        return [], "GPU: no CUDA device on this machine"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return [], "GPU: a CUDA device is present but this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    columns = ["CUDA", "CUDA+IOB"]
    # choose_providers also checks that TensorRT's library loads.
    if "TensorrtExecutionProvider" in choose_providers("auto"):
        columns.append("TensorRT+IOB")
    if requested is not None:
        columns = [c for c in columns if c in requested]
    return columns, None


def _cell(r: Result) -> str:
    if r.skipped:
        return "skipped"
    return f"{r.items_per_s:,.0f}/s {r.median_ms:.2f}/{r.p95_ms:.2f} ms {r.first_s:.2f} s"


def print_table(results: list[Result], columns: list[str]) -> None:
    """Models down, providers across: items/s, median/p95 ms per batch, first run s."""
    by_key = {(r.model, r.provider): r for r in results}
    models = list(dict.fromkeys(r.model for r in results))
    header = ["MODEL", "BATCH"] + [f"{c}: items/s p50/p95 ms first s" for c in columns]
    rows = [header]
    for m in models:
        batch = next(r.batch for r in results if r.model == m)
        rows.append([m, str(batch)] + [_cell(by_key[(m, c)]) if (m, c) in by_key else "-" for c in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in results:
        if r.skipped:
            print(f"skipped: {r.model} on {r.provider}: {r.skipped}")
    if "CUDA" in columns and "CUDA+IOB" in columns:
        for m in models:
            plain, bound = by_key.get((m, "CUDA")), by_key.get((m, "CUDA+IOB"))
            if plain and bound and plain.median_ms and bound.median_ms:
                print(f"IO binding on CUDA, {m}: median {plain.median_ms / bound.median_ms:.2f}x of plain run speed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--models-dir", type=Path, default=None, help="default: the installed exported_models/")
    ap.add_argument("--models", nargs="*", help="only these models (default: every manifest)")
    ap.add_argument(
        "--providers",
        nargs="*",
        choices=[c.lower() for c in PROVIDERS],
        help="only these columns (default: CPU and every GPU column this machine supports)",
    )
    ap.add_argument("--batch", type=int, default=None, help="items per batch for every model (default: realistic)")
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per model and provider")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (the first is timed as 'first s')")
    ap.add_argument("--max-seconds", type=float, default=10.0, help="stop timing a cell after this long (>= 3 runs)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    registry = ModelRegistry(args.models_dir or default_models_dir(), providers=["CPUExecutionProvider"])
    names = args.models or list(registry.manifests())
    requested = None if args.providers is None else [c for c in PROVIDERS if c.lower() in args.providers]
    gpu, no_gpu = gpu_columns(requested)
    columns = (["CPU"] if requested is None or "CPU" in requested else []) + gpu
    machine = _machine()
    print(
        f"# {machine['cpu']}, {machine['cpu_cores']} cores; onnxruntime {machine['onnxruntime']}; "
        f"GPUs: {', '.join(machine['gpus']) or 'none'}"
    )
    results: list[Result] = []
    failures = 0
    for name in names:
        reason = registry.verify(name)
        if reason is not None:
            print(f"{name}: not measured: {reason}", file=sys.stderr)
            failures += 1
            continue
        feeds, items = make_inputs(registry.get(name), args.batch, np.random.default_rng(0))
        for column in columns:
            r = measure(
                name,
                registry.path(name),
                column,
                feeds,
                items,
                repeat=args.repeat,
                warmup=args.warmup,
                max_seconds=args.max_seconds,
                threads=args.threads,
            )
            results.append(r)
            print(f"# {name} on {column}: {_cell(r)}", file=sys.stderr, flush=True)
    print()
    print_table(results, columns)
    if no_gpu:
        print(no_gpu)
    report = {"machine": machine, "gpu": no_gpu or "measured", "results": [asdict(r) for r in results]}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
