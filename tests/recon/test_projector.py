"""CPU projector tests: adjointness, analytic line integrals, TOF, oracle agreement.

The GPU twins of the generic checks live in ``test_gpu.py``.
"""

import numpy as np
import pytest

import projector_cases as cases
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.projector import ListmodeProjector, SinogramProjector, back_project, forward_project

TOF_OPTIONS = [None, cases.small_tof()]
TOF_IDS = ["nontof", "tof"]


# ---------------------------------------------------------------------------- adjointness
@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
def test_adjoint_random_lors(rng, tof):
    cases.check_adjoint_lors(rng, np, "cpu", tof)


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
@pytest.mark.parametrize("span,views", [(1, None), (3, None), (1, [0, 5, 7, 20])])
def test_adjoint_sinogram(rng, tof, span, views):
    cases.check_adjoint_sinogram(rng, np, "cpu", tof, span, views)


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
def test_adjoint_listmode(rng, tof):
    cases.check_adjoint_listmode(rng, np, "cpu", tof)


def test_operator_adjointness_helper(rng):
    op = SinogramProjector(cases.small_layout(), cases.small_grid(), device="cpu")
    assert op.adjointness_error(rng=1) < 1e-5


# ---------------------------------------------------------------------------- oracle agreement
@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
def test_compiled_matches_numpy_oracle(rng, tof):
    cases.check_against_oracle(rng, np, "cpu", tof)


def test_listmode_matches_numpy_oracle(rng):
    cases.check_listmode_against_oracle(rng, np, "cpu")


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
@pytest.mark.parametrize("span", [1, 3])
def test_sinogram_kernel_geometry_matches_layout(rng, tof, span):
    cases.check_sinogram_against_endpoints(rng, np, "cpu", tof, span)


def test_numpy_fallback_without_compiler(monkeypatch, rng):
    """Without a C++ compiler the projector warns and uses the NumPy implementation."""
    from petbind.recon import kernels, projector

    def no_compiler():
        raise kernels.CompilerNotFound("no C++ compiler (test)")

    monkeypatch.setattr(kernels, "_find_compiler", no_compiler)
    monkeypatch.setattr(kernels, "_cpu_libraries", {})
    monkeypatch.setattr(projector, "_fallback_warned", False)
    grid = cases.small_grid()
    img = rng.random(grid.shape).astype(np.float32)
    s, e = cases.random_lors(rng, 20)
    with pytest.warns(RuntimeWarning, match="install g\\+\\+"):
        got = forward_project(img, s, e, grid, device="cpu")
    monkeypatch.setattr(kernels, "_cpu_libraries", {})
    monkeypatch.undo()
    ref = forward_project(img, s, e, grid, device="cpu")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.max())


# ---------------------------------------------------------------------------- analytic oracles
def _supersampled(grid, inside, factor=4):
    """Partial-volume image of a solid given by ``inside(x, y, z) -> bool`` (mm)."""
    offs = (np.arange(factor) + 0.5) / factor - 0.5
    xs, ys, zs = grid.axis_centres_mm()
    vx, vy, vz = grid.voxel_size_mm
    frac = np.zeros(grid.shape)
    for ox in offs:
        for oy in offs:
            for oz in offs:
                X, Y, Z = np.meshgrid(xs + ox * vx, ys + oy * vy, zs + oz * vz, indexing="ij")
                frac += inside(X, Y, Z)
    return (frac / factor**3).astype(np.float32)


def test_uniform_cylinder_chord_lengths(rng):
    """Line integrals through a uniform cylinder equal activity × chord length."""
    grid = ImageGrid((80, 80, 10), (2.0, 2.0, 2.0))
    radius, activity = 60.0, 3.0
    img = activity * _supersampled(grid, lambda x, y, z: x**2 + y**2 <= radius**2)
    n = 200
    phi = rng.uniform(0, np.pi, n)
    offset = rng.uniform(-0.8, 0.8, n) * radius  # chords >= 72 mm = 36 voxels
    z0, z1 = rng.uniform(-6, 6, n), rng.uniform(-6, 6, n)  # slightly oblique, stays inside the slab
    u = np.stack([np.cos(phi), np.sin(phi)], 1)
    nrm = np.stack([-np.sin(phi), np.cos(phi)], 1)
    centre = offset[:, None] * nrm
    half = 200.0
    start = np.concatenate([centre - half * u, z0[:, None]], 1)
    end = np.concatenate([centre + half * u, z1[:, None]], 1)
    proj = forward_project(img, start, end, grid, device="cpu")
    transverse_chord = 2 * np.sqrt(radius**2 - offset**2)
    chord = transverse_chord * np.linalg.norm(end - start, axis=1) / np.linalg.norm((end - start)[:, :2], axis=1)
    np.testing.assert_allclose(proj, activity * chord, rtol=0.01)


def test_uniform_sphere_chord_lengths(rng):
    grid = ImageGrid((48, 48, 48), 2.5)
    radius, activity = 45.0, 1.7
    img = activity * _supersampled(grid, lambda x, y, z: x**2 + y**2 + z**2 <= radius**2, factor=3)
    n = 150
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    # closest-approach point perpendicular to d, at distance p < 0.75 R
    q = rng.normal(size=(n, 3))
    q -= (q * d).sum(1, keepdims=True) * d
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p = rng.uniform(0, 0.75, n) * radius
    centre = p[:, None] * q
    start, end = centre - 300 * d, centre + 300 * d
    proj = forward_project(img, start, end, grid, device="cpu")
    np.testing.assert_allclose(proj, activity * 2 * np.sqrt(radius**2 - p**2), rtol=0.01)


def test_axis_aligned_rays_equal_hand_sums(rng):
    grid = cases.small_grid()
    img = rng.random(grid.shape).astype(np.float32)
    xs, ys, zs = grid.axis_centres_mm()
    vx, vy, vz = grid.voxel_size_mm
    far = 500.0
    # along x through voxel centres (j, k) = (4, 6)
    s, e = np.array([[-far, ys[4], zs[6]]]), np.array([[far, ys[4], zs[6]]])
    assert forward_project(img, s, e, grid, device="cpu")[0] == pytest.approx(img[:, 4, 6].sum() * vx, rel=1e-5)
    # along y, half-way between x centres 2 and 3: the mean of the two columns
    xm = 0.5 * (xs[2] + xs[3])
    s, e = np.array([[xm, -far, zs[1]]]), np.array([[xm, far, zs[1]]])
    hand = 0.5 * (img[2, :, 1] + img[3, :, 1]).sum() * vy
    assert forward_project(img, s, e, grid, device="cpu")[0] == pytest.approx(hand, rel=1e-5)
    # along -z (reversed direction) through (7, 3)
    s, e = np.array([[xs[7], ys[3], far]]), np.array([[xs[7], ys[3], -far]])
    assert forward_project(img, s, e, grid, device="cpu")[0] == pytest.approx(img[7, 3, :].sum() * vz, rel=1e-5)
    # a ray that misses the image entirely gives exactly zero
    s, e = np.array([[-far, 200.0, 0.0]]), np.array([[far, 200.0, 0.0]])
    assert forward_project(img, s, e, grid, device="cpu")[0] == 0.0


def test_point_source_traces_a_sine(rng):
    """The sinogram of a point source peaks, in every view, at the bin whose LOR passes closest."""
    scanner = Scanner.cylindrical(radius_mm=120.0, crystals_per_ring=96, num_rings=1, ring_spacing_mm=4.0)
    layout = SinogramLayout(scanner, num_radial=61)
    # voxels larger than the LOR spacing, so that no LOR family misses the point
    grid = ImageGrid((32, 32, 1), 4.0)
    img = np.zeros(grid.shape, np.float32)
    img[22, 13, 0] = 1.0
    point = grid.voxel_centres_mm()[22, 13, 0]
    sino = SinogramProjector(layout, grid, device="cpu").forward(img)[0]
    s, e = layout.lor_endpoints_mm()
    s, e = s[0], e[0]
    d = (e - s) / np.linalg.norm(e - s, axis=-1, keepdims=True)
    w = point - s
    dist = np.linalg.norm(w - (w * d).sum(-1, keepdims=True) * d, axis=-1)
    peak = sino.argmax(axis=1)
    closest = dist.argmin(axis=1)
    assert np.all(np.abs(peak - closest) <= 1)
    # the trace really moves (r·sin(φ - φ0) over half a turn spans several bins)
    assert peak.max() - peak.min() >= 6


# ---------------------------------------------------------------------------- TOF physics
def test_tof_bins_sum_to_nontof(rng):
    grid = cases.small_grid()
    img = rng.random(grid.shape).astype(np.float32)
    s, e = cases.random_lors(rng, 300)
    tof = cases.small_tof()
    t = forward_project(img, s, e, grid, tof=tof, device="cpu")
    n = forward_project(img, s, e, grid, device="cpu")
    np.testing.assert_allclose(t.sum(axis=1), n, rtol=1e-5, atol=1e-5 * n.max())


@pytest.mark.parametrize("offset_mm", [-37.0, -13.0, 0.0, 5.0, 26.0])  # none on a bin edge (a tie)
def test_tof_point_source_peaks_in_its_bin(offset_mm):
    grid = ImageGrid((101, 3, 3), 1.0)
    tof = TOFParameters(num_bins=15, bin_width_mm=8.0, fwhm_ps=100.0)  # sigma ~6.4 mm
    img = np.zeros(grid.shape, np.float32)
    xs = grid.axis_centres_mm()[0]
    i = int(np.argmin(np.abs(xs - offset_mm)))
    img[i, 1, 1] = 1.0
    s, e = np.array([[-60.0, 0.0, 0.0]]), np.array([[60.0, 0.0, 0.0]])
    prof = forward_project(img, s, e, grid, tof=tof, device="cpu")[0]
    expected = int(np.floor(xs[i] / tof.bin_width_mm + (tof.num_bins - 1) / 2 + 0.5))
    assert prof.argmax() == expected
    # reversing the LOR mirrors the TOF profile
    rev = forward_project(img, e, s, grid, tof=tof, device="cpu")[0]
    np.testing.assert_allclose(rev, prof[::-1], rtol=1e-5, atol=1e-7)


def test_listmode_tof_equals_sinogram_tof_bin(rng):
    """A listmode event's TOF value equals its bin in the all-bins projection."""
    layout = cases.small_layout()
    grid, tof = cases.small_grid(), cases.small_tof()
    img = rng.random(grid.shape).astype(np.float32)
    pairs = layout.detector_pairs()[:, ::4].reshape(-1, 2)
    pos = layout.scanner.detector_positions_mm()
    allbins = forward_project(img, pos[pairs[:, 0]], pos[pairs[:, 1]], grid, tof=tof, device="cpu")
    tb = rng.integers(0, tof.num_bins, pairs.shape[0])
    lm = ListmodeProjector(layout.scanner, grid, pairs, tof_bins=tb, tof=tof, device="cpu").forward(img)
    np.testing.assert_allclose(lm, allbins[np.arange(pairs.shape[0]), tb], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- input checking
def test_bad_inputs_are_refused(rng):
    grid = cases.small_grid()
    img = np.zeros(grid.shape, np.float32)
    s, e = cases.random_lors(rng, 4)
    with pytest.raises(ValueError, match="grid is"):
        forward_project(np.zeros((3, 3, 3), np.float32), s, e, grid, device="cpu")
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        forward_project(img, s[:, :2], e[:, :2], grid, device="cpu")
    with pytest.raises(ValueError, match="values must have shape"):
        back_project(np.zeros(5, np.float32), s, e, grid, device="cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        forward_project(img, s, e, grid, device="tpu")
    scanner = cases.small_layout().scanner
    with pytest.raises(ValueError, match="detector_ids must lie in"):
        ListmodeProjector(scanner, grid, np.array([[0, scanner.num_detectors]]), device="cpu")
    with pytest.raises(ValueError, match="tof and tof_bins"):
        ListmodeProjector(scanner, grid, np.array([[0, 1]]), tof=cases.small_tof(), device="cpu")
    op = SinogramProjector(cases.small_layout(), grid, device="cpu")
    with pytest.raises(ValueError, match="expects shape"):
        op.forward(np.zeros((2, 2, 2), np.float32))


@pytest.mark.parametrize("span,views", [(1, None), (3, [0, 5, 7, 20])])
def test_tof_summed_back_projection(rng, span, views):
    got, nontof = cases.check_tof_summed_back_projection(rng, np, "cpu", cases.small_tof(), span, views)
    # the TOF range covers every LOR here: the TOF sensitivity is the non-TOF one
    np.testing.assert_allclose(got, nontof, rtol=1e-4, atol=1e-5 * nontof.max())
    got, nontof = cases.check_tof_summed_back_projection(rng, np, "cpu", cases.short_tof(), span, views)
    # it does not here: samples beyond the TOF kernels' reach get no weight
    assert np.abs(got - nontof).max() > 0.05 * nontof.max() and np.all(got <= nontof * (1 + 1e-4) + 1e-6)


def test_cpu_back_projection_is_the_same_for_any_thread_count(tmp_path):
    """Scatter-adds are summed in a fixed order: 1, 2 or 3 OpenMP threads give identical bits
    (a study run on Dask workers must equal the serial run)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout\n"
        "from petbind.recon.projector import SinogramProjector\n"
        "lay = SinogramLayout(Scanner.cylindrical(100.0, 64, 4, 5.0), 31)\n"
        "p = SinogramProjector(lay, ImageGrid((20, 20, 4), 5.0), device='cpu')\n"
        "y = np.random.default_rng(0).random(lay.shape).astype(np.float32)\n"
        "np.save(sys.argv[1], p.back(y))\n"
    )
    out = []
    for n in (1, 2, 3):
        path = tmp_path / f"b{n}.npy"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(n), PETBIND_DEVICE="cpu"))
        out.append(np.load(path))
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])
