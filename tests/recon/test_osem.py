"""OSEM against a dense-matrix NumPy oracle, listmode/sinogram equivalence,
convergence on consistent data and input checks."""

import numpy as np
import pytest

from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.osem import ListmodeOSEM, SinogramOSEM

# The GPU variants run the same checks through CuPy (the stand-in on CI).
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


def small_problem(rng, tof=None):
    scanner = Scanner.cylindrical(radius_mm=60.0, crystals_per_ring=40, num_rings=2, ring_spacing_mm=4.0)
    layout = SinogramLayout(scanner, num_radial=19)
    grid = ImageGrid((10, 10, 2), 6.0)
    truth = np.zeros(grid.shape, np.float32)
    c = grid.voxel_centres_mm()
    truth[np.hypot(c[..., 0], c[..., 1]) < 22] = 2.0
    truth[np.hypot(c[..., 0] - 8, c[..., 1]) < 8] = 5.0
    m = rng.uniform(0.5, 1.0, layout.shape).astype(np.float32)
    data_shape = layout.shape + (() if tof is None else (tof.num_bins,))
    a = np.full(data_shape, 0.3, np.float32)
    return scanner, layout, grid, truth, m, a


def to_host(a):
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else a


def dense_matrix(op):
    """The system matrix of a linear operator, column by column (the oracle)."""
    n = int(np.prod(op.in_shape))
    cols = []
    for j in range(n):
        e = np.zeros(n, np.float32)
        e[j] = 1
        cols.append(op.forward(e.reshape(op.in_shape)).astype(np.float64).ravel())
    return np.stack(cols, axis=1)


def dense_osem(A_subsets, y_subsets, a_subsets, n_iter, n_vox):
    x = np.ones(n_vox)
    for _ in range(n_iter):
        for A, y, a in zip(A_subsets, y_subsets, a_subsets):
            ybar = A @ x + a
            x = x / A.sum(axis=0) * (A.T @ (y / ybar))
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_subsets", [1, 4])
def test_osem_matches_dense_matrix_oracle(rng, num_subsets, device):
    scanner, layout, grid, truth, m, a = small_problem(rng)
    rec = SinogramOSEM(layout, grid, multiplicative=m, additive=a, num_subsets=num_subsets, device=device)
    # noisy data from the model itself (NumPy in, NumPy out on either device)
    full = SinogramOSEM(layout, grid, multiplicative=m, additive=a, num_subsets=1, device=device).models[0]
    ybar = full.expected_counts(truth)
    assert isinstance(ybar, np.ndarray)
    y = rng.poisson(ybar).astype(np.float32)
    got = rec.reconstruct(y, num_iterations=3, progress=False)
    assert isinstance(got, np.ndarray)
    A_sub = [dense_matrix(model) for model in rec.models]
    y_sub = [y[:, v].astype(np.float64).ravel() for v in rec.subsets]
    a_sub = [a[:, v].astype(np.float64).ravel() for v in rec.subsets]
    want = dense_osem(A_sub, y_sub, a_sub, 3, grid.num_voxels).reshape(grid.shape)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * want.max())


@pytest.mark.parametrize("device", DEVICES)
def test_mlem_converges_on_consistent_data(rng, device):
    scanner, layout, grid, truth, m, a = small_problem(rng)
    rec = SinogramOSEM(layout, grid, multiplicative=m, additive=a, num_subsets=1, device=device)
    y = rec.models[0].expected_counts(truth)
    errors, loglik = [], []

    def track(it, x):  # x lives on the reconstruction's device
        x = to_host(x)
        ybar = rec.models[0].expected_counts(x).astype(np.float64)
        loglik.append(float((y * np.log(ybar) - ybar).sum()))
        errors.append(float(np.abs(x - truth).sum() / truth.sum()))

    x = rec.reconstruct(y, num_iterations=300, progress=False, callback=track)
    # MLEM never decreases the likelihood (up to float32 rounding of the image)
    assert np.all(np.diff(loglik) >= -1e-6 * abs(loglik[0]))
    assert errors[-1] < 0.5 * errors[9]
    assert errors[-1] < 0.12
    # total activity is recovered closely
    assert x.sum() == pytest.approx(truth.sum(), rel=0.02)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_tof", [False, True])
def test_listmode_osem_equals_sinogram_osem(rng, use_tof, device):
    """Events made from a histogram reconstruct exactly as the histogram."""
    tof = TOFParameters(num_bins=5, bin_width_mm=30.0, fwhm_ps=300.0) if use_tof else None
    scanner, layout, grid, truth, m, a = small_problem(rng, tof)
    sino = SinogramOSEM(layout, grid, tof=tof, multiplicative=m, additive=a, num_subsets=1, device=device)
    y = rng.poisson(sino.models[0].expected_counts(truth)).astype(np.float32)
    x_sino = sino.reconstruct(y, num_iterations=4, progress=False)

    counts = y.reshape(-1).astype(int)
    bins = np.repeat(np.arange(counts.size), counts)
    if tof is None:
        lor = bins
        tb = None
    else:
        lor, tb = np.divmod(bins, tof.num_bins)
    ids = layout.detector_pairs().reshape(-1, 2)[lor]
    lm = ListmodeOSEM(
        scanner, grid, ids, sensitivity=sino.sensitivities()[0], tof_bins=tb, tof=tof,
        multiplicative=m.reshape(-1)[lor], additive=a.reshape(-1)[bins], num_subsets=1, device=device,
    )
    x_lm = to_host(lm.reconstruct(num_iterations=4, progress=False))
    np.testing.assert_allclose(x_lm, x_sino, rtol=1e-3, atol=1e-3 * x_sino.max())


def test_osem_refuses_bad_data(rng):
    scanner, layout, grid, truth, m, a = small_problem(rng)
    rec = SinogramOSEM(layout, grid, num_subsets=2, device="cpu")
    with pytest.raises(ValueError, match="prompts must have shape"):
        rec.reconstruct(np.ones((3, 3, 3), np.float32), 1)
    bad = np.ones(layout.shape, np.float32)
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        rec.reconstruct(bad, 1)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rec.reconstruct(bad, 1)
    with pytest.raises(ValueError, match="multiplicative"):
        SinogramOSEM(layout, grid, multiplicative=np.ones(3), device="cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_listmode_osem_subsets_match_dense_oracle(rng, device):
    """With event subsets each update uses A_k^T 1 = sensitivity / num_subsets."""
    scanner, layout, grid, truth, m, a = small_problem(rng)
    full = SinogramOSEM(layout, grid, multiplicative=m, additive=a, num_subsets=1, device=device)
    y = rng.poisson(full.models[0].expected_counts(truth)).astype(np.float32)
    counts = y.reshape(-1).astype(int)
    bins = np.repeat(np.arange(counts.size), counts)
    ids = layout.detector_pairs().reshape(-1, 2)[bins]
    sens = full.sensitivities()[0]
    lm = ListmodeOSEM(scanner, grid, ids, sensitivity=sens, multiplicative=m.reshape(-1)[bins],
                      additive=a.reshape(-1)[bins], num_subsets=3, device=device)
    got = to_host(lm.reconstruct(num_iterations=2, progress=False))
    A_sub = [dense_matrix(model) for model in lm.models]
    a_sub = [a.reshape(-1)[bins][idx].astype(np.float64) for idx in lm.subsets]
    x = np.ones(grid.num_voxels)
    s = to_host(sens).astype(np.float64).ravel() / 3
    for _ in range(2):
        for A, ae in zip(A_sub, a_sub):
            x = x / s * (A.T @ (1.0 / (A @ x + ae)))
    np.testing.assert_allclose(got.ravel(), x, rtol=1e-3, atol=1e-3 * x.max())


@pytest.mark.parametrize("device", DEVICES)
def test_per_frame_additive_equals_a_fresh_reconstructor(rng, device):
    """One SinogramOSEM serves several frames: set_additive/additive= give the
    same image as an object built with that frame's background."""
    scanner, layout, grid, truth, m, a = small_problem(rng)
    y = rng.poisson(5.0, layout.shape).astype(np.float32)
    a2 = (a * rng.uniform(0.5, 2.0, a.shape)).astype(np.float32)
    shared = SinogramOSEM(layout, grid, multiplicative=m, additive=a, num_subsets=4, device=device)
    first = shared.reconstruct(y, 2, progress=False)
    second = shared.reconstruct(y, 2, progress=False, additive=a2)
    fresh1 = SinogramOSEM(layout, grid, multiplicative=m, additive=a, num_subsets=4, device=device)
    fresh2 = SinogramOSEM(layout, grid, multiplicative=m, additive=a2, num_subsets=4, device=device)
    np.testing.assert_array_equal(first, fresh1.reconstruct(y, 2, progress=False))
    np.testing.assert_array_equal(second, fresh2.reconstruct(y, 2, progress=False))
    assert not np.allclose(first, second)
    with pytest.raises(ValueError, match="additive term must have the data shape"):
        shared.set_additive(a[:, :3])
