"""Helpers shared by the batched model fits (all targets at once, written once against ``xp``).

Every batched fit (:mod:`.srtm` ``bfsrtm``, :mod:`.srtm2`, :mod:`.mrtm`,
:mod:`.logan`) takes the target TACs as an ``xp`` array ``Y`` of shape
``(n_targets, n_frames)`` (one row per region or voxel) and returns a dict
with ``params`` (name -> xp array (n_targets,)), ``se`` (same names, NaN when
not available), ``fitted`` (xp (n_targets, n_frames) or ``None``), ``rss``
(weighted residual sum of squares) and ``status`` (xp int array).  There is
no loop over targets: regional fits and parametric maps are the same code.

Standard errors are not computed there (NaN): ordinary least-squares errors of
MRTM/MRTM2/Logan treat the noisy running integral of ``C_T`` as an exact
regressor and underestimate the true spread about threefold (checked by
Monte Carlo); :func:`petbind.quant.models.fit_model` adds Jacobian-based errors for
regional fits instead.
"""

from __future__ import annotations

import numpy as np

from petbind.quant.models._core import (
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


def _included(frames, tstar_min, w, model):
    inc = frames.mid_min >= tstar_min
    wt = np.where(inc, w, 0.0)
    n_used = int(np.count_nonzero(wt > 0))
    return wt, n_used
