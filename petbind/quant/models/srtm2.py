"""SRTM2: SRTM with the reference efflux ``k2'`` fixed, batched basis-function fit."""

from __future__ import annotations

import numpy as np

from petbind.quant.models._batch import _bases, _finish, _grid_search, _interp_rows, _nan, _prepare
from petbind.quant.models._core import STATUS_BOUND_HIT

__all__ = ["srtm2"]


def srtm2(frames, ref, w, Y, xp, *, theta3, k2prime, refine=True):
    """Basis-function SRTM2 (Wu & Carson 2002) with ``k2'`` fixed.

    With ``k2 = R1 k2'`` the SRTM operational equation becomes
    ``C_T = R1 [C_R + (k2' - k2a) C_R (x) exp(-k2a t)]``: one linear
    parameter (R1) per basis ``k2a = theta3``; the basis with minimum RSS wins,
    refined as in :func:`bfsrtm`.  ``BP_ND = k2' R1 / k2a - 1``.
    """
    Y, finite, status = _prepare(Y, xp)
    nt = Y.shape[0]
    theta3 = np.asarray(theta3, dtype=np.float64)
    B = _bases(frames, ref, theta3)
    X = ref[None, :] + (k2prime - theta3)[:, None] * B
    xx = (X * X) @ w
    x_X, x_w, x_ref, x_B = xp.asarray(X), xp.asarray(w), xp.asarray(ref), xp.asarray(B)
    # RSS_j = yy - <Y, X_j>_w^2 / |X_j|_w^2: rank bases by the square of one product.
    c = Y @ xp.asarray(X * w / np.sqrt(xx)[:, None]).T
    c *= c
    j, edge, jc, th3_ref, lag = _grid_search(c, theta3, xp)
    del c
    r1 = xp.sum(Y * x_X[j] * x_w, axis=1) / xp.asarray(xx)[j]
    t3 = xp.asarray(theta3)[j]
    fitted = r1[:, None] * x_X[j]
    rss = ((Y - fitted) ** 2) @ x_w
    if refine and theta3.size >= 3:
        Bs = _interp_rows(x_B, jc, lag)
        Xs = x_ref[None, :] + (k2prime - th3_ref)[:, None] * Bs
        r1s = xp.sum(Xs * Y * x_w, axis=1) / ((Xs * Xs) @ x_w)
        fit_s = r1s[:, None] * Xs
        rss_s = ((Y - fit_s) ** 2) @ x_w
        use = ~edge & (rss_s <= rss)
        r1 = xp.where(use, r1s, r1)
        t3 = xp.where(use, th3_ref, t3)
        fitted = xp.where(use[:, None], fit_s, fitted)
        rss = xp.where(use, rss_s, rss)
    bp = k2prime * r1 / t3 - 1.0
    status = xp.where(finite & edge, STATUS_BOUND_HIT, status).astype(xp.int8)
    params = {
        "bp_nd": bp,
        "r1": r1,
        "k2_per_min": r1 * k2prime,
        "k2prime_per_min": xp.full(nt, float(k2prime)),
        "k2a_per_min": t3,
    }
    se = {k: _nan(xp, nt) for k in params}
    return _finish(xp, params, se, fitted, rss, status, finite)
