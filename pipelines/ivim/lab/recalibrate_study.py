"""Study: can per-quartile coverage of the IVIM network's 90 % intervals reach [0.85, 0.95]?

Usage::

    OMP_NUM_THREADS=1 python -m pipelines.ivim.lab.recalibrate_study [--part net|bayes|all]
        [--bayes-voxels 1000] [--json-out FILE]

Two parts, both on the voxels of :func:`~pipelines.ivim.lab.calibration.calibration_sets`
(settings A and B, Gaussian and Rician, SNR 10, 20, 50):

``bayes``
    The grid posterior of the true prior (uniform in the test ranges) on
    fresh voxels: per-quartile coverage of (a) posterior mean ± Z90 posterior
    sd and (b) the central 90 % credible interval of each marginal. Gaussian
    rows use the likelihood of :class:`~pipelines.ivim.lab.bayes.BayesEstimator`
    (S0 known, and S0 unknown with the scale prior); Rician rows use the exact
    Rician likelihood with S0 known (on a coarser grid, it is slower). This
    says whether even an ideal posterior meets the per-quartile target.

``net``
    Replaces the network's one scalar sd factor per parameter by a factor
    that depends on what is observable at inference: the estimate's position
    ``u`` in the output bounds and the log of the raw (uncalibrated) sd in
    unit space. Fitted on the calibration stream of ``train.py::calibrate``
    (``calibration_sets(1, 4000)``, the exported model's training seed),
    evaluated on the card's seed, the unit test's seed and a fresh seed, with
    the out-of-range AUROC before and after. Forms: bins of u, bins of
    (u, l) and polynomials of (u, l), each calibrated to 90 % locally (these
    do not narrow the quartile spread), and tables fitted to the target
    itself (coverage per row and quartile on the calibration stream; these
    meet it on held-out seeds but drive the out-of-range AUROC of D and D*
    below 0.7, because they shrink the sd of exactly the uncertain voxels).

Runtime (one thread, shared 2-core machine): the ``net`` part about 40 s;
the ``bayes`` part about 3 minutes with ``--bayes-voxels 1000`` and the
default grids, about 15 minutes with 2000 voxels, finer grids and ``--rician-b``.

This is a research script (nothing imports it); it prints its tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from pipelines._lab import cpu_session  # noqa: E402
from pipelines.ivim.infer import IvimNetEstimator  # noqa: E402
from pipelines.ivim.lab.bayes import BayesEstimator, PriorGrid, S0Prior, rician_correction  # noqa: E402
from pipelines.ivim.lab.calibration import (  # noqa: E402
    COVERAGE_RANGE,
    SD_PARAMS,
    Z90,
    Errors,
    VoxelSet,
    auroc,
    calibration_sets,
    coverage,
    outside_sets,
    quartile_coverage,
)
from pipelines.ivim.lab.signal import BENCH_TEST_SEED, MODEL_TEST_SEED, TEST_RANGES, ivim_signal  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "exported_models" / "ivim-net.onnx"
MANIFEST = ROOT / "exported_models" / "ivim-net.json"
#: Training seed of the exported model: its calibration stream is ``calibration_sets(1, 4000)``.
CALIBRATION_SEED = 1
CALIBRATION_VOXELS = 4000
#: A seed no run has used, as a third evaluation.
FRESH_SEED = 31415
#: Output bounds of each sd parameter (the unit space of the network; from the manifest, net.py needs torch).
BOUNDS: dict[str, tuple[float, float]] = {
    p: tuple(json.loads(MANIFEST.read_text())["preprocessing"]["output_bounds"][p]) for p in SD_PARAMS
}
#: Truth keys of the bayes grid axes.
AXES: tuple[str, ...] = ("d", "f", "dstar")


# ----------------------------------------------------------------------------- rows of voxels


def grouped_sets(seed: int, n: int) -> dict[str, list[VoxelSet]]:
    """``calibration_sets(seed, n)`` grouped by row label."""
    groups: dict[str, list[VoxelSet]] = {}
    for label, vs in calibration_sets(seed, n):
        groups.setdefault(label, []).append(vs)
    return groups


@dataclass
class NetRows:
    """Network outputs on many voxel sets, concatenated: estimate, raw sd (factor 1), truth per parameter."""

    est: dict[str, np.ndarray]
    raw_sd: dict[str, np.ndarray]
    truth: dict[str, np.ndarray]

    def errors(self, sd: dict[str, np.ndarray]) -> Errors:
        return Errors({p: self.est[p] - self.truth[p] for p in SD_PARAMS}, sd, self.truth)

    def features(self, p: str) -> tuple[np.ndarray, np.ndarray]:
        """``(u, l)``: estimate in the unit space of the output bounds, log of the raw sd in that space."""
        lo, hi = BOUNDS[p]
        return (self.est[p] - lo) / (hi - lo), np.log(self.raw_sd[p] / (hi - lo))


def net_rows(net: IvimNetEstimator, factors: dict[str, float], sets: list[VoxelSet]) -> NetRows:
    """Run the network on ``sets``; the raw sd is the graph's sd divided by its scalar factor."""
    est: dict[str, list[np.ndarray]] = {p: [] for p in SD_PARAMS}
    sd: dict[str, list[np.ndarray]] = {p: [] for p in SD_PARAMS}
    truth: dict[str, list[np.ndarray]] = {p: [] for p in SD_PARAMS}
    for vs in sets:
        out = net.fit(vs.signals, vs.bvalues)
        for p in SD_PARAMS:
            est[p].append(np.asarray(getattr(out, p), np.float64))
            sd[p].append(np.asarray(getattr(out, f"{p}_sd"), np.float64) / factors[p])
            truth[p].append(vs.truth[p])
    cat = np.concatenate
    return NetRows(
        {p: cat(v) for p, v in est.items()}, {p: cat(v) for p, v in sd.items()}, {p: cat(v) for p, v in truth.items()}
    )


def merge(rows: list[NetRows]) -> NetRows:
    cat = np.concatenate
    return NetRows(
        {p: cat([r.est[p] for r in rows]) for p in SD_PARAMS},
        {p: cat([r.raw_sd[p] for r in rows]) for p in SD_PARAMS},
        {p: cat([r.truth[p] for r in rows]) for p in SD_PARAMS},
    )


# ----------------------------------------------------------------------------- recalibration forms


def _ratio(rows: NetRows, p: str) -> np.ndarray:
    """``|error| / (Z90 raw sd)``: the factor each voxel needs to be just covered."""
    return np.abs(rows.est[p] - rows.truth[p]) / (Z90 * np.maximum(rows.raw_sd[p], 1e-30))


@dataclass
class Recalibration:
    """log factor = polynomial in (u, l) per parameter, clipped to the fitted range of (u, l).

    ``coef[p]`` multiplies the monomials ``u^i l^j`` for ``(i, j)`` in ``powers``;
    ``u`` and ``l`` are clipped to ``u_range[p]`` and ``l_range[p]`` before.
    """

    powers: list[tuple[int, int]]
    coef: dict[str, np.ndarray]
    u_range: dict[str, tuple[float, float]]
    l_range: dict[str, tuple[float, float]]

    def factor(self, p: str, u: np.ndarray, ll: np.ndarray) -> np.ndarray:
        u = np.clip(u, *self.u_range[p])
        ll = np.clip(ll, *self.l_range[p])
        x = np.stack([u**i * ll**j for i, j in self.powers], axis=1)
        return np.exp(x @ self.coef[p])

    def sd(self, rows: NetRows) -> dict[str, np.ndarray]:
        return {p: rows.raw_sd[p] * self.factor(p, *rows.features(p)) for p in SD_PARAMS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "log_factor": "sum_k coef[k] * u^i * l^j over powers[k] = (i, j); u = (est - lo) / (hi - lo) of the output "
            "bounds, l = log(raw_sd / (hi - lo)), both clipped to their ranges first",
            "powers": self.powers,
            "coef": {p: c.tolist() for p, c in self.coef.items()},
            "u_range": self.u_range,
            "l_range": self.l_range,
            "output_bounds": BOUNDS,
        }


def fit_polynomial(rows: NetRows, deg_u: int, deg_l: int, iters: int = 200, lr: float = 0.5) -> Recalibration:
    """Fit log factor(u, l) so that the 90 % interval covers 90 % *locally* in (u, l).

    A smoothed quantile regression of ``log(|err| / (Z90 raw sd))`` at the
    0.9 quantile (pinball loss, which is what "covers 90 % given the
    features" means), by Newton-free gradient steps on a logistic-smoothed
    indicator; the start is the least-squares fit to binned 0.9 quantiles.
    """
    powers = [(i, j) for i in range(deg_u + 1) for j in range(deg_l + 1) if i + j <= max(deg_u, deg_l)]
    coef: dict[str, np.ndarray] = {}
    u_range: dict[str, tuple[float, float]] = {}
    l_range: dict[str, tuple[float, float]] = {}
    for p in SD_PARAMS:
        u, ll = rows.features(p)
        u_range[p] = (float(np.quantile(u, 0.001)), float(np.quantile(u, 0.999)))
        l_range[p] = (float(np.quantile(ll, 0.001)), float(np.quantile(ll, 0.999)))
        u, ll = np.clip(u, *u_range[p]), np.clip(ll, *l_range[p])
        x = np.stack([u**i * ll**j for i, j in powers], axis=1)
        # Standardise the design for the optimiser.
        mu, sc = x.mean(axis=0), x.std(axis=0)
        sc[sc == 0] = 1.0
        mu[[k for k, (i, j) in enumerate(powers) if i == j == 0]] = 0.0
        z = (x - mu) / sc
        y = np.log(np.maximum(_ratio(rows, p), 1e-12))
        w = np.zeros(len(powers))
        w[0] = float(np.quantile(y, 0.9))
        # Pinball loss at 0.9, plain full-batch gradient with a decaying step (convex).
        for it in range(iters):
            r = y - z @ w
            g = -(z * np.where(r > 0, 0.9, -0.1)[:, None]).mean(axis=0)
            w -= lr / np.sqrt(1.0 + it) * g
        # Back to the unstandardised monomials.
        c = w / sc
        c[0] -= float(np.dot(mu, c))
        coef[p] = c
    return Recalibration(powers, coef, u_range, l_range)


@dataclass
class BinTable:
    """A factor per cell of a (u bins) x (l bins) table, per parameter; l bins may be 1."""

    u_edges: dict[str, np.ndarray]
    l_edges: dict[str, np.ndarray]
    table: dict[str, np.ndarray]

    def factor(self, p: str, u: np.ndarray, ll: np.ndarray) -> np.ndarray:
        i = np.clip(np.searchsorted(self.u_edges[p], u) - 1, 0, self.table[p].shape[0] - 1)
        j = np.clip(np.searchsorted(self.l_edges[p], ll) - 1, 0, self.table[p].shape[1] - 1)
        return self.table[p][i, j]

    def sd(self, rows: NetRows) -> dict[str, np.ndarray]:
        return {p: rows.raw_sd[p] * self.factor(p, *rows.features(p)) for p in SD_PARAMS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "u_edges": {p: e.tolist() for p, e in self.u_edges.items()},
            "l_edges": {p: e.tolist() for p, e in self.l_edges.items()},
            "factor": {p: t.tolist() for p, t in self.table.items()},
        }


def fit_bins(rows: NetRows, nu: int, nl: int) -> BinTable:
    """Equal-count bins of u (and of l within the whole set); factor = 0.9 quantile of the needed factor."""
    ue, le, tab = {}, {}, {}
    for p in SD_PARAMS:
        u, ll = rows.features(p)
        r = _ratio(rows, p)
        ue[p] = np.quantile(u, np.linspace(0, 1, nu + 1))
        le[p] = np.quantile(ll, np.linspace(0, 1, nl + 1))
        ue[p][0], ue[p][-1], le[p][0], le[p][-1] = -np.inf, np.inf, -np.inf, np.inf
        i = np.clip(np.searchsorted(ue[p], u) - 1, 0, nu - 1)
        j = np.clip(np.searchsorted(le[p], ll) - 1, 0, nl - 1)
        t = np.ones((nu, nl))
        for a in range(nu):
            for b in range(nl):
                sel = (i == a) & (j == b)
                t[a, b] = float(np.quantile(r[sel], 0.9)) if sel.sum() >= 50 else float(np.quantile(r, 0.9))
        tab[p] = t
    return BinTable(ue, le, tab)


def fit_target_table(
    rows: dict[str, NetRows], nu: int, nl: int, tol: float = 0.03, tau: float = 0.05, steps: int = 1500
) -> BinTable:
    """A (u x l) factor table fitted to the target itself on the calibration rows.

    Minimises, per parameter, the sum over rows and over {overall, each
    quartile of the truth} of ``relu(|coverage - 0.9| - tol)^2``, with the
    coverage smoothed by a logistic of width ``tau`` in log factor (Adam on
    the log factors, started from the locally calibrated table). This is the
    direct test of whether *any* factor of (u, l) meets the target on the
    data it is fitted on.
    """
    merged = merge(list(rows.values()))
    start = fit_bins(merged, nu, nl)
    table: dict[str, np.ndarray] = {}
    for p in SD_PARAMS:
        logr, cell, group = [], [], []
        g0 = 0
        for r in rows.values():
            u, ll = r.features(p)
            i = np.clip(np.searchsorted(start.u_edges[p], u) - 1, 0, nu - 1)
            j = np.clip(np.searchsorted(start.l_edges[p], ll) - 1, 0, nl - 1)
            t = r.truth[p]
            q = np.searchsorted(np.quantile(t, [0.25, 0.5, 0.75]), t)
            logr.append(np.log(np.maximum(_ratio(r, p), 1e-12)))
            cell.append(i * nl + j)
            group.append(np.stack([np.full(t.size, g0), g0 + 1 + q], axis=1))
            g0 += 5
        lr_, c_, gr = np.concatenate(logr), np.concatenate(cell), np.concatenate(group)
        ng = g0
        sizes = np.bincount(gr[:, 0], minlength=ng) + np.bincount(gr[:, 1], minlength=ng)
        w = np.log(start.table[p]).ravel()
        m1, m2 = np.zeros_like(w), np.zeros_like(w)
        for it in range(steps):
            s = 1.0 / (1.0 + np.exp(-(w[c_] - lr_) / tau))
            cov = (np.bincount(gr[:, 0], s, ng) + np.bincount(gr[:, 1], s, ng)) / sizes
            dev = cov - 0.9
            dl = 2 * np.maximum(np.abs(dev) - tol, 0.0) * np.sign(dev) / sizes  # d loss / d sum_s of group
            ds = s * (1 - s) / tau
            per_voxel = (dl[gr[:, 0]] + dl[gr[:, 1]]) * ds
            grad = np.bincount(c_, per_voxel, w.size) + 1e-4 * (w - np.log(start.table[p]).ravel())
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.999 * m2 + 0.001 * grad**2
            w -= 0.01 * (m1 / (1 - 0.9 ** (it + 1))) / (np.sqrt(m2 / (1 - 0.999 ** (it + 1))) + 1e-12)
        table[p] = np.exp(w).reshape(nu, nl)
    return BinTable(start.u_edges, start.l_edges, table)


@dataclass
class KnotTable:
    """log factor piecewise constant in u bins and piecewise linear in l between knots, constant beyond them.

    With ``min_slope`` = -1 + margin the calibrated sd ``raw_sd * factor`` never decreases when the raw sd grows
    (at fixed u), so the sd keeps flagging voxels the network is unsure of (out-of-range ones).
    """

    u_edges: dict[str, np.ndarray]
    knots: dict[str, np.ndarray]
    log_factor: dict[str, np.ndarray]  # [nu, nk]

    def _interp(self, p: str, u: np.ndarray, ll: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cell index of the two knots and the weight of the upper one, per voxel."""
        k = self.knots[p]
        nu = self.log_factor[p].shape[0]
        i = np.clip(np.searchsorted(self.u_edges[p], u) - 1, 0, nu - 1)
        lc = np.clip(ll, k[0], k[-1])
        j = np.clip(np.searchsorted(k, lc) - 1, 0, k.size - 2)
        t = (lc - k[j]) / (k[j + 1] - k[j])
        return i * k.size + j, i * k.size + j + 1, t

    def factor(self, p: str, u: np.ndarray, ll: np.ndarray) -> np.ndarray:
        a, b, t = self._interp(p, u, ll)
        w = self.log_factor[p].ravel()
        return np.exp((1 - t) * w[a] + t * w[b])

    def sd(self, rows: NetRows) -> dict[str, np.ndarray]:
        return {p: rows.raw_sd[p] * self.factor(p, *rows.features(p)) for p in SD_PARAMS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "u_edges": {p: e.tolist() for p, e in self.u_edges.items()},
            "l_knots": {p: k.tolist() for p, k in self.knots.items()},
            "log_factor": {p: t.tolist() for p, t in self.log_factor.items()},
        }


def fit_target_knots(
    rows: dict[str, NetRows],
    nu: int,
    nk: int,
    min_slope: float,
    freeze_above: float | None = None,
    tol: float = 0.03,
    tau: float = 0.05,
    steps: int = 1500,
) -> KnotTable:
    """Like :func:`fit_target_table`, on a :class:`KnotTable` whose slope in l is kept >= ``min_slope``.

    ``freeze_above``: an extra u bin above this value (beyond the test ranges' top, where the estimates of
    out-of-range voxels saturate) keeps the scalar factor, so those voxels keep their sd.
    """
    merged = merge(list(rows.values()))
    ue: dict[str, np.ndarray] = {}
    kn: dict[str, np.ndarray] = {}
    lf: dict[str, np.ndarray] = {}
    scalar = {p: float(np.log(np.quantile(_ratio(merged, p), 0.9))) for p in SD_PARAMS}
    for p in SD_PARAMS:
        u, ll = merged.features(p)
        ue[p] = np.quantile(u, np.linspace(0, 1, nu + 1))
        ue[p][0], ue[p][-1] = -np.inf, np.inf
        if freeze_above is not None:
            ue[p] = np.concatenate([ue[p][ue[p] < freeze_above], [freeze_above, np.inf]])
        nb = ue[p].size - 1
        kn[p] = np.quantile(ll, np.linspace(0.02, 0.98, nk))
        table = KnotTable(ue, kn, {q: np.full((nb, nk), scalar[q]) for q in SD_PARAMS})
        lo_i, hi_i, tt, logr, group = [], [], [], [], []
        g0 = 0
        for r in rows.values():
            a, b, t = table._interp(p, *r.features(p))
            tr = r.truth[p]
            q = np.searchsorted(np.quantile(tr, [0.25, 0.5, 0.75]), tr)
            lo_i.append(a)
            hi_i.append(b)
            tt.append(t)
            logr.append(np.log(np.maximum(_ratio(r, p), 1e-12)))
            group.append(np.stack([np.full(tr.size, g0), g0 + 1 + q], axis=1))
            g0 += 5
        a_, b_, t_, lr_, gr = (np.concatenate(x) for x in (lo_i, hi_i, tt, logr, group))
        sizes = np.bincount(gr[:, 0], minlength=g0) + np.bincount(gr[:, 1], minlength=g0)
        w = np.full(nb * nk, scalar[p])
        m1, m2 = np.zeros_like(w), np.zeros_like(w)
        dk = np.diff(kn[p])
        for it in range(steps):
            s = 1.0 / (1.0 + np.exp(-((1 - t_) * w[a_] + t_ * w[b_] - lr_) / tau))
            cov = (np.bincount(gr[:, 0], s, g0) + np.bincount(gr[:, 1], s, g0)) / sizes
            dev = cov - 0.9
            dl = 2 * np.maximum(np.abs(dev) - tol, 0.0) * np.sign(dev) / sizes
            pv = (dl[gr[:, 0]] + dl[gr[:, 1]]) * s * (1 - s) / tau
            grad = np.bincount(a_, pv * (1 - t_), w.size) + np.bincount(b_, pv * t_, w.size)
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.999 * m2 + 0.001 * grad**2
            w -= 0.01 * (m1 / (1 - 0.9 ** (it + 1))) / (np.sqrt(m2 / (1 - 0.999 ** (it + 1))) + 1e-12)
            wm = w.reshape(nb, nk)
            for j in range(nk - 1):  # keep the slope in l at least min_slope
                wm[:, j + 1] = np.maximum(wm[:, j + 1], wm[:, j] + min_slope * dk[j])
            if freeze_above is not None:
                wm[-1] = scalar[p]
        lf[p] = w.reshape(nb, nk)
    return KnotTable(ue, kn, lf)


# ----------------------------------------------------------------------------- tables


def cov_table(
    rows: dict[str, NetRows], sds: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, dict[str, float]]]:
    return {label: {p: coverage(r.errors(sds[label]), p) for p in SD_PARAMS} for label, r in rows.items()}


def print_cov(title: str, tab: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    lo, hi = COVERAGE_RANGE
    print(f"\n### {title}\n")
    print(f"each cell: overall (lowest-highest quartile of the true value); * = some cell outside [{lo}, {hi}]\n")
    print("| row | D | D* | f |")
    print("|---|---|---|---|")
    bad = 0
    worst = {p: [1.0, 0.0] for p in SD_PARAMS}
    for label, cov in tab.items():
        cells = []
        for p in SD_PARAMS:
            c = cov[p]
            qs = [c[f"q{i}"] for i in range(1, 5)]
            out = not all(lo <= v <= hi for v in [c["all"], *qs])
            bad += out
            worst[p] = [min(worst[p][0], *qs), max(worst[p][1], *qs)]
            cells.append(f"{c['all']:.3f} ({min(qs):.3f}-{max(qs):.3f}){'*' if out else ''}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    summary = " ".join(f"{p} {w[0]:.3f}-{w[1]:.3f}" for p, w in worst.items())
    print(f"\ncells (row x parameter) outside the range: {bad} of {3 * len(tab)}; quartile range {summary}")
    return {"cells_outside": bad, "quartile_min_max": worst}


# ----------------------------------------------------------------------------- part 2: the network


def net_part(voxels: dict[int, int], outside_voxels: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    net = IvimNetEstimator(cpu_session(MODEL, threads=1))
    factors = json.loads(MANIFEST.read_text())["preprocessing"]["sd_calibration_factors"]
    cal_groups = grouped_sets(CALIBRATION_SEED, CALIBRATION_VOXELS)
    cal_rows = {label: net_rows(net, factors, sets) for label, sets in cal_groups.items()}
    cal = merge(list(cal_rows.values()))
    # The scalar factor refitted here must be the exported one.
    refit = {p: float(np.quantile(_ratio(cal, p), 0.9)) for p in SD_PARAMS}
    print(
        "scalar factors refitted on the calibration stream: "
        + ", ".join(f"{p} {refit[p]:.4f} (exported {factors[p]:.4f})" for p in SD_PARAMS)
    )
    forms: dict[str, Any] = {
        "bins u 8": fit_bins(cal, 8, 1),
        "bins u 8 x l 4": fit_bins(cal, 8, 4),
        "poly u3 l2": fit_polynomial(cal, 3, 2),
        "poly u4 l3": fit_polynomial(cal, 4, 3),
        "target-fitted u 8 x l 4": fit_target_table(cal_rows, 8, 4),
        "target-fitted u 4 x l 1": fit_target_table(cal_rows, 4, 1),
        "target-fitted knots u 8 x l 5, slope >= -1": fit_target_knots(cal_rows, 8, 5, -1.0),
        "target-fitted knots u 8 x l 5, slope >= -0.7": fit_target_knots(cal_rows, 8, 5, -0.7),
        "target-fitted knots u 8 x l 5, slope >= -0.4": fit_target_knots(cal_rows, 8, 5, -0.4),
        "knots u 8 x l 5, slope >= -1, u > 0.93 frozen": fit_target_knots(cal_rows, 8, 5, -1.0, 0.93),
        "knots u 8 x l 5, slope >= -0.4, u > 0.93 frozen": fit_target_knots(cal_rows, 8, 5, -0.4, 0.93),
    }
    res: dict[str, Any] = {"exported_factors": factors, "refit_scalar": refit, "forms": {}, "eval": {}, "auroc": {}}
    for name, form in forms.items():
        res["forms"][name] = form.as_dict()
    print(f"fitted in {time.perf_counter() - t0:.0f} s")
    for seed, n in voxels.items():
        groups = grouped_sets(seed, n)
        rows = {label: net_rows(net, factors, sets) for label, sets in groups.items()}
        res["eval"][seed] = {}
        scalar = {label: {p: r.raw_sd[p] * factors[p] for p in SD_PARAMS} for label, r in rows.items()}
        res["eval"][seed]["scalar (exported)"] = print_cov(
            f"seed {seed}, {n} voxels a row: scalar factor (exported)", cov_table(rows, scalar)
        )
        for name, form in forms.items():
            sds = {label: form.sd(r) for label, r in rows.items()}
            res["eval"][seed][name] = print_cov(f"seed {seed}, {n} voxels a row: {name}", cov_table(rows, sds))
        print(f"\n({time.perf_counter() - t0:.0f} s so far)")
    print(
        f"\n### AUROC of the sd, outside versus inside the training ranges (seed {BENCH_TEST_SEED}, "
        f"{outside_voxels} voxels each)\n"
    )
    print("| form | " + " | ".join(f"SNR {s} {p}" for s in (10, 20, 50) for p in SD_PARAMS) + " |")
    print("|---|" + "---|" * 9)
    aur: dict[str, dict[str, float]] = {k: {} for k in ["scalar (exported)", *forms]}
    for snr in (10, 20, 50):
        for p in SD_PARAMS:
            inside, outside = outside_sets(BENCH_TEST_SEED, outside_voxels, float(snr), p)
            ri, ro = net_rows(net, factors, inside), net_rows(net, factors, outside)
            aur["scalar (exported)"][f"{snr} {p}"] = auroc(ri.raw_sd[p], ro.raw_sd[p])
            for name, form in forms.items():
                aur[name][f"{snr} {p}"] = auroc(form.sd(ri)[p], form.sd(ro)[p])
    for name, v in aur.items():
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in v.values()) + " |")
    res["auroc"] = aur
    res["seconds"] = time.perf_counter() - t0
    print(f"\nnet part: {res['seconds']:.0f} s")
    return res


# ----------------------------------------------------------------------------- part 1: the Bayes posterior


@dataclass
class Grid:
    """A tensor grid of cell centres over the test ranges, ``points[a]`` cells on axis ``a`` (D, f, D*)."""

    points: tuple[int, int, int]

    def axes(self) -> list[np.ndarray]:
        rng = (TEST_RANGES.d, TEST_RANGES.f, TEST_RANGES.dstar)
        return [lo + (np.arange(n) + 0.5) * (hi - lo) / n for n, (lo, hi) in zip(self.points, rng)]

    def edges(self) -> list[np.ndarray]:
        rng = (TEST_RANGES.d, TEST_RANGES.f, TEST_RANGES.dstar)
        return [np.linspace(lo, hi, n + 1) for n, (lo, hi) in zip(self.points, rng)]

    def prior(self) -> PriorGrid:
        d, f, dstar = (a.ravel() for a in np.meshgrid(*self.axes(), indexing="ij"))
        return PriorGrid(d, f, dstar)


def posterior_summaries(
    grid: Grid, vs: VoxelSet, snr: float, likelihood: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Posterior mean, sd and central 90 % interval (lo, hi) of each marginal, per voxel.

    ``likelihood``: ``"known"`` or ``"scale"`` (Gaussian, BayesEstimator's), ``"rician"`` (exact, S0 known).
    Mass is taken as uniform within each cell (so quantiles interpolate linearly between cell edges and the
    variance has the cell's ``h^2 / 12`` added).
    """
    prior = grid.prior()
    b = np.asarray(vs.bvalues, np.float64)
    shapes = ivim_signal(b, prior.d, prior.f, prior.dstar).astype(np.float32)
    norm2 = np.einsum("mk,mk->m", shapes, shapes)
    y = np.asarray(vs.signals, np.float32)
    n = y.shape[0]
    axes, edges = grid.axes(), grid.edges()
    names = AXES
    mean = {p: np.empty(n) for p in names}
    sd = {p: np.empty(n) for p in names}
    qlo = {p: np.empty(n) for p in names}
    qhi = {p: np.empty(n) for p in names}
    chunk = max(1, (1 << 23) // prior.size)
    est = BayesEstimator(snr, S0Prior.KNOWN if likelihood in ("known", "rician") else S0Prior.SCALE, grid=prior)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        yy = np.einsum("nk,nk->n", y[rows], y[rows])[:, None]
        logw, _ = est._log_weights(y[rows] @ shapes.T, yy, norm2, b.size)
        if likelihood == "rician":  # the Gaussian weights with S0 known, corrected as BayesEstimator does
            logw += rician_correction(y[rows], shapes, snr)
        logw -= logw.max(axis=1, keepdims=True)
        w = np.exp(logw).reshape(-1, *grid.points)
        w /= w.sum(axis=(1, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
        for a, p in enumerate(names):
            other = tuple(x for x in (1, 2, 3) if x != a + 1)
            m = w.sum(axis=other, dtype=np.float64)  # [c, P_a]
            m /= m.sum(axis=1, keepdims=True)
            c = axes[a]
            h = c[1] - c[0]
            mu = m @ c
            mean[p][rows] = mu
            sd[p][rows] = np.sqrt(np.maximum(m @ c**2 - mu**2, 0.0) + h * h / 12)
            cdf = np.concatenate([np.zeros((m.shape[0], 1)), np.cumsum(m, axis=1)], axis=1)
            for i in range(m.shape[0]):
                qlo[p][start + i], qhi[p][start + i] = np.interp([0.05, 0.95], cdf[i], edges[a])
    return mean, sd, qlo, qhi


def bayes_part(n: int, seed: int, grid_g: Grid, grid_r: Grid, rician_b: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    groups = grouped_sets(seed, n)
    res: dict[str, Any] = {"seed": seed, "voxels": n, "grid_gaussian": grid_g.points, "grid_rician": grid_r.points}
    tabs: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for label, sets in groups.items():
        setting, noise, _, snr_s = label.split()
        snr = float(snr_s)
        liks = ["known", "scale"] if noise == "gaussian" else (["rician"] if setting == "A" or rician_b else [])
        for lik in liks:
            grid = grid_r if lik == "rician" else grid_g
            acc: dict[str, list[np.ndarray]] = {k: [] for k in ("mean", "sd", "lo", "hi", "truth", "cells")}
            per: dict[str, dict[str, list[np.ndarray]]] = {p: {k: [] for k in acc} for p in SD_PARAMS}
            for vs in sets:
                mean, sd, lo, hi = posterior_summaries(grid, vs, snr, lik)
                for p in SD_PARAMS:
                    per[p]["mean"].append(mean[p])
                    per[p]["sd"].append(sd[p])
                    per[p]["lo"].append(lo[p])
                    per[p]["hi"].append(hi[p])
                    per[p]["truth"].append(vs.truth[p])
            for p in SD_PARAMS:
                v = {k: np.concatenate(x) for k, x in per[p].items() if x}
                sym = np.abs(v["mean"] - v["truth"]) <= Z90 * v["sd"]
                cred = (v["truth"] >= v["lo"]) & (v["truth"] <= v["hi"])
                a = AXES.index(p)
                h = grid.edges()[a][1] - grid.edges()[a][0]
                tabs.setdefault(f"mean ± Z90 sd, {lik}", {}).setdefault(label, {})[p] = quartile_coverage(
                    sym, v["truth"]
                )
                tabs.setdefault(f"central 90 % credible, {lik}", {}).setdefault(label, {})[p] = quartile_coverage(
                    cred, v["truth"]
                )
                res.setdefault("median_sd_in_cells", {}).setdefault(f"{label} {lik}", {})[p] = float(
                    np.median(v["sd"]) / h
                )
        print(f"  {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    res["tables"] = {}
    for title, tab in tabs.items():
        res["tables"][title] = {"coverage": tab, "summary": print_cov(f"Bayes posterior: {title}", tab)}
    print("\nmedian posterior sd in grid cells (resolution check):")
    for k, v in res["median_sd_in_cells"].items():
        print(f"  {k}: " + ", ".join(f"{p} {x:.1f}" for p, x in v.items()))
    res["seconds"] = time.perf_counter() - t0
    print(f"\nbayes part: {res['seconds']:.0f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--part", choices=["net", "bayes", "all"], default="all")
    p.add_argument("--bayes-voxels", type=int, default=1000, help="voxels a row of the Bayes part")
    p.add_argument("--bayes-seed", type=int, default=FRESH_SEED)
    p.add_argument("--grid", type=int, nargs=3, default=[100, 50, 40], help="Gaussian grid cells D f D*")
    p.add_argument("--grid-rician", type=int, nargs=3, default=[50, 30, 30], help="Rician grid cells D f D*")
    p.add_argument("--rician-b", action="store_true", help="also the Rician rows of setting B (slow)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    if args.part in ("bayes", "all"):
        print("## Part 1: Bayes grid posterior\n")
        res["bayes"] = bayes_part(
            args.bayes_voxels, args.bayes_seed, Grid(tuple(args.grid)), Grid(tuple(args.grid_rician)), args.rician_b
        )
    if args.part in ("net", "all"):
        print("\n## Part 2: recalibrating the network's sd\n")
        res["net"] = net_part({BENCH_TEST_SEED: 10000, MODEL_TEST_SEED: 2000, FRESH_SEED: 10000}, 10000)
    res["seconds"] = time.perf_counter() - t0
    print(f"\nTotal: {res['seconds']:.0f} s; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
