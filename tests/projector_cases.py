"""Geometries and checks shared by the CPU projector tests and their GPU twins.

Every check takes the array namespace ``xp`` and a device name, so
``tests/recon/test_projector.py`` (NumPy, CPU) and ``tests/recon/test_gpu.py`` (CuPy, GPU)
run the same assertions.
"""

import numpy as np

from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.kernels.reference import back_reference, forward_reference
from petbind.recon.projector import ListmodeProjector, SinogramProjector, back_project, forward_project


def random_lors(rng, n, radius=60.0):
    """LOR end points on a sphere of ``radius`` mm around the origin."""
    def sphere(k):
        v = rng.normal(size=(k, 3))
        return radius * v / np.linalg.norm(v, axis=1, keepdims=True)

    return sphere(n), sphere(n)


def small_grid():
    # Anisotropic, off-centre, odd sizes: catches axis and origin mix-ups.
    return ImageGrid((17, 13, 9), (2.0, 2.5, 3.0), (-15.0, -14.0, -10.0))


def small_tof():
    return TOFParameters(num_bins=11, bin_width_mm=12.0, fwhm_ps=150.0, num_sigmas=3.0)


def small_layout(span=1):
    scanner = Scanner.cylindrical(radius_mm=50.0, crystals_per_ring=48, num_rings=5, ring_spacing_mm=4.0)
    return SinogramLayout(scanner, num_radial=31, max_ring_difference=4, span=span)


def dot_test(op, rng, xp):
    x = xp.asarray(rng.random(op.in_shape).astype(np.float32))
    y = xp.asarray(rng.random(op.out_shape).astype(np.float32))
    lhs = float((op.forward(x).astype(np.float64) * y.astype(np.float64)).sum())
    rhs = float((x.astype(np.float64) * op.back(y).astype(np.float64)).sum())
    return abs(lhs - rhs) / max(abs(lhs), abs(rhs))


class LorOperator:
    """forward_project/back_project on fixed LORs as an operator (for dot tests)."""

    def __init__(self, start, end, grid, tof, device):
        self.start, self.end, self.grid, self.tof, self.device = start, end, grid, tof, device
        self.in_shape = grid.shape
        self.out_shape = (start.shape[0],) + (() if tof is None else (tof.num_bins,))

    def forward(self, x):
        return forward_project(x, self.start, self.end, self.grid, tof=self.tof, device=self.device)

    def back(self, y):
        return back_project(y, self.start, self.end, self.grid, tof=self.tof, device=self.device)


def check_adjoint_lors(rng, xp, device, tof):
    s, e = random_lors(rng, 400)
    op = LorOperator(xp.asarray(s), xp.asarray(e), small_grid(), tof, device)
    assert dot_test(op, rng, xp) < 1e-5


def check_adjoint_sinogram(rng, xp, device, tof, span, views):
    layout = small_layout(span)
    op = SinogramProjector(layout, small_grid(), tof=tof, views=views, device=device)
    assert dot_test(op, rng, xp) < 1e-5


def check_adjoint_listmode(rng, xp, device, tof):
    layout = small_layout()
    scanner = layout.scanner
    ids = rng.integers(0, scanner.num_detectors, size=(500, 2))
    ids = ids[ids[:, 0] != ids[:, 1]]
    tb = None if tof is None else rng.integers(0, tof.num_bins, size=ids.shape[0])
    op = ListmodeProjector(scanner, small_grid(), ids, tof_bins=tb, tof=tof, device=device)
    assert dot_test(op, rng, xp) < 1e-5


def to_host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def check_against_oracle(rng, xp, device, tof):
    grid = small_grid()
    img = rng.random(grid.shape).astype(np.float32)
    s, e = random_lors(rng, 200)
    fwd = to_host(forward_project(xp.asarray(img), xp.asarray(s), xp.asarray(e), grid, tof=tof, device=device))
    ref = forward_reference(img, s, e, grid, tof)
    np.testing.assert_allclose(fwd, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    vals = rng.random(ref.shape).astype(np.float32)
    back = to_host(back_project(xp.asarray(vals), xp.asarray(s), xp.asarray(e), grid, tof=tof, device=device))
    bref = back_reference(vals, s, e, grid, tof)
    np.testing.assert_allclose(back, bref, rtol=1e-4, atol=1e-4 * np.abs(bref).max())


def check_listmode_against_oracle(rng, xp, device):
    layout = small_layout()
    scanner, grid, tof = layout.scanner, small_grid(), small_tof()
    img = rng.random(grid.shape).astype(np.float32)
    ids = rng.integers(0, scanner.num_detectors, size=(300, 2))
    ids = ids[ids[:, 0] != ids[:, 1]]
    tb = rng.integers(0, tof.num_bins, size=ids.shape[0])
    pos = scanner.detector_positions_mm()
    for t, bins in ((None, None), (tof, tb)):
        op = ListmodeProjector(scanner, grid, ids, tof_bins=bins, tof=t, device=device)
        got = to_host(op.forward(xp.asarray(img)))
        ref = forward_reference(img, pos[ids[:, 0]], pos[ids[:, 1]], grid, t, bins)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.max())


def check_sinogram_against_endpoints(rng, xp, device, tof, span):
    """The in-kernel LOR geometry equals the layout's documented end points."""
    layout = small_layout(span)
    grid = small_grid()
    img = rng.random(grid.shape).astype(np.float32)
    views = np.arange(1, layout.num_views, 3)
    op = SinogramProjector(layout, grid, tof=tof, views=views, device=device)
    got = to_host(op.forward(xp.asarray(img)))
    s, e = layout.lor_endpoints_mm(views)
    ref = forward_reference(img, s, e, grid, tof)
    ref = ref.reshape(op.out_shape) * layout.plane_multiplicity.reshape((-1,) + (1,) * (len(op.out_shape) - 1))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.max())


def short_tof():
    """TOF whose truncated kernels reach only +-19 mm from a LOR's midpoint
    (3 bins of 5 mm, sigma 3.8 mm): samples of ``small_grid`` farther along a
    LOR get no TOF weight."""
    return TOFParameters(num_bins=3, bin_width_mm=5.0, fwhm_ps=60.0, num_sigmas=3.0)


def check_tof_summed_back_projection(rng, xp, device, tof, span=3, views=None):
    """``back_tof_summed(v)`` is the TOF back-projection of ``v`` copied into every bin."""
    layout = small_layout(span)
    grid = small_grid()
    proj = SinogramProjector(layout, grid, tof=tof, views=views, device=device)
    v = rng.random(proj.out_shape[:3]).astype(np.float32)
    want = to_host(proj.back(xp.asarray(np.ascontiguousarray(np.repeat(v[..., None], tof.num_bins, axis=-1)))))
    got = proj.back_tof_summed(xp.asarray(v))
    assert isinstance(got, xp.ndarray)
    got = to_host(got)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * want.max())
    return got, to_host(SinogramProjector(layout, grid, views=views, device=device).back(xp.asarray(v)))
