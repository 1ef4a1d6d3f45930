"""Logan reference-region graphical analysis, batched over targets."""

from __future__ import annotations

from petbind.quant.models._batch import _DET_TOL, _finish, _included, _nan, _prepare
from petbind.quant.models._core import STATUS_FIT_FAILED, STATUS_NONPOSITIVE_DATA

__all__ = ["logan"]


def logan(frames, ref, w, Y, xp, *, tstar_min, k2prime):
    """Logan reference-region graphical analysis (Logan et al. 1996).

    For frames with mid-time >= t*:
    ``int_0^T C_T / C_T(T) = DVR [int_0^T C_R + C_R(T)/k2'] / C_T(T) + b``;
    ``BP_ND = DVR - 1``.  Weighted linear regression of the plot with the
    frame weights; ``fitted`` (TAC space) is not defined for Logan (NaN).
    """
    Y, finite, status = _prepare(Y, xp)
    nt = Y.shape[0]
    wt, n_used = _included(frames, tstar_min, w, "logan")
    M0 = frames.running_integral_matrix
    x_wt = xp.asarray(wt)
    inc = x_wt > 0
    pos = xp.all((Y > 0) | ~inc[None, :], axis=1)
    Ys = xp.where(Y > 0, Y, 1.0)
    num_x = xp.asarray(M0 @ ref + ref / k2prime)
    xv = num_x[None, :] / Ys
    zv = (Y @ xp.asarray(M0).T) / Ys
    S = xp.sum(x_wt)
    Sx = xv @ x_wt
    Sz = zv @ x_wt
    Sxx = (xv * xv) @ x_wt
    Sxz = (xv * zv) @ x_wt
    D = S * Sxx - Sx**2
    ok = D > _DET_TOL * S * Sxx
    Dn = xp.where(ok, D, 1.0)
    dvr = (S * Sxz - Sx * Sz) / Dn
    icpt = (Sz - dvr * Sx) / S
    res = zv - dvr[:, None] * xv - icpt[:, None]
    rss = (res * res) @ x_wt
    status = xp.where(finite & ~ok, STATUS_FIT_FAILED, status)
    status = xp.where(finite & ok & ~pos, STATUS_NONPOSITIVE_DATA, status).astype(xp.int8)
    params = {
        "bp_nd": dvr - 1.0,
        "dvr": dvr,
        "intercept_min": icpt,
        "r1": _nan(xp, nt),
        "k2_per_min": _nan(xp, nt),
        "k2prime_per_min": xp.full(nt, float(k2prime)),
    }
    se = {k: _nan(xp, nt) for k in params}
    fitted = xp.full(Y.shape, xp.nan)
    return _finish(xp, params, se, fitted, rss, status, finite)
