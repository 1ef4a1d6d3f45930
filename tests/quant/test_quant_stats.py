import itertools
import math

import numpy as np
import pytest
import scipy.stats as ss

from petbind.quant import stats


def test_paired_t_hand_values_and_scipy():
    base = np.array([1.0, 2.0, 3.0, 4.0])
    post = np.array([2.0, 4.0, 4.0, 6.0])  # d = [1, 2, 1, 2]
    r = stats.paired_t(base, post)
    assert r["mean_diff"] == pytest.approx(1.5)
    assert r["sd_diff"] == pytest.approx(math.sqrt(1.0 / 3.0))
    assert r["t"] == pytest.approx(3.0 * math.sqrt(3.0))
    assert r["df"] == 3
    assert r["cohens_dz"] == pytest.approx(1.5 / math.sqrt(1.0 / 3.0))
    ref = ss.ttest_rel(post, base)
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert r["p_t"] == pytest.approx(ref.pvalue, rel=1e-10)
    half = 3.182446305284263 * math.sqrt(1.0 / 3.0) / 2.0  # t_{0.975,3} * s/sqrt(n)
    assert r["ci_low"] == pytest.approx(1.5 - half, rel=1e-9)
    assert r["ci_high"] == pytest.approx(1.5 + half, rel=1e-9)
    lo, hi = ref.confidence_interval(0.95)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), rel=1e-10)


def test_paired_t_random_vs_scipy():
    rng = np.random.default_rng(10)
    for n in (3, 7, 20):
        b = rng.normal(2.0, 0.4, n)
        p = b + rng.normal(-0.3, 0.2, n)
        r = stats.paired_t(b, p)
        ref = ss.ttest_rel(p, b)
        assert r["t"] == pytest.approx(ref.statistic, rel=1e-10)
        assert r["p_t"] == pytest.approx(ref.pvalue, rel=1e-8)


def test_hedges_correction_gamma_form():
    for df in (2, 3, 10, 50):
        exact = math.gamma(df / 2) / (math.sqrt(df / 2) * math.gamma((df - 1) / 2))
        assert float(stats.hedges_correction(df)) == pytest.approx(exact, rel=1e-12)
        assert float(stats.hedges_correction(df)) == pytest.approx(1 - 3 / (4 * df - 1), rel=0.02)
    assert math.isnan(float(stats.hedges_correction(1)))


def test_wilcoxon_exact_hand_values():
    # n = 5 all positive: only 1 of 32 sign patterns as extreme on each side -> p = 2/32
    w, p, method = stats.wilcoxon_signed_rank(np.zeros(5), [1.0, 2.0, 3.0, 4.0, 5.0])
    assert (w, p, method) == (0.0, 2.0 / 32.0, "exact")
    # d = [1..5, -6]: W- = 6; 14 of 64 subsets of {1..6} have rank sum <= 6 -> p = 28/64
    w, p, method = stats.wilcoxon_signed_rank(np.zeros(6), [1.0, 2.0, 3.0, 4.0, 5.0, -6.0])
    assert w == 6.0 and p == pytest.approx(28.0 / 64.0) and method == "exact"


def test_wilcoxon_vs_scipy_exact_and_normal():
    rng = np.random.default_rng(11)
    for n in (6, 9, 15):
        d = rng.normal(0.3, 1.0, n)
        w, p, method = stats.wilcoxon_signed_rank(np.zeros(n), d)
        ref = ss.wilcoxon(d, method="exact")
        assert method == "exact"
        assert w == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue, rel=1e-10)
    d = np.array([1.0, 2.0, 2.0, 3.0, -1.0, 4.0, 5.0, 5.0, 5.0, -2.0, 0.0])  # ties and a zero
    w, p, method = stats.wilcoxon_signed_rank(np.zeros(d.size), d)
    ref = ss.wilcoxon(d, method="asymptotic", correction=False, zero_method="wilcox")
    assert method == "normal"
    assert w == pytest.approx(ref.statistic)
    assert p == pytest.approx(ref.pvalue, rel=1e-10)


def test_welch_hand_values_and_scipy():
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([4.0, 6.0, 8.0])
    r = stats.welch_t(a, b)
    assert r.diff == pytest.approx(-4.0)
    assert r.t == pytest.approx(-4.0 / math.sqrt(5.0 / 3.0))
    assert r.df == pytest.approx(50.0 / 17.0)
    ref = ss.ttest_ind(a, b, equal_var=False)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-10)
    lo, hi = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == pytest.approx((lo, hi), rel=1e-9)
    # Hedges g: pooled SD sqrt((2*1 + 2*4)/4), J(4) = 1 / (sqrt(2) * Gamma(1.5)) * Gamma(2)
    j4 = math.gamma(2.0) / (math.sqrt(2.0) * math.gamma(1.5))
    assert r.hedges_g == pytest.approx(j4 * -4.0 / math.sqrt(2.5))
    rng = np.random.default_rng(12)
    x, y = rng.normal(0, 1, 7), rng.normal(0.5, 3, 11)
    r = stats.welch_t(x, y)
    ref = ss.ttest_ind(x, y, equal_var=False)
    assert r.t == pytest.approx(ref.statistic, rel=1e-10)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-10)


def _enumerated_p(a, b):
    """Oracle: every split of the pooled sample into |a| and |b|."""
    x = np.concatenate([a, b])
    obs = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for combo in itertools.combinations(range(x.size), a.size):
        mask = np.zeros(x.size, bool)
        mask[list(combo)] = True
        stat = abs(x[mask].mean() - x[~mask].mean())
        hits += stat >= obs - 1e-12
        total += 1
    return hits / total


def test_permutation_exact_hand_and_enumeration():
    p, n_used, exact = stats.permutation_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert (p, n_used, exact) == (pytest.approx(2.0 / 20.0), 20, True)
    rng = np.random.default_rng(13)
    a = rng.normal(0.0, 1.0, 4).round(1)
    b = rng.normal(0.8, 1.0, 5).round(1)
    p, n_used, exact = stats.permutation_test(a, b, n_permutations=1000)
    assert exact and n_used == 126
    assert p == pytest.approx(_enumerated_p(a, b), abs=1e-15)


def test_permutation_random_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(14)
    a = rng.normal(0.0, 1.0, 7)
    b = rng.normal(1.0, 1.0, 7)
    exact = _enumerated_p(a, b)  # 3432 relabelings
    p1, n1, ex1 = stats.permutation_test(a, b, n_permutations=2000, rng=7)
    p2, _, _ = stats.permutation_test(a, b, n_permutations=2000, rng=7)
    assert not ex1 and n1 == 2000
    assert p1 == p2
    se = math.sqrt(exact * (1 - exact) / 2000)
    assert abs(p1 - exact) < 4 * se + 1.0 / 2001
    assert p1 >= 1.0 / 2001


def test_permutation_2d_columns_match_1d():
    rng = np.random.default_rng(15)
    a = rng.normal(0, 1, (4, 3))
    b = rng.normal(0.5, 1, (4, 3))
    p2d, _, _ = stats.permutation_test(a, b, n_permutations=100)
    for j in range(3):
        assert p2d[j] == pytest.approx(_enumerated_p(a[:, j], b[:, j]))


def test_holm_and_bh_hand_values():
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    p = [0.01, 0.02, 0.03, 0.04, 0.05]
    np.testing.assert_allclose(stats.holm(p), [0.05, 0.08, 0.09, 0.09, 0.09])
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.05] * 5)
    p = [0.011, 0.5, 0.01]  # BH raw m*p/i = 0.03, 0.0165, 0.5 is not monotone: step-up gives 0.0165 twice
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.0165, 0.5, 0.0165])
    # Holm: 3*0.01 = 0.03, then max(0.03, 2*0.011 = 0.022) = 0.03, then 0.5
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.5, 0.03])
    p = [0.5, np.nan, 0.2, 0.9]  # NaN kept, m = 3, capped at 1
    np.testing.assert_allclose(stats.holm(p), [1.0, np.nan, 0.6, 1.0])
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.75, np.nan, 0.6, 0.9])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm([1.5])


@pytest.mark.filterwarnings("ignore:Precision loss")
def test_paired_t_map_vs_scipy():
    rng = np.random.default_rng(16)
    b = rng.normal(2, 0.5, (6, 4, 3, 2))
    p = b + rng.normal(-0.2, 0.3, b.shape)
    b[:, 0, 0, 0] = np.arange(6) * 0.5  # exact binary fractions, so the change is exactly constant
    p[:, 0, 0, 0] = b[:, 0, 0, 0] + 0.25  # constant change: t undefined -> NaN
    mask = np.ones((4, 3, 2), bool)
    mask[3, 2, 1] = False
    mean, t, pv = stats.paired_t_map(b, p, mask)
    ref = ss.ttest_rel(p, b, axis=0)
    ok = mask.copy()
    ok[0, 0, 0] = False
    np.testing.assert_allclose(t[ok], ref.statistic[ok], rtol=1e-10)
    np.testing.assert_allclose(pv[ok], ref.pvalue[ok], rtol=1e-8)
    np.testing.assert_allclose(mean[ok], (p - b).mean(axis=0)[ok])
    assert np.isnan(t[0, 0, 0]) and np.isnan(t[3, 2, 1]) and np.isnan(mean[3, 2, 1])


def test_nan_input_refused():
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_t([1.0, np.nan], [2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        stats.permutation_test([1.0, np.nan], [2.0, 3.0])


def _paired_maps():
    rng = np.random.default_rng(17)
    b = rng.normal(2, 0.5, (5, 6, 4, 3))
    p = b + rng.normal(-0.2, 0.3, b.shape)
    b[2, 1, 1, 1] = np.nan  # a failed fit in one subject
    mask = np.ones((6, 4, 3), bool)
    mask[0, 0, 0] = False
    return b, p, mask


@pytest.mark.gpu
def test_paired_t_map_gpu_equals_cpu():
    """GPU twin of test_paired_t_map_vs_scipy: CuPy in, CuPy out, same numbers as NumPy."""
    import cupy

    b, p, mask = _paired_maps()
    cpu = stats.paired_t_map(b, p, mask)
    gpu = stats.paired_t_map(cupy.asarray(b), cupy.asarray(p), cupy.asarray(mask))
    for c, g, name in zip(cpu, gpu, ("mean", "t", "p")):
        assert type(g).__module__.startswith("cupy"), name
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
    assert np.isnan(cpu[1][1, 1, 1]) and np.isnan(cpu[1][0, 0, 0])
