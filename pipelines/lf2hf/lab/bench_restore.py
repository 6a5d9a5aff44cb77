"""Benchmark of the contrast-preserving restorations: the learned one (lf2hf-dc) against TV and bicubic.

Usage::

    python -m pipelines.lf2hf.lab.bench_restore [--restore-model exported_models/lf2hf-dc.onnx]
        [--json-out FILE] [--manifest exported_models/lf2hf-dc.json --train-log DIR/lf2hf-dc.train.json]

Every figure compares, per slice, bicubic (:func:`~pipelines.lf2hf.lab.bench.bicubic`),
the classical TV reconstruction (:func:`~pipelines.lf2hf.infer.reconstruct_tv`,
:data:`~pipelines.lf2hf.infer.TV_ITERATIONS` iterations, as the pipeline
runs it) and the learned restoration (:func:`~pipelines.lf2hf.infer.restore`)
against the noiseless fine-grid truth *with the input's own contrast*
(nothing here maps contrast), all divided by the input's normalisation
scale:

1. **in domain**: the held-out brain slab (:data:`~pipelines.lf2hf.lab.simulator.HELDOUT_SLICES`,
   seeds :data:`~pipelines.lf2hf.lab.simulator.BENCH_SEEDS`) imaged at
   0.064, 0.3 and 0.55 T, T1w and T2w, with its low-field contrast
   (:func:`~pipelines.lf2hf.lab.anatomy.brain_truth`); PSNR/SSIM in the brain;
2. **phantoms**: domain-randomised scenes (:func:`~pipelines.lf2hf.lab.anatomy.random_scene`,
   256 x 256, seed :data:`PHANTOM_SEED`, never used in training) at the
   out-of-domain benchmark's three SNRs; PSNR/SSIM in the foreground;
3. **data consistency**: the distribution of
   :func:`~pipelines.lf2hf.infer.residual_to_noise` of every output above;
4. **B0 robustness**: the same slices with a field-map perturbation
   (:func:`~pipelines.lf2hf.lab.anatomy.field_map_warp`, full strength,
   as in training) applied to the scene before it is acquired; the loss is
   ``PSNR(clean) - PSNR(perturbed)``, each against its own truth (the
   restoration cannot know the field map, so it restores the distorted
   scene; what this measures is whether it breaks on anatomy that is not
   where a prior would expect it);
5. **speed**: slices per second, 128 x 128 -> 256 x 256, one thread, of the
   learned restoration and of TV in the same run (the test compares their
   ratio, not absolute times).

The real-image out-of-domain figures are in ``python -m pipelines.lf2hf.lab.bench --ood``.
This is a command-line script, so it prints its tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from pipelines._lab import cpu_session, sha256_file, write_manifest  # noqa: E402
from pipelines.lf2hf.infer import (  # noqa: E402
    PRIOR_SIGMA_FLOOR,
    PRIOR_SIGMA_REF,
    PRIOR_STRIDE,
    RESTORE_ITERATIONS,
    RESTORE_STEP,
    RESTORE_TAU,
    reconstruct_tv,
    residual_to_noise,
    restore,
)
from pipelines.lf2hf.lab.anatomy import (  # noqa: E402
    B0_SHIFT_MAX_PX,
    GRADIENT_NONLINEARITY_MAX,
    PHANTOM_SEED,
    SNR_RANGE,
    brain_truth,
    degrade,
    field_map_warp,
    random_scene,
)
from pipelines.lf2hf.lab.bench import BENCH_FIELDS, DEFAULT_RESTORE_MODEL, OOD_SNR_3T, OOD_SNR_EXPONENT, bicubic  # noqa: E402
from pipelines.lf2hf.lab.metrics import psnr_masked, ssim_masked  # noqa: E402
from pipelines.lf2hf.lab.simulator import (  # noqa: E402
    BENCH_SEEDS,
    HELDOUT_SLICES,
    draw_acquisition,
    load_anatomy,
)
from pipelines.lf2hf.preprocess import Contrast, head_mask, normalisation_scale  # noqa: E402

METHODS: tuple[str, ...] = ("bicubic", "tv", "learned")
PHANTOM_SHAPE: tuple[int, int] = (256, 256)
PHANTOMS_PER_SNR: int = 6


def ood_snr(field_t: float) -> float:
    """Tissue SNR of the out-of-domain benchmark's degradation at ``field_t`` (8, 67, 155 at its fields)."""
    return OOD_SNR_3T * (field_t / 3.0) ** OOD_SNR_EXPONENT


def phantom_case(seed: int, index: int, snr: float, warp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A domain-randomised 256 x 256 phantom: (input, truth, foreground mask of the truth)."""
    rng = np.random.default_rng([seed, index])
    truth = random_scene(rng, PHANTOM_SHAPE, warp=False,
                         warp_rng=np.random.default_rng([seed, index, 0xF1]) if warp else None)
    return degrade(truth, snr, np.random.default_rng([seed, index, int(snr)])), truth, head_mask(truth)


def score(y: np.ndarray, truth: np.ndarray, mask: np.ndarray, session: Any) -> dict[str, dict[str, float]]:
    """PSNR, SSIM and residual-to-noise of each method on one case (normalised by the input's scale)."""
    s = normalisation_scale(y)
    truth_n = truth / s
    preds = {"bicubic": bicubic(y / s), "tv": reconstruct_tv(y) / s, "learned": restore(session, y) / s}
    out = {}
    for m, p in preds.items():
        out[m] = {"psnr": psnr_masked(p, truth_n, mask), "ssim": ssim_masked(p, truth_n, mask),
                  "residual_to_noise": float(residual_to_noise(p * s, y)[0])}
    return out


def _warp_mask(mask: np.ndarray, seed_rng: np.random.Generator) -> np.ndarray:
    return field_map_warp(mask.astype(np.float32), seed_rng) > 0.5


def brain_rows(session: Any, seeds: tuple[int, ...] = BENCH_SEEDS, slices: tuple[int, ...] = HELDOUT_SLICES,
               fields: tuple[float, ...] = BENCH_FIELDS) -> list[dict[str, Any]]:
    """Per field and weighting: every slice's scores, clean and B0-perturbed."""
    anatomy = load_anatomy()
    rows = []
    for f in fields:
        for c in Contrast:
            cases = []
            for seed in seeds:
                for z in slices:
                    key = [seed, int(round(f * 1000)), list(Contrast).index(c), z]
                    rng = np.random.default_rng(key + [0xB0])
                    acq = draw_acquisition(rng, f, c)
                    truth = brain_truth(anatomy.slab(z), acq)
                    brain = anatomy.brain_slice(z)
                    clean = score(degrade(truth, acq.snr, rng), truth, brain, session)
                    # The same field map for the image and its brain mask.
                    warped = field_map_warp(truth, np.random.default_rng(key + [0xF1]))
                    wbrain = _warp_mask(brain, np.random.default_rng(key + [0xF1]))
                    pert = score(degrade(warped, acq.snr, np.random.default_rng(key + [0xF2])), warped, wbrain,
                                 session)
                    cases.append({"z": z, "seed": seed, "snr": acq.snr, "clean": clean, "b0": pert})
            rows.append({"field_t": f, "contrast": c.value, "cases": cases})
    return rows


def phantom_rows(session: Any, seed: int = PHANTOM_SEED, n: int = PHANTOMS_PER_SNR,
                 fields: tuple[float, ...] = BENCH_FIELDS) -> list[dict[str, Any]]:
    """Per out-of-domain SNR: every phantom's scores, clean and B0-perturbed."""
    rows = []
    for f in fields:
        snr = ood_snr(f)
        cases = []
        for i in range(n):
            y, truth, mask = phantom_case(seed, i, snr, warp=False)
            yw, tw, mw = phantom_case(seed, i, snr, warp=True)
            cases.append({"index": i, "clean": score(y, truth, mask, session), "b0": score(yw, tw, mw, session)})
        rows.append({"field_t": f, "snr": snr, "cases": cases})
    return rows


def summarise(rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Print one table (means per row of cases) and return its rows."""
    print(f"| {label} | " + " | ".join(f"{m} PSNR / SSIM" for m in METHODS)
          + " | learned - TV (dB) | learned - bicubic, worst slice (dB) | B0 loss learned (dB) | B0 loss TV (dB) |")
    print("|---|" + "---|" * (len(METHODS) + 4))
    out = []
    for r in rows:
        cs = r["cases"]

        def mean(kind: str, m: str, k: str, cs: list[dict[str, Any]] = cs) -> float:
            return float(np.mean([c[kind][m][k] for c in cs]))

        worst = float(min(c["clean"]["learned"]["psnr"] - c["clean"]["bicubic"]["psnr"] for c in cs))
        loss = {m: mean("clean", m, "psnr") - mean("b0", m, "psnr") for m in ("learned", "tv")}
        name = f"{r['field_t']:g} T" + (f" {r['contrast']}" if "contrast" in r else f" (SNR {r['snr']:.0f})")
        cells = " | ".join(f"{mean('clean', m, 'psnr'):.2f} / {mean('clean', m, 'ssim'):.3f}" for m in METHODS)
        gain_tv = mean("clean", "learned", "psnr") - mean("clean", "tv", "psnr")
        print(f"| {name} | {cells} | {gain_tv:+.2f} | {worst:+.2f} | {loss['learned']:+.2f} | {loss['tv']:+.2f} |")
        out.append({"row": name, **{m: {"psnr": mean("clean", m, "psnr"), "ssim": mean("clean", m, "ssim")}
                                    for m in METHODS},
                    "learned_minus_tv_db": gain_tv, "worst_learned_minus_bicubic_db": worst,
                    "b0_psnr_loss_db": loss, "n": len(cs)})
    print()
    return out


def residual_distribution(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Percentiles of residual-to-noise over every clean and perturbed case, per method."""
    out = {}
    for m in ("tv", "learned"):
        v = np.array([c[k][m]["residual_to_noise"] for r in rows for c in r["cases"] for k in ("clean", "b0")])
        out[m] = {"p0": float(v.min()), "p5": float(np.percentile(v, 5)), "p50": float(np.median(v)),
                  "p95": float(np.percentile(v, 95)), "p100": float(v.max()), "n": int(v.size)}
    return out


def speed(session: Any, n: int = 10) -> dict[str, float]:
    """Slices per second for one 128 x 128 -> 256 x 256 slice per call, learned and TV, in the same run."""
    x = np.random.default_rng(0).rayleigh(1.0, (1, 128, 128)).astype(np.float32)
    x[:, 24:104, 24:104] += 20.0
    out = {}
    for name, fn in (("learned", lambda a: restore(session, a)), ("tv", reconstruct_tv)):
        fn(x)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x)
        out[name] = n / (time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--restore-model", type=Path, default=DEFAULT_RESTORE_MODEL)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--manifest", type=Path, default=None)
    ap.add_argument("--train-log", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=len(BENCH_SEEDS), help="how many of the bench seeds (speed)")
    args = ap.parse_args(argv)
    if args.manifest is not None and args.train_log is None:
        ap.error("--manifest needs --train-log")
    session = cpu_session(args.restore_model, threads=1)
    print(f"model {args.restore_model} sha256 {sha256_file(args.restore_model)}; onnxruntime CPU, 1 thread\n")
    print("## In domain: held-out brain slab, own low-field contrast (PSNR/SSIM in the brain, tissue = 1)\n")
    b_rows = brain_rows(session, BENCH_SEEDS[: args.seeds])
    brain = summarise(b_rows, "B0 / weighting")
    print(f"## Domain-randomised phantoms (seed {PHANTOM_SEED}, {PHANTOM_SHAPE[0]}^2, foreground)\n")
    p_rows = phantom_rows(session)
    phantoms = summarise(p_rows, "B0 (SNR)")
    res = residual_distribution(b_rows + p_rows)
    print("## Data consistency: residual-to-noise of every output (clean and B0-perturbed)\n")
    print("| method | min | p5 | median | p95 | max | n |\n|---|---|---|---|---|---|---|")
    for m, d in res.items():
        print(f"| {m} | {d['p0']:.2f} | {d['p5']:.2f} | {d['p50']:.2f} | {d['p95']:.2f} | {d['p100']:.2f} | "
              f"{d['n']} |")
    sp = speed(session)
    print(f"\n## Speed (128 x 128 -> 256 x 256, 1 thread, one slice per call)\n\nlearned {sp['learned']:.1f} "
          f"slices/s, TV {sp['tv']:.1f} slices/s (cpu count {os.cpu_count()})\n")
    metrics = {"in_domain": brain, "phantoms": phantoms, "residual_to_noise": res, "speed_128_to_256": sp,
               "model_bytes": args.restore_model.stat().st_size}
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(metrics, indent=2))
    if args.manifest is not None:
        write_restore_manifest(args.restore_model, args.manifest, metrics, json.loads(args.train_log.read_text()))
        print(f"wrote {args.manifest}")
    return 0


def write_restore_manifest(model: Path, manifest: Path, metrics: dict[str, Any], train_log: dict[str, Any]) -> None:
    """Write ``lf2hf-dc.json``: the loop's constants from the code that runs it, training provenance, figures."""
    cfg = train_log["config"]
    write_manifest(
        model,
        manifest,
        "lf2hf-dc",
        "1.1.0",
        preprocessing={
            "function": "pipelines.lf2hf.infer.restore",
            "loop": "x = D(x0, c0); x = D(x - step (P x - x0), ck) for k = 1..K-1; projection onto "
            "||A x - y|| <= tau sigma; P = Re(A+ A), x0 = Re(A+ y) (zero filling)",
            "iterations": RESTORE_ITERATIONS,
            "step": RESTORE_STEP,
            "tau": RESTORE_TAU,
            "padding_multiple": PRIOR_STRIDE,
            "conditioning": [f"log10(max(sigma / scale, {PRIOR_SIGMA_FLOOR}) / {PRIOR_SIGMA_REF})",
                             "k / (iterations - 1)"],
            "noise_sigma": "pipelines.lf2hf.preprocess.robust_noise_sigma (background or high-pass, from the image)",
            "normalisation": "pipelines.lf2hf.preprocess.normalisation_scale; the output is multiplied back",
        },
        training={
            "command": train_log["command"],
            "seed": cfg["seed"],
            "data_generator": "pipelines.lf2hf.lab.anatomy",
            "parameters": {**cfg, "network_parameters": train_log["parameters"],
                           "snr_range": list(SNR_RANGE), "b0_shift_max_px": B0_SHIFT_MAX_PX,
                           "gradient_nonlinearity_max": GRADIENT_NONLINEARITY_MAX,
                           "train_seconds_single_thread": train_log["train_seconds"], "torch": train_log["torch"],
                           "onnx_max_abs_diff_vs_torch_loop": train_log["onnx_max_abs_diff"]},
        },
        metrics=metrics,
    )


if __name__ == "__main__":
    sys.exit(main())
