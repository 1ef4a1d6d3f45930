"""Batched (all targets at once) fits written once against ``xp``.

Every function takes the target TACs as an ``xp`` array ``Y`` of shape
``(n_targets, n_frames)`` (one row per region or voxel) and returns a dict
with ``params`` (name -> xp array (n_targets,)), ``se`` (same names, NaN when
not available), ``fitted`` (xp (n_targets, n_frames) or ``None``), ``rss``
(weighted residual sum of squares) and ``status`` (xp int array).  There is
no loop over targets: regional fits and parametric maps are the same code.

Standard errors are not computed here (NaN): ordinary least-squares errors of
MRTM/MRTM2/Logan treat the noisy running integral of ``C_T`` as an exact
regressor and underestimate the true spread about threefold (checked by
Monte Carlo); :func:`petbind.quant.models.fit_model` adds Jacobian-based errors for
regional fits instead.
"""

from __future__ import annotations

import numpy as np

from petbind.quant.models._core import (
    STATUS_BOUND_HIT,
    STATUS_FIT_FAILED,
    STATUS_NONFINITE_INPUT,
    STATUS_NONPOSITIVE_DATA,
    STATUS_OK,
    conv_matrices,
)

# Relative determinant below which a (column-scaled) normal matrix counts as singular.
_DET_TOL = 1e-12


def _prepare(Y, xp):
    """Zero non-finite rows (so the algebra stays finite) and flag them."""
    finite = xp.all(xp.isfinite(Y), axis=1)
    status = xp.where(finite, STATUS_OK, STATUS_NONFINITE_INPUT).astype(xp.int8)
    Y = xp.where(finite[:, None], Y, 0.0)
    return Y, finite, status


def _finish(xp, params, se, fitted, rss, status, finite):
    bad = ~finite | (status == STATUS_FIT_FAILED) | (status == STATUS_NONPOSITIVE_DATA)
    for d in (params, se):
        for k in d:
            d[k] = xp.where(bad, xp.nan, d[k])
    if fitted is not None:
        fitted = xp.where(bad[:, None], xp.nan, fitted)
    rss = xp.where(bad, xp.nan, rss)
    return {"params": params, "se": se, "fitted": fitted, "rss": rss, "status": status}


def _nan(xp, n):
    return xp.full(n, xp.nan)


def _parabola_vertex(x0, x1, x2, y0, y1, y2, xp):
    """Abscissa of the parabola through three points, clamped to [x0, x2]."""
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    ok = xp.abs(den) > 0
    xv = x1 - 0.5 * num / xp.where(ok, den, 1.0)
    xv = xp.where(ok, xv, x1)
    return xp.clip(xv, x0, x2)


def _grid_search(expl, theta3, xp):
    """Best basis per target (``expl``: explained sum of squares up to a
    per-target constant; maximum = minimum RSS)
    and the parabolic vertex of ``RSS(log theta3)`` through it and its two
    neighbours.  Returns ``j``, ``edge`` flag, the clipped centre ``jc`` and
    Lagrange weights ``(l0, l1, l2)`` of the vertex on nodes ``jc-1..jc+1``."""
    nb = theta3.size
    j = xp.argmax(expl, axis=1)
    edge = (j == 0) | (j == nb - 1)
    jc = xp.clip(j, 1, nb - 2)
    u = xp.asarray(np.log(theta3))
    # RSS = yy - explained: the yy term is common and cancels in the vertex.
    r = [-xp.take_along_axis(expl, (jc + d)[:, None], axis=1)[:, 0] for d in (-1, 0, 1)]
    u0, u1, u2 = u[jc - 1], u[jc], u[jc + 1]
    uv = _parabola_vertex(u0, u1, u2, r[0], r[1], r[2], xp)
    lag = (
        (uv - u1) * (uv - u2) / ((u0 - u1) * (u0 - u2)),
        (uv - u0) * (uv - u2) / ((u1 - u0) * (u1 - u2)),
        (uv - u0) * (uv - u1) / ((u2 - u0) * (u2 - u1)),
    )
    return j, edge, jc, xp.exp(uv), lag


def _interp_rows(table, jc, lag):
    """Quadratic Lagrange interpolation (in log theta3) of basis rows."""
    return lag[0][:, None] * table[jc - 1] + lag[1][:, None] * table[jc] + lag[2][:, None] * table[jc + 1]


def _bases(frames, ref, theta3):
    """Basis functions ``B_j = C_R (x) exp(-theta3_j t)`` (frame means), (nb, nf)."""
    return np.einsum("bij,j->bi", conv_matrices(frames, theta3), ref)


# ----------------------------------------------------------------- BF-SRTM
def bfsrtm(frames, ref, w, Y, xp, theta3, refine=True):
    """Basis-function SRTM (Gunn et al. 1997) for every row of ``Y``.

    Operational equation (Lammertsma & Hume 1996; Gunn et al. 1997):
    ``C_T = theta1 C_R + theta2 B(theta3)``, ``B = C_R (x) exp(-theta3 t)``,
    with ``theta1 = R1``, ``theta2 = k2 - R1 k2a``, ``theta3 = k2a = k2/(1+BP)``.
    For each basis the 2-parameter weighted least squares is solved for all
    targets at once from the normal equations; the basis with minimum RSS
    wins.  ``refine`` then takes the vertex of a parabola through
    ``RSS(log theta3)`` at the best basis and its neighbours, interpolates
    the basis there (quadratic Lagrange in ``log theta3``; the basis is
    smooth in ``theta3``, interpolation error ~1e-5 relative on a 100-basis
    grid) and keeps the refit where it lowers the RSS.  This removes the
    grid quantisation of ``theta3`` without a per-target convolution.
    """
    Y, finite, status = _prepare(Y, xp)
    nt = Y.shape[0]
    theta3 = np.asarray(theta3, dtype=np.float64)
    B = _bases(frames, ref, theta3)  # (nb, nf)
    wr = w * ref
    g11 = float(wr @ ref)
    g12 = B @ wr
    g22 = (B * B) @ w
    det = g11 * g22 - g12**2
    x_B, x_w, x_ref, x_wr = xp.asarray(B), xp.asarray(w), xp.asarray(ref), xp.asarray(wr)
    a = Y @ x_wr
    # Each basis orthogonalised (weighted) against C_R and normalised:
    # Bt_j = (B_j - (g12_j/g11) C_R) / |.|_w.  Then RSS_j = yy - a^2/g11 - c_j^2
    # with c_j = <Y, Bt_j>_w, so one matrix product and a square rank all bases.
    Bt = B - (g12 / g11)[:, None] * ref[None, :]
    Bt /= np.sqrt((Bt * Bt) @ w)[:, None]
    c = Y @ xp.asarray(Bt * w).T  # (nt, nb)
    c *= c
    j, edge, jc, th3_ref, lag = _grid_search(c, theta3, xp)
    del c
    bj = xp.sum(Y * x_B[j] * x_w, axis=1)
    g12x, g22x, detx = xp.asarray(g12)[j], xp.asarray(g22)[j], xp.asarray(det)[j]
    t1 = (g22x * a - g12x * bj) / detx
    t2 = (g11 * bj - g12x * a) / detx
    t3 = xp.asarray(theta3)[j]
    Bsel = x_B[j]
    fitted = t1[:, None] * x_ref + t2[:, None] * Bsel
    rss = ((Y - fitted) ** 2) @ x_w
    if refine and theta3.size >= 3:
        Bs = _interp_rows(x_B, jc, lag)
        G12 = Bs @ x_wr
        G22 = (Bs * Bs) @ x_w
        bs = xp.sum(Bs * Y * x_w, axis=1)
        D = g11 * G22 - G12**2
        okD = D > _DET_TOL * g11 * G22
        D = xp.where(okD, D, 1.0)
        s1 = (G22 * a - G12 * bs) / D
        s2 = (g11 * bs - G12 * a) / D
        # Direct residuals: the normal-equation form cancels near a perfect fit.
        fit_s = s1[:, None] * x_ref + s2[:, None] * Bs
        rss_s = ((Y - fit_s) ** 2) @ x_w
        use = okD & ~edge & (rss_s <= rss)
        t1 = xp.where(use, s1, t1)
        t2 = xp.where(use, s2, t2)
        t3 = xp.where(use, th3_ref, t3)
        fitted = xp.where(use[:, None], fit_s, fitted)
        rss = xp.where(use, rss_s, rss)
    k2 = t2 + t1 * t3
    bp = k2 / t3 - 1.0
    status = xp.where(finite & edge, STATUS_BOUND_HIT, status).astype(xp.int8)
    params = {
        "bp_nd": bp,
        "r1": t1,
        "k2_per_min": k2,
        "k2prime_per_min": k2 / t1,
        "k2a_per_min": t3,
    }
    se = {k: _nan(xp, nt) for k in params}
    return _finish(xp, params, se, fitted, rss, status, finite)


# ------------------------------------------------------------------- SRTM2
def srtm2(frames, ref, w, Y, xp, theta3, k2prime, refine=True):
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


# ------------------------------------------------------- linear: MRTM family
def _included(frames, tstar_min, w, model):
    inc = frames.mid_min >= tstar_min
    wt = np.where(inc, w, 0.0)
    n_used = int(np.count_nonzero(wt > 0))
    return wt, n_used


def mrtm(frames, ref, w, Y, xp, tstar_min):
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


def mrtm2(frames, ref, w, Y, xp, tstar_min, k2prime):
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


def logan(frames, ref, w, Y, xp, tstar_min, k2prime):
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
