"""Statistics for baseline vs post-dose binding studies, through ``scipy.stats``.

The tests are those of :mod:`scipy.stats` (``ttest_rel``, ``wilcoxon``,
``ttest_ind(equal_var=False)``, ``permutation_test``,
``false_discovery_control``); this module fixes the choices a study table
needs (two-sided, which Wilcoxon method, exact enumeration when cheap, NaN
handling) and adds what scipy lacks: Hedges' effect sizes, the Holm
adjustment and a voxelwise paired t-map that runs on NumPy or CuPy.

Effect sizes (documented choice)
--------------------------------
* Within a group (paired change ``d = post - baseline``): Cohen's
  :math:`d_z = \\bar d / s_d` and the small-sample corrected Hedges'
  :math:`g_z = J(n-1)\\, d_z`.
* Between groups (difference of changes, group x time interaction): Hedges'
  :math:`g = J(n_a+n_b-2)\\,(\\bar d_a - \\bar d_b)/s_p` with the pooled SD
  :math:`s_p^2 = ((n_a-1)s_a^2 + (n_b-1)s_b^2)/(n_a+n_b-2)`.

with the exact correction :math:`J(\\nu) = \\Gamma(\\nu/2) /
(\\sqrt{\\nu/2}\\,\\Gamma((\\nu-1)/2))` (approximately :math:`1 - 3/(4\\nu-1)`).

References
----------
Hedges LV (1981). Distribution theory for Glass's estimator of effect size
and related estimators. J Educ Stat 6:107-128.
Holm S (1979). A simple sequentially rejective multiple test procedure.
Scand J Stat 6:65-70.
Benjamini Y, Hochberg Y (1995). Controlling the false discovery rate.
J R Stat Soc B 57:289-300.
Phipson B, Smyth GK (2010). Permutation p-values should never be zero.
Stat Appl Genet Mol Biol 9:39.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as _sps

from petbind.core.device import array_module, to_numpy

logger = logging.getLogger(__name__)

__all__ = [
    "PairedResult",
    "WelchResult",
    "hedges_correction",
    "paired_t",
    "paired_test",
    "wilcoxon_signed_rank",
    "welch_t",
    "permutation_test",
    "holm",
    "benjamini_hochberg",
    "paired_t_map",
]

#: Above this many non-zero differences (or with tied ``|d|``) the Wilcoxon
#: test uses the normal approximation (scipy's ``method='auto'`` threshold).
WILCOXON_EXACT_MAX_N = 50


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: NaN/inf values; drop failed fits before testing")
    return arr


def _pairs(baseline, post, what: str):
    b = _as_1d(baseline, "baseline")
    p = _as_1d(post, "post")
    if b.size != p.size:
        raise ValueError(f"{what}: baseline has {b.size} values, post has {p.size}; expected pairs")
    return b, p


def hedges_correction(df) -> np.ndarray:
    """Exact small-sample bias correction :math:`J(\\nu)` of Hedges (1981).

    ``scipy.stats`` has no effect sizes, so this one is written out.

    Parameters
    ----------
    df : float or ndarray
        Degrees of freedom :math:`\\nu > 1`.

    Returns
    -------
    float or ndarray
        :math:`\\Gamma(\\nu/2) / (\\sqrt{\\nu/2}\\,\\Gamma((\\nu-1)/2))`; NaN for
        :math:`\\nu \\le 1`.
    """
    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.exp(special.gammaln(df / 2) - 0.5 * np.log(df / 2) - special.gammaln((df - 1) / 2))
    return np.where(df > 1, out, np.nan)


@dataclass
class PairedResult:
    """Paired (within-group) comparison of ``post - baseline``.

    Attributes
    ----------
    n : int
        Number of pairs.
    mean_diff, sd_diff : float
        Mean and SD (ddof=1) of the differences.
    ci_low, ci_high : float
        Confidence interval of the mean difference (t distribution).
    t, df, p_t : float
        Paired t statistic, degrees of freedom, two-sided p.
    w, p_wilcoxon : float
        Wilcoxon signed-rank statistic ``min(W+, W-)`` and two-sided p.
    wilcoxon_method : str
        ``"exact"`` or ``"normal"``.
    cohens_dz, hedges_gz : float
        Effect sizes (see module docstring).
    """

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p_t: float
    w: float
    p_wilcoxon: float
    wilcoxon_method: str
    cohens_dz: float
    hedges_gz: float


@dataclass
class WelchResult:
    """Welch two-sample comparison of means ``a - b``.

    Attributes
    ----------
    n_a, n_b : int
    mean_a, mean_b, diff : float
    ci_low, ci_high : float
        Welch-Satterthwaite confidence interval of ``diff``.
    t, df, p : float
        Welch t, Welch-Satterthwaite df, two-sided p.
    hedges_g : float
        Pooled-SD standardised difference with small-sample correction.
    """

    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p: float
    hedges_g: float


def paired_t(baseline, post, confidence: float = 0.95):
    """Paired t-test and effect size of ``post - baseline``.

    Parameters
    ----------
    baseline, post : array_like, shape (n,)
        Paired values (e.g. BP_ND of one region, one value per subject).
    confidence : float
        Confidence level of the interval.

    Returns
    -------
    dict
        ``n, mean_diff, sd_diff, ci_low, ci_high, t, df, p_t, cohens_dz,
        hedges_gz``.

    Notes
    -----
    ``scipy.stats.ttest_rel`` and its ``confidence_interval``:
    :math:`t = \\bar d / (s_d/\\sqrt n)`, ``df = n - 1``, CI
    :math:`\\bar d \\pm t_{(1+c)/2, n-1}\\, s_d/\\sqrt n`.  With ``s_d = 0``
    the test is undefined (scipy reports ``t = ±inf, p = 0``): here ``t``,
    ``p_t`` and the effect sizes are NaN and the interval is the mean.
    """
    b, p = _pairs(baseline, post, "paired_t")
    d = p - b
    n = d.size
    if n < 2:
        raise ValueError(f"paired_t: need at least 2 pairs, got {n}")
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    df = float(n - 1)
    if sd == 0:
        nan = math.nan
        return dict(n=n, mean_diff=mean, sd_diff=sd, ci_low=mean, ci_high=mean, t=nan, df=df, p_t=nan,
                    cohens_dz=nan, hedges_gz=nan)
    res = _sps.ttest_rel(p, b)
    ci = res.confidence_interval(confidence)
    dz = mean / sd
    return dict(n=n, mean_diff=mean, sd_diff=sd, ci_low=float(ci.low), ci_high=float(ci.high),
                t=float(res.statistic), df=df, p_t=float(res.pvalue), cohens_dz=dz,
                hedges_gz=float(hedges_correction(df)) * dz)


def wilcoxon_signed_rank(baseline, post):
    """Wilcoxon signed-rank test of ``post - baseline`` (two-sided).

    Parameters
    ----------
    baseline, post : array_like, shape (n,)

    Returns
    -------
    w : float
        ``min(W+, W-)``, the rank sums of positive and negative differences.
    p : float
        Two-sided p-value; NaN if all differences are zero.
    method : str
        ``"exact"`` (no tied ``|d|``, at most :data:`WILCOXON_EXACT_MAX_N`
        non-zero differences: exact null distribution of :math:`W^+`) or
        ``"normal"`` (normal approximation with tie correction, no
        continuity correction).

    Notes
    -----
    ``scipy.stats.wilcoxon`` on the non-zero differences (Wilcoxon's own
    treatment of zeros, scipy's ``zero_method="wilcox"``), with the method
    chosen here so that the table can say which one was used.
    """
    b, p = _pairs(baseline, post, "wilcoxon")
    d = p - b
    d = d[d != 0]
    if d.size == 0:
        return 0.0, math.nan, "exact"
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    exact = not np.any(tie_counts > 1) and d.size <= WILCOXON_EXACT_MAX_N
    res = _sps.wilcoxon(d, zero_method="wilcox", correction=False, alternative="two-sided",
                        method="exact" if exact else "asymptotic")
    return float(res.statistic), float(res.pvalue), "exact" if exact else "normal"


def paired_test(baseline, post, confidence: float = 0.95) -> PairedResult:
    """Paired t, Wilcoxon signed-rank and effect sizes in one result.

    See :func:`paired_t` and :func:`wilcoxon_signed_rank`.
    """
    r = paired_t(baseline, post, confidence)
    w, pw, method = wilcoxon_signed_rank(baseline, post)
    return PairedResult(w=w, p_wilcoxon=pw, wilcoxon_method=method, **r)


def welch_t(a, b, confidence: float = 0.95) -> WelchResult:
    """Welch's unequal-variance t-test of ``mean(a) - mean(b)``.

    Parameters
    ----------
    a, b : array_like
        Samples (e.g. BP_ND changes in the drug and the placebo group).
    confidence : float
        Confidence level of the interval.

    Returns
    -------
    WelchResult

    Notes
    -----
    ``scipy.stats.ttest_ind(equal_var=False)`` and its
    ``confidence_interval`` (Welch-Satterthwaite degrees of freedom).  When
    both samples are constant the test is undefined: ``t``, ``df``, ``p`` and
    the interval are NaN.
    """
    a = _as_1d(a, "group a")
    b = _as_1d(b, "group b")
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        raise ValueError(f"welch_t: need at least 2 values per group, got {na} and {nb}")
    ma, mb = float(a.mean()), float(b.mean())
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    diff = ma - mb
    if va + vb > 0:
        res = _sps.ttest_ind(a, b, equal_var=False)
        ci = res.confidence_interval(confidence)
        t, df, p, lo, hi = (float(v) for v in (res.statistic, res.df, res.pvalue, ci.low, ci.high))
    else:
        t = df = p = lo = hi = math.nan
    df_pool = na + nb - 2
    sp = math.sqrt(((na - 1) * va + (nb - 1) * vb) / df_pool)
    g = float(hedges_correction(df_pool)) * diff / sp if sp > 0 else math.nan
    return WelchResult(na, nb, ma, mb, diff, lo, hi, t, df, p, g)


def _abs_mean_difference(x, y, axis):
    return np.abs(x.mean(axis=axis) - y.mean(axis=axis))


def permutation_test(a, b, n_permutations: int = 10000, rng=None):
    """Two-sided permutation test of the difference of means ``mean(a) - mean(b)``.

    Group labels are exchanged under the null hypothesis.  When
    ``n_permutations`` is at least the number of distinct relabelings
    :math:`\\binom{n_a+n_b}{n_a}` all relabelings are enumerated and the
    p-value is exact; otherwise ``n_permutations`` random relabelings are
    drawn and :math:`p = (1 + \\#\\{|T^*| \\ge |T|\\})/(1 + N)` (Phipson &
    Smyth 2010), which is never zero.

    Parameters
    ----------
    a, b : array_like, shape (n_a,) / (n_b,) or (n_a, k) / (n_b, k)
        Samples; with 2-D input, ``k`` columns (regions) are tested with the
        same relabelings.
    n_permutations : int
        Number of random relabelings (ignored when enumeration is cheaper).
    rng : numpy.random.Generator or int, optional
        Generator or seed, for reproducible p-values.

    Returns
    -------
    p : float or ndarray, shape (k,)
        Two-sided p-values.
    n_used : int
        Relabelings evaluated.
    exact : bool
        Whether all relabelings were enumerated.

    Notes
    -----
    ``scipy.stats.permutation_test`` (independent samples) with the statistic
    :math:`|\\bar a - \\bar b|` and ``alternative="greater"``: this counts
    relabelings at least as extreme in either direction.  scipy's own
    ``"two-sided"`` doubles the smaller one-sided p instead, which differs
    when the groups have different sizes (the null distribution of the
    difference is then not symmetric).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    one_d = a.ndim == 1
    a2 = a.reshape(a.shape[0], -1)
    b2 = b.reshape(b.shape[0], -1)
    if a2.shape[1] != b2.shape[1]:
        raise ValueError(f"permutation_test: a has {a2.shape[1]} columns, b has {b2.shape[1]}")
    if not (np.all(np.isfinite(a2)) and np.all(np.isfinite(b2))):
        raise ValueError("permutation_test: NaN/inf values; drop failed fits before testing")
    if n_permutations < 1:
        raise ValueError(f"permutation_test: n_permutations must be >= 1, got {n_permutations}")
    na, nb = a2.shape[0], b2.shape[0]
    if na < 1 or nb < 1:
        raise ValueError(f"permutation_test: need at least one value per group, got {na} and {nb}")
    res = _sps.permutation_test((a2, b2), _abs_mean_difference, permutation_type="independent",
                                vectorized=True, n_resamples=int(n_permutations), alternative="greater",
                                axis=0, rng=rng)
    n_relabel = math.comb(na + nb, na)
    exact = n_relabel <= n_permutations
    n_used = n_relabel if exact else int(n_permutations)
    p = np.asarray(res.pvalue, dtype=np.float64).reshape(-1)
    return (float(p[0]) if one_d else p), n_used, exact


def _valid_p(p):
    """Flat float copy of ``p`` and the mask of its non-NaN entries (checked in [0, 1])."""
    flat = np.asarray(p, dtype=np.float64).reshape(-1)
    valid = ~np.isnan(flat)
    if np.any((flat[valid] < 0) | (flat[valid] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    return flat, valid


def holm(p) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values (family-wise error).

    ``scipy.stats`` has no Holm adjustment, so this short one is written out.

    Parameters
    ----------
    p : array_like
        Raw p-values; NaN entries are kept as NaN and not counted in the
        family size ``m``.

    Returns
    -------
    ndarray
        Adjusted p-values, same shape.

    Notes
    -----
    With :math:`p_{(1)} \\le \\dots \\le p_{(m)}`:
    :math:`\\tilde p_{(i)} = \\max_{j \\le i} \\min(1, (m - j + 1)\\, p_{(j)})`.
    """
    flat, valid = _valid_p(p)
    out = np.full(flat.size, np.nan)
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(flat[idx], kind="mergesort")]
    m = order.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * flat[order]))
    return out.reshape(np.shape(p))


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg (1995) FDR-adjusted p-values (q-values).

    Parameters
    ----------
    p : array_like
        Raw p-values; NaN entries stay NaN and are not counted in ``m``.

    Returns
    -------
    ndarray
        Adjusted p-values, same shape.

    Notes
    -----
    ``scipy.stats.false_discovery_control(method="bh")`` on the non-NaN
    entries: :math:`\\tilde p_{(i)} = \\min_{j \\ge i} \\min(1, m\\, p_{(j)} / j)`.
    """
    flat, valid = _valid_p(p)
    out = np.full(flat.size, np.nan)
    if np.any(valid):
        out[valid] = _sps.false_discovery_control(flat[valid], method="bh")
    return out.reshape(np.shape(p))


def paired_t_map(baseline, post, mask=None):
    """Voxelwise paired t-test of ``post - baseline``, on NumPy or CuPy arrays.

    Parameters
    ----------
    baseline, post : ndarray or cupy.ndarray, shape (n_subjects, x, y, z)
        Co-registered maps (e.g. BP_ND), one per subject.
    mask : array of bool, shape (x, y, z), optional
        Voxels to test; others are NaN.  Voxels with a NaN in any subject
        are NaN in the output as well.

    Returns
    -------
    mean_diff, t, p : arrays, shape (x, y, z)
        Mean change, paired t and two-sided p (uncorrected); same array type
        as the input.

    Notes
    -----
    The mean, SD and t are written against the array namespace rather than
    calling ``scipy.stats.ttest_rel`` so that the map stays on the GPU for
    CuPy input; only the final p-value (``scipy.stats.t.sf``) is computed on
    the host, one transfer for the whole map.  A voxel whose change is the
    same in every subject (SD 0) has no t: NaN.
    """
    xp = array_module(baseline, post)
    b = xp.asarray(baseline, dtype=xp.float64)
    q = xp.asarray(post, dtype=xp.float64)
    if b.shape != q.shape:
        raise ValueError(f"paired_t_map: baseline shape {b.shape} differs from post shape {q.shape}")
    if b.ndim != 4 or b.shape[0] < 2:
        raise ValueError(f"paired_t_map: expected (n_subjects>=2, x, y, z), got {b.shape}")
    n = b.shape[0]
    d = q - b
    valid = xp.all(xp.isfinite(d), axis=0)
    if mask is not None:
        valid &= xp.asarray(mask, dtype=bool)
    d = xp.where(valid[None], d, 0.0)  # keeps NaN out of the arithmetic below
    mean = d.mean(axis=0)
    sd = d.std(axis=0, ddof=1)
    ok = valid & (sd > 0)
    t = xp.where(ok, mean / xp.where(ok, sd, 1.0) * math.sqrt(n), xp.nan)
    mean = xp.where(valid, mean, xp.nan)
    t_host = to_numpy(t)
    p = np.full(t_host.shape, np.nan)
    fin = np.isfinite(t_host)
    p[fin] = 2.0 * _sps.t.sf(np.abs(t_host[fin]), n - 1)
    return mean, t, xp.asarray(p)
