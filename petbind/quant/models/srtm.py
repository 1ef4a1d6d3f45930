"""Simplified reference tissue model: frame-integrated forward model and the
per-target weighted nonlinear least-squares fit."""

from __future__ import annotations

import numpy as np
from scipy.optimize import least_squares

from petbind.quant.models._core import (
    STATUS_BOUND_HIT,
    STATUS_FIT_FAILED,
    STATUS_NONFINITE_INPUT,
    STATUS_OK,
    KineticFrames,
    conv_matrices,
    validate_reference,
)

__all__ = ["srtm_forward"]

#: Default bounds of (R1, k2 [1/min], BP_ND) for the nonlinear SRTM fit.
SRTM_LOWER = (1e-3, 1e-4, -0.9)
SRTM_UPPER = (10.0, 10.0, 20.0)


def _srtm_frames(frames, ref, r1, k2_per_min, bp_nd):
    """SRTM frame means for validated inputs (scalars)."""
    k2a = k2_per_min / (1.0 + bp_nd)
    conv = conv_matrices(frames, np.array([k2a]))[0] @ ref
    return r1 * ref + (k2_per_min - r1 * k2a) * conv


def srtm_forward(frame_start_s, frame_end_s, reference_tac, r1, k2_per_min, bp_nd):
    """Frame-mean target TAC predicted by the simplified reference tissue model.

    Parameters
    ----------
    frame_start_s, frame_end_s : array_like (n_frames,)
        Frame start and end times in seconds from injection.
    reference_tac : array_like (n_frames,)
        Reference-region frame means in Bq/mL.
    r1 : float
        ``R1 = K1/K1'`` (unitless).
    k2_per_min : float
        Target efflux rate ``k2`` in 1/min.
    bp_nd : float
        Non-displaceable binding potential (> -1).

    Returns
    -------
    ndarray (n_frames,)
        Target frame means in Bq/mL.

    Raises
    ------
    ValueError
        Bad frame timing or reference TAC, or ``bp_nd <= -1``.

    Notes
    -----
    SRTM operational equation (Lammertsma & Hume 1996):

    ``C_T(t) = R1 C_R(t) + (k2 - R1 k2a) C_R(t) (x) exp(-k2a t)``,
    ``k2a = k2 / (1 + BP_ND)``.

    The first term uses the measured frame means of ``C_R`` (exact); the
    convolution is evaluated analytically for the piecewise-linear
    interpolant of ``C_R`` (zero at injection, through the frame mid-points)
    and averaged over each frame, so uneven frames are handled exactly for
    that interpolant (no mid-frame sampling).

    References
    ----------
    Lammertsma AA, Hume SP. Simplified reference tissue model for PET
    receptor studies. NeuroImage. 1996;4(3):153-158.

    Examples
    --------
    >>> import numpy as np
    >>> t = np.arange(0, 3600, 300.0)
    >>> ref = 1e4 * np.exp(-(t + 150) / 3000)
    >>> srtm_forward(t, t + 300, ref, 1.0, 0.3, 1.5).shape
    (12,)
    """
    frames = KineticFrames(frame_start_s, frame_end_s)
    ref = validate_reference(reference_tac, frames)
    if not bp_nd > -1:
        raise ValueError(f"bp_nd: expected > -1 (k2a = k2/(1+BP_ND) must be positive); got {bp_nd!r}")
    return _srtm_frames(frames, ref, float(r1), float(k2_per_min), float(bp_nd))


def covariance(jac_w, rss, n_used):
    """Parameter covariance ``s^2 (J^T J)^-1`` from the Jacobian of the
    weighted residuals, ``s^2 = RSS_w / (n_used - p)``; NaN if singular."""
    p = jac_w.shape[1]
    if n_used <= p:
        return np.full((p, p), np.nan)
    try:
        inv = np.linalg.inv(jac_w.T @ jac_w)
    except np.linalg.LinAlgError:
        return np.full((p, p), np.nan)
    return inv * (rss / (n_used - p))


def fit_srtm_nls(frames, ref, w, Y, start, lower=SRTM_LOWER, upper=SRTM_UPPER, max_nfev=None):
    """Weighted NLS SRTM fit, one ``scipy.optimize.least_squares`` per target.

    Parameters are ``(R1, k2, BP_ND)`` with box bounds.  Residuals are
    ``sqrt(w_i) (y_i - f_i)`` (``w`` are 1/variance weights).  Standard
    errors come from the Jacobian at the solution.
    """
    nt = Y.shape[0]
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    if lower.shape != (3,) or upper.shape != (3,) or np.any(lower >= upper):
        raise ValueError(
            "lower/upper: expected 3 values each for (r1, k2_per_min, bp_nd) with lower < upper; "
            f"got {lower.tolist()} and {upper.tolist()}"
        )
    if lower[2] <= -1:
        raise ValueError(f"lower: bp_nd bound must be > -1; got {lower[2]!r}")
    sw = np.sqrt(w)
    n_used = int(np.count_nonzero(w > 0))
    names = ("r1", "k2_per_min", "bp_nd")
    est = np.full((nt, 3), np.nan)
    se = np.full((nt, 3), np.nan)
    se_kp = np.full(nt, np.nan)
    fitted = np.full(Y.shape, np.nan)
    rss = np.full(nt, np.nan)
    status = np.full(nt, STATUS_OK, dtype=np.int8)
    bound = np.zeros(nt, dtype=bool)
    width = upper - lower
    for i in range(nt):
        y = Y[i]
        if not np.all(np.isfinite(y)):
            status[i] = STATUS_NONFINITE_INPUT
            continue
        x0 = np.asarray(start[i], dtype=np.float64)
        if not np.all(np.isfinite(x0)):
            x0 = np.array([1.0, 0.3, 1.0])
        x0 = np.clip(x0, lower + 1e-3 * width, upper - 1e-3 * width)

        def fun(p, y=y):
            return sw * (_srtm_frames(frames, ref, p[0], p[1], p[2]) - y)

        try:
            res = least_squares(fun, x0, bounds=(lower, upper), x_scale="jac", max_nfev=max_nfev)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            status[i] = STATUS_FIT_FAILED
            continue
        if not res.success or not np.all(np.isfinite(res.x)):
            status[i] = STATUS_FIT_FAILED
            continue
        est[i] = res.x
        rss[i] = 2.0 * res.cost
        fitted[i] = _srtm_frames(frames, ref, *res.x)
        if np.any(res.active_mask != 0):
            bound[i] = True
            status[i] = STATUS_BOUND_HIT
        cov = covariance(res.jac, rss[i], n_used)
        se[i] = np.sqrt(np.diag(cov))
        g = np.array([-res.x[1] / res.x[0] ** 2, 1.0 / res.x[0], 0.0])  # d(k2/R1)
        se_kp[i] = np.sqrt(g @ cov @ g)
    params = {n: est[:, k] for k, n in enumerate(names)}
    params["k2prime_per_min"] = params["k2_per_min"] / params["r1"]
    params["k2a_per_min"] = params["k2_per_min"] / (1.0 + params["bp_nd"])
    ses = {n: se[:, k] for k, n in enumerate(names)}
    ses["k2prime_per_min"] = se_kp
    ses["k2a_per_min"] = np.full(nt, np.nan)
    return {"params": params, "se": ses, "fitted": fitted, "rss": rss, "status": status, "bound_hit": bound}
