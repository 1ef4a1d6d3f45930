"""``fit_model``: one entry point and one result type for every model."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from petbind.core.device import to_numpy
from petbind.quant.models._core import (
    STATUS_BOUND_HIT,
    STATUS_NAMES,
    STATUS_OK,
    KineticFrames,
    conv_per_target,
    make_weights,
    validate_reference,
    warn_status,
)
from petbind.quant.models.registry import MODELS, get_model
from petbind.quant.models.srtm import SRTM_LOWER, SRTM_UPPER, fit_srtm_nls

logger = logging.getLogger("petbind.quant.models")

__all__ = ["MODELS", "UNITS", "KineticResult", "fit_model", "theta3_grid", "srtm_jacobian"]

UNITS = {
    "bp_nd": "1",
    "dvr": "1",
    "r1": "1",
    "k2_per_min": "1/min",
    "k2prime_per_min": "1/min",
    "k2a_per_min": "1/min",
    "intercept_min": "min",
    "fitted": "Bq/mL",
    "rss": "(Bq/mL)^2 (weighted; Logan: min^2 in plot coordinates)",
    "tstar_min": "min",
    "theta3_grid_per_min": "1/min",
}


@dataclasses.dataclass
class KineticResult:
    """Result of :func:`fit_model`; the same fields for every model.

    Attributes
    ----------
    model : str
        One of :data:`MODELS`.
    parameters : dict of str -> ndarray (n_targets,)
        Always ``bp_nd``, ``r1``, ``k2_per_min`` (1/min) and
        ``k2prime_per_min`` (1/min); NaN where the model does not give one
        (``r1``/``k2_per_min`` for Logan) and for failed targets.  Models may
        add more (``k2a_per_min``, Logan ``dvr`` and ``intercept_min``).
    standard_errors : dict of str -> ndarray (n_targets,)
        Same keys; NaN when not available (fixed parameters, failed
        targets, every Logan parameter).  SRTM: from the solver Jacobian;
        BF-SRTM, SRTM2, MRTM, MRTM2: from the Jacobian of the SRTM
        operational equation at the estimate (asymptotic, ``s^2 (J^T W J)^-1``).
    fitted : ndarray (n_frames, n_targets)
        Model TAC in Bq/mL (frame means); NaN for Logan and failed targets.
    weights : ndarray (n_frames,)
        Frame weights used (1/variance, relative, mean 1).
    status : ndarray of int8 (n_targets,)
        Codes in ``status_names``: 0 ok, 1 bound hit (value kept), 2 fit
        failed, 3 non-finite input, 5 non-positive data (Logan).
    status_names : dict of int -> str
    bound_hit : ndarray of bool (n_targets,)
    info : dict
        ``tstar_min``, ``k2prime_per_min`` and ``k2prime_source``,
        ``theta3_grid_per_min``, ``weights`` (scheme), ``n_frames_used``,
        ``units``.
    rss : ndarray (n_targets,)
        Weighted residual sum of squares (Logan: in plot coordinates).
    """

    model: str
    parameters: dict
    standard_errors: dict
    fitted: np.ndarray
    weights: np.ndarray
    status: np.ndarray
    status_names: dict
    bound_hit: np.ndarray
    info: dict
    rss: np.ndarray = None

    @property
    def n_targets(self):
        return int(self.status.size)


def theta3_grid(theta3_min_per_min=0.01, theta3_max_per_min=1.0, num_basis=100):
    """Log-spaced ``theta3`` (= ``k2a``) grid in 1/min for the basis functions."""
    lo, hi = float(theta3_min_per_min), float(theta3_max_per_min)
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        raise ValueError(
            f"theta3_min_per_min/theta3_max_per_min: expected 0 < min < max (1/min); got {lo!r}, {hi!r}"
        )
    n = int(num_basis)
    if n != num_basis or n < 3:
        raise ValueError(f"num_basis: expected an integer >= 3; got {num_basis!r}")
    return np.geomspace(lo, hi, n)


def _check_options(model, options, extra=()):
    allowed = get_model(model).options + tuple(extra)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{model}: unknown option(s) {unknown}; valid options are {sorted(allowed)}")


def _check_model(model):
    get_model(model)


def resolve_tstar(model, frames, tstar_min, w):
    """t* in minutes: given, or 0 for MRTM/MRTM2 (valid from injection when
    the target obeys SRTM), or one third of the scan for Logan."""
    spec = get_model(model)
    if not spec.uses_tstar:
        if tstar_min is not None:
            uses = [m for m in MODELS if get_model(m).uses_tstar]
            raise ValueError(f"tstar_min: {model} uses every frame; tstar_min applies only to {tuple(uses)}")
        return None
    if tstar_min is None:
        tstar_min = spec.default_tstar_fraction * frames.end_min[-1]
    t = float(tstar_min)
    if not (np.isfinite(t) and t >= 0):
        raise ValueError(f"tstar_min: expected minutes >= 0; got {tstar_min!r}")
    n_par = spec.n_params
    n_used = int(np.count_nonzero((frames.mid_min >= t) & (w > 0)))
    if n_used < n_par + 1:
        raise ValueError(
            f"tstar_min={t} min leaves {n_used} weighted frames (mid-time >= t*) for {model}; "
            f"need at least {n_par + 1}; the last frame mid-time is {frames.mid_min[-1]:.2f} min"
        )
    return t


def _grid_from_options(options):
    return theta3_grid(
        options.get("theta3_min_per_min", 0.01),
        options.get("theta3_max_per_min", 1.0),
        options.get("num_basis", 100),
    )


def first_pass_k2prime(frames, ref, w, Y, xp, grid, refine=True):
    """``k2' = k2/R1`` from BF-SRTM: median over targets that fit (status ok)
    with ``BP_ND > 0`` and ``R1 > 0`` (Wu & Carson 2002 use an SRTM first
    pass over high-binding regions the same way).  Returns (k2', n_used)."""
    out = run_batch("bfsrtm", frames, ref, w, Y, xp, None, None, grid, refine)
    p = {k: to_numpy(v) for k, v in out["params"].items()}
    st = to_numpy(out["status"])
    kp = p["k2prime_per_min"]
    ok = (st == STATUS_OK) & np.isfinite(kp) & (p["bp_nd"] > 0) & (p["r1"] > 0) & (kp > 0)
    if not np.any(ok):
        raise ValueError(
            "k2prime_per_min=None: the BF-SRTM first pass found no target with status ok, BP_ND > 0 and "
            "R1 > 0 to estimate k2'; pass k2prime_per_min explicitly"
        )
    return float(np.median(kp[ok])), int(np.count_nonzero(ok))


def resolve_k2prime(model, k2prime_per_min):
    if not get_model(model).uses_k2prime:
        if k2prime_per_min is not None:
            uses = tuple(m for m in MODELS if get_model(m).uses_k2prime)
            raise ValueError(f"k2prime_per_min: {model} estimates k2' itself; a fixed k2' applies only to {uses}")
        return None
    if k2prime_per_min is None:
        return None
    k = float(k2prime_per_min)
    if not (np.isfinite(k) and k > 0):
        raise ValueError(f"k2prime_per_min: expected a positive rate in 1/min; got {k2prime_per_min!r}")
    return k


def _used_weights(frames, w, tstar):
    """Weights with frames before t* set to 0."""
    return w if tstar is None else np.where(frames.mid_min >= tstar, w, 0.0)


def run_batch(model, frames, ref, w, Y, xp, tstar, k2p, grid, refine):
    """Dispatch to the batched implementation (not SRTM-NLS)."""
    # Failed rows divide by zero on the way to NaN; status reports them.
    if xp is np:
        with np.errstate(divide="ignore", invalid="ignore"):
            return _run_batch(model, frames, ref, w, Y, xp, tstar, k2p, grid, refine)
    return _run_batch(model, frames, ref, w, Y, xp, tstar, k2p, grid, refine)


def _run_batch(model, frames, ref, w, Y, xp, tstar, k2p, grid, refine):
    spec = get_model(model)
    if spec.batch is None:
        raise ValueError(f"model {model!r} has no batched implementation")
    return spec.batch(frames, ref, w, Y, xp, **spec.settings(theta3=grid, refine=refine, tstar_min=tstar,
                                                             k2prime=k2p))


def srtm_jacobian(frames, ref, r1, k2_per_min, bp_nd):
    """Analytic Jacobian of the frame-mean SRTM output for many targets.

    Returns ndarray (n_targets, n_frames, 3): derivatives with respect to
    ``(R1, k2, BP_ND)``.  With ``A = k2 - R1 k2a`` and ``B = C_R (x)
    exp(-k2a t)``: ``df/dR1 = C_R - k2a B``, ``df/dk2 = B + (A dB/dk2a - R1 B)
    / (1+BP)``, ``df/dBP = -(A dB/dk2a - R1 B) k2a / (1+BP)``; ``dB/dk2a`` by
    central differences of the exact frame-mean convolution.
    """
    k2a = k2_per_min / (1.0 + bp_nd)
    h = 1e-5 * k2a
    B = conv_per_target(frames, ref, k2a, np)
    dB = (conv_per_target(frames, ref, k2a + h, np) - conv_per_target(frames, ref, k2a - h, np)) / (2 * h)[:, None]
    A = k2_per_min - r1 * k2a
    core = (A[:, None] * dB - r1[:, None] * B) / (1.0 + bp_nd)[:, None]
    j_r1 = ref[None, :] - k2a[:, None] * B
    j_k2 = B + core
    j_bp = -core * k2a[:, None]
    return np.stack([j_r1, j_k2, j_bp], axis=2)


def _jacobian_se(model, frames, ref, wt, out, k2p):
    """Standard errors from the Jacobian of the SRTM operational equation at
    the estimate, ``cov = s^2 (J^T W J)^-1``, ``s^2 = RSS_w / (n - p)``.

    BF-SRTM and MRTM give (R1, k2, BP_ND); SRTM2 and MRTM2 give (R1, BP_ND)
    with ``k2 = R1 k2'``.  For MRTM/MRTM2 this is the asymptotic error of
    the SRTM estimate at the same parameters: ordinary least-squares errors
    of the linear form treat the noisy running integral of ``C_T`` as exact
    and came out about three times too small in Monte Carlo checks.  Only
    frames with positive weight (after t*) enter.  Batched over targets.
    """
    p = out["params"]
    n_used = int(np.count_nonzero(wt > 0))
    n_par = get_model(model).n_params
    three = n_par == 3
    ok = np.isfinite(p["bp_nd"]) & (p["bp_nd"] > -1) & np.isfinite(out["rss"]) & (p["k2_per_min"] > 0)
    if not np.any(ok) or n_used <= n_par:
        return
    r1, k2, bp = p["r1"][ok], p["k2_per_min"][ok], p["bp_nd"][ok]
    J = srtm_jacobian(frames, ref, r1, k2, bp)
    if not three:
        J = np.stack([J[:, :, 0] + k2p * J[:, :, 1], J[:, :, 2]], axis=2)
    J = J * np.sqrt(wt)[None, :, None]
    G = np.einsum("tfi,tfj->tij", J, J)
    cov = np.full(G.shape, np.nan)
    for i in range(G.shape[0]):  # 3x3 inverses; a singular one must not poison the rest
        try:
            cov[i] = np.linalg.inv(G[i])
        except np.linalg.LinAlgError:
            pass
    cov *= (out["rss"][ok] / (n_used - n_par))[:, None, None]
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    idx = np.nonzero(ok)[0]
    if three:
        out["se"]["r1"][idx], out["se"]["k2_per_min"][idx], out["se"]["bp_nd"][idx] = se.T
        g = np.stack([-k2 / r1**2, 1.0 / r1, np.zeros_like(r1)], axis=1)  # d(k2/R1)
        with np.errstate(invalid="ignore"):
            out["se"]["k2prime_per_min"][idx] = np.sqrt(np.einsum("ti,tij,tj->t", g, cov, g))
    else:
        out["se"]["r1"][idx], out["se"]["bp_nd"][idx] = se.T
        out["se"]["k2_per_min"][idx] = se[:, 0] * k2p


def _as_targets(target_tacs, n_frames):
    Y = np.asarray(to_numpy(target_tacs), dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != n_frames:
        raise ValueError(
            f"target_tacs: expected shape ({n_frames},) or ({n_frames}, n_targets) (frames first); got {Y.shape}"
        )
    if Y.shape[1] == 0:
        raise ValueError("target_tacs: no targets (n_targets = 0)")
    return np.ascontiguousarray(Y.T)


def fit_model(
    model,
    frame_start_s,
    frame_end_s,
    reference_tac,
    target_tacs,
    *,
    weights="none",
    tstar_min=None,
    k2prime_per_min=None,
    half_life_min=None,
    **options,
):
    """Fit a reference-tissue model to one or more target TACs.

    Parameters
    ----------
    model : {"srtm", "bfsrtm", "srtm2", "mrtm", "mrtm2", "logan"}
    frame_start_s, frame_end_s : array_like (n_frames,)
        Frame times in seconds from injection; sorted, non-overlapping.
    reference_tac : array_like (n_frames,)
        Reference-region TAC, Bq/mL (decay corrected), finite.
    target_tacs : array_like (n_frames,) or (n_frames, n_targets)
        Target TACs in Bq/mL.  A target with NaN/inf gets status 3 and NaN.
    weights : {"none", "duration", "counts"} or array_like (n_frames,)
        Frame weights (1/variance); see :func:`petbind.quant.models.make_weights`.
    tstar_min : float, optional
        MRTM/MRTM2/Logan: frames with mid-time >= t* (min) enter the fit.
        Default 0 for MRTM/MRTM2, one third of the scan for Logan.  Refused
        for the other models.
    k2prime_per_min : float, optional
        SRTM2/MRTM2/Logan: fixed reference efflux rate ``k2'`` in 1/min.
        ``None``: BF-SRTM first pass, median ``k2/R1`` over targets with
        status ok and ``BP_ND > 0``.  Refused for the other models.
    half_life_min : float, optional
        Isotope half-life in minutes, required for ``weights="counts"``.
    **options
        ``theta3_min_per_min`` (0.01), ``theta3_max_per_min`` (1.0),
        ``num_basis`` (100), ``refine`` (True) for the basis-function grids
        (BF-SRTM, SRTM2 and every first pass; SRTM uses BF-SRTM as start);
        ``lower``/``upper`` (3 values each: r1, k2_per_min, bp_nd) and
        ``max_nfev`` for SRTM.

    Returns
    -------
    KineticResult

    Raises
    ------
    ValueError
        Unknown model, bad frame timing, reference TAC or target shape, bad
        weights, a t* that leaves too few frames, no usable first pass.
    TypeError
        Unknown option for the model.

    Notes
    -----
    Models (``C_R`` reference, ``C_T`` target, ``(x)`` convolution,
    ``k2a = k2/(1+BP_ND)``, ``k2' = k2/R1``):

    - ``srtm``: ``C_T = R1 C_R + (k2 - R1 k2a) C_R (x) e^{-k2a t}``, weighted
      NLS with bounds (Lammertsma & Hume 1996).
    - ``bfsrtm``: the same equation, linear in ``(R1, k2 - R1 k2a)`` for each
      ``k2a`` on a log grid (Gunn et al. 1997).
    - ``srtm2``: SRTM with ``k2 = R1 k2'`` fixed (Wu & Carson 2002).
    - ``mrtm``: ``C_T = g1 int C_R + g2 int C_T + g3 C_R``,
      ``BP_ND = -(g1/g2 + 1)`` (Ichise et al. 2003).
    - ``mrtm2``: ``C_T = g1 (int C_R + C_R/k2') + g2 int C_T`` (Ichise 2003).
    - ``logan``: ``int C_T / C_T = DVR (int C_R + C_R/k2') / C_T + b``,
      ``BP_ND = DVR - 1`` (Logan et al. 1996).

    Every model sees frame means; convolutions and running integrals are
    exact frame means of the piecewise-linear interpolant of the TACs.
    Failed targets are NaN with a status code and one warning with counts.

    References
    ----------
    Lammertsma AA, Hume SP. NeuroImage. 1996;4:153-158.
    Gunn RN, Lammertsma AA, Hume SP, Cunningham VJ. NeuroImage. 1997;6:279-287.
    Wu Y, Carson RE. J Cereb Blood Flow Metab. 2002;22:1440-1452.
    Ichise M, Liow JS, Lu JQ, et al. J Cereb Blood Flow Metab. 2003;23:1096-1112.
    Logan J, Fowler JS, Volkow ND, et al. J Cereb Blood Flow Metab. 1996;16:834-840.

    Examples
    --------
    >>> import numpy as np
    >>> from petbind.quant.models import fit_model, srtm_forward
    >>> t0 = np.arange(0, 5400, 300.0)
    >>> ref = 1e4 * (1 - np.exp(-(t0 + 150) / 200)) * np.exp(-(t0 + 150) / 3000)
    >>> tac = srtm_forward(t0, t0 + 300, ref, 1.0, 0.3, 1.5)
    >>> res = fit_model("mrtm", t0, t0 + 300, ref, tac)
    >>> bool(abs(res.parameters["bp_nd"][0] - 1.5) < 0.01)
    True
    """
    _check_model(model)
    _check_options(model, options)
    frames = KineticFrames(frame_start_s, frame_end_s)
    ref = validate_reference(reference_tac, frames)
    Y = _as_targets(target_tacs, frames.n)
    w = make_weights(weights, frames, ref, half_life_min)
    tstar = resolve_tstar(model, frames, tstar_min, w)
    k2p = resolve_k2prime(model, k2prime_per_min)
    spec = get_model(model)
    grid = _grid_from_options(options) if spec.uses_grid else None
    refine = bool(options.get("refine", True))
    info = {
        "model": model,
        "tstar_min": tstar,
        "k2prime_per_min": k2p,
        "k2prime_source": "given" if k2p is not None else None,
        "theta3_grid_per_min": None if grid is None else grid.tolist(),
        "weights": weights if isinstance(weights, str) else "array",
        "units": dict(UNITS),
    }
    if spec.uses_k2prime and k2p is None:
        k2p, n_fp = first_pass_k2prime(frames, ref, w, Y, np, grid, refine)
        info["k2prime_per_min"] = k2p
        info["k2prime_source"] = f"bfsrtm first pass: median k2/R1 over {n_fp} targets with BP_ND > 0"
        logger.info("%s: k2' = %.5g 1/min from BF-SRTM first pass (%d targets)", model, k2p, n_fp)
    if spec.batch is None:  # nonlinear SRTM: one host fit per target, BF-SRTM start values
        start_out = run_batch("bfsrtm", frames, ref, w, Y, np, None, None, grid, refine)
        sp = start_out["params"]
        start = np.stack([sp["r1"], sp["k2_per_min"], sp["bp_nd"]], axis=1)
        out = fit_srtm_nls(
            frames,
            ref,
            w,
            Y,
            start,
            options.get("lower", SRTM_LOWER),
            options.get("upper", SRTM_UPPER),
            options.get("max_nfev"),
        )
        info["lower"] = list(map(float, options.get("lower", SRTM_LOWER)))
        info["upper"] = list(map(float, options.get("upper", SRTM_UPPER)))
        bound = out["bound_hit"]
    else:
        out = run_batch(model, frames, ref, w, Y, np, tstar, k2p, grid, refine)
        out["params"] = {k: np.array(v, dtype=np.float64) for k, v in out["params"].items()}
        out["se"] = {k: np.array(v, dtype=np.float64) for k, v in out["se"].items()}
        if spec.jacobian_se:
            _jacobian_se(model, frames, ref, _used_weights(frames, w, tstar), out, k2p)
        bound = out["status"] == STATUS_BOUND_HIT
    wt = _used_weights(frames, w, tstar)
    info["n_frames_used"] = int(np.count_nonzero(wt > 0))
    status = np.asarray(out["status"], dtype=np.int8)
    warn_status(model, status)
    return KineticResult(
        model=model,
        parameters={k: np.asarray(v, dtype=np.float64) for k, v in out["params"].items()},
        standard_errors={k: np.asarray(v, dtype=np.float64) for k, v in out["se"].items()},
        fitted=np.ascontiguousarray(np.asarray(out["fitted"]).T),
        weights=w,
        status=status,
        status_names=dict(STATUS_NAMES),
        bound_hit=np.asarray(bound, dtype=bool),
        info=info,
        rss=np.asarray(out["rss"], dtype=np.float64),
    )
