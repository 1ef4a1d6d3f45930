"""OSEM's device memory: the model of ``sinogram_osem_memory`` against what the
CuPy stand-in counts, and what it says of a full mMR-size TOF scan.

The stand-in accounts every device buffer (views are free, results are
allocations, as on a GPU), so its peak is the reconstruction's peak device
memory up to CuPy's pool rounding.  The large case is computed from the
model only, never allocated.
"""

import numpy as np
import pytest

import fakecupy
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.osem import SinogramOSEM, sinogram_osem_memory

GIB = 2**30


def _problem(span, tof):
    scanner = Scanner.cylindrical(radius_mm=60.0, crystals_per_ring=48, num_rings=4, ring_spacing_mm=4.0)
    layout = SinogramLayout(scanner, num_radial=25, span=span, max_ring_difference=3)
    grid = ImageGrid((12, 12, 4), 5.0)
    return layout, grid, tof


@pytest.mark.parametrize("span,num_subsets,use_tof,resolution", [
    (1, 1, True, None), (1, 4, True, None), (3, 4, False, None), (1, 3, True, 6.0),
])
def test_memory_model_matches_the_stand_in(monkeypatch, span, num_subsets, use_tof, resolution):
    fakecupy.install(monkeypatch)
    tof = TOFParameters(num_bins=7, bin_width_mm=20.0, fwhm_ps=300.0) if use_tof else None
    layout, grid, tof = _problem(span, tof)
    rng = np.random.default_rng(1)
    shape = layout.shape + (() if tof is None else (tof.num_bins,))
    m = rng.uniform(0.5, 1.0, layout.shape).astype(np.float32)
    a = np.full(shape, 0.2, np.float32)
    y = rng.poisson(3.0, shape).astype(np.float32)
    stats = fakecupy.stats
    base = stats.live_bytes
    stats.reset_peak()
    rec = SinogramOSEM(layout, grid, tof=tof, multiplicative=m, additive=a, resolution_fwhm_mm=resolution,
                       num_subsets=num_subsets, device="gpu")
    x = rec.reconstruct(y, num_iterations=2, progress=False)
    assert isinstance(x, np.ndarray)
    measured = stats.peak_bytes - base
    model = sinogram_osem_memory(layout, grid, tof, num_subsets, resolution=resolution is not None)
    # An upper bound that is not loose: the model is what the code allocates.
    assert measured <= model["total"], (measured, model)
    assert measured >= 0.9 * model["total"], (measured, model)


def test_no_host_traffic_inside_the_iterations(monkeypatch):
    """Copies and synchronisations do not grow with the number of iterations."""
    fakecupy.install(monkeypatch)
    layout, grid, tof = _problem(1, TOFParameters(num_bins=5, bin_width_mm=20.0, fwhm_ps=300.0))
    y = np.random.default_rng(2).poisson(3.0, layout.shape + (5,)).astype(np.float32)
    counts = []
    for n_iter in (1, 3):
        rec = SinogramOSEM(layout, grid, tof=tof, num_subsets=4, device="gpu")
        before = fakecupy.stats.snapshot()
        rec.reconstruct(y, num_iterations=n_iter, progress=False)
        after = fakecupy.stats.snapshot()
        counts.append({k: after[k] - before[k] for k in ("h2d", "d2h", "syncs")})
    assert counts[0] == counts[1], counts


def test_span1_mmr_tof_fits_in_80_gib():
    """Biograph mMR geometry at span 1 (4084 planes x 252 views x 344 radial) with 17 TOF bins:
    22.4 GiB of data.  The study's default 8 subsets, and even MLEM (1 subset), fit on an 80 GiB GPU."""
    layout = SinogramLayout(Scanner.mmr(), 344, max_ring_difference=60, span=1)
    grid = ImageGrid((344, 344, 127), (2.0863, 2.0863, 2.03125))
    tof = TOFParameters(num_bins=17, bin_width_mm=25.0, fwhm_ps=400.0)
    assert layout.shape == (4084, 252, 344)
    for subsets in (8, 1):
        mem = sinogram_osem_memory(layout, grid, tof, subsets, resolution=True)
        assert mem["data"] / GIB == pytest.approx(4084 * 252 * 344 * 17 * 4 / GIB)
        assert mem["total"] < 80 * GIB, (subsets, mem["total"] / GIB)
