"""Kernel sources and their two builds.

The projector kernels are written once, in CUDA C (``joseph.cu`` with the
portability header ``compat.cuh``).  This module

* expands the source (the header is inlined, so the text alone identifies a
  build and CuPy's own cache keys on it);
* builds it for the CPU with the host C++ compiler and OpenMP into a shared
  library cached under ``$PETBIND_CACHE_DIR`` (default ``~/.cache/petbind``),
  keyed by a hash of the source, the flags and the compiler; the library is
  written to a temporary name and renamed, so concurrent processes are safe;
* compiles it for the GPU with CuPy's ``RawModule`` (NVRTC), memoised per
  (device, defines);
* compiles it with NVRTC alone (no GPU needed) for a given architecture, which
  the tests use to prove that every kernel builds for current GPUs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent

#: Kernel names and argument kinds: p = pointer, i = int32, f = float32, q = int64.
_GRID = "ppp"
_TOF = "ifff"
_SINO = "pppiii"
KERNEL_SIGNATURES = {
    "joseph_forward_lor": "pp" + "p" + _GRID + "pq",
    "joseph_back_lor": "pp" + "p" + _GRID + "pq",
    "joseph_forward_lor_tof": "pp" + "p" + _GRID + _TOF + "pq",
    "joseph_back_lor_tof": "pp" + "p" + _GRID + _TOF + "pq",
    "joseph_forward_sino": _SINO + "p" + _GRID + "pq",
    "joseph_back_sino": _SINO + "p" + _GRID + "pq",
    "joseph_forward_sino_tof": _SINO + "p" + _GRID + _TOF + "pq",
    "joseph_back_sino_tof": _SINO + "p" + _GRID + _TOF + "pq",
    "joseph_forward_listmode": "pp" + "p" + _GRID + "pq",
    "joseph_back_listmode": "pp" + "p" + _GRID + "pq",
    "joseph_forward_listmode_tof": "ppp" + "p" + _GRID + _TOF + "pq",
    "joseph_back_listmode_tof": "ppp" + "p" + _GRID + _TOF + "pq",
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int32, "f": ctypes.c_float, "q": ctypes.c_int64}
_NUMPY_SCALARS = {"i": np.int32, "f": np.float32, "q": np.int64}

#: Architecture the tests compile for with NVRTC (Hopper).
DEFAULT_NVRTC_ARCH = "sm_90"

#: NVRTC options of the GPU build; the no-GPU compile check uses the same ones.
#: (No --std: NVRTC's default dialect, C++17 since CUDA 11, is what the source
#: needs, and CuPy may pass its own.)
GPU_OPTIONS = ("-use_fast_math",)


def kernel_source(name="joseph"):
    """The kernel source ``recon/kernels/<name>.cu`` with local headers inlined."""
    path = KERNEL_DIR / f"{name}.cu"
    if not path.is_file():
        raise ValueError(f"no kernel source {path}; available: {sorted(p.stem for p in KERNEL_DIR.glob('*.cu'))}")
    out = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith('#include "') and stripped.endswith('"'):
            header = KERNEL_DIR / stripped.split('"')[1]
            out.append(f"// ---- begin {header.name} ----")
            out.append(header.read_text())
            out.append(f"// ---- end {header.name} ----")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# CPU build
# --------------------------------------------------------------------------------------------
class CompilerNotFound(RuntimeError):
    pass


_cpu_lock = threading.Lock()
_cpu_libraries: dict = {}


def cache_dir():
    """Folder holding compiled CPU kernels (created on demand)."""
    root = os.environ.get("PETBIND_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "petbind")
    path = Path(root) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_compiler():
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise CompilerNotFound(
        "no C++ compiler found (tried $CXX, c++, g++, clang++); install one, e.g. "
        "`apt-get install g++` (Debian/Ubuntu) or Xcode command line tools (macOS), "
        "to get the fast CPU projectors"
    )


def _cpu_identity():
    # -march=native code must not be reused on another processor model.
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags")):
                    model += line
    except OSError:
        pass
    return model


_BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno", "-x", "c++"]


def _compile_cpu(name, source):
    cxx = _find_compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    attempts = [["-march=native", "-fopenmp"], ["-fopenmp"], []]
    errors = []
    for extra in attempts:
        flags = _BASE_FLAGS + extra
        key = hashlib.sha256(
            "\0".join([source, " ".join(flags), version, _cpu_identity() if "-march=native" in extra else ""]).encode()
        ).hexdigest()[:20]
        target = cache_dir() / f"{name}-{key}.so"
        if target.is_file():
            return target, extra
        fd, tmp_src = tempfile.mkstemp(suffix=".cu", dir=cache_dir())
        with os.fdopen(fd, "w") as fh:
            fh.write(source)
        fd, tmp_lib = tempfile.mkstemp(suffix=".so.tmp", dir=cache_dir())
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, tmp_src, "-o", tmp_lib], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp_lib, target)  # atomic: a concurrent build just replaces an identical file
                if "-fopenmp" not in extra:
                    log.warning("CPU kernels built without OpenMP (single thread): %s", errors[-1][:200])
                return target, extra
            errors.append(proc.stderr.strip())
        finally:
            for p in (tmp_src, tmp_lib):
                if os.path.exists(p):
                    os.unlink(p)
    raise RuntimeError(f"compiling {name}.cu for the CPU with {cxx} failed:\n{errors[-1]}")


def cpu_library(name="joseph"):
    """Load (building if needed) the CPU shared library of a kernel source.

    Returns
    -------
    ctypes.CDLL or None
        ``None`` when no C++ compiler exists (callers fall back to NumPy).
    """
    with _cpu_lock:
        if name in _cpu_libraries:
            return _cpu_libraries[name]
        try:
            path, _ = _compile_cpu(name, kernel_source(name))
        except CompilerNotFound as exc:
            _cpu_libraries[name] = None
            log.warning("%s; falling back to the slow NumPy projector", exc)
            return None
        lib = ctypes.CDLL(str(path))
        for kernel, sig in KERNEL_SIGNATURES.items():
            if kernel.startswith(name) or name == "joseph":
                fn = getattr(lib, f"host_{kernel}")
                fn.argtypes = [_CTYPES[c] for c in sig]
                fn.restype = None
        _cpu_libraries[name] = lib
        return lib


def launch_cpu(kernel, args, count):
    """Run ``kernel`` on the CPU.  ``args`` are NumPy arrays (C-contiguous, right
    dtype) or Python scalars in the order of :data:`KERNEL_SIGNATURES`."""
    lib = cpu_library("joseph")
    sig = KERNEL_SIGNATURES[kernel]
    if len(args) != len(sig):
        raise TypeError(f"{kernel} takes {len(sig)} arguments; got {len(args)}")
    conv = []
    for kind, a in zip(sig, args):
        if kind == "p":
            if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                raise TypeError(f"{kernel}: pointer arguments must be C-contiguous NumPy arrays")
            conv.append(a.ctypes.data)
        else:
            conv.append(a)
    getattr(lib, f"host_{kernel}")(*conv)


# --------------------------------------------------------------------------------------------
# GPU build (CuPy RawModule / NVRTC)
# --------------------------------------------------------------------------------------------
_gpu_modules: dict = {}


def gpu_module(name="joseph", defines=()):
    """CuPy ``RawModule`` of a kernel source for the current device, memoised
    per (device id, defines)."""
    from petbind.core.device import get_cupy

    cupy = get_cupy()
    key = (name, cupy.cuda.runtime.getDevice(), tuple(defines))
    mod = _gpu_modules.get(key)
    if mod is None:
        options = GPU_OPTIONS + tuple(f"-D{d}" for d in defines)
        mod = cupy.RawModule(code=kernel_source(name), options=options)
        _gpu_modules[key] = mod
    return mod


def launch_gpu(kernel, args, count, block=256):
    """Run ``kernel`` on the current GPU over ``count`` threads."""
    sig = KERNEL_SIGNATURES[kernel]
    if len(args) != len(sig):
        raise TypeError(f"{kernel} takes {len(sig)} arguments; got {len(args)}")
    conv = tuple(a if kind == "p" else _NUMPY_SCALARS[kind](a) for kind, a in zip(sig, args))
    if count == 0:
        return
    fn = gpu_module("joseph").get_function(kernel)
    fn(((count + block - 1) // block,), (block,), conv)


# --------------------------------------------------------------------------------------------
# NVRTC without a GPU
# --------------------------------------------------------------------------------------------
def _load_nvrtc():
    names = []
    try:  # the nvidia-cuda-nvrtc-cu12 wheel (the `test` extra)
        import nvidia.cuda_nvrtc  # noqa: PLC0415

        for base in nvidia.cuda_nvrtc.__path__:
            names += sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so*")))
            names += sorted(glob.glob(os.path.join(base, "bin", "nvrtc64*.dll")))
    except ImportError:
        pass
    for root in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        names += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        names.append(found)
    for n in names:
        if "builtins" in n or ".alt." in n:
            continue
        try:
            return ctypes.CDLL(n)
        except OSError:
            continue
    raise RuntimeError(
        "NVRTC library not found; `pip install nvidia-cuda-nvrtc-cu12` (part of petbind's `test` extra)"
    )


def nvrtc_compile(name="joseph", arch=DEFAULT_NVRTC_ARCH, options=()):
    """Compile a kernel source with NVRTC for ``arch`` without needing a GPU.

    Parameters
    ----------
    name : str
        Kernel source name (``recon/kernels/<name>.cu``).
    arch : str
        Virtual or real architecture, e.g. ``"sm_90"`` or ``"compute_90"``.

    Returns
    -------
    str
        The PTX text.

    Raises
    ------
    RuntimeError
        With NVRTC's log when the source does not compile.
    """
    nvrtc = _load_nvrtc()
    prog = ctypes.c_void_p()
    src = kernel_source(name).encode()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None)
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed with code {rc}")
    arch_opt = arch if arch.startswith("compute_") else arch.replace("sm_", "compute_")
    opts = [f"--gpu-architecture={arch_opt}", *GPU_OPTIONS, *options]
    c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    try:
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), c_opts)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        if rc != 0:
            raise RuntimeError(f"NVRTC ({arch}) failed to compile {name}.cu:\n{buf.value.decode(errors='replace')}")
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


__all__ = [
    "KERNEL_SIGNATURES",
    "kernel_source",
    "cpu_library",
    "launch_cpu",
    "gpu_module",
    "launch_gpu",
    "nvrtc_compile",
    "cache_dir",
    "CompilerNotFound",
]

if sys.platform == "win32":  # pragma: no cover
    log.debug("Windows: the CPU build expects a MinGW/clang++ on PATH")
