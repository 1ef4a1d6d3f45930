"""MRTM and MRTM2 (Ichise et al. 2003): linear, batched over targets."""

from __future__ import annotations

import numpy as np

from petbind.quant.models._batch import _DET_TOL, _finish, _included, _nan, _prepare
from petbind.quant.models._core import STATUS_FIT_FAILED

__all__ = ["mrtm", "mrtm2"]


def mrtm(frames, ref, w, Y, xp, *, tstar_min):
    """MRTM (Ichise et al. 2003), 3 parameters, linear.

    Operational equation (integrated SRTM; Ichise et al. 2003, MRTM):
    ``C_T(T) = g1 int_0^T C_R + g2 int_0^T C_T + g3 C_R(T)`` for frames with
    mid-time >= t*, where ``g1 = k2``, ``g2 = -k2a``, ``g3 = R1``, so
    ``BP_ND = -(g1/g2 + 1)`` and ``k2' = g1/g3``.  Integrals are frame means
    of the running integral (see ``_core``).
    """
    Y, finite, status = _prepare(Y, xp)
    nt = Y.shape[0]
    wt, n_used = _included(frames, tstar_min, w, "mrtm")
    M0 = frames.running_integral_matrix
    u1 = M0 @ ref
    u3 = ref
    x_M0 = xp.asarray(M0)
    x_wt = xp.asarray(wt)
    u2 = Y @ x_M0.T  # (nt, nf)
    # Column scaling makes the normal matrix a correlation-like matrix, so one
    # determinant tolerance serves any unit or magnitude.
    s1 = float(np.sqrt(wt @ (u1 * u1)))
    s3 = float(np.sqrt(wt @ (u3 * u3)))
    s2 = xp.sqrt((u2 * u2) @ x_wt)
    s2 = xp.where(s2 > 0, s2, 1.0)
    v1 = xp.asarray(u1 / s1)
    v3 = xp.asarray(u3 / s3)
    v2 = u2 / s2[:, None]
    a13 = float(np.sum(wt * (u1 / s1) * (u3 / s3)))
    a12 = v2 @ (x_wt * v1)
    a23 = v2 @ (x_wt * v3)
    r1_ = Y @ (x_wt * v1)
    r2_ = xp.sum(x_wt * v2 * Y, axis=1)
    r3_ = Y @ (x_wt * v3)
    # Inverse of the symmetric matrix [[1, a12, a13], [a12, 1, a23], [a13, a23, 1]].
    c11 = 1 - a23**2
    c12 = a13 * a23 - a12
    c13 = a12 * a23 - a13
    c22 = 1 - a13**2
    c23 = a12 * a13 - a23
    c33 = 1 - a12**2
    det = c11 + a12 * c12 + a13 * c13
    ok = det > _DET_TOL
    det = xp.where(ok, det, 1.0)
    inv = [[c11, c12, c13], [c12, c22, c23], [c13, c23, c33]]
    inv = [[c / det for c in row] for row in inv]
    rr = (r1_, r2_, r3_)
    cs = [sum(inv[i][k] * rr[k] for k in range(3)) for i in range(3)]
    scale = (s1, s2, s3)
    g1, g2, g3 = (cs[i] / scale[i] for i in range(3))
    fitted = g1[:, None] * xp.asarray(u1) + g2[:, None] * u2 + g3[:, None] * xp.asarray(u3)
    rss = ((Y - fitted) ** 2) @ x_wt
    ok = ok & (g2 < 0)
    g2s = xp.where(g2 != 0, g2, xp.nan)
    g3s = xp.where(g3 != 0, g3, xp.nan)
    bp = -(g1 / g2s) - 1.0
    status = xp.where(finite & ~ok, STATUS_FIT_FAILED, status).astype(xp.int8)
    params = {"bp_nd": bp, "r1": g3, "k2_per_min": g1, "k2prime_per_min": g1 / g3s, "k2a_per_min": -g2}
    se = {k: _nan(xp, nt) for k in params}
    return _finish(xp, params, se, fitted, rss, status, finite)


def _two_column(Y, x_wt, u1, u2, xp):
    """Weighted LS ``Y ~ c1 u1 + c2 u2`` per row; ``u1`` (n_frames,) shared,
    ``u2`` (n_targets, n_frames).  Returns the coefficients and a flag that
    is False where the normal matrix is singular."""
    s1 = xp.sqrt(xp.sum(x_wt * u1 * u1))
    s2 = xp.sqrt((u2 * u2) @ x_wt)
    s2 = xp.where(s2 > 0, s2, 1.0)
    v1 = u1 / s1
    v2 = u2 / s2[:, None]
    a12 = v2 @ (x_wt * v1)
    r1_ = Y @ (x_wt * v1)
    r2_ = xp.sum(x_wt * v2 * Y, axis=1)
    det = 1 - a12**2
    ok = det > _DET_TOL
    det = xp.where(ok, det, 1.0)
    c1 = (r1_ - a12 * r2_) / det / s1
    c2 = (r2_ - a12 * r1_) / det / s2
    return c1, c2, ok


def mrtm2(frames, ref, w, Y, xp, *, tstar_min, k2prime):
    """MRTM2 (Ichise et al. 2003), 2 parameters, ``k2'`` fixed.

    ``C_T(T) = g1 [int_0^T C_R + C_R(T)/k2'] + g2 int_0^T C_T`` for frames
    with mid-time >= t*, with ``g1 = k2 = R1 k2'`` and ``g2 = -k2a``, so
    ``BP_ND = -(g1/g2 + 1)`` and ``R1 = g1/k2'``.
    """
    Y, finite, status = _prepare(Y, xp)
    nt = Y.shape[0]
    wt, n_used = _included(frames, tstar_min, w, "mrtm2")
    M0 = frames.running_integral_matrix
    u1 = xp.asarray(M0 @ ref + ref / k2prime)
    u2 = Y @ xp.asarray(M0).T
    x_wt = xp.asarray(wt)
    g1, g2, ok = _two_column(Y, x_wt, u1, u2, xp)
    fitted = g1[:, None] * u1 + g2[:, None] * u2
    rss = ((Y - fitted) ** 2) @ x_wt
    ok = ok & (g2 < 0)
    g2s = xp.where(g2 != 0, g2, xp.nan)
    bp = -(g1 / g2s) - 1.0
    status = xp.where(finite & ~ok, STATUS_FIT_FAILED, status).astype(xp.int8)
    params = {
        "bp_nd": bp,
        "r1": g1 / k2prime,
        "k2_per_min": g1,
        "k2prime_per_min": xp.full(nt, float(k2prime)),
        "k2a_per_min": -g2,
    }
    se = {k: _nan(xp, nt) for k in params}
    return _finish(xp, params, se, fitted, rss, status, finite)
