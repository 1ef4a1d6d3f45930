"""The CuPy stand-in itself: it must fail where CuPy fails, or the GPU tests
that run through it on CI prove nothing.

These tests use the stand-in directly (``fakecupy.install``), never the real
CuPy, so they run on every machine.
"""

import sys

import numpy as np
import pytest

import fakecupy
from fakecupy import API_NAMES
from petbind.recon import kernels
from petbind.recon.geometry import ImageGrid


@pytest.fixture
def fcp(monkeypatch):
    return fakecupy.install(monkeypatch)


def test_install_is_undone_after_the_test(monkeypatch):
    before = sys.modules.get("cupy")
    with monkeypatch.context() as mp:
        mod = fakecupy.install(mp)
        import cupyx.scipy.ndimage as nd

        assert sys.modules["cupy"] is mod and fakecupy.is_standin(mod)
        assert nd.__name__ == "cupyx.scipy.ndimage" and sys.modules["cupyx.scipy.ndimage"] is nd
    assert sys.modules.get("cupy") is before
    assert not fakecupy.is_standin(sys.modules.get("cupyx.scipy.ndimage"))


def test_implicit_conversion_and_mixing_are_refused(fcp):
    a = fcp.asarray(np.arange(4, dtype=np.float32))
    h = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.testing.assert_allclose(a, h)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + h
    with pytest.raises(TypeError):
        h + a
    with pytest.raises(TypeError, match="Unsupported type"):
        fcp.where(a > 1, h, 0.0)
    with pytest.raises(TypeError):
        fcp.ascontiguousarray(h)  # CuPy's ascontiguousarray takes device arrays only
    with pytest.raises(TypeError):
        [0, 1, 2][fcp.asarray(1)]  # no __index__ in CuPy
    # what CuPy allows: scalars, NumPy scalars, NumPy ufuncs of device arrays, explicit copies
    b = np.float32(2) * a + 1.0
    assert isinstance(b, fcp.ndarray) and isinstance(np.exp(a), fcp.ndarray)
    np.testing.assert_array_equal(b.get(), 2 * np.arange(4) + 1)
    assert isinstance(np.sum(a), fcp.ndarray)  # __array_function__ dispatches to the device


def test_only_cupy_names_exist(fcp):
    assert "asmatrix" not in API_NAMES["cupy"]
    with pytest.raises(AttributeError, match="not a CuPy name"):
        fcp.asmatrix
    a = fcp.zeros(3)
    with pytest.raises(AttributeError):
        a.ctypes
    with pytest.raises(AttributeError):
        a.tofile_not_a_method
    public = {n for n in dir(fcp.ndarray) if not n.startswith("_")}
    assert public <= set(API_NAMES["cupy.ndarray"]), public - set(API_NAMES["cupy.ndarray"])
    defined = {n for n in vars(fcp) if not n.startswith("_")}
    assert defined <= set(API_NAMES["cupy"]), defined - set(API_NAMES["cupy"])
    with pytest.raises(NotImplementedError, match="stand-in does not implement cupy.random.default_rng"):
        fcp.random.default_rng(0)


def test_cupy_results_and_counters(fcp):
    stats = fakecupy.stats
    stats.reset()
    a = fcp.asarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert stats.h2d == 1 and stats.h2d_bytes == 48
    s = a.sum()
    assert isinstance(s, fcp.ndarray) and s.shape == ()  # 0-d array, not a scalar
    assert stats.syncs == 0
    assert float(s) == 15.0
    assert stats.syncs == 1 and stats.d2h == 1
    a[a > 2]  # boolean mask: the result size needs the data
    assert stats.syncs == 2
    host = a.get()
    host[0, 0] = 99  # host and device never alias
    assert float(a[0, 0]) == 0.0
    assert np.isnan(fcp.empty(3).get()).all()  # empty is garbage, not zeros


def test_memory_is_counted_per_buffer(fcp):
    stats = fakecupy.stats
    base = stats.live_bytes
    a = fcp.zeros((1000,), dtype=np.float32)
    assert stats.live_bytes == base + 4000
    v = a.reshape(10, 100)[2:5]  # views are free
    assert stats.live_bytes == base + 4000
    b = a * 2  # results are allocations
    assert stats.live_bytes == base + 8000
    a *= 3  # in place is not
    assert stats.live_bytes == base + 8000 and stats.peak_bytes >= base + 8000
    del a, b
    assert stats.live_bytes == base + 4000  # the view keeps its buffer
    del v
    assert stats.live_bytes == base


def _forward_lor_args(fcp, n=5):
    grid = ImageGrid((4, 4, 4), 1.0)
    rng = np.random.default_rng(0)
    start = fcp.asarray(np.tile([[-9.0, 0.5, 0.5]], (n, 1)).astype(np.float32))
    end = fcp.asarray(np.tile([[9.0, 0.5, 0.5]], (n, 1)).astype(np.float32))
    img = fcp.asarray(rng.random(grid.shape).astype(np.float32))
    origin = fcp.asarray(grid.origin_mm.astype(np.float32))
    vox = fcp.asarray(np.asarray(grid.voxel_size_mm, np.float32))
    shape = fcp.asarray(np.asarray(grid.shape, np.int32))
    out = fcp.empty(n, dtype=np.float32)
    return [start, end, img, origin, vox, shape, out, np.int64(n)]


def test_kernel_launches_are_checked_against_the_declarations(fcp):
    mod = fcp.RawModule(code=kernels.kernel_source("joseph"), options=kernels.GPU_OPTIONS)
    fn = mod.get_function("joseph_forward_lor")
    args = _forward_lor_args(fcp)
    fn((1,), (256,), tuple(args))
    host = [a.get() if isinstance(a, fcp.ndarray) else a for a in args]
    host[6] = np.empty(5, np.float32)
    kernels.launch_cpu("joseph_forward_lor", host, 5)
    np.testing.assert_array_equal(args[6].get(), host[6])  # the launch ran the CPU build
    assert fakecupy.stats.launches == 1

    def bad(i, value, match, grid=(1,)):
        a = list(args)
        a[i] = value
        with pytest.raises((TypeError, ValueError), match=match):
            fn(grid, (256,), tuple(a))

    bad(7, 5, "declared long long; pass numpy.int64")  # a Python int would go in at the wrong width
    bad(7, np.int32(5), "declared long long")
    bad(2, args[2].astype(np.float64), "declared float\\* but the array is float64")
    bad(2, args[2].get(), "must be a device array")
    bad(0, args[0][:4], "holds 12 elements; the launch needs 15")
    bad(2, fcp.asarray(np.ones((4, 4, 8), np.float32))[:, :, ::2], "not C-contiguous")
    bad(6, args[2].reshape(-1)[:5], "overlaps the output")
    with pytest.raises(ValueError, match="covers 4 threads < num_lors=5"):
        fn((1,), (4,), tuple(args))
    with pytest.raises(TypeError, match="8 arguments declared, 7 given"):
        fn((1,), (256,), tuple(args[:7]))
    with pytest.raises(Exception, match="named symbol not found"):
        mod.get_function("joseph_nonexistent")
    with pytest.raises(ValueError, match="joseph.cu only"):
        fcp.RawModule(code="extern \"C\" __global__ void k(float* x) {}")


def test_a_petbind_launch_goes_through_the_checks(fcp):
    """``kernels.launch_gpu`` converts Python scalars to the declared C types, which the raw launch refuses."""
    args = _forward_lor_args(fcp)[:-1] + [5]
    kernels.launch_gpu("joseph_forward_lor", args, 5)
    assert fakecupy.stats.launches == 1
    fn = kernels.gpu_module("joseph").get_function("joseph_forward_lor")
    with pytest.raises(TypeError, match="declared long long"):
        fn((1,), (256,), tuple(args))


def test_gpu_module_compiles_with_the_options_the_nvrtc_test_checks(fcp):
    """The NVRTC build test compiles with ``cupy_nvrtc_options`` = GPU_OPTIONS + CuPy's own; the
    RawModule must get exactly GPU_OPTIONS, or the test proves nothing about the real build."""
    mod = kernels.gpu_module("joseph")
    assert mod.options == kernels.GPU_OPTIONS
    assert kernels.cupy_nvrtc_options("sm_90")[: len(kernels.GPU_OPTIONS)] == kernels.GPU_OPTIONS
    assert mod.code == kernels.kernel_source("joseph")
