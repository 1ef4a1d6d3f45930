"""Framing, histogramming, bin look-up, decay and dead-time factors."""

import math
from collections import Counter

import numpy as np
import pytest
from scipy.integrate import quad

from petbind.core.decay import decay_correction_factor
from petbind.core.frames import Frames, parse_frames
from petbind.recon.corrections import (
    dead_time_factors,
    frame_dead_time_factor,
    frame_singles_rate_cps,
)
from petbind.recon.geometry import Scanner, SinogramLayout, TOFParameters
from petbind.recon.listmode import histogram_listmode, select_frame
from petbind.recon.rawdata.schema import ExamInfo, ListmodeChunk, ListmodeCorrections
from petbind.recon.rawdata.hdf5 import ListmodeReader, ListmodeWriter

LAYOUTS = [(15, None, 1), (7, 2, 1), (9, None, 3), (1, 0, 1), (8, 3, 3)]


def scanners():
    return [Scanner.cylindrical(100.0, 16, 5, 4.0), Scanner.polygon(4, 3, 5.0, 50.0, 4, 4.0, gap_crystals_per_module=1)]


def forward_table(layout):
    """(d1, d2) -> (flat bin, swapped) for every ring pair of every bin, from the forward map."""
    n = layout.scanner.crystals_per_ring
    cp = layout.crystal_pairs()
    table = {}
    for (r1, r2), plane in zip(layout.ring_pairs, layout.plane_of_ring_pair):
        for v in range(layout.num_views):
            for r in range(layout.num_radial):
                c1, c2 = cp[v, r]
                if not (layout.scanner.crystal_mask[c1] and layout.scanner.crystal_mask[c2]):
                    continue
                b = (plane * layout.num_views + v) * layout.num_radial + r
                table[(r1 * n + c1, r2 * n + c2)] = (b, False)
                table[(r2 * n + c2, r1 * n + c1)] = (b, True)
    return table


@pytest.mark.parametrize("sc_index", [0, 1])
@pytest.mark.parametrize("num_radial,mrd,span", LAYOUTS)
def test_bin_indices_inverts_forward_map(sc_index, num_radial, mrd, span):
    layout = SinogramLayout(scanners()[sc_index], num_radial, mrd, span)
    dp = layout.detector_pairs().reshape(-1, 2)
    expected = np.where(layout.bin_mask().ravel(), np.arange(layout.num_bins), -1)
    b, sw = layout.bin_indices(dp, return_swapped=True)
    np.testing.assert_array_equal(b, expected)
    b2, sw2 = layout.bin_indices(dp[:, ::-1], return_swapped=True)
    np.testing.assert_array_equal(b2, expected)
    ok = expected >= 0
    assert not sw[ok].any() and sw2[ok].all()
    # every detector pair of the scanner: in the forward table or -1
    table = forward_table(layout)
    nd = layout.scanner.num_detectors
    d1, d2 = np.meshgrid(np.arange(nd), np.arange(nd), indexing="ij")
    allp = np.stack([d1.ravel(), d2.ravel()], 1)
    b, sw = layout.bin_indices(allp, return_swapped=True)
    want = np.array([table.get((a, c), (-1, False))[0] for a, c in allp])
    want_sw = np.array([table.get((a, c), (-1, False))[1] for a, c in allp])
    np.testing.assert_array_equal(b, want)
    np.testing.assert_array_equal(sw[want >= 0], want_sw[want >= 0])


def test_bin_indices_rejects_bad_ids():
    layout = SinogramLayout(scanners()[0], 7)
    with pytest.raises(ValueError, match="detector_ids"):
        layout.bin_indices(np.array([[0, layout.scanner.num_detectors]]))
    with pytest.raises(ValueError, match="shape"):
        layout.bin_indices(np.array([0, 1]))


# ------------------------------------------------------------------------------------------------
def test_frame_strings_and_bids():
    f = parse_frames("6x10s,3x20s,6x30s,5x60s")
    assert len(f) == 20
    assert f.end_s[-1] == 6 * 10 + 3 * 20 + 6 * 30 + 5 * 60
    np.testing.assert_array_equal(f.start_s[1:], f.end_s[:-1])
    np.testing.assert_allclose(f.mid_s, (f.start_s + f.end_s) / 2)
    assert parse_frames("2x1m,1x0.5min") == Frames([0, 60, 120], [60, 60, 30])
    g = parse_frames([0, 10, 30], [10, 20, 30])
    assert g == parse_frames("1x10s,20s,30s")
    assert Frames.from_bids(**{"frame_times_start": g.to_bids()["FrameTimesStart"], "frame_duration": g.to_bids()["FrameDuration"]}) == g
    # thirty 0.1 s frames end exactly at 3 s (no accumulated rounding)
    h = parse_frames("30x0.1s")
    assert h.end_ms[-1] == 3000.0 and h.start_ms[7] == 700.0
    for bad in ["", "6x10", "6y10s", "0x10s", "10sec"]:
        with pytest.raises(ValueError):
            parse_frames(bad)
    with pytest.raises(ValueError, match="overlap"):
        Frames([0, 5], [10, 10])


def test_frame_selection_boundaries_are_exact():
    f = parse_frames("2x10s,1x0.1s")
    t = np.array([0.0, 9999.999, 10000.0, 19999.0, 20000.0, 20099.999, 20100.0, np.nextafter(10000.0, 0)])
    np.testing.assert_array_equal(f.frame_of(t), [0, 0, 1, 1, 2, 2, -1, 0])
    np.testing.assert_array_equal(select_frame(t, 10, 20), [False, False, True, True, False, False, False, False])
    gap = Frames([0, 20], [10, 5])
    np.testing.assert_array_equal(gap.frame_of(np.array([9999.0, 10000.0, 15000.0, 20000.0, 25000.0])), [0, -1, -1, 1, -1])


# ------------------------------------------------------------------------------------------------
def _events(layout, n, rng, tof_bins):
    real = np.flatnonzero(layout.scanner.detector_mask())
    ids = rng.choice(real, (n, 2)).astype(np.int32)
    # add a share of events that certainly hit bins, both orientations
    dp = layout.detector_pairs().reshape(-1, 2)[layout.bin_mask().ravel()]
    pick = dp[rng.integers(0, len(dp), n)]
    flip = rng.random(n) < 0.5
    pick[flip] = pick[flip, ::-1]
    use = rng.random(n) < 0.7
    ids[use] = pick[use]
    t = np.sort(rng.uniform(0, 30_000, n))
    k = rng.integers(0, tof_bins, n).astype(np.int16) if tof_bins else None
    return ids, k, t, rng.random(n) < 0.75


@pytest.mark.parametrize("tof_bins", [None, 5])
@pytest.mark.parametrize("num_radial,mrd,span", [(15, None, 1), (9, 3, 3)])
def test_histogram_matches_event_loop(tmp_path, tof_bins, num_radial, mrd, span):
    rng = np.random.default_rng(11)
    sc = scanners()[1]
    layout = SinogramLayout(sc, num_radial, mrd, span)
    ids, k, t, p = _events(layout, 4000, rng, tof_bins)
    tof = TOFParameters(tof_bins, 10.0, 200.0) if tof_bins else None
    path = tmp_path / "lm.h5"
    with ListmodeWriter(path, sc, tof=tof, chunk_events=700) as w:
        w.append(ids, k, t, p)
    frames = parse_frames("1x10s,2x5s,1x7.5s")  # ends at 27.5 s: later events are outside every frame
    h = histogram_listmode(ListmodeReader(path, chunk_events=333), layout, frames, tof=True, progress=False)
    table = forward_table(layout)
    want = {kind: np.zeros((len(frames), layout.num_bins * (tof_bins or 1))) for kind in (True, False)}
    outside = Counter()
    totals = Counter()
    for i in range(len(t)):
        fr = [j for j, (a, b) in enumerate(frames) if a * 1000 <= t[i] < b * 1000]
        if not fr:
            continue
        totals[(p[i], fr[0])] += 1
        hit = table.get((int(ids[i, 0]), int(ids[i, 1])))
        if hit is None:
            outside[(p[i], fr[0])] += 1
            continue
        b, swapped = hit
        if tof_bins:
            kk = tof_bins - 1 - k[i] if swapped else k[i]
            b = b * tof_bins + kk
        want[bool(p[i])][fr[0], b] += 1
    shape = (len(frames),) + layout.shape + ((tof_bins,) if tof_bins else ())
    np.testing.assert_array_equal(h.prompts, want[True].reshape(shape))
    np.testing.assert_array_equal(h.delayeds, want[False].reshape(shape))
    for j in range(len(frames)):
        assert h.num_prompts[j] == totals[(True, j)] and h.num_delayeds[j] == totals[(False, j)]
        assert tuple(h.num_outside_layout[j]) == (outside[(True, j)], outside[(False, j)])
    assert h.prompts.sum() + h.num_outside_layout[:, 0].sum() == h.num_prompts.sum()
    if tof_bins:
        # summing TOF equals the non-TOF histogram of the same events
        h0 = histogram_listmode(ListmodeReader(path), layout, frames, tof=False, progress=False)
        np.testing.assert_array_equal(h0.prompts, h.prompts.sum(-1))


def test_histogram_non_tof_equals_histogramdd():
    rng = np.random.default_rng(2)
    sc = scanners()[0]
    layout = SinogramLayout(sc, 15)
    dp = layout.detector_pairs()
    pl, v, r = (rng.integers(0, s, 5000) for s in layout.shape)
    ids = dp[pl, v, r]
    chunk = ListmodeChunk(ids.astype(np.int32), None, np.arange(5000.0), np.ones(5000, bool))
    h = histogram_listmode([chunk], layout, None, tof=False, progress=False)
    ref, _ = np.histogramdd(np.stack([pl, v, r], 1), bins=[np.arange(s + 1) - 0.5 for s in layout.shape])
    np.testing.assert_array_equal(h.prompts[0], ref)


# ------------------------------------------------------------------------------------------------
def test_decay_factor_against_numerical_integration():
    half = 1221.84
    lam = math.log(2) / half
    for t0, t1, start in [(0, 10, 0), (600, 900, 0), (3000, 3300, 120.0), (5.0, 5.001, 0)]:
        integral, _ = quad(lambda t: math.exp(-lam * t), t0 + start, t1 + start, epsabs=0, epsrel=1e-13)
        expected = (t1 - t0) / integral
        assert decay_correction_factor(t0, t1, half, scan_start_s=start) == pytest.approx(expected, rel=1e-10)
    f = parse_frames("3x60s")
    np.testing.assert_allclose(decay_correction_factor(f.start_s, f.end_s, half), [decay_correction_factor(a, b, half) for a, b in f])
    exam = ExamInfo(half_life_s=half, scan_start_s=30.0)
    want = [(b - a) / quad(lambda t: math.exp(-lam * t), a + 30, b + 30, epsrel=1e-13)[0] for a, b in f]
    np.testing.assert_allclose(f.decay_correction(exam), want, rtol=1e-10)
    with pytest.raises(ValueError, match="half_life_s"):
        f.decay_correction(ExamInfo())


def test_dead_time_models_recover_true_rate():
    n_true = np.array([0.0, 1e3, 1e5, 4e5])
    tau = 1e-6
    m_np = n_true / (1 + n_true * tau)
    m_p = n_true * np.exp(-n_true * tau)
    np.testing.assert_allclose(dead_time_factors(m_np, tau, "non-paralyzable") * m_np, n_true, rtol=1e-12)
    np.testing.assert_allclose(dead_time_factors(m_p, tau, "paralyzable") * m_p, n_true, rtol=1e-10)
    with pytest.raises(ValueError, match="model"):
        dead_time_factors(m_np, tau, "both")
    with pytest.raises(ValueError, match="1/e"):
        dead_time_factors(np.array([1e6]), tau, "paralyzable")


def test_frame_singles_and_dead_time():
    nd = 4
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    counts = np.array([[10, 0, 5, 1], [20, 2, 5, 1], [40, 4, 10, 2]], float)
    corr = ListmodeCorrections(singles_block_edges_s=edges, singles_counts=counts)
    corr.validate(nd)
    f = Frames([0.5, 1.5], [1.0, 2.5])
    rate = frame_singles_rate_cps(corr, f)
    # frame 0: half of block 0 + half of block 1, over 1 s; frame 1: half of block 1 + block 2 over 2.5 s
    np.testing.assert_allclose(rate[0], 0.5 * counts[0] + 0.5 * counts[1])
    np.testing.assert_allclose(rate[1], (0.5 * counts[1] + counts[2]) / 2.5)
    with pytest.raises(ValueError, match="singles blocks cover"):
        frame_singles_rate_cps(corr, Frames([3.0], [2.0]))
    tau = 1e-3
    fac = frame_dead_time_factor(rate, tau)
    per_det = 1 / (1 - rate * tau)
    pairs = np.einsum("fi,fj->fij", per_det, per_det).mean(axis=(1, 2))
    np.testing.assert_allclose(fac, pairs)


@pytest.mark.gpu
@pytest.mark.parametrize("tof_bins", [None, 5])
def test_histogram_gpu_matches_cpu(tmp_path, tof_bins):
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(4)
    sc = scanners()[1]
    layout = SinogramLayout(sc, 9, 3, 3)
    ids, k, t, p = _events(layout, 3000, rng, tof_bins)
    tof = TOFParameters(tof_bins, 10.0, 200.0) if tof_bins else None
    path = tmp_path / "lm.h5"
    with ListmodeWriter(path, sc, tof=tof) as w:
        w.append(ids, k, t, p)
    frames = parse_frames("3x10s")
    cpu = histogram_listmode(ListmodeReader(path, chunk_events=500), layout, frames, device="cpu", progress=False)
    gpu = histogram_listmode(ListmodeReader(path, chunk_events=500), layout, frames, device="gpu", progress=False)
    np.testing.assert_array_equal(gpu.prompts, cpu.prompts)
    np.testing.assert_array_equal(gpu.delayeds, cpu.delayeds)
    np.testing.assert_array_equal(gpu.num_outside_layout, cpu.num_outside_layout)
    b_gpu = layout.bin_indices(cupy.asarray(ids))
    np.testing.assert_array_equal(cupy.asnumpy(b_gpu), layout.bin_indices(ids))
