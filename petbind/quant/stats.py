"""Statistics for baseline vs post-dose binding studies.

Everything here is implemented from the textbook formulas (the tests compare
against ``scipy.stats`` and hand-computed values); ``scipy.stats`` is used only
for the t, normal distribution functions.

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

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as _sps

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

#: Above this many non-zero differences the Wilcoxon test uses the normal
#: approximation (same threshold as scipy's ``method='auto'``).
WILCOXON_EXACT_MAX_N = 50


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: NaN/inf values; drop failed fits before testing")
    return arr


def hedges_correction(df) -> np.ndarray:
    """Exact small-sample bias correction :math:`J(\\nu)` of Hedges (1981).

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


def _t_p_two_sided(t: float, df: float) -> float:
    if math.isnan(t) or math.isnan(df):
        return math.nan
    return float(2.0 * _sps.t.sf(abs(t), df))


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
    :math:`t = \\bar d / (s_d/\\sqrt n)`, ``df = n - 1``, CI
    :math:`\\bar d \\pm t_{(1+c)/2, n-1}\\, s_d/\\sqrt n`.  With ``s_d = 0``
    the test is undefined and ``t``, ``p_t`` are NaN.
    """
    b = _as_1d(baseline, "baseline")
    p = _as_1d(post, "post")
    if b.size != p.size:
        raise ValueError(f"paired_t: baseline has {b.size} values, post has {p.size}; expected pairs")
    d = p - b
    n = d.size
    if n < 2:
        raise ValueError(f"paired_t: need at least 2 pairs, got {n}")
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    if sd > 0:
        t = mean / se
        dz = mean / sd
    else:
        t = math.nan
        dz = math.nan
    half = float(_sps.t.ppf(0.5 + confidence / 2, df)) * se
    return dict(n=n, mean_diff=mean, sd_diff=sd, ci_low=mean - half, ci_high=mean + half, t=t, df=float(df),
                p_t=_t_p_two_sided(t, df), cohens_dz=dz, hedges_gz=float(hedges_correction(df)) * dz)


def _signed_rank_counts(n: int) -> np.ndarray:
    """Number of subsets of {1..n} with each sum 0..n(n+1)/2 (exact W+ null)."""
    total = n * (n + 1) // 2
    counts = np.zeros(total + 1, dtype=np.float64)
    counts[0] = 1.0
    for k in range(1, n + 1):
        # right-hand side is built from the old counts, so rank k is used at most once
        counts[k:] = counts[k:] + counts[:-k]
    return counts


def _rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


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
        ``"exact"`` (no ties, at most 50 non-zero differences: exact null
        distribution of :math:`W^+`) or ``"normal"`` (normal approximation
        with tie correction, no continuity correction).

    Notes
    -----
    Zero differences are discarded before ranking (Wilcoxon's original
    treatment, also scipy's default ``zero_method="wilcox"``).  Normal
    approximation: :math:`z = (W^+ - n(n+1)/4)/\\sigma`,
    :math:`\\sigma^2 = n(n+1)(2n+1)/24 - \\sum (t^3-t)/48` over tie groups.
    Exact: :math:`p = \\min(1, 2\\min(P(W^+ \\le w^+), P(W^+ \\ge w^+)))`.
    """
    b = _as_1d(baseline, "baseline")
    p = _as_1d(post, "post")
    if b.size != p.size:
        raise ValueError(f"wilcoxon: baseline has {b.size} values, post has {p.size}; expected pairs")
    d = p - b
    d = d[d != 0]
    n = d.size
    if n == 0:
        return 0.0, math.nan, "exact"
    ranks = _rank_average(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    w_minus = float(ranks[d < 0].sum())
    w = min(w_plus, w_minus)
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    has_ties = bool(np.any(tie_counts > 1))
    if not has_ties and n <= WILCOXON_EXACT_MAX_N:
        counts = _signed_rank_counts(n)
        prob = counts / counts.sum()
        k = int(round(w_plus))
        p_low = float(prob[: k + 1].sum())
        p_high = float(prob[k:].sum())
        return w, min(1.0, 2.0 * min(p_low, p_high)), "exact"
    mean = n * (n + 1) / 4.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float(np.sum(tie_counts**3 - tie_counts)) / 48.0
    if var <= 0:
        return w, math.nan, "normal"
    z = (w_plus - mean) / math.sqrt(var)
    return w, float(2.0 * _sps.norm.sf(abs(z))), "normal"


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
    :math:`t = (\\bar a - \\bar b)/\\sqrt{s_a^2/n_a + s_b^2/n_b}`, with
    Welch-Satterthwaite
    :math:`\\nu = (s_a^2/n_a + s_b^2/n_b)^2 / [(s_a^2/n_a)^2/(n_a-1) +
    (s_b^2/n_b)^2/(n_b-1)]`.
    """
    a = _as_1d(a, "group a")
    b = _as_1d(b, "group b")
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        raise ValueError(f"welch_t: need at least 2 values per group, got {na} and {nb}")
    ma, mb = float(a.mean()), float(b.mean())
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    qa, qb = va / na, vb / nb
    se = math.sqrt(qa + qb)
    diff = ma - mb
    if se > 0:
        df = (qa + qb) ** 2 / (qa**2 / (na - 1) + qb**2 / (nb - 1))
        t = diff / se
        half = float(_sps.t.ppf(0.5 + confidence / 2, df)) * se
    else:
        df = t = half = math.nan
    df_pool = na + nb - 2
    sp = math.sqrt(((na - 1) * va + (nb - 1) * vb) / df_pool)
    g = float(hedges_correction(df_pool)) * diff / sp if sp > 0 else math.nan
    return WelchResult(na, nb, ma, mb, diff, diff - half, diff + half, t, df, _t_p_two_sided(t, df), g)


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
    x = np.concatenate([a2, b2], axis=0)
    n = na + nb
    total = x.sum(axis=0)
    observed = a2.mean(axis=0) - b2.mean(axis=0)
    n_relabel = math.comb(n, na)
    exact = n_relabel <= n_permutations
    if exact:
        members = np.zeros((n_relabel, n), dtype=bool)
        for i, combo in enumerate(itertools.combinations(range(n), na)):
            members[i, list(combo)] = True
        n_used = n_relabel
    else:
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        keys = rng.random((n_permutations, n))
        order = np.argsort(keys, axis=1)[:, :na]
        members = np.zeros((n_permutations, n), dtype=bool)
        np.put_along_axis(members, order, True, axis=1)
        n_used = n_permutations
    sum_a = members.astype(np.float64) @ x  # (n_used, k)
    stat = sum_a / na - (total - sum_a) / nb
    # Tolerance: relabelings that give the observed |T| up to rounding count as ties.
    tol = 1e-12 * np.maximum(1.0, np.abs(observed))
    count = np.sum(np.abs(stat) >= np.abs(observed) - tol, axis=0)
    if exact:
        p = count / n_used
    else:
        p = (1.0 + count) / (1.0 + n_used)
    return (float(p[0]) if one_d else p), n_used, exact


def _adjust_sorted(p, adjust):
    """Apply ``adjust(sorted_p, m) -> adjusted`` to the non-NaN p-values in
    ascending order and put the results back in place (NaN stays NaN and is
    not counted in ``m``)."""
    p = np.asarray(p, dtype=np.float64)
    if np.any((p[~np.isnan(p)] < 0) | (p[~np.isnan(p)] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.size, np.nan)
    flat = p.reshape(-1)
    valid = np.flatnonzero(~np.isnan(flat))
    if valid.size:
        order = valid[np.argsort(flat[valid], kind="mergesort")]
        out[order] = adjust(flat[order], valid.size)
    return out.reshape(p.shape)


def holm(p) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values (family-wise error).

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
    return _adjust_sorted(p, lambda ps, m: np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * ps)))


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
    :math:`\\tilde p_{(i)} = \\min_{j \\ge i} \\min(1, m\\, p_{(j)} / j)`.
    """
    return _adjust_sorted(
        p, lambda ps, m: np.minimum(1.0, np.minimum.accumulate((ps * m / np.arange(1, m + 1))[::-1])[::-1])
    )


def paired_t_map(baseline, post, mask=None):
    """Voxelwise paired t-test of ``post - baseline``.

    Parameters
    ----------
    baseline, post : ndarray, shape (n_subjects, x, y, z)
        Co-registered maps (e.g. BP_ND), one per subject.
    mask : ndarray of bool, shape (x, y, z), optional
        Voxels to test; others are NaN.  Voxels with a NaN in any subject
        are NaN in the output as well.

    Returns
    -------
    mean_diff, t, p : ndarray, shape (x, y, z)
        Mean change, paired t and two-sided p (uncorrected).
    """
    b = np.asarray(baseline, dtype=np.float64)
    q = np.asarray(post, dtype=np.float64)
    if b.shape != q.shape:
        raise ValueError(f"paired_t_map: baseline shape {b.shape} differs from post shape {q.shape}")
    if b.ndim != 4 or b.shape[0] < 2:
        raise ValueError(f"paired_t_map: expected (n_subjects>=2, x, y, z), got {b.shape}")
    n = b.shape[0]
    d = q - b
    valid = np.all(np.isfinite(d), axis=0)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = d.mean(axis=0)
        sd = d.std(axis=0, ddof=1)
        t = mean / (sd / math.sqrt(n))
    t = np.where(valid & (sd > 0), t, np.nan)
    mean = np.where(valid, mean, np.nan)
    p = np.full(t.shape, np.nan)
    ok = np.isfinite(t)
    p[ok] = 2.0 * _sps.t.sf(np.abs(t[ok]), n - 1)
    return mean, t, p
