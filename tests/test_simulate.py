import math

import numpy as np
import pytest
from scipy import stats

from petbind.core.decay import decay_integral
from petbind.recon.corrections import randoms_from_singles
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.projector import SinogramProjector
from petbind.sim.acquisition import (
    BasisActivity,
    ListmodeSimulator,
    random_crystal_efficiencies,
    sample_decay_times,
)

HALF_LIFE_S = 1221.84
# GPU variants run the simulator's projections through CuPy (the stand-in on CI).
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def setup():
    scanner = Scanner.cylindrical(60.0, 32, 3, 4.0)
    layout = SinogramLayout(scanner, 15)
    grid = ImageGrid((14, 14, 3), 5.0)
    c = grid.voxel_centres_mm()
    r = np.hypot(c[..., 0], c[..., 1])
    activity = np.where(r < 25.0, 1000.0, 0.0).astype(np.float32)
    activity[(np.abs(c[..., 0] - 8) < 5) & (np.abs(c[..., 1]) < 5)] = 3000.0
    mu = np.where(r < 30.0, 0.0096, 0.0).astype(np.float32)
    eff = random_crystal_efficiencies(scanner, rng=0, spread=0.1)
    return scanner, layout, grid, activity, mu, eff


def make_sim(setup, **kw):
    scanner, layout, grid, activity, mu, eff = setup
    args = dict(crystal_efficiencies=eff, scatter_fraction=0.3, randoms_fraction=0.2, sensitivity_cps_per_kbq=50.0,
                chunk_planes=2, device="cpu", quiet=True)
    args.update(kw)
    return ListmodeSimulator(layout, grid, mu, **args)


@pytest.mark.parametrize("device", DEVICES)
def test_expected_trues_follow_the_system_model(setup, device):
    # Oracle: the full-sinogram projector (an independent code path from the plane chunks).
    scanner, layout, grid, activity, mu, eff = setup
    sim = make_sim(setup, device=device)
    out = sim.simulate_sinograms(activity, [0.0], [60.0], seed=1)
    proj = SinogramProjector(layout, grid, device="cpu")
    att = np.exp(-proj.forward(mu).astype(np.float64))
    n = np.zeros(layout.shape)
    pairs = layout.detector_pairs()
    n = eff[pairs[..., 0]] * eff[pairs[..., 1]]
    lam = math.log(2) / HALF_LIFE_S
    exposure = (1 - math.exp(-lam * 60.0)) / lam
    expected = sim.kappa * exposure * n * att * proj.forward(activity)
    np.testing.assert_allclose(out["trues"][0], expected, rtol=2e-5, atol=1e-9 * expected.max())


def test_calibration_point_source_count_rate(setup):
    # Unattenuated point source at the centre, unit efficiencies, 1 s, negligible decay:
    # trues = sensitivity * A / 1000.
    scanner, layout, grid, _, _, _ = setup
    sim = ListmodeSimulator(layout, grid, None, scatter_fraction=0.0, randoms_fraction=0.0, sensitivity_cps_per_kbq=7.0,
                            half_life_s=1e12, device="cpu", quiet=True)
    point = np.zeros(grid.shape, np.float32)
    point[7, 7, 1] = 2e6 / (np.prod(grid.voxel_size_mm) / 1000.0)  # 2 MBq in one voxel
    out = sim.simulate_sinograms(point, [0.0], [1.0], seed=0)
    assert out["trues"].sum() == pytest.approx(7.0 * 2e6 / 1000, rel=1e-5)


def test_fractions_come_out_as_asked(setup):
    activity = setup[3]
    sim = make_sim(setup, scatter_fraction=0.35, randoms_fraction=0.25)
    out = sim.simulate_sinograms(activity, [0.0], [600.0], seed=2)
    t, s, r = out["trues"].sum(), out["scatter"].sum(), out["randoms"].sum()
    assert s / (t + s) == pytest.approx(0.35, rel=1e-6)  # float32 sinograms
    assert r / (t + s + r) == pytest.approx(0.25, rel=1e-6)
    # The drawn counts too, within Poisson error.
    ct, cs, cr = out["trues_counts"].sum(), out["scatter_counts"].sum(), out["randoms_counts"].sum()
    n = ct + cs + cr
    assert n > 1e5
    assert abs(cs / (ct + cs) - 0.35) < 5 * math.sqrt(0.35 * 0.65 / (ct + cs))
    assert abs(cr / n - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    # Scatter is smooth and extends beyond the object; it is zero only in gaps.
    assert np.all(out["scatter"][0][out["trues"][0] > 0] > 0)


def test_randoms_follow_singles_model(setup):
    scanner, layout, grid, activity, mu, eff = setup
    sim = make_sim(setup)
    out = sim.simulate_sinograms(np.stack([activity] * 2, -1), [0.0, 60.0], [60.0, 180.0], seed=3)
    lam = math.log(2) / HALF_LIFE_S
    activity_bq = activity.sum(dtype=np.float64) * np.prod(grid.voxel_size_mm) / 1000
    for k, (a, b) in enumerate([(0.0, 60.0), (60.0, 180.0)]):
        # R_ij = 2 tau S_i S_j with S_i(t) = sigma eps_i A(t), A(t) = A0 exp(-lam t).
        singles = sim.singles_scale * eff
        i2 = activity_bq**2 * decay_integral(a, b, 2 * lam)
        oracle = randoms_from_singles(layout, singles, 4.0, duration_s=1.0) * i2
        np.testing.assert_allclose(out["randoms"][k], oracle, rtol=1e-6)  # n is stored as float32
    counts = sim.singles_counts([0.0, 60.0], [60.0, 180.0])
    np.testing.assert_allclose(counts[1], sim.singles_scale * eff * activity_bq * decay_integral(60.0, 180.0, lam), rtol=1e-12)


def test_noise_mean_matches_expected_counts(setup):
    # 200 identical frames (no decay, one basis image) are 200 noise realisations of one ybar.
    activity = setup[3]
    sim = make_sim(setup, sensitivity_cps_per_kbq=0.5, half_life_s=1e15)
    k = 200
    edges = np.arange(k + 1) * 30.0
    out = sim.simulate_sinograms(BasisActivity(activity[None], np.ones((1, k))), edges[:-1], edges[1:], seed=0)
    ybar = out["trues"][0] + out["scatter"][0] + out["randoms"][0]
    np.testing.assert_allclose(out["trues"], np.broadcast_to(out["trues"][0], out["trues"].shape), rtol=1e-6)
    mean = out["prompts"].mean(axis=0)
    m = ybar > 0
    z2 = (mean[m] - ybar[m]) ** 2 / (ybar[m] / k)
    # chi-square per bin has mean 1 and sd sqrt(2 / bins).
    assert abs(z2.mean() - 1) < 5 * math.sqrt(2 / m.sum())
    assert np.all(mean[~m] == 0)
    total = out["prompts"].sum()
    assert abs(total - k * ybar.sum()) < 5 * math.sqrt(k * ybar.sum())
    # Delayeds are an independent draw of the randoms.
    assert abs(out["delayeds"].sum() - k * out["randoms"][0].sum()) < 5 * math.sqrt(k * out["randoms"][0].sum())
    assert not np.array_equal(out["delayeds"], out["randoms_counts"])


def _bin_lookup(layout):
    pairs = layout.detector_pairs().reshape(-1, 2)
    return {(int(a), int(b)): i for i, (a, b) in enumerate(pairs)}


@pytest.mark.parametrize("basis", [False, True])
@pytest.mark.parametrize("tof", [None, TOFParameters(5, 20.0, 300.0)])
def test_listmode_events_histogram_to_the_drawn_counts(setup, tof, basis):
    scanner, layout, grid, activity, mu, eff = setup
    sim = make_sim(setup, tof=tof, max_events_per_chunk=1000, sensitivity_cps_per_kbq=5.0)
    counts = {}
    frames = ([0.0, 30.0], [30.0, 90.0])
    act = BasisActivity(activity[None] / 1000, np.array([[1000.0, 500.0]])) if basis else np.stack([activity, 0.5 * activity], -1)
    chunks = list(sim.simulate_listmode(act, *frames, seed=5, counts_out=counts))
    lookup = _bin_lookup(layout)
    ntof = 1 if tof is None else tof.num_bins
    all_t = np.concatenate([c.time_ms for c in chunks])
    assert np.all(np.diff(all_t) >= 0), "events must be time-ordered across chunks"
    assert max(len(c) for c in chunks) <= 1000 and len(chunks) > 4
    for k in range(2):
        hist = {True: np.zeros(layout.num_bins * ntof, np.int64), False: np.zeros(layout.num_bins * ntof, np.int64)}
        for c in chunks:
            if c.frame_index != k:
                continue
            assert np.all((c.time_ms >= frames[0][k] * 1000) & (c.time_ms < frames[1][k] * 1000))
            lor = np.array([lookup[(int(a), int(b))] for a, b in c.detector_ids])
            idx = lor * ntof + (0 if tof is None else c.tof_bin.astype(np.int64))
            for p in (True, False):
                np.add.at(hist[p], idx[c.is_prompt == p], 1)
        np.testing.assert_array_equal(hist[True], counts["prompts"][k].ravel())
        np.testing.assert_array_equal(hist[False], counts["delayeds"][k].ravel())
        st = sim.frame_stats[k]
        assert st.prompts == counts["prompts"][k].sum() and st.delayeds == counts["delayeds"][k].sum()


def test_listmode_is_deterministic_given_a_seed(setup):
    activity = setup[3]

    def run(seed, **kw):
        sim = make_sim(setup, sensitivity_cps_per_kbq=2.0, **kw)
        cs = list(sim.simulate_listmode(activity, [0.0], [60.0], seed=seed))
        return np.concatenate([c.detector_ids for c in cs]), np.concatenate([c.time_ms for c in cs])

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[1].shape != c[1].shape or not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("basis", [False, True])
def test_event_times_are_decay_distributed(setup, basis):
    # Short half-life so that the decay is visible within the frame; KS test against the analytic CDF.
    activity = setup[3]
    half = 40.0
    lam = math.log(2) / half
    sim = make_sim(setup, half_life_s=half, sensitivity_cps_per_kbq=10.0, randoms_fraction=0.4, max_events_per_chunk=5000)
    a, b = 20.0, 140.0
    act = BasisActivity(activity[None], np.ones((1, 1))) if basis else activity
    chunks = list(sim.simulate_listmode(act, [a], [b], seed=11))
    t = np.concatenate([c.time_ms for c in chunks]) / 1000
    prompt = np.concatenate([c.is_prompt for c in chunks])
    assert t.min() >= a and t.max() < b

    def cdf(mu):
        return lambda x: -np.expm1(-mu * (np.asarray(x) - a)) / -np.expm1(-mu * (b - a))

    # Delayed events (pure randoms) decay at 2 lambda; prompts are a mixture.
    delayed = t[~prompt]
    assert delayed.size > 2000
    assert stats.kstest(delayed, cdf(2 * lam)).pvalue > 1e-3
    assert stats.kstest(delayed, cdf(lam)).pvalue < 1e-6  # the test can tell the two apart
    st = sim.frame_stats[0]
    w = (st.trues + st.scatter) / st.prompts
    mix = lambda x: w * cdf(lam)(x) + (1 - w) * cdf(2 * lam)(x)  # noqa: E731
    assert stats.kstest(t[prompt], mix).pvalue > 1e-3


def test_sample_decay_times_ks():
    rng = np.random.default_rng(0)
    lam = 0.05
    t = sample_decay_times(rng, 20000, 10.0, 70.0, lam)
    cdf = lambda x: -np.expm1(-lam * (x - 10.0)) / -np.expm1(-lam * 60.0)  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert t.min() >= 10.0 and t.max() < 70.0
    assert decay_integral(10.0, 70.0, lam) == pytest.approx((math.exp(-0.5) - math.exp(-3.5)) / lam)


@pytest.mark.parametrize("device", DEVICES)
def test_tof_sums_to_non_tof(setup, device):
    activity = setup[3]
    plain = make_sim(setup).simulate_sinograms(activity, [0.0], [60.0], seed=0)
    tof = make_sim(setup, tof=TOFParameters(7, 15.0, 250.0), device=device).simulate_sinograms(
        activity, [0.0], [60.0], seed=0)
    for name in ("trues", "scatter", "randoms"):
        np.testing.assert_allclose(tof[name][0].sum(-1), plain[name][0], rtol=1e-4, atol=1e-8 * plain[name].max())


def test_basis_activity_equals_explicit_frames(setup):
    activity = setup[3]
    blob = np.zeros_like(activity)
    blob[4:8, 4:8, :] = 1.0
    images = np.stack([activity / 1000.0, blob])
    weights = np.array([[1000.0, 800.0], [0.0, 500.0]])
    frames = ([0.0, 60.0], [60.0, 120.0])
    explicit = np.stack([np.tensordot(weights[:, k], images, axes=1) for k in range(2)], -1)
    a = make_sim(setup).simulate_sinograms(BasisActivity(images, weights), *frames, seed=4)
    b = make_sim(setup).simulate_sinograms(explicit, *frames, seed=4)
    for name in ("trues", "scatter", "randoms"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-9 * b[name].max())


def test_bad_input_is_refused(setup):
    scanner, layout, grid, activity, mu, eff = setup
    with pytest.raises(ValueError, match="span=1"):
        ListmodeSimulator(SinogramLayout(scanner, 15, span=3), grid, mu)
    with pytest.raises(ValueError, match="scatter_fraction"):
        ListmodeSimulator(layout, grid, mu, scatter_fraction=1.0)
    sim = make_sim(setup)
    with pytest.raises(ValueError, match="non-overlapping"):
        sim.simulate_sinograms(np.stack([activity] * 2, -1), [0.0, 30.0], [60.0, 90.0])
    with pytest.raises(ValueError, match="activity must have shape"):
        sim.simulate_sinograms(activity[:-1], [0.0], [60.0])
    with pytest.raises(ValueError, match="non-negative"):
        sim.simulate_sinograms(-activity, [0.0], [60.0])


@pytest.mark.parametrize("scale", [0.01, 5.0])  # sparse (categorical) and dense (per-bin) regimes
def test_draw_poisson_sparse_is_poisson_per_bin(scale):
    from petbind.sim.acquisition import draw_poisson_sparse

    rng = np.random.default_rng(9)
    mean = scale * np.array([0.0, 1.0, 3.0, 0.5, 0.0, 2.0, 8.0, 0.2] * 8)
    k = 4000
    counts = np.zeros((k, mean.size))
    for i in range(k):
        idx, cnt = draw_poisson_sparse(rng, mean)
        assert np.all(np.diff(idx) > 0) and np.all(cnt > 0)
        counts[i, idx] = cnt
    assert np.all(counts[:, mean == 0] == 0)
    m = mean > 0
    z = (counts.mean(0)[m] - mean[m]) / np.sqrt(mean[m] / k)
    assert np.all(np.abs(z) < 5)
    # Poisson: variance equals mean; independent bins: no correlation between neighbours.
    # Sample variance of Poisson counts: sd about mean * sqrt((1 / mean + 2) / k).
    tol = 5 * mean[m] * np.sqrt((1 / mean[m] + 2) / k)
    assert np.all(np.abs(counts.var(0)[m] - mean[m]) < tol)
    c = np.corrcoef(counts[:, 1], counts[:, 2])[0, 1]
    assert abs(c) < 5 / np.sqrt(k)


def test_scatter_shape_is_a_gaussian_blur(setup):
    # Oracle: scipy's Gaussian filter with the same widths (periodic views, zero outside radially).
    from scipy import ndimage

    sim = make_sim(setup, scatter_fwhm_mm=120.0)
    cfg = sim._scatter_setup()
    rng = np.random.default_rng(3)
    em = np.zeros((2, sim.layout.num_views, sim.layout.num_radial))
    em[:, :, 4:11] = rng.uniform(0.5, 1.5, (2, sim.layout.num_views, 7))
    got = sim._scatter_shape(em)
    start, end = sim.layout.lor_endpoints_mm()
    d = end[0, 0, :, :2] - start[0, 0, :, :2]
    dist = (d[:, 0] * start[0, 0, :, 1] - d[:, 1] * start[0, 0, :, 0]) / np.hypot(d[:, 0], d[:, 1])
    bin_mm = np.median(np.abs(np.diff(dist)))
    sigma_mm = 120.0 / 2.3548
    sig = (0, sigma_mm / (100 * np.pi / sim.layout.num_views), sigma_mm / bin_mm)
    ref = ndimage.gaussian_filter(em, sig, mode=("nearest", "wrap", "constant"), truncate=3.0)
    assert cfg["fr"] > 1  # the decimated path is exercised
    # Same shape up to normalisation, within a few percent of the peak.
    ref_n = ref / ref.sum(axis=(1, 2), keepdims=True)
    got_n = got / got.sum(axis=(1, 2), keepdims=True)
    assert np.abs(got_n - ref_n).max() < 0.05 * ref_n.max()


@pytest.mark.parametrize("tof", [None, TOFParameters(3, 30.0, 300.0)])
def test_basis_listmode_counts_follow_the_expected_sinogram(setup, tof):
    # Event-by-event drawing of a basis activity (low counts) against the bin-by-bin model:
    # k identical frames without decay; per-bin means of prompts and delayeds vs ybar.
    activity = setup[3]
    k = 300
    edges = np.arange(k + 1) * 20.0
    act = BasisActivity(activity[None], np.ones((1, k)))
    sim = make_sim(setup, tof=tof, sensitivity_cps_per_kbq=2.0, half_life_s=1e15)
    ref = sim.simulate_sinograms(BasisActivity(activity[None], np.ones((1, 1))), edges[:1], edges[1:2], seed=0)
    ybar = ref["trues"][0] + ref["scatter"][0] + ref["randoms"][0]
    assert 300 < ybar.sum() + ref["randoms"].sum() < 0.5 * ybar.size  # the event-by-event path is under test
    counts = {}
    for _ in sim.simulate_listmode(act, edges[:-1], edges[1:], seed=1, counts_out=counts):
        pass
    for name, mean_sino in (("prompts", ybar), ("delayeds", ref["randoms"][0])):
        c = counts[name]
        mean = c.mean(axis=0)
        m = mean_sino > 0
        z2 = (mean[m] - mean_sino[m]) ** 2 / (mean_sino[m] / k)
        assert abs(z2.mean() - 1) < 5 * math.sqrt(2 / m.sum()), name
        assert np.all(mean[~m] == 0)
        assert abs(c.sum() - k * mean_sino.sum()) < 5 * math.sqrt(k * mean_sino.sum()), name
        # Each frame on its own: the share of events in the first half of the bins is binomial.
        flat = c.reshape(k, -1)
        half = flat.shape[1] // 2
        p = mean_sino.ravel()[:half].sum() / mean_sino.sum()
        nk = flat.sum(axis=1)
        z = (flat[:, :half].sum(axis=1) - nk * p) / np.sqrt(np.maximum(nk * p * (1 - p), 1e-9))
        assert abs(np.mean(z**2) - 1) < 5 * math.sqrt(2 / k), name
    st = sim.frame_stats
    t, s_, r = (sum(getattr(x, a) for x in st) for a in ("trues", "scatter", "randoms"))
    assert abs(s_ / (t + s_) - 0.3) < 5 * math.sqrt(0.21 / (t + s_))
    assert abs(r / (t + s_ + r) - 0.2) < 5 * math.sqrt(0.16 / (t + s_ + r))


def test_write_sinograms_round_trip(setup, tmp_path):
    from petbind.recon.rawdata.schema import ExamInfo
    from petbind.recon.rawdata.sinograms import read_sinograms_h5

    activity = setup[3]
    sim = make_sim(setup)
    out = sim.simulate_sinograms(activity, [30.0], [90.0], seed=0)
    path = tmp_path / "frame.h5"
    sim.write_sinograms(path, out, 0, 30.0, 90.0, exam=ExamInfo(isotope="C11", half_life_s=HALF_LIFE_S))
    data = read_sinograms_h5(path)
    np.testing.assert_array_equal(data.prompts, out["prompts"][0])
    np.testing.assert_array_equal(data.delayeds, out["delayeds"][0])
    np.testing.assert_allclose(data.attenuation, sim.attenuation)
    np.testing.assert_allclose(data.normalisation, sim.normalisation)
    assert data.frame_start_s == 30.0 and data.frame_duration_s == 60.0


@pytest.mark.parametrize("tof", [None, TOFParameters(5, 20.0, 300.0)])
def test_events_histogram_with_recon_listmode(setup, tof):
    # Independent inverse map: petbind.recon.listmode.histogram_events (SinogramLayout.bin_indices).
    from petbind.recon.listmode import histogram_events

    scanner, layout, grid, activity, mu, eff = setup
    sim = make_sim(setup, tof=tof, sensitivity_cps_per_kbq=5.0)
    counts = {}
    chunks = list(sim.simulate_listmode(activity, [0.0], [60.0], seed=2, counts_out=counts))
    ids = np.concatenate([c.detector_ids for c in chunks])
    prompt = np.concatenate([c.is_prompt for c in chunks])
    k = None if tof is None else np.concatenate([c.tof_bin for c in chunks])
    hist, outside = histogram_events(layout, ids, prompt, tof_bin=k, num_tof_bins=None if tof is None else tof.num_bins)
    assert outside.sum() == 0
    np.testing.assert_array_equal(hist[0, 0], counts["prompts"][0].ravel())
    np.testing.assert_array_equal(hist[1, 0], counts["delayeds"][0].ravel())


def test_gap_crystals_never_detect(tmp_path):
    from petbind.recon.rawdata.hdf5 import ListmodeReader, ListmodeWriter

    scanner = Scanner.polygon(8, 4, 8.0, 60.0, 2, 4.0, gap_crystals_per_module=1)
    layout = SinogramLayout(scanner, 17)
    grid = ImageGrid((12, 12, 2), 6.0)
    act = np.full(grid.shape, 5000.0, np.float32)
    sim = ListmodeSimulator(layout, grid, np.full(grid.shape, 0.0096, np.float32), sensitivity_cps_per_kbq=20.0,
                            device="cpu", quiet=True)
    out = sim.simulate_sinograms(act, [0.0], [60.0], seed=0)
    gap = ~layout.bin_mask()
    for name in ("trues", "scatter", "randoms", "prompts", "delayeds"):
        assert np.all(out[name][0][gap] == 0), name
    path = tmp_path / "lm.h5"
    with ListmodeWriter(path, scanner) as w:  # validates: no event may name a gap crystal
        for c in sim.simulate_listmode(act, [0.0], [60.0], seed=0):
            w.append(c.detector_ids, c.tof_bin, c.time_ms, c.is_prompt)
    assert ListmodeReader(path).num_events > 100


@pytest.mark.parametrize("device", DEVICES)
def test_osem_with_the_simulator_factors_recovers_bq_per_ml(setup, device):
    # Cross-module check: data simulated here, reconstructed by petbind.recon.osem with the same factors
    # (m = kappa * D * n * a; a = scatter + randoms), give back the activity in Bq/mL.
    from petbind.recon.osem import SinogramOSEM

    scanner, layout, grid, activity, mu, eff = setup
    sim = make_sim(setup, device=device)
    lam = math.log(2) / HALF_LIFE_S
    out = sim.simulate_sinograms(activity, [0.0], [120.0], seed=0)
    m = sim.kappa * decay_integral(0.0, 120.0, lam) * sim.normalisation * sim.attenuation
    add = (out["scatter"][0] + out["randoms"][0]).astype(np.float32)
    ybar = (out["trues"][0] + add).astype(np.float32)
    rec = SinogramOSEM(layout, grid, multiplicative=m.astype(np.float32), additive=add, num_subsets=1, device=device)
    x = rec.reconstruct(ybar, num_iterations=200, progress=False)
    assert isinstance(x, np.ndarray)
    c = grid.voxel_centres_mm()
    r = np.hypot(c[..., 0], c[..., 1])
    bg = (r < 18) & (np.abs(c[..., 0] - 8) > 10)
    hot = (np.abs(c[..., 0] - 8) < 3) & (np.abs(c[..., 1]) < 3)
    assert np.median(x[bg]) == pytest.approx(1000.0, rel=0.05)
    assert np.median(x[hot]) == pytest.approx(3000.0, rel=0.1)
