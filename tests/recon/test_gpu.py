"""GPU twins of the projector tests (``pytest -m gpu``).

They run the same checks as ``test_projector.py`` on CuPy arrays and compare
the GPU with the CPU.  Without CuPy or a CUDA device they are skipped with
the reason (see ``conftest.py``).
"""

import numpy as np
import pytest

import projector_cases as cases
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout
from petbind.recon.projector import SinogramProjector, forward_project

pytestmark = pytest.mark.gpu

TOF_OPTIONS = [None, cases.small_tof()]
TOF_IDS = ["nontof", "tof"]


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
def test_gpu_adjoint_random_lors(rng, cp, tof):
    cases.check_adjoint_lors(rng, cp, "gpu", tof)


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
@pytest.mark.parametrize("span,views", [(1, None), (3, None), (1, [0, 5, 7, 20])])
def test_gpu_adjoint_sinogram(rng, cp, tof, span, views):
    cases.check_adjoint_sinogram(rng, cp, "gpu", tof, span, views)


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
def test_gpu_adjoint_listmode(rng, cp, tof):
    cases.check_adjoint_listmode(rng, cp, "gpu", tof)


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
def test_gpu_matches_numpy_oracle(rng, cp, tof):
    cases.check_against_oracle(rng, cp, "gpu", tof)


def test_gpu_listmode_matches_numpy_oracle(rng, cp):
    cases.check_listmode_against_oracle(rng, cp, "gpu")


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
@pytest.mark.parametrize("span", [1, 3])
def test_gpu_sinogram_geometry(rng, cp, tof, span):
    cases.check_sinogram_against_endpoints(rng, cp, "gpu", tof, span)


@pytest.mark.parametrize("tof", TOF_OPTIONS, ids=TOF_IDS)
def test_gpu_equals_cpu_on_a_realistic_sinogram(rng, cp, tof):
    scanner = Scanner.cylindrical(330.0, 400, 4, 4.0)
    layout = SinogramLayout(scanner, 149)
    grid = ImageGrid((64, 64, 4), 4.0)
    img = rng.random(grid.shape).astype(np.float32)
    gpu = SinogramProjector(layout, grid, tof=tof, device="gpu")
    cpu = SinogramProjector(layout, grid, tof=tof, device="cpu")
    yg = gpu.forward(cp.asarray(img))
    assert isinstance(yg, cp.ndarray)  # CuPy in, CuPy out
    yc = cpu.forward(img)
    np.testing.assert_allclose(yg.get(), yc, rtol=1e-4, atol=1e-4 * yc.max())
    bg, bc = gpu.back(yg).get(), cpu.back(yc)
    np.testing.assert_allclose(bg, bc, rtol=1e-4, atol=1e-4 * bc.max())
    # NumPy in, NumPy out even when the projector lives on the GPU
    assert isinstance(gpu.forward(img), np.ndarray)


def test_gpu_tof_sums_to_nontof(rng, cp):
    grid = cases.small_grid()
    img = cp.asarray(rng.random(grid.shape).astype(np.float32))
    s, e = (cp.asarray(a) for a in cases.random_lors(rng, 300))
    t = forward_project(img, s, e, grid, tof=cases.small_tof())
    n = forward_project(img, s, e, grid)
    np.testing.assert_allclose(t.sum(axis=1).get(), n.get(), rtol=1e-5, atol=1e-5 * float(n.max()))


@pytest.mark.parametrize("tof", [cases.small_tof(), cases.short_tof()], ids=["covering", "short"])
def test_gpu_tof_summed_back_projection(rng, cp, tof):
    cases.check_tof_summed_back_projection(rng, cp, "gpu", tof, 3, [0, 5, 7, 20])
