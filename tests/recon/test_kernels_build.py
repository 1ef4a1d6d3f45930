"""Kernel builds: NVRTC for a current GPU (no GPU needed), the cached CPU build,
device selection, and that ``recon`` imports without CuPy."""

import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from petbind.recon import kernels
from petbind.core.device import resolve_device


def _elf_sections(blob):
    """Section names, machine and CUDA SM of a 64-bit little-endian ELF (a cubin)."""
    assert blob[:4] == b"\x7fELF" and blob[4] == 2 and blob[5] == 1, "not a 64-bit little-endian ELF"
    (machine,) = struct.unpack_from("<H", blob, 0x12)
    (flags,) = struct.unpack_from("<I", blob, 0x30)
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    names = {blob[strtab + h[0] : blob.index(b"\0", strtab + h[0])].decode() for h in headers}
    # The SM number sits in e_flags: bits 0-7 up to ELF ABI version 7 (CUDA 12),
    # bits 8-15 from ABI version 8 (CUDA 13), as read from both NVRTCs' cubins.
    sm = flags & 0xFF if blob[8] < 8 else (flags >> 8) & 0xFF
    return names, machine, sm


_PTX_PARAM = {"p": ".u64", "q": ".u64", "i": ".u32", "f": ".f32", "I": ".u32"}

NVRTC_LIBRARIES = kernels.nvrtc_library_paths()


def test_the_test_extra_provides_nvrtc():
    """The `test` extra installs nvidia-cuda-nvrtc-cu12; without NVRTC the build check below cannot run."""
    assert NVRTC_LIBRARIES, "no NVRTC found: pip install -e '.[test]' installs nvidia-cuda-nvrtc-cu12"


@pytest.mark.parametrize("library", NVRTC_LIBRARIES, ids=[os.path.basename(p) for p in NVRTC_LIBRARIES])
def test_every_kernel_compiles_for_sm90_exactly_as_cupy_will(library):
    """A kernel that would not build on an H100/H200 fails here, on CPU-only CI: the
    RawModule's options plus CuPy's own, a cubin for sm_90 (what CuPy loads)."""
    build = kernels.nvrtc_compile("joseph", arch="sm_90", library=library)
    assert build.options == kernels.GPU_OPTIONS + ("-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")
    names, machine, sm = _elf_sections(build.cubin)
    assert machine == 190  # EM_CUDA
    assert sm == 90
    sigs = kernels.kernel_signatures("joseph")
    assert {n[len(".text."):] for n in names if n.startswith(".text.")} >= set(sigs)
    # NVRTC's own reading of each argument list agrees with the parsed signatures
    for name, sig in sigs.items():
        m = re.search(r"\.entry\s+" + name + r"\(([^)]*)\)", build.ptx)
        assert m, name
        types = re.findall(r"\.param\s+(\.\w+)", m.group(1))
        assert types == [_PTX_PARAM[k] for k in sig.kinds], name
    assert ".target sm_90" in build.ptx
    assert set(re.findall(r"\.entry\s+(\w+)", build.ptx)) == set(sigs)


def test_nvrtc_is_found_in_cuda12_and_cuda13_wheel_layouts(tmp_path):
    cu12 = tmp_path / "nvidia" / "cuda_nvrtc" / "lib"
    cu13 = tmp_path / "nvidia" / "cu13" / "lib"
    for d, names in ((cu12, ["libnvrtc.so.12", "libnvrtc-builtins.so.12.9"]), (cu13, ["libnvrtc.so.13", "libnvrtc-builtins.so.13.5"])):
        d.mkdir(parents=True)
        for n in names:
            (d / n).write_bytes(b"")
    found = kernels.nvrtc_library_paths([str(tmp_path / "nvidia")])
    assert str(cu12 / "libnvrtc.so.12") in found and str(cu13 / "libnvrtc.so.13") in found
    assert not [p for p in found if "builtins" in p]


def test_kernel_signatures_are_parsed_from_the_source():
    src = textwrap.dedent(
        """
        #define GRID const float* image_origin, const float *voxel_size, \\
            const int* image_shape
        #define TOF int num_tof_bins, float width
        // PB_KERNEL void commented_out(float* x, long long n)
        PB_KERNEL void k_fwd(const float* a, const float* image, GRID, TOF, float* projection, long long num_lors) {}
        PB_KERNEL void k_back(const float* a, const float* projection, GRID, float* image, long long num_lors) {}
        """
    )
    sigs = kernels.parse_kernel_signatures(src)
    assert list(sigs) == ["k_fwd", "k_back"]
    assert sigs["k_fwd"].kinds == "pppppifpq"
    assert [p.name for p in sigs["k_fwd"].params][3:7] == ["voxel_size", "image_shape", "num_tof_bins", "width"]
    assert sigs["k_fwd"].output.name == "projection" and not sigs["k_fwd"].accumulates
    assert sigs["k_back"].accumulates and sigs["k_back"].params[4].dtype == np.int32
    wrapper = sigs["k_back"].host_wrapper()
    assert wrapper.startswith('extern "C" void host_k_back(const float* a, const float* projection,')
    assert "pb_launch_accumulate(k_back, num_lors, image, (long long)image_shape[0] * image_shape[1] * image_shape[2]" in wrapper
    with pytest.raises(ValueError, match="k_bad: argument 'double x'"):
        kernels.parse_kernel_signatures("PB_KERNEL void k_bad(double x, float* y, long long n) {}")
    with pytest.raises(ValueError, match="last argument must be the long long thread count"):
        kernels.parse_kernel_signatures("PB_KERNEL void k(float* y, int n) {}")
    with pytest.raises(ValueError, match="exactly one non-const pointer"):
        kernels.parse_kernel_signatures("PB_KERNEL void k(float* y, float* z, long long n) {}")


def test_kernel_signatures_match_the_shipped_kernels():
    """Every kernel of joseph.cu is described; the table is derived, not kept by hand."""
    src = (kernels.KERNEL_DIR / "joseph.cu").read_text()
    assert set(kernels.KERNEL_SIGNATURES) == set(re.findall(r"PB_KERNEL\s+void\s+(\w+)", src))
    assert "host_joseph" not in src  # entry points are generated, not written a second time
    lib = kernels.cpu_library("joseph")
    for name in kernels.KERNEL_SIGNATURES:
        assert hasattr(lib, f"host_{name}")


def test_nvrtc_reports_compile_errors(tmp_path, monkeypatch):
    bad = tmp_path / "broken.cu"
    bad.write_text('#include "compat.cuh"\nPB_KERNEL void k(float* x, long long n) { x[0] = undefined_symbol; }\n')
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


def test_asking_for_a_missing_gpu_is_a_clear_error(monkeypatch, caplog):
    import petbind.core.device as device

    monkeypatch.setitem(sys.modules, "cupy", None)  # as on a machine without CuPy
    with pytest.raises(RuntimeError, match=r"not usable: CuPy is not installed.*gpu-cuda12"):
        device.resolve_device("gpu")
    monkeypatch.delenv("PETBIND_DEVICE", raising=False)
    monkeypatch.setattr(device, "_logged", set())
    with caplog.at_level("INFO", logger="petbind.core.device"):
        assert device.resolve_device("auto") == "cpu"
    assert "chose the CPU: CuPy is not installed" in caplog.text


class _BrokenCupy:
    """A CuPy whose device is visible but whose kernels cannot be compiled (no NVRTC)."""

    __version__ = "14.2.0"

    class cuda:
        class runtime:
            @staticmethod
            def getDeviceCount():
                return 1

    float32 = np.float32

    @staticmethod
    def arange(*args, **kwargs):
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared object file")


def test_a_broken_cupy_is_reported_not_swallowed(monkeypatch, caplog):
    import petbind.core.device as device

    monkeypatch.setitem(sys.modules, "cupy", _BrokenCupy)
    monkeypatch.setattr(device, "_logged", set())
    monkeypatch.delenv("PETBIND_DEVICE", raising=False)
    with pytest.raises(RuntimeError, match="cannot run kernels.*libnvrtc.so.12"):
        device.resolve_device("gpu")
    with caplog.at_level("INFO", logger="petbind.core.device"):
        assert device.resolve_device("auto") == "cpu"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "libnvrtc.so.12" in warnings[0].getMessage()
    assert "chose the CPU" in caplog.text


@pytest.mark.gpu
def test_gpu_is_usable_when_cupy_works(cp):
    from petbind.core.device import gpu_status, resolve_device

    assert gpu_status() == (True, None)
    assert resolve_device("gpu") == "gpu"


def test_kernel_arguments_are_bound_by_their_declared_names():
    sig = kernels.kernel_signatures()["joseph_forward_lor"]
    named = {p.name: i for i, p in enumerate(sig.params)}
    assert kernels.bind("joseph_forward_lor", **named) == tuple(range(len(sig.params)))
    with pytest.raises(TypeError, match=r"missing \['num_lors'\], unknown \['num_events'\]"):
        kernels.bind("joseph_forward_lor", **{**{k: v for k, v in named.items() if k != "num_lors"}, "num_events": 1})
    with pytest.raises(KeyError, match="available"):
        kernels.bind("joseph_sideways", **named)
