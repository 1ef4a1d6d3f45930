import numpy as np
import pytest
from scipy.integrate import quad, solve_ivp

from petbind.sim.kinetics import (
    DEFAULT_FRAME_DURATIONS_S,
    FengInput,
    RegionKinetics,
    ReferenceKinetics,
    convolve_exponential,
    frame_average,
    frame_times_s,
    one_tissue_tac,
    simulate_regional_tacs,
    srtm_tac,
    two_tissue_tac,
)


def test_default_framing_is_90_min():
    start, end = frame_times_s(DEFAULT_FRAME_DURATIONS_S)
    assert start[0] == 0 and end[-1] == 5400.0
    np.testing.assert_array_equal(start[1:], end[:-1])
    with pytest.raises(ValueError, match="positive"):
        frame_times_s([10.0, -1.0])


@pytest.mark.parametrize("k", [(0.3, 0.12, 0.09, 0.06), (0.5, 0.4, 0.0, 0.05), (0.2, 0.1, 0.2, 0.02)])
def test_two_tissue_matches_ode_solution(k):
    k1, k2, k3, k4 = k
    cp = FengInput()
    t = np.linspace(0, 90, 451)

    def rhs(time, c):
        p = cp(time)
        return [k1 * p - (k2 + k3) * c[0] + k4 * c[1], k3 * c[0] - k4 * c[1]]

    # Start the integration at the arrival time so that the kink in Cp is not inside a step.
    t0 = cp.delay_min
    sol = solve_ivp(rhs, (t0, 90), [0.0, 0.0], t_eval=t[t >= t0], rtol=1e-10, atol=1e-8, method="LSODA")
    ode = np.zeros_like(t)
    ode[t >= t0] = sol.y.sum(axis=0)
    if k3 == 0.0:
        analytic = one_tissue_tac(t, cp, k1, k2)
    else:
        analytic = two_tissue_tac(t, cp, k1, k2, k3, k4)
    np.testing.assert_allclose(analytic, ode, rtol=1e-6, atol=1e-6 * ode.max())


@pytest.mark.parametrize("which", ["l1_per_min", "l2_per_min"])
@pytest.mark.parametrize("t", [0.3, 2.0, 30.0])
def test_feng_convolution_is_stable_near_degeneracy(which, t):
    # alpha = -lambda makes beta = 0 in a term (linear term for lambda1); compare with quadrature.
    cp = FengInput()
    alpha = -getattr(cp, which) * (1 + 1e-5)
    ref = quad(lambda s: cp(s) * np.exp(-alpha * (t - s)), 0, t, points=[cp.delay_min], limit=200, epsabs=0, epsrel=1e-12)[0]
    assert cp.convolve_exponential(np.array([t]), alpha)[0] == pytest.approx(ref, rel=1e-8)


def test_convolve_exponential_exact_for_linear_pieces():
    t = np.array([0.0, 1.0, 2.5, 4.0])
    c = np.array([0.0, 2.0, 2.0, 0.5])
    k = 0.3

    def interp(s):
        return np.interp(s, t, c)

    for j, tj in enumerate(t):
        ref = quad(lambda s: interp(s) * np.exp(-k * (tj - s)), 0, tj, points=list(t[1:j]) or None)[0] if tj > 0 else 0.0
        assert convolve_exponential(t, c, k)[j] == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_srtm_with_one_tissue_reference_equals_one_tissue_target():
    # With a one-tissue target of the same V_ND, SRTM is exact:
    # C_T = R1 K1' Cp conv exp(-k2 t / (1 + BP)).
    cp = FengInput()
    k1r, k2r = 0.3, 0.12
    r1, bp = 1.2, 1.5
    t = np.linspace(0, 90, 9001)
    ref = one_tissue_tac(t, cp, k1r, k2r)
    target = srtm_tac(t, ref, r1, r1 * k2r, bp)
    truth = one_tissue_tac(t, cp, r1 * k1r, r1 * k2r / (1 + bp))
    np.testing.assert_allclose(target, truth, rtol=2e-4, atol=1e-4 * truth.max())


def test_distribution_volume_ratio_is_one_plus_bp():
    # Areas under the curves over a long time: V_T / V_ND = 1 + BP_ND (2TCM target, 1TCM reference).
    cp = FengInput(l2_per_min=-0.1)  # fast clearance so that 600 min reach the plateau of the areas
    ref = ReferenceKinetics(k1=0.3, k2_per_min=0.12, k4_per_min=0.06, blood_volume_fraction=0.0)
    bp = 1.7
    t = np.linspace(0, 600, 60001)
    c_ref = one_tissue_tac(t, cp, ref.k1, ref.k2_per_min)
    c_t = two_tissue_tac(t, cp, 1.1 * ref.k1, 1.1 * ref.k2_per_min, bp * ref.k4_per_min, ref.k4_per_min)
    assert np.trapezoid(c_t, t) / np.trapezoid(c_ref, t) == pytest.approx(1 + bp, rel=1e-4)


def test_frame_average_matches_quadrature():
    cp = FengInput()
    start, end = frame_times_s(DEFAULT_FRAME_DURATIONS_S)
    t = np.union1d(np.linspace(0, 90, 9001), np.concatenate([start, end]) / 60)
    curve = two_tissue_tac(t, cp, 0.3, 0.12, 0.1, 0.06)
    avg = frame_average(t, curve, start, end)
    f = lambda s: two_tissue_tac(np.array([s]), cp, 0.3, 0.12, 0.1, 0.06)[0]
    for j in [0, 3, 8, 20, len(start) - 1]:
        a, b = start[j] / 60, end[j] / 60
        ref = quad(f, a, b, points=[cp.delay_min] if a < cp.delay_min < b else None, limit=200)[0] / (b - a)
        assert avg[j] == pytest.approx(ref, rel=2e-4)


def test_frame_average_exact_for_piecewise_linear_samples():
    t = np.array([0.0, 0.5, 2.0, 3.0])
    v = np.array([0.0, 4.0, 1.0, 3.0])
    start = np.array([0.0, 12.0, 50.0])
    end = np.array([20.0, 170.0, 180.0])
    avg = frame_average(t, np.column_stack([v, 2 * v]), start, end)
    for j in range(3):
        a, b = start[j] / 60, end[j] / 60
        ref = quad(lambda s: np.interp(s, t, v), a, b, points=list(t[1:-1]))[0] / (b - a)
        assert avg[j, 0] == pytest.approx(ref, rel=1e-10)
        assert avg[j, 1] == pytest.approx(2 * ref, rel=1e-10)
    with pytest.raises(ValueError, match="frames span"):
        frame_average(t, v, [0.0], [200.0])


def test_simulated_regional_tacs_models():
    regions = {"cerebellum": RegionKinetics(1.0, 0.0), "pallidum": RegionKinetics(0.9, 1.8), "thalamus": RegionKinetics(1.0, 0.6)}
    two = simulate_regional_tacs(regions, model="2tcm")
    srtm = simulate_regional_tacs(regions, model="srtm")
    assert two.bp_nd == {"cerebellum": 0.0, "pallidum": 1.8, "thalamus": 0.6}
    np.testing.assert_allclose(two.tacs["cerebellum"], srtm.tacs["cerebellum"], rtol=1e-12)
    for res in (two, srtm):
        assert all(np.all(v >= 0) for v in res.tacs.values())
        # Higher binding -> higher late uptake relative to the reference.
        late = slice(-5, None)
        assert np.all(res.tacs["pallidum"][late] > res.tacs["thalamus"][late])
        assert np.all(res.tacs["thalamus"][late] > res.tacs["cerebellum"][late])
    cols, rows = two.to_table()
    assert cols[:2] == ["frame_start", "frame_end"] and rows.shape == (len(DEFAULT_FRAME_DURATIONS_S), 5)
    with pytest.raises(ValueError, match="reference region"):
        simulate_regional_tacs({"cerebellum": RegionKinetics(1.0, 0.2)})


def test_explicit_k2_changes_the_nondisplaceable_volume():
    # 1TCM region with its own k2: late-time area ratio to the reference is V_T / V_ND' = (K1/k2) / (K1'/k2').
    ref = ReferenceKinetics(k1=0.3, k2_per_min=0.12, k4_per_min=0.06, blood_volume_fraction=0.0)
    regions = {"cerebellum": RegionKinetics(1.0, 0.0), "x": RegionKinetics(1.0, 0.0, k2_per_min=0.08)}
    start, end = frame_times_s([600.0] * 60)
    res = simulate_regional_tacs(regions, start, end, model="2tcm", plasma=FengInput(l2_per_min=-0.1), reference=ref)
    ratio = res.tacs["x"].sum() / res.tacs["cerebellum"].sum()
    assert ratio == pytest.approx(0.12 / 0.08, rel=1e-3)
    with pytest.raises(ValueError, match="r1 must be positive"):
        RegionKinetics(0.0, 1.0)
