"""Kernel builds: NVRTC for a current GPU (no GPU needed), the cached CPU build,
device selection, and that ``recon`` imports without CuPy."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from petbind.recon import kernels
from petbind.core.device import resolve_device


def test_every_kernel_compiles_with_nvrtc_for_sm90():
    """A kernel that would not build on a GPU fails here, on CPU-only CI."""
    ptx = kernels.nvrtc_compile("joseph", arch="sm_90")
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries == set(kernels.KERNEL_SIGNATURES)
    assert ".target sm_90" in ptx


def test_nvrtc_reports_compile_errors(tmp_path, monkeypatch):
    bad = tmp_path / "broken.cu"
    bad.write_text('#include "compat.cuh"\nPB_KERNEL void k(float* x) { x[0] = undefined_symbol; }\n')
    (tmp_path / "compat.cuh").write_text((kernels.KERNEL_DIR / "compat.cuh").read_text())
    monkeypatch.setattr(kernels, "KERNEL_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="undefined_symbol"):
        kernels.nvrtc_compile("broken")


def test_kernel_source_inlines_header():
    src = kernels.kernel_source("joseph")
    assert '#include "compat.cuh"' not in src
    assert "pb_thread_index" in src
    with pytest.raises(ValueError, match="available"):
        kernels.kernel_source("nonexistent")


_BUILD = textwrap.dedent(
    """
    import numpy as np
    from petbind.recon import kernels
    from petbind.recon.geometry import ImageGrid
    from petbind.recon.projector import forward_project
    lib = kernels.cpu_library()
    assert lib is not None
    g = ImageGrid((4, 4, 4), 1.0)
    v = forward_project(np.ones(g.shape, np.float32), np.array([[-9.0, 0.5, 0.5]]), np.array([[9.0, 0.5, 0.5]]), g, device="cpu")
    assert abs(float(v[0]) - 4.0) < 1e-5, v
    print(lib._name)
    """
)


def test_cpu_build_is_cached_and_safe_when_two_processes_build_at_once(tmp_path):
    env = dict(os.environ, PETBIND_CACHE_DIR=str(tmp_path), PYTHONPATH=os.getcwd())
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    names = {out.strip() for out, _ in outs}
    assert len(names) == 1  # both loaded the same cached library
    libs = list((tmp_path / "kernels").glob("joseph-*.so"))
    assert len(libs) == 1 and str(libs[0]) in names
    assert not list((tmp_path / "kernels").glob("*.tmp"))  # no half-written leftovers
    # a third process reuses the cache without compiling
    mtime = libs[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", _BUILD], env=env, check=True, capture_output=True)
    assert libs[0].stat().st_mtime_ns == mtime


def test_import_without_cupy():
    code = (
        "import sys, pkgutil, importlib, numpy as np\n"
        "sys.modules['cupy'] = None  # any import of cupy would now fail\n"
        "import petbind\n"
        "for m in pkgutil.walk_packages(petbind.__path__, 'petbind.'):\n"
        "    importlib.import_module(m.name)\n"
        "from petbind.recon.geometry import ImageGrid\n"
        "from petbind.recon.projector import forward_project\n"
        "g = ImageGrid((2, 2, 2), 1.0)\n"
        "forward_project(np.ones(g.shape, np.float32), np.zeros((1, 3)) - 5, np.zeros((1, 3)) + 5, g, device='cpu')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd(), PETBIND_DEVICE="cpu")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_device_selection(monkeypatch):
    monkeypatch.delenv("PETBIND_DEVICE", raising=False)
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("PETBIND_DEVICE", "cpu")
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"
    monkeypatch.setenv("PETBIND_DEVICE", "quantum")
    with pytest.raises(ValueError, match="PETBIND_DEVICE"):
        resolve_device("auto")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")


def test_asking_for_a_missing_gpu_is_a_clear_error(monkeypatch):
    import petbind.core.device as device

    monkeypatch.setattr(device, "gpu_available", lambda: False)
    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without CuPy
    with pytest.raises(RuntimeError, match="cupy-cuda12x"):
        device.resolve_device("gpu")
    monkeypatch.delenv("PETBIND_DEVICE", raising=False)
    assert device.resolve_device("auto") == "cpu"
