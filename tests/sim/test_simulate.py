"""Sinogram-domain acquisition simulator: system model, Poisson statistics, listmode expansion."""

import math

import numpy as np
import pytest
from scipy import ndimage, stats

from petbind.core.decay import decay_integral
from petbind.recon.corrections import normalisation_factors, point_source_kappa, randoms_from_singles
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.listmode import histogram_events
from petbind.recon.projector import SinogramProjector
from petbind.sim.acquisition import (
    AcquisitionSimulator,
    BasisActivity,
    random_crystal_efficiencies,
    sample_decay_times,
)

HALF_LIFE_S = 1221.84
LAM = math.log(2) / HALF_LIFE_S
# GPU variants run the simulator's projections through CuPy (the stand-in on CI).
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def setup():
    scanner = Scanner.cylindrical(60.0, 32, 4, 4.0)
    grid = ImageGrid((14, 14, 4), 5.0)
    c = grid.voxel_centres_mm()
    r = np.hypot(c[..., 0], c[..., 1])
    activity = np.where(r < 25.0, 1000.0, 0.0).astype(np.float32)
    activity[(np.abs(c[..., 0] - 8) < 5) & (np.abs(c[..., 1]) < 5)] = 3000.0
    mu = np.where(r < 30.0, 0.0096, 0.0).astype(np.float32)
    eff = random_crystal_efficiencies(scanner, rng=0, spread=0.1)
    return scanner, grid, activity, mu, eff


def make_sim(setup, span=1, **kw):
    scanner, grid, activity, mu, eff = setup
    args = dict(crystal_efficiencies=eff, scatter_fraction=0.3, randoms_fraction=0.2, sensitivity_cps_per_kbq=50.0,
                chunk_planes=3, device="cpu", quiet=True)
    args.update(kw)
    return AcquisitionSimulator(SinogramLayout(scanner, 15, span=span), grid, mu, **args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("span", [1, 3])
def test_expected_trues_follow_the_system_model(setup, span, device):
    # Oracle: the recon's full-sinogram projector (its own LOR tables and plane multiplicity) and
    # normalisation; an independent code path from the simulator's plane chunks of explicit LORs.
    scanner, grid, activity, mu, eff = setup
    sim = make_sim(setup, span=span, device=device)
    layout = sim.layout
    out = sim.simulate_sinograms(activity, [0.0], [60.0], seed=1)
    proj = SinogramProjector(layout, grid, device="cpu")
    mult = layout.plane_multiplicity[:, None, None]
    att = np.exp(-proj.forward(mu).astype(np.float64) / mult)  # attenuation is a line integral, not a sum over pairs
    n = normalisation_factors(layout, eff)
    expected = sim.kappa * decay_integral(0.0, 60.0, LAM) * n * att * proj.forward(activity)
    np.testing.assert_allclose(out["trues"][0], expected, rtol=2e-5, atol=1e-9 * expected.max())
    # κ is the recon's: the point-source calibration through the full projector (multiplicity included).
    kappa = point_source_kappa(50.0, grid, lambda img: float(np.sum(proj.forward(img), dtype=np.float64)))
    assert sim.kappa == pytest.approx(kappa, rel=1e-6)


def test_calibration_point_source_count_rate(setup):
    # Unattenuated point source at the centre, unit efficiencies, 1 s, negligible decay:
    # trues = sensitivity * A / 1000.
    scanner, grid, _, _, _ = setup
    sim = AcquisitionSimulator(SinogramLayout(scanner, 15), grid, None, scatter_fraction=0.0, randoms_fraction=0.0,
                               sensitivity_cps_per_kbq=7.0, half_life_s=1e12, device="cpu", quiet=True)
    point = np.zeros(grid.shape, np.float32)
    point[7, 7, 2] = 2e6 / (np.prod(grid.voxel_size_mm) / 1000.0)  # 2 MBq in one voxel
    out = sim.simulate_sinograms(point, [0.0], [1.0], seed=0)
    assert out["trues"].sum() == pytest.approx(7.0 * 2e6 / 1000, rel=1e-5)


def test_resolution_defaults_to_the_scanners(setup):
    # A scanner that knows its resolution blurs by default; the oracle blurs with scipy first.
    _, grid, activity, mu, eff = setup
    scanner = Scanner.cylindrical(60.0, 32, 4, 4.0, resolution_fwhm_mm=8.0)
    layout = SinogramLayout(scanner, 15)
    point = np.zeros(grid.shape, np.float32)
    point[5, 8, 1] = 1e5
    kw = dict(scatter_fraction=0.0, randoms_fraction=0.0, device="cpu", quiet=True)
    blurred_sim = AcquisitionSimulator(layout, grid, None, **kw)
    assert blurred_sim.resolution is not None
    sigma = 8.0 / (2 * math.sqrt(2 * math.log(2))) / grid.voxel_size_mm
    pre = ndimage.gaussian_filter(point.astype(np.float64), sigma, mode="constant", truncate=3.0).astype(np.float32)
    plain_sim = AcquisitionSimulator(layout, grid, None, resolution_fwhm_mm=None, **kw)
    a = blurred_sim.simulate_sinograms(point, [0.0], [60.0], seed=0)["trues"]
    b = plain_sim.simulate_sinograms(pre, [0.0], [60.0], seed=0)["trues"]
    # scipy's kernel is normalised over the truncated window like ours; rounding of the radius may differ by a voxel
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * b.max())
    unblurred = plain_sim.simulate_sinograms(point, [0.0], [60.0], seed=0)["trues"]
    assert np.abs(unblurred - b).max() > 0.1 * b.max()  # the check can tell blurred from not


def test_fractions_come_out_as_asked(setup):
    activity = setup[2]
    sim = make_sim(setup, scatter_fraction=0.35, randoms_fraction=0.25)
    out = sim.simulate_sinograms(activity, [0.0], [600.0], seed=2)
    t, s, r = out["trues"].sum(), out["scatter"].sum(), out["randoms"].sum()
    assert s / (t + s) == pytest.approx(0.35, rel=1e-5)  # float32 sinograms
    assert r / (t + s + r) == pytest.approx(0.25, rel=1e-5)
    n = out["prompts"].sum()
    assert n > 1e5
    assert abs(n - (t + s + r)) < 5 * math.sqrt(t + s + r)
    assert abs(out["delayeds"].sum() - r) < 5 * math.sqrt(r)
    # Scatter is smooth and extends beyond the object; it is zero only in gaps.
    assert np.all(out["scatter"][0][out["trues"][0] > 0] > 0)


def test_randoms_follow_singles_model(setup):
    scanner, grid, activity, mu, eff = setup
    sim = make_sim(setup, span=3)
    acq = sim.acquire(np.stack([activity] * 2, -1), [0.0, 60.0], [60.0, 180.0], seed=3)
    out = acq.expected()
    activity_bq = activity.sum(dtype=np.float64) * np.prod(grid.voxel_size_mm) / 1000
    for k, (a, b) in enumerate([(0.0, 60.0), (60.0, 180.0)]):
        # R_ij = 2 tau S_i S_j summed over the plane's ring pairs, S_i(t) = sigma eps_i A(t).
        singles = acq.singles_scale * eff
        i2 = activity_bq**2 * decay_integral(a, b, 2 * LAM)
        oracle = randoms_from_singles(sim.layout, singles, 4.0, duration_s=1.0) * i2
        np.testing.assert_allclose(out["randoms"][k], oracle, rtol=1e-5)
    counts = acq.singles_counts()
    np.testing.assert_allclose(counts[1], acq.singles_scale * eff * activity_bq * decay_integral(60.0, 180.0, LAM), rtol=1e-12)


@pytest.mark.parametrize("scale", [0.02, 30.0])  # a few counts per frame in most bins, and hundreds
def test_counts_are_poisson_per_bin(setup, scale):
    # K identical frames (no decay) are K independent draws of one ybar: per bin, the mean (chi-square)
    # and the variance (index of dispersion) must match ybar, and delayeds must follow the randoms.
    activity = setup[2]
    k = 400
    sim = make_sim(setup, sensitivity_cps_per_kbq=scale, half_life_s=1e15)
    edges = np.arange(k + 1) * 30.0
    acq = sim.acquire(BasisActivity(activity[None], np.ones((1, k))), edges[:-1], edges[1:], seed=0)
    ex = acq.expected()
    ybar = ex["trues"][0] + ex["scatter"][0] + ex["randoms"][0]
    np.testing.assert_allclose(ex["trues"], np.broadcast_to(ex["trues"][0], ex["trues"].shape), rtol=1e-6)
    counts = acq.sinograms()
    for name, mean_sino in (("prompts", ybar), ("delayeds", ex["randoms"][0])):
        c = counts[name].reshape(k, -1).astype(np.float64)
        mu = mean_sino.ravel()
        m = mu > 0
        assert np.all(c[:, ~m] == 0), name
        z2 = (c[:, m].mean(0) - mu[m]) ** 2 / (mu[m] / k)
        # chi-square per bin: mean 1, sd sqrt(2 / bins)
        assert abs(z2.mean() - 1) < 5 * math.sqrt(2 / m.sum()), name
        # index of dispersion s^2 / ybar: mean 1, per-bin sd about sqrt((1/ybar + 2) / k)
        d = c[:, m].var(0, ddof=1) / mu[m]
        assert abs(d.mean() - 1) < 5 * math.sqrt(np.mean((1 / mu[m] + 2) / k) / m.sum()), name
    # Frames and blocks are independent draws: neighbouring frames are uncorrelated.
    p = counts["prompts"].reshape(k, -1).sum(axis=1).astype(float)
    assert abs(np.corrcoef(p[:-1], p[1:])[0, 1]) < 5 / math.sqrt(k)


def test_noise_free_gives_the_expected_counts(setup):
    activity = setup[2]
    acq = make_sim(setup).acquire(activity, [0.0], [60.0], seed=0, noise=False)
    ex = acq.expected()
    s = acq.sinograms()
    np.testing.assert_allclose(s["prompts"], ex["trues"] + ex["scatter"] + ex["randoms"], rtol=2e-6)
    np.testing.assert_allclose(s["delayeds"], ex["randoms"], rtol=2e-6)


def test_same_seed_same_counts_whatever_the_block_size(setup):
    activity = setup[2]
    a = make_sim(setup, chunk_planes=3).acquire(activity, [0.0], [60.0], seed=7).sinograms()
    b = make_sim(setup, chunk_planes=3).acquire(activity, [0.0], [60.0], seed=7).sinograms()
    c = make_sim(setup, chunk_planes=3).acquire(activity, [0.0], [60.0], seed=8).sinograms()
    np.testing.assert_array_equal(a["prompts"], b["prompts"])
    assert not np.array_equal(a["prompts"], c["prompts"])


def _expand(acq, counts):
    chunks = list(acq.events(lambda k: (counts["prompts"][k], counts["delayeds"][k])))
    ids = np.concatenate([c.detector_ids for c in chunks])
    prompt = np.concatenate([c.is_prompt for c in chunks])
    t = np.concatenate([c.time_ms for c in chunks])
    frame = np.concatenate([np.full(len(c), c.frame_index) for c in chunks])
    tof = None if chunks[0].tof_bin is None else np.concatenate([c.tof_bin for c in chunks])
    return chunks, ids, prompt, t, frame, tof


@pytest.mark.parametrize("span", [1, 3])
@pytest.mark.parametrize("tof", [None, TOFParameters(5, 20.0, 300.0)])
def test_listmode_expansion_histograms_back_to_the_sinograms(setup, tof, span):
    # Oracle: petbind.recon.listmode.histogram_events (SinogramLayout.bin_indices, the recon's inverse map).
    activity = setup[2]
    sim = make_sim(setup, span=span, tof=tof, max_events_per_chunk=1000, sensitivity_cps_per_kbq=5.0)
    frames = ([0.0, 30.0], [30.0, 90.0])
    acq = sim.acquire(BasisActivity(activity[None] / 1000, np.array([[1000.0, 500.0]])), *frames, seed=5)
    counts = acq.sinograms()
    chunks, ids, prompt, t, frame, kb = _expand(acq, counts)
    assert max(len(c) for c in chunks) <= 1000 and len(chunks) > 4
    assert np.all(np.diff(t) >= 0), "events must be time-ordered across chunks and frames"
    for k in range(2):
        sel = frame == k
        assert np.all((t[sel] >= frames[0][k] * 1000) & (t[sel] < frames[1][k] * 1000))
    nt = None if tof is None else tof.num_bins
    hist, outside = histogram_events(sim.layout, ids, prompt, tof_bin=kb, num_tof_bins=nt, frame_index=frame, num_frames=2)
    assert outside.sum() == 0
    for k in range(2):
        np.testing.assert_array_equal(hist[0, k], counts["prompts"][k].ravel())
        np.testing.assert_array_equal(hist[1, k], counts["delayeds"][k].ravel())


def test_ring_pairs_of_a_plane_are_drawn_by_efficiency(setup):
    # span 3: the plane of ring sum 1 groups the pairs (0, 1) and (1, 0).  With ring 0's odd crystals at
    # efficiency 0.2 and everything else at 1, a bin (c1 even, c2 odd) has pair weights
    # ε(0,c1) ε(1,c2) = 1 and ε(1,c1) ε(0,c2) = 0.2: events must pick (0, 1) with probability 1/1.2.
    scanner = setup[0]
    activity = setup[2]
    ncr = scanner.crystals_per_ring
    eff = np.ones(scanner.num_detectors)
    eff[1:ncr:2] = 0.2
    sim = make_sim(setup, span=3, crystal_efficiencies=eff, sensitivity_cps_per_kbq=40.0)
    layout = sim.layout
    plane = layout.plane_of_ring_pair[np.flatnonzero((layout.ring_pairs[:, 0] == 0) & (layout.ring_pairs[:, 1] == 1))[0]]
    assert sorted(map(tuple, layout.ring_pairs[layout.plane_of_ring_pair == plane].tolist())) == [(0, 1), (1, 0)]
    acq = sim.acquire(activity, [0.0], [300.0], seed=2)
    _, ids, _, _, _, _ = _expand(acq, acq.sinograms())
    r, c = ids // ncr, ids % ncr
    in_plane = (r.sum(axis=1) == 1) & (r.max(axis=1) == 1)
    sel = in_plane & (c[:, 0] % 2 == 0) & (c[:, 1] % 2 == 1)
    n, n01 = int(sel.sum()), int((sel & (r[:, 0] == 0)).sum())
    p01 = 1 / 1.2
    assert n > 2000
    assert abs(n01 - n * p01) < 5 * math.sqrt(n * p01 * (1 - p01))


@pytest.mark.parametrize("tof", [None, TOFParameters(3, 30.0, 300.0)])
def test_event_times_are_decay_distributed(setup, tof):
    # Short half-life so that the decay shows within the frame; KS test against the analytic CDF.
    activity = setup[2]
    half = 40.0
    lam = math.log(2) / half
    sim = make_sim(setup, tof=tof, half_life_s=half, sensitivity_cps_per_kbq=10.0, randoms_fraction=0.4,
                   max_events_per_chunk=5000)
    a, b = 20.0, 140.0
    acq = sim.acquire(BasisActivity(activity[None], np.ones((1, 1))), [a], [b], seed=11)
    counts = acq.sinograms()
    _, _, prompt, t, _, _ = _expand(acq, counts)
    t = t / 1000
    assert t.min() >= a and t.max() < b

    def cdf(mu):
        return lambda x: -np.expm1(-mu * (np.asarray(x) - a)) / -np.expm1(-mu * (b - a))

    # Delayed events (pure randoms) decay at 2 lambda; prompts are a mixture of both.
    delayed = t[~prompt]
    assert delayed.size > 2000
    assert stats.kstest(delayed, cdf(2 * lam)).pvalue > 1e-3
    assert stats.kstest(delayed, cdf(lam)).pvalue < 1e-6  # the test can tell the two apart
    st = acq.frame_stats[0]
    w = (st.expected_trues + st.expected_scatter) / (st.expected_trues + st.expected_scatter + st.expected_randoms)
    mix = lambda x: w * cdf(lam)(x) + (1 - w) * cdf(2 * lam)(x)  # noqa: E731
    assert stats.kstest(t[prompt], mix).pvalue > 1e-3


def test_sample_decay_times_ks():
    rng = np.random.default_rng(0)
    lam = 0.05
    t = sample_decay_times(rng, 20000, 10.0, 70.0, lam)
    cdf = lambda x: -np.expm1(-lam * (x - 10.0)) / -np.expm1(-lam * 60.0)  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert t.min() >= 10.0 and t.max() < 70.0


@pytest.mark.parametrize("device", DEVICES)
def test_tof_sums_to_non_tof(setup, device):
    activity = setup[2]
    plain = make_sim(setup).simulate_sinograms(activity, [0.0], [60.0], seed=0)
    tof = make_sim(setup, tof=TOFParameters(7, 15.0, 250.0), device=device).simulate_sinograms(
        activity, [0.0], [60.0], seed=0)
    for name in ("trues", "scatter", "randoms"):
        np.testing.assert_allclose(tof[name][0].sum(-1), plain[name][0], rtol=1e-4, atol=1e-8 * plain[name].max())


def test_basis_activity_equals_explicit_frames(setup):
    activity = setup[2]
    blob = np.zeros_like(activity)
    blob[4:8, 4:8, :] = 1.0
    images = np.stack([activity / 1000.0, blob])
    weights = np.array([[1000.0, 800.0], [0.0, 500.0]])
    frames = ([0.0, 60.0], [60.0, 120.0])
    explicit = np.stack([np.tensordot(weights[:, k], images, axes=1) for k in range(2)], -1)
    # Scatter is built per basis image (per-plane fraction each): compare the linear parts and totals.
    a = make_sim(setup).acquire(BasisActivity(images, weights), *frames, seed=4).expected()
    b = make_sim(setup).acquire(explicit, *frames, seed=4).expected()
    for name in ("trues", "randoms"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-9 * b[name].max())
    np.testing.assert_allclose(a["scatter"].sum(axis=(2, 3)), b["scatter"].sum(axis=(2, 3)), rtol=1e-5)


def test_projections_are_cached_across_acquisitions(setup, monkeypatch):
    activity = setup[2]
    sim = make_sim(setup)
    images = activity[None] / 1000.0
    sim.acquire(BasisActivity(images, np.ones((1, 1)) * 1000), [0.0], [60.0], seed=0)
    calls = []
    monkeypatch.setattr(sim, "_unit_chunk", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    acq = sim.acquire(BasisActivity(images, np.ones((1, 2)) * 500), [0.0, 60.0], [60.0, 120.0], seed=1)
    acq.sinograms()
    assert calls == []


def test_bad_input_is_refused(setup):
    scanner, grid, activity, mu, eff = setup
    layout = SinogramLayout(scanner, 15)
    with pytest.raises(ValueError, match="scatter_fraction"):
        AcquisitionSimulator(layout, grid, mu, scatter_fraction=1.0)
    with pytest.raises(ValueError, match="resolution_fwhm_mm"):
        AcquisitionSimulator(layout, grid, mu, resolution_fwhm_mm="blurry")
    sim = make_sim(setup)
    with pytest.raises(ValueError, match="non-overlapping"):
        sim.acquire(np.stack([activity] * 2, -1), [0.0, 30.0], [60.0, 90.0])
    with pytest.raises(ValueError, match="activity must have shape"):
        sim.acquire(activity[:-1], [0.0], [60.0])
    with pytest.raises(ValueError, match="non-negative"):
        sim.acquire(-activity, [0.0], [60.0])
    with pytest.raises(ValueError, match="non-negative"):
        sim.acquire(BasisActivity(activity[None], -np.ones((1, 1))), [0.0], [60.0])
    acq = sim.acquire(activity, [0.0], [60.0], noise=False)
    s = acq.sinograms()
    with pytest.raises(TypeError, match="integer counts"):
        list(acq.events(lambda k: (s["prompts"][k], s["delayeds"][k])))


def test_scatter_shape_is_a_gaussian_blur(setup):
    # Oracle: scipy's Gaussian filter with the same widths (periodic views, zero outside radially).
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
    ref_n = ref / ref.sum(axis=(1, 2), keepdims=True)
    got_n = got / got.sum(axis=(1, 2), keepdims=True)
    assert np.abs(got_n - ref_n).max() < 0.05 * ref_n.max()


def test_write_h5_round_trip(setup, tmp_path):
    from petbind.recon.rawdata.schema import ExamInfo, ListmodeCorrections
    from petbind.recon.rawdata.sinograms import read_sinograms_h5

    activity = setup[2]
    sim = make_sim(setup, span=3)
    frames = ([30.0, 90.0], [90.0, 150.0])
    acq = sim.acquire(np.stack([activity, activity], -1), *frames, seed=0)
    path = tmp_path / "sino.h5"
    corr = ListmodeCorrections(crystal_efficiencies=sim.crystal_efficiencies, calibration_factor=1 / sim.kappa)
    acq.write_h5(path, exam=ExamInfo(isotope="C11", half_life_s=HALF_LIFE_S), corrections=corr)
    data = read_sinograms_h5(path)
    again = make_sim(setup, span=3).acquire(np.stack([activity, activity], -1), *frames, seed=0).sinograms()
    assert data.prompts.dtype == np.uint16  # counts fit: the small type is chosen
    np.testing.assert_array_equal(data.prompts, again["prompts"])
    np.testing.assert_array_equal(data.delayeds, again["delayeds"])
    np.testing.assert_array_equal(data.frame_start_s, frames[0])
    assert data.layout.span == 3 and data.corrections.equals(corr) and data.exam.isotope == "C11"
    assert [st.prompts for st in acq.frame_stats] == data.prompts.reshape(2, -1).sum(axis=1).tolist()


def test_gap_crystals_never_detect(tmp_path):
    from petbind.recon.rawdata.hdf5 import ListmodeReader

    scanner = Scanner.polygon(8, 4, 8.0, 60.0, 2, 4.0, gap_crystals_per_module=1)
    layout = SinogramLayout(scanner, 17)
    grid = ImageGrid((12, 12, 2), 6.0)
    act = np.full(grid.shape, 5000.0, np.float32)
    sim = AcquisitionSimulator(layout, grid, np.full(grid.shape, 0.0096, np.float32), sensitivity_cps_per_kbq=20.0,
                               device="cpu", quiet=True)
    acq = sim.acquire(act, [0.0], [60.0], seed=0)
    out = {**acq.expected(), **acq.sinograms()}
    gap = ~layout.bin_mask()
    for name in ("trues", "scatter", "randoms", "prompts", "delayeds"):
        assert np.all(out[name][0][gap] == 0), name
    path = tmp_path / "lm.h5"
    # the writer validates: no event may name a gap crystal
    n = acq.write_listmode_h5(path, lambda k: (out["prompts"][k], out["delayeds"][k]))
    assert ListmodeReader(path).num_events == n == out["prompts"].sum() + out["delayeds"].sum()


@pytest.mark.parametrize("device", DEVICES)
def test_osem_with_the_simulator_factors_recovers_bq_per_ml(setup, device):
    # Cross-module check: data simulated here, reconstructed by petbind.recon.osem with the same factors
    # (m = kappa * D * n * a; additive = scatter + randoms), give back the activity in Bq/mL.
    from petbind.recon.osem import SinogramOSEM

    scanner, grid, activity, mu, eff = setup
    sim = make_sim(setup, device=device)
    out = sim.acquire(activity, [0.0], [120.0], seed=0).expected()
    m = sim.kappa * decay_integral(0.0, 120.0, LAM) * sim.normalisation * sim.attenuation
    add = (out["scatter"][0] + out["randoms"][0]).astype(np.float32)
    ybar = (out["trues"][0] + add).astype(np.float32)
    rec = SinogramOSEM(sim.layout, grid, multiplicative=m.astype(np.float32), additive=add, num_subsets=1,
                       device=device)
    x = rec.reconstruct(ybar, num_iterations=200, progress=False)
    assert isinstance(x, np.ndarray)
    c = grid.voxel_centres_mm()
    r = np.hypot(c[..., 0], c[..., 1])
    bg = (r < 18) & (np.abs(c[..., 0] - 8) > 10)
    hot = (np.abs(c[..., 0] - 8) < 3) & (np.abs(c[..., 1]) < 3)
    assert np.median(x[bg]) == pytest.approx(1000.0, rel=0.05)
    assert np.median(x[hot]) == pytest.approx(3000.0, rel=0.1)
