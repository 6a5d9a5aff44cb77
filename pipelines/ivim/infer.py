"""IVIM parameter estimation, the model loop of the pipeline: voxels in, D, D*, f and S0 out.

Three estimators share one interface, :class:`IvimEstimator`, and are picked
by the ``method`` option (:data:`~pipelines.ivim.options.IvimMethod`) with
:func:`select_method`:

``net``
    :class:`IvimNetEstimator`, the exported network run by onnxruntime; it
    also gives a standard deviation of D, D* and f per voxel.
``lsq-segmented``
    :class:`SegmentedLsqEstimator`, the conventional segmented fit.
``lsq-full``
    :class:`FullLsqEstimator`, the bounded bi-exponential fit initialised
    from the segmented one.

All three run in the service, so everything here is numpy (and onnxruntime
for the network); the least-squares fits are vectorised over voxels, so a
whole volume is fitted at once. Bounds of the least-squares fits are
:data:`LSQ_BOUNDS`. :func:`fit_maps` turns a masked volume into parameter
maps with the estimator the options name.

The protocol limits of the network (:data:`K_MIN`, :data:`K_MAX`,
:data:`B_MAX`) live here because the service checks every series against
them; the lab's simulator (:mod:`pipelines.ivim.lab.signal`) draws its
training protocols within the same limits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gateway.contract import InputError, RunContext
from pipelines.ivim.options import METHODS, IvimMethod

if TYPE_CHECKING:
    import onnxruntime

    from pipelines.ivim.preprocess import DwiVolume

__all__ = [
    "B_MAX",
    "K_MAX",
    "K_MIN",
    "LSQ_BOUNDS",
    "MAP_KEYS",
    "MODEL",
    "SD_KEYS",
    "NET_BATCH",
    "FullLsqEstimator",
    "IvimEstimator",
    "IvimNetEstimator",
    "IvimParams",
    "SegmentedLsqEstimator",
    "fit_maps",
    "merge_repeated_bvalues",
    "method_description",
    "select_method",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

#: Manifest name of the exported network (``exported_models/ivim-net.json``).
MODEL = "ivim-net"
#: Largest number of b-values a protocol may have (network input width).
K_MAX: int = 20
#: Smallest number of distinct b-values the network is trained for.
K_MIN: int = 4
#: Largest b-value (s/mm²) the network is trained for (some body protocols reach 1200).
B_MAX: float = 1200.0
#: Bounds of the least-squares fits: D and D* in mm²/s; S0 relative to the
#: largest signal of the voxel. D* starts where D ends so the two
#: compartments cannot swap.
LSQ_BOUNDS: dict[str, tuple[float, float]] = {
    "d": (0.0, 5e-3),
    "f": (0.0, 1.0),
    "dstar": (5e-3, 0.3),
    "s0_rel": (0.0, 10.0),
}
#: Segmented fit: D comes from b-values at or above this (s/mm²).
SEGMENTED_B_THRESHOLD: float = 200.0
#: Voxels per onnxruntime call. Small enough that a batch's activations stay
#: in the CPU's caches: on one thread here 1,024 to 2,048 voxels per call ran
#: 1.6x faster than 65,536 (370,000 against 230,000 voxels/s) and ONNX
#: Runtime's arena stayed about 450 MB smaller (resident 158 against 607 MB).
NET_BATCH: int = 2048
#: Tolerance on the b-value range accepted by the network (s/mm²).
_B_TOL: float = 1e-6


@dataclass
class IvimParams:
    """Estimated IVIM parameter maps (flattened voxels) and, where the estimator gives them, their uncertainty.

    Attributes
    ----------
    d : numpy.ndarray
        Diffusion coefficient (mm²/s), float32 ``[N]``.
    dstar : numpy.ndarray
        Pseudo-diffusion coefficient (mm²/s), float32 ``[N]``.
    f : numpy.ndarray
        Perfusion fraction, float32 ``[N]``.
    s0 : numpy.ndarray
        Signal at ``b = 0`` (signal units), float32 ``[N]``.
    d_sd, dstar_sd, f_sd : numpy.ndarray or None
        Standard deviation of D, D* and f in their units, float32 ``[N]``:
        the network's calibrated per-voxel uncertainty (the nominal 90 %
        interval is the estimate ± 1.645 sd). None for the least-squares fits.
    """

    d: np.ndarray
    dstar: np.ndarray
    f: np.ndarray
    s0: np.ndarray
    d_sd: np.ndarray | None = None
    dstar_sd: np.ndarray | None = None
    f_sd: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, d: np.ndarray, dstar: np.ndarray, f: np.ndarray, s0: np.ndarray) -> "IvimParams":
        """Build from arrays of any float type, cast to float32."""
        return cls(*(np.asarray(a, dtype=np.float32) for a in (d, dstar, f, s0)))


class IvimEstimator(Protocol):
    """What every IVIM estimator offers."""

    def fit(self, signals: np.ndarray, bvalues: np.ndarray) -> IvimParams:
        """Estimate IVIM parameters of ``signals [N, K]`` on ``bvalues [K]``."""
        ...


def merge_repeated_bvalues(signals: np.ndarray, bvalues: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average the signals of repeated b-values (e.g. several b = 0 images).

    Parameters
    ----------
    signals : numpy.ndarray
        ``[N, K]`` signals.
    bvalues : numpy.ndarray
        ``[K]`` b-values (s/mm²).

    Returns
    -------
    tuple of numpy.ndarray
        ``(signals [N, K'], bvalues [K'])`` with distinct, sorted b-values.
    """
    b = np.asarray(bvalues, dtype=np.float64).ravel()
    s = np.asarray(signals, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != b.size:
        raise ValueError(f"signals must be [N, {b.size}] for {b.size} b-values, got {s.shape}")
    uniq, inverse = np.unique(b, return_inverse=True)
    if uniq.size == b.size:
        order = np.argsort(b)
        return s[:, order], b[order]
    out = np.zeros((s.shape[0], uniq.size))
    np.add.at(out.T, inverse, s.T)
    out /= np.bincount(inverse, minlength=uniq.size)[None, :]
    return out, uniq


def _check_protocol(bvalues: np.ndarray) -> None:
    """Raise ``ValueError`` if the network was not trained for this protocol."""
    k = bvalues.size
    if not K_MIN <= k <= K_MAX:
        raise ValueError(f"the IVIM network needs {K_MIN} to {K_MAX} distinct b-values, got {k}")
    if bvalues.min() < -_B_TOL or bvalues.max() > B_MAX + _B_TOL:
        raise ValueError(f"b-values must lie in [0, {B_MAX:g}] s/mm2, got [{bvalues.min():g}, {bvalues.max():g}]")


class IvimNetEstimator:
    """Run the exported IVIM network: estimates and their standard deviations.

    The ONNX graph does its own normalisation (see
    :mod:`pipelines.ivim.lab.net`) and takes the protocol once per call
    (``bvalues`` and ``mask`` ``[1, 20]``, broadcast over the voxels, so
    the protocol encoder runs once per batch, not per voxel); this wrapper
    merges repeated b-values, checks the protocol, pads to ``K_MAX`` with
    ``b = 0``, ``signal = 0`` and ``mask = 0``, and runs the voxels in
    batches of :data:`NET_BATCH`. Voxels with a non-finite signal get NaN
    parameters.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Session on ``ivim-net.onnx`` (inputs ``signal`` float32 ``[N, 20]``,
        ``bvalues`` and ``mask`` float32 ``[1, 20]``; outputs ``params``
        float32 ``[N, 4]`` = D, D*, f, S0 and ``params_sd`` float32
        ``[N, 3]`` = standard deviations of D, D*, f).
    batch : int
        Voxels per call.
    """

    INPUT_NAMES: tuple[str, str, str] = ("signal", "bvalues", "mask")
    OUTPUT_NAMES: tuple[str, str] = ("params", "params_sd")

    def __init__(self, session: "onnxruntime.InferenceSession", batch: int = NET_BATCH) -> None:
        names = {i.name for i in session.get_inputs()}
        if names != set(self.INPUT_NAMES):
            raise ValueError(f"model inputs are {sorted(names)}, expected {list(self.INPUT_NAMES)}")
        outputs = {o.name for o in session.get_outputs()}
        if outputs != set(self.OUTPUT_NAMES):
            raise ValueError(f"model outputs are {sorted(outputs)}, expected {list(self.OUTPUT_NAMES)}")
        self.session = session
        self.batch = batch

    def fit(self, signals: np.ndarray, bvalues: np.ndarray) -> IvimParams:
        """Estimate IVIM parameters and their standard deviations.

        Parameters
        ----------
        signals : numpy.ndarray
            ``[N, K]`` magnitude signals.
        bvalues : numpy.ndarray
            ``[K]`` b-values (s/mm²), 4 to 20 distinct values in
            ``[0, B_MAX]`` after repeated values are averaged.

        Returns
        -------
        IvimParams
            The parameter estimates, with ``d_sd``, ``dstar_sd`` and ``f_sd``.
        """
        s, b = merge_repeated_bvalues(signals, bvalues)
        _check_protocol(b)
        n, k = s.shape
        finite = np.all(np.isfinite(s), axis=1)
        b_pad = np.zeros((1, K_MAX), dtype=np.float32)
        b_pad[0, :k] = b
        m_pad = np.zeros((1, K_MAX), dtype=np.float32)
        m_pad[0, :k] = 1.0
        out = np.empty((n, 4), dtype=np.float32)
        sd = np.empty((n, 3), dtype=np.float32)
        for start in range(0, n, self.batch):
            stop = min(start + self.batch, n)
            chunk = np.zeros((stop - start, K_MAX), dtype=np.float32)
            chunk[:, :k] = np.where(finite[start:stop, None], s[start:stop], 0.0)
            out[start:stop], sd[start:stop] = self.session.run(
                list(self.OUTPUT_NAMES), {"signal": chunk, "bvalues": b_pad, "mask": m_pad}
            )
        out[~finite] = np.nan
        sd[~finite] = np.nan
        return IvimParams(out[:, 0], out[:, 1], out[:, 2], out[:, 3], sd[:, 0], sd[:, 1], sd[:, 2])


def _log_linear(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line ``y = a + c x`` for every row of ``y``; returns ``(a, c)``."""
    xm = x.mean()
    xc = x - xm
    c = (y - y.mean(axis=1, keepdims=True)) @ xc / np.sum(xc**2)
    a = y.mean(axis=1) - c * xm
    return a, c


class SegmentedLsqEstimator:
    """Conventional segmented IVIM fit, vectorised over voxels.

    1. D and the intercept from a mono-exponential fit of the b-values at or
       above :data:`SEGMENTED_B_THRESHOLD` (the two highest b-values if fewer
       than two qualify): a log-linear least-squares start refined by
       bounded Gauss-Newton steps on the signal.
    2. S0 is the signal at the lowest b-value (which is biased low when the
       protocol has no ``b = 0``), and ``f = 1 - intercept / S0``, clipped to
       ``[0, 1]``.
    3. D* by bounded least squares on all b-values with D, f and S0 fixed: a
       log-spaced grid search over the D* bounds refined by a few projected
       Gauss-Newton steps.

    Bounds are :data:`LSQ_BOUNDS`.

    Parameters
    ----------
    grid : int
        Number of grid points of the D* search.
    """

    def __init__(self, grid: int = 120) -> None:
        self.grid = grid

    def fit(self, signals: np.ndarray, bvalues: np.ndarray) -> IvimParams:
        """Estimate IVIM parameters of ``signals [N, K]`` on ``bvalues [K]``."""
        s, b = merge_repeated_bvalues(signals, bvalues)
        d, dstar, f, s0 = self._fit(s, b)
        return IvimParams.from_arrays(d, dstar, f, s0)

    def _fit(self, s: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if b.size < 3:
            raise ValueError(f"a segmented IVIM fit needs at least 3 b-values, got {b.size}")
        scale = np.maximum(np.max(s, axis=1), 1e-12)
        y = s / scale[:, None]
        hi = b >= SEGMENTED_B_THRESHOLD
        if hi.sum() < 2:
            hi = np.zeros_like(hi)
            hi[np.argsort(b)[-2:]] = True
        d, intercept = self._fit_d(y[:, hi], b[hi])
        s0 = np.maximum(y[:, np.argmin(b)], 1e-6)
        f = np.clip(1.0 - intercept / s0, *LSQ_BOUNDS["f"])
        dstar = self._fit_dstar(y, b, d, f, s0)
        return d, dstar, f, s0 * scale

    @staticmethod
    def _fit_d(y: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mono-exponential fit ``A exp(-b D)`` of the high-b signals.

        A log-linear least-squares fit gives the start; since the log
        amplifies the noise of the small high-b signals, a few projected
        Gauss-Newton steps on the signal itself (with A in closed form for
        each D) then finish the least-squares fit.

        Returns
        -------
        tuple of numpy.ndarray
            ``(D, A)`` per voxel.
        """
        lo_d, hi_d = LSQ_BOUNDS["d"]
        # Noise can make high-b magnitudes tiny or (Gaussian) negative; the
        # floor keeps the log finite.
        logy = np.log(np.maximum(y, 1e-3))
        _, slope = _log_linear(b, logy)
        d = np.clip(-slope, lo_d, hi_d)

        def amp_cost(dd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            e = np.exp(-dd[:, None] * b)
            a = np.maximum(np.sum(y * e, axis=1) / np.sum(e * e, axis=1), 0.0)
            return a, e, np.sum((y - a[:, None] * e) ** 2, axis=1)

        a, e, cost = amp_cost(d)
        for _ in range(8):
            r = y - a[:, None] * e
            jac = -a[:, None] * b * e
            den = np.sum(jac**2, axis=1)
            step = np.where(den > 0, np.sum(jac * r, axis=1) / np.maximum(den, 1e-30), 0.0)
            cand = np.clip(d + step, lo_d, hi_d)
            ca, ce, ccost = amp_cost(cand)
            take = ccost < cost
            d = np.where(take, cand, d)
            a = np.where(take, ca, a)
            e = np.where(take[:, None], ce, e)
            cost = np.where(take, ccost, cost)
        return d, a

    def _fit_dstar(self, y: np.ndarray, b: np.ndarray, d: np.ndarray, f: np.ndarray, s0: np.ndarray) -> np.ndarray:
        """Bounded least-squares D* with D, f and S0 fixed."""
        lo, hi = LSQ_BOUNDS["dstar"]
        resid0 = y - (s0 * (1.0 - f))[:, None] * np.exp(-np.outer(d, b))
        amp = (s0 * f)[:, None]
        grid = np.geomspace(lo, hi, self.grid)
        best = np.full(y.shape[0], np.inf)
        dstar = np.full(y.shape[0], grid[0])
        for g in grid:
            cost = np.sum((resid0 - amp * np.exp(-g * b)) ** 2, axis=1)
            better = cost < best
            best = np.where(better, cost, best)
            dstar = np.where(better, g, dstar)
        for _ in range(5):
            e = np.exp(-dstar[:, None] * b)
            r = resid0 - amp * e
            jac = -amp * b * e
            den = np.sum(jac**2, axis=1)
            step = np.where(den > 0, np.sum(jac * r, axis=1) / np.maximum(den, 1e-30), 0.0)
            cand = np.clip(dstar + step, lo, hi)
            new_cost = np.sum((resid0 - amp * np.exp(-cand[:, None] * b)) ** 2, axis=1)
            take = new_cost < best
            dstar = np.where(take, cand, dstar)
            best = np.where(take, new_cost, best)
        return dstar


class FullLsqEstimator:
    """Bounded bi-exponential least-squares IVIM fit, vectorised over voxels.

    Fits S0, f, D and D* jointly by a projected Levenberg-Marquardt method
    (Marquardt's diagonal scaling, steps clipped to :data:`LSQ_BOUNDS`, a
    step kept only if it lowers the voxel's cost), started from
    :class:`SegmentedLsqEstimator`. Each voxel has its own damping.

    Parameters
    ----------
    max_iter : int
        Maximum iterations.
    tol : float
        Stop when no voxel's relative cost decrease exceeds this.
    """

    def __init__(self, max_iter: int = 100, tol: float = 1e-10) -> None:
        self.max_iter = max_iter
        self.tol = tol
        self._segmented = SegmentedLsqEstimator()

    def fit(self, signals: np.ndarray, bvalues: np.ndarray) -> IvimParams:
        """Estimate IVIM parameters of ``signals [N, K]`` on ``bvalues [K]``."""
        s, b = merge_repeated_bvalues(signals, bvalues)
        if b.size < 4:
            raise ValueError(f"a full IVIM fit needs at least 4 b-values, got {b.size}")
        d, dstar, f, s0 = self._segmented._fit(s, b)
        scale = np.maximum(np.max(s, axis=1), 1e-12)
        y = s / scale[:, None]
        # Parameters are scaled to similar magnitudes (S0/max, f, D*1e3,
        # D**1e2) so one damping value suits all four.
        unit = np.array([1.0, 1.0, 1e-3, 1e-2])
        lo = np.array([LSQ_BOUNDS["s0_rel"][0], LSQ_BOUNDS["f"][0], LSQ_BOUNDS["d"][0], LSQ_BOUNDS["dstar"][0]]) / unit
        hi = np.array([LSQ_BOUNDS["s0_rel"][1], LSQ_BOUNDS["f"][1], LSQ_BOUNDS["d"][1], LSQ_BOUNDS["dstar"][1]]) / unit
        theta = np.stack([s0 / scale, f, d, dstar], axis=1) / unit
        theta = np.clip(theta, lo, hi)
        theta = self._levenberg_marquardt(y, b, theta, lo, hi, unit)
        p = theta * unit
        return IvimParams.from_arrays(p[:, 2], p[:, 3], p[:, 1], p[:, 0] * scale)

    @staticmethod
    def _model(theta: np.ndarray, b: np.ndarray, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model signal ``[N, K]`` and Jacobian ``[N, K, 4]`` in scaled parameters."""
        s0, f, d, ds = (theta * unit).T
        e1 = np.exp(-ds[:, None] * b)
        e2 = np.exp(-d[:, None] * b)
        model = s0[:, None] * (f[:, None] * e1 + (1.0 - f[:, None]) * e2)
        jac = (
            np.stack(
                [
                    f[:, None] * e1 + (1.0 - f[:, None]) * e2,
                    s0[:, None] * (e1 - e2),
                    -(s0 * (1.0 - f))[:, None] * b * e2,
                    -(s0 * f)[:, None] * b * e1,
                ],
                axis=2,
            )
            * unit
        )
        return model, jac

    def _levenberg_marquardt(
        self,
        y: np.ndarray,
        b: np.ndarray,
        theta: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        unit: np.ndarray,
    ) -> np.ndarray:
        model, jac = self._model(theta, b, unit)
        r = y - model
        cost = np.sum(r**2, axis=1)
        lam = np.full(y.shape[0], 1e-3)
        eye = np.eye(4)
        stall = 0
        for _ in range(self.max_iter):
            jtj = np.einsum("nki,nkj->nij", jac, jac)
            g = np.einsum("nki,nk->ni", jac, r)
            diag = np.einsum("nii->ni", jtj)
            # Marquardt scaling plus a tiny absolute term: with f = 0 the D*
            # column is zero and the system would otherwise be singular.
            damp = lam[:, None] * (diag + 1e-9)
            a = jtj + damp[:, :, None] * eye
            step = np.linalg.solve(a, g[:, :, None])[:, :, 0]
            cand = np.clip(theta + step, lo, hi)
            cmodel, cjac = self._model(cand, b, unit)
            cr = y - cmodel
            ccost = np.sum(cr**2, axis=1)
            better = ccost < cost
            gain = np.where(better, (cost - ccost) / np.maximum(cost, 1e-30), 0.0)
            theta = np.where(better[:, None], cand, theta)
            r = np.where(better[:, None], cr, r)
            jac = np.where(better[:, None, None], cjac, jac)
            cost = np.where(better, ccost, cost)
            lam = np.clip(np.where(better, lam / 3.0, lam * 4.0), 1e-9, 1e9)
            # A rejected step raises the damping and may succeed next time,
            # so stop only after several iterations without real progress.
            stall = 0 if np.any(gain > self.tol) else stall + 1
            if stall >= 5:
                break
        return theta


def select_method(
    name: IvimMethod | str, session: "onnxruntime.InferenceSession | None" = None, batch: int = NET_BATCH
) -> IvimEstimator:
    """Return the estimator called ``name``.

    Parameters
    ----------
    name : IvimMethod or str
        ``"net"``, ``"lsq-segmented"`` or ``"lsq-full"``.
    session : onnxruntime.InferenceSession, optional
        Needed for ``"net"``.
    batch : int
        Voxels per network run (``"net"`` only).

    Returns
    -------
    IvimEstimator
        The estimator.

    Raises
    ------
    ValueError
        For an unknown name, or ``"net"`` without a session.
    """
    if name not in METHODS:
        known = ", ".join(METHODS)
        raise ValueError(f"unknown IVIM method {name!r}; expected one of: {known}")
    if name == "net":
        if session is None:
            raise ValueError("the 'net' IVIM method needs an onnxruntime session")
        return IvimNetEstimator(session, batch=batch)
    if name == "lsq-segmented":
        return SegmentedLsqEstimator()
    return FullLsqEstimator()


#: Keys of the parameter maps :func:`fit_maps` returns, in :class:`IvimParams` order.
MAP_KEYS: tuple[str, ...] = ("d", "dstar", "f", "s0")
#: Keys of the standard-deviation maps :func:`fit_maps` adds when the estimator gives them.
SD_KEYS: tuple[str, ...] = ("d_sd", "dstar_sd", "f_sd")


def fit_maps(
    volume: DwiVolume, mask: np.ndarray, method: IvimMethod, ctx: RunContext, uncertainty: bool = True
) -> dict[str, np.ndarray]:
    """Fit every voxel inside ``mask`` and return one map per parameter (and per standard deviation).

    Parameters
    ----------
    volume : DwiVolume
        Trace-weighted signals ``[slices, b, rows, cols]`` and their b-values.
    mask : numpy.ndarray
        ``[slices, rows, cols]``, True where a voxel is fitted.
    method : IvimMethod
        The estimator; ``"net"`` runs ``ctx.sessions["ivim-net"]`` in batches
        of ``ctx.batch_size("ivim-net", NET_BATCH)`` voxels.
    ctx : RunContext
        Sessions, batch sizes and the job's logger.
    uncertainty : bool
        Also return the :data:`SD_KEYS` maps, if the estimator gives them
        (the network does, the least-squares fits do not).

    Returns
    -------
    dict of str to numpy.ndarray
        :data:`MAP_KEYS` (and possibly :data:`SD_KEYS`) -> float32
        ``[slices, rows, cols]``. Background and voxels the estimator could
        not fit (NaN or infinite estimates) are 0, and negative estimates are
        clipped to 0, so every map is a valid non-negative quantity for the
        DICOM writers.

    Raises
    ------
    InputError
        If the protocol is outside what the method supports (for example
        more than 20 b-values for the network): rerunning cannot help.
    """
    z, k, rows, cols = volume.signals.shape
    voxels = volume.signals.transpose(0, 2, 3, 1)[mask]  # [N, K]
    ctx.log.info("fitting %d voxels on %d b-values with %s", voxels.shape[0], k, method)
    params: IvimParams | None = None
    if voxels.shape[0]:
        try:
            estimator = select_method(method, ctx.sessions.get(MODEL), batch=ctx.batch_size(MODEL, NET_BATCH))
            params = estimator.fit(voxels.astype(np.float32), volume.bvalues)
        except ValueError as exc:  # protocol outside what the method supports
            raise InputError(str(exc)) from None
    # Which maps exist must not depend on whether any voxel was fitted.
    keys = MAP_KEYS + (SD_KEYS if uncertainty and method == "net" else ())
    maps = {key: np.zeros((z, rows, cols), np.float32) for key in keys}
    if params is not None:
        for key in keys:
            values = np.nan_to_num(getattr(params, key), nan=0.0, posinf=0.0, neginf=0.0)
            maps[key][mask] = np.maximum(values, 0.0)
    return maps


def method_description(method: IvimMethod, model_versions: Mapping[str, str]) -> str:
    """How the maps were made, for Series and Content Descriptions: the method, and the model version for "net"."""
    if method == "net":
        return f"{method} {MODEL} {model_versions.get(MODEL, '?')}"
    return method
