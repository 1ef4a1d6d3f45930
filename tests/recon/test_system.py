import numpy as np
import pytest

from petbind.recon.corrections import (
    attenuation_factors,
    normalisation_factors,
    randoms_from_singles,
)
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout
from petbind.recon.operators import LinearOperator
from petbind.recon.system import GaussianFilter, SystemModel


class DenseProjector(LinearOperator):
    """A random non-negative matrix standing in for P (oracle for the algebra)."""

    def __init__(self, in_shape, out_shape, rng, tof=None):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.matrix = rng.random((int(np.prod(out_shape)), int(np.prod(in_shape))))
        self.tof = tof

    def _forward(self, x):
        return (self.matrix @ x.ravel()).reshape(self.out_shape)

    def _back(self, y):
        return (self.matrix.T @ y.ravel()).reshape(self.in_shape)


def test_gaussian_filter_matches_scipy_and_is_self_adjoint():
    from scipy.ndimage import gaussian_filter1d

    grid = ImageGrid((16, 12, 10), (2.0, 2.0, 3.0))
    g = GaussianFilter(grid, (5.0, 0.0, 6.0))
    rng = np.random.default_rng(0)
    x = rng.random(grid.shape)
    sig = np.array([5.0, 0.0, 6.0]) / (2 * np.sqrt(2 * np.log(2))) / grid.voxel_size_mm
    ref = gaussian_filter1d(x, sig[0], axis=0, mode="constant", truncate=np.ceil(3 * sig[0]) / sig[0])
    ref = gaussian_filter1d(ref, sig[2], axis=2, mode="constant", truncate=np.ceil(3 * sig[2]) / sig[2])
    np.testing.assert_allclose(g.forward(x), ref, rtol=1e-10, atol=1e-12)
    assert g.adjointness_error(rng=1, dtype=np.float64) < 1e-12
    # An interior point spreads with the requested FWHM (variance check).
    d = np.zeros(grid.shape)
    d[8, 6, 5] = 1.0
    b = g.forward(d)
    xs = np.arange(16) * 2.0
    var = np.sum(b.sum(axis=(1, 2)) * (xs - 16.0) ** 2)
    assert np.sqrt(var) == pytest.approx(5.0 / 2.3548, rel=0.03)
    with pytest.raises(ValueError, match="fwhm_mm"):
        GaussianFilter(grid, (-1.0, 1.0, 1.0))


@pytest.mark.parametrize("tof_bins", [None, 3])
def test_system_model_linear_part_adjoint_and_sensitivity(tof_bins):
    rng = np.random.default_rng(2)
    grid = ImageGrid((6, 5, 4), 3.0)
    lor_shape = (4, 3, 5)
    out = lor_shape + ((tof_bins,) if tof_bins else ())
    proj = DenseProjector(grid.shape, out, rng, tof=object() if tof_bins else None)
    m = rng.random(lor_shape)
    a = rng.random(out)
    model = SystemModel(proj, multiplicative=m, additive=a, resolution=4.0, grid=grid)
    x = rng.random(grid.shape)
    # Oracle: explicit formula with independent pieces.
    gx = GaussianFilter(grid, 4.0).forward(x)
    mm = m[..., None] if tof_bins else m
    np.testing.assert_allclose(model.expected_counts(x), mm * proj.forward(gx) + a, rtol=1e-12)
    assert model.adjointness_error(rng=3, dtype=np.float64) < 1e-12
    # Sensitivity = G^T P^T m (TOF: m applies to every TOF bin).
    full_m = np.broadcast_to(mm, out)
    expected = GaussianFilter(grid, 4.0).back(proj.back(np.ascontiguousarray(full_m)))
    np.testing.assert_allclose(model.sensitivity(dtype=np.float64), expected, rtol=1e-12)


def test_attenuation_factors_of_uniform_path():
    rng = np.random.default_rng(4)
    grid = ImageGrid((3, 3, 3), 1.0)
    proj = DenseProjector(grid.shape, (5,), rng)
    mu = np.full(grid.shape, 0.0096)
    np.testing.assert_allclose(attenuation_factors(mu, proj), np.exp(-proj.matrix.sum(axis=1) * 0.0096))
    with pytest.raises(ValueError, match="non-negative"):
        attenuation_factors(-mu, proj)


def _loop_pairs(layout, values):
    """Slow oracle: loop over every ring pair and bin."""
    n = layout.scanner.crystals_per_ring
    out = np.zeros(layout.shape)
    for (r1, r2), plane in zip(layout.ring_pairs, layout.plane_of_ring_pair):
        for v in range(layout.num_views):
            for r in range(layout.num_radial):
                c1, c2 = layout.crystal_pairs()[v, r]
                out[plane, v, r] += values[r1 * n + c1] * values[r2 * n + c2]
    return out


@pytest.mark.parametrize("span", [1, 3])
def test_normalisation_and_randoms_from_crystal_values(span):
    scanner = Scanner.polygon(8, 4, 4.0, 40.0, 4, 4.0, gap_crystals_per_module=1)
    layout = SinogramLayout(scanner, 9, span=span)
    rng = np.random.default_rng(5)
    eff = rng.uniform(0.8, 1.2, scanner.num_detectors)
    masked = eff * scanner.detector_mask()
    norm = normalisation_factors(layout, eff)
    oracle = _loop_pairs(layout, masked) / layout.plane_multiplicity[:, None, None]
    np.testing.assert_allclose(norm, oracle, rtol=1e-6)
    assert np.all(norm[~layout.bin_mask()] == 0) and np.all(norm[layout.bin_mask()] > 0)
    singles = rng.uniform(1e4, 2e4, scanner.num_detectors)
    r = randoms_from_singles(layout, singles, coincidence_window_ns=4.0, duration_s=10.0)
    np.testing.assert_allclose(r, _loop_pairs(layout, singles * scanner.detector_mask()) * 4e-9 * 10.0, rtol=1e-12)
    with pytest.raises(ValueError, match="one value per detector"):
        normalisation_factors(layout, eff[:-1])


def _host(a):
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else a


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tof", [None, "tof"])
def test_system_model_with_real_projector(tof, device):
    from petbind.recon.geometry import TOFParameters
    from petbind.recon.projector import SinogramProjector
    from petbind.recon.system import LORProjector

    scanner = Scanner.cylindrical(50.0, 24, 3, 4.0)
    layout = SinogramLayout(scanner, 11)
    grid = ImageGrid((10, 10, 3), 5.0)
    t = TOFParameters(5, 15.0, 300.0) if tof else None
    proj = SinogramProjector(layout, grid, tof=t, device=device)
    rng = np.random.default_rng(6)
    eff = rng.uniform(0.8, 1.2, scanner.num_detectors)
    mu = np.full(grid.shape, 0.0096, np.float32)
    m = normalisation_factors(layout, eff) * attenuation_factors(mu, proj)
    m = _host(m)
    model = SystemModel(proj, multiplicative=m, resolution=6.0, grid=grid)
    assert model.adjointness_error(rng=7, dtype=np.float64) < 1e-5
    sens = _host(model.sensitivity())
    mm = np.broadcast_to(m[..., None], proj.out_shape) if tof else m
    expected = GaussianFilter(grid, 6.0).back(proj.back(np.ascontiguousarray(mm, dtype=np.float32)))
    assert isinstance(expected, np.ndarray)  # NumPy in, NumPy out, whatever the device
    np.testing.assert_allclose(sens, expected, rtol=1e-5, atol=1e-6 * expected.max())
    # The LOR projector of a plane subset equals those planes of the sinogram projector.
    start, end = layout.lor_endpoints_mm()
    lp = LORProjector(start[2:5], end[2:5], grid, tof=t, device=device)
    x = rng.random(grid.shape).astype(np.float32)
    np.testing.assert_allclose(lp.forward(x), proj.forward(x)[2:5], rtol=1e-5, atol=1e-6)
    assert lp.adjointness_error(rng=8, dtype=np.float32) < 1e-5
    if device == "gpu":  # CuPy in, CuPy out
        import cupy

        y = model.expected_counts(cupy.asarray(x))
        assert isinstance(y, cupy.ndarray)
        np.testing.assert_allclose(y.get(), model.expected_counts(x), rtol=1e-6)
        assert lp.adjointness_error(rng=8, xp=cupy, dtype=np.float32) < 1e-5
