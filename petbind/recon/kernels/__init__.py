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
* compiles it with NVRTC alone (no GPU needed) with exactly CuPy's options
  into a cubin for a given architecture, which the tests use to prove that
  every kernel builds for current GPUs;
* reads the kernels' argument lists from their declarations in the source
  (:func:`kernel_signatures`): the CPU build's ``host_*`` entry points, the
  ctypes argument types and the GPU launch conversions all derive from them.
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
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent

#: C types a kernel argument may have, with their NumPy dtype and ctypes type.
_C_TYPES = {
    "float": (np.dtype(np.float32), ctypes.c_float, "f"),
    "int": (np.dtype(np.int32), ctypes.c_int32, "i"),
    "long long": (np.dtype(np.int64), ctypes.c_int64, "q"),
    "unsigned int": (np.dtype(np.uint32), ctypes.c_uint32, "I"),
}


@dataclass(frozen=True)
class KernelParam:
    """One kernel argument as declared in the CUDA source.

    Attributes
    ----------
    name : str
        Argument name (``image``, ``num_lors``, ...).
    ctype : str
        Element type: ``"float"``, ``"int"``, ``"long long"`` or ``"unsigned int"``.
    pointer : bool
        A device pointer (an array) rather than a scalar.
    const : bool
        Pointer to read-only data.
    """

    name: str
    ctype: str
    pointer: bool
    const: bool

    @property
    def dtype(self):
        """NumPy dtype of the scalar or of the pointed-to elements."""
        return _C_TYPES[self.ctype][0]

    @property
    def kind(self):
        """One letter: ``p`` pointer, ``i`` int32, ``f`` float32, ``q`` int64, ``I`` uint32."""
        return "p" if self.pointer else _C_TYPES[self.ctype][2]

    def c_decl(self):
        return f"{'const ' if self.const else ''}{self.ctype}{'*' if self.pointer else ''} {self.name}"


@dataclass(frozen=True)
class KernelSignature:
    """A ``PB_KERNEL`` declaration parsed from a kernel source.

    Conventions the parser enforces (ARCHITECTURE: one thread = one LOR):
    the last argument is the ``long long`` thread count; exactly one
    argument is a non-const pointer, the output; a kernel whose output is
    named ``image`` scatter-adds (accumulates) into an image of
    ``image_shape[0] * image_shape[1] * image_shape[2]`` floats.
    """

    name: str
    params: tuple

    @property
    def kinds(self):
        return "".join(p.kind for p in self.params)

    @property
    def count(self):
        """The thread-count argument (the last one)."""
        return self.params[-1]

    @property
    def output(self):
        return next(p for p in self.params if p.pointer and not p.const)

    @property
    def accumulates(self):
        return self.output.name == "image"

    def index(self, name):
        for i, p in enumerate(self.params):
            if p.name == name:
                return i
        raise KeyError(f"{self.name} has no argument {name!r}")

    def host_wrapper(self):
        """C++ source of the ``extern "C" host_<name>`` entry point of the CPU build."""
        decl = ", ".join(p.c_decl() for p in self.params)
        args = ", ".join(p.name for p in self.params)
        if self.accumulates:
            size = "(long long)image_shape[0] * image_shape[1] * image_shape[2]"
            body = f"pb_launch_accumulate({self.name}, {self.count.name}, image, {size}, {args});"
        else:
            body = f"pb_launch({self.name}, {self.count.name}, {args});"
        return f'extern "C" void host_{self.name}({decl}) {{ {body} }}'


def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _parse_param(raw, kernel, origin):
    tokens = raw.replace("*", " * ").split()
    const = tokens[:1] == ["const"]
    tokens = tokens[1:] if const else tokens
    pointer = tokens.count("*") == 1
    tokens = [t for t in tokens if t != "*"]
    ctype = " ".join(tokens[:-1])
    if len(tokens) < 2 or ctype not in _C_TYPES or not tokens[-1].isidentifier() or (const and not pointer):
        raise ValueError(f"{origin}: kernel {kernel}: argument {raw.strip()!r} is not a "
                         f"{'/'.join(_C_TYPES)} scalar or pointer")
    return KernelParam(tokens[-1], ctype, pointer, const)


def parse_kernel_signatures(source, origin="kernel source"):
    """Kernel declarations of a CUDA source: ``{name: KernelSignature}``, in file order.

    Object-like ``#define`` macros used in argument lists (``PB_TOF_ARGS``)
    are expanded; every argument must be a ``float``, ``int``, ``long long``
    or ``unsigned int`` scalar or pointer.

    Raises
    ------
    ValueError
        Naming the kernel and the argument that breaks the conventions.
    """
    text = _strip_comments(source).replace("\\\n", " ")
    macros = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(?![\w(])[ \t]*(.*)$", text, flags=re.M):
        macros[m.group(1)] = m.group(2).strip()
    out = {}
    for m in re.finditer(r"\bPB_KERNEL\s+void\s+(\w+)\s*\(", text):
        name, depth, i = m.group(1), 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        args = text[m.end() : i - 1]
        for _ in range(10):  # expand nested object-like macros
            args = re.sub(r"\b\w+\b", lambda t: macros.get(t.group(0), t.group(0)), args)
        params = tuple(_parse_param(raw, name, origin) for raw in args.split(","))
        sig = KernelSignature(name, params)
        if params[-1].pointer or params[-1].ctype != "long long":
            raise ValueError(f"{origin}: kernel {name}: the last argument must be the long long thread count")
        outputs = [p.name for p in params if p.pointer and not p.const]
        if len(outputs) != 1:
            raise ValueError(f"{origin}: kernel {name}: expected exactly one non-const pointer (the output); got {outputs}")
        if sig.accumulates and "image_shape" not in {p.name for p in params}:
            raise ValueError(f"{origin}: kernel {name} accumulates into image but has no image_shape argument")
        if name in out:
            raise ValueError(f"{origin}: kernel {name} is declared twice")
        out[name] = sig
    if not out:
        raise ValueError(f"{origin}: no PB_KERNEL declarations found")
    return out


_signature_cache: dict = {}


def kernel_signatures(name="joseph"):
    """Parsed signatures of ``recon/kernels/<name>.cu`` (cached per file content).

    Returns
    -------
    dict
        ``{kernel name: KernelSignature}`` in the order of the file.
    """
    path = KERNEL_DIR / f"{name}.cu"
    try:
        st = path.stat()
    except FileNotFoundError:
        kernel_source(name)  # raises with the list of sources
        raise
    # keyed by the file's identity, so a launch costs a stat, not a read and a hash of the source
    stamp = (name, st.st_mtime_ns, st.st_size)
    sigs = _signature_cache.get(stamp)
    if sigs is None:
        text = path.read_text()
        sigs = _signature_cache[stamp] = parse_kernel_signatures(text, str(path))
    return sigs


def host_source(name="joseph"):
    """Source of the CPU build: the kernel source plus generated ``host_*`` entry points."""
    wrappers = "\n".join(sig.host_wrapper() for sig in kernel_signatures(name).values())
    return kernel_source(name) + "\n// ---- generated host entry points ----\n" + wrappers + "\n"


#: Architecture the tests compile for with NVRTC (Hopper).
DEFAULT_NVRTC_ARCH = "sm_90"

#: Options :func:`gpu_module` gives CuPy's ``RawModule``; CuPy adds its own
#: (see :func:`cupy_nvrtc_options`), and the no-GPU compile check uses them all.
#: (No --std: NVRTC's default dialect, C++17 since CUDA 11, is what the source
#: needs.)
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


#: Kernel names and argument kinds (p = pointer, i = int32, f = float32,
#: q = int64), derived from the declarations in ``joseph.cu``.
KERNEL_SIGNATURES = {k: sig.kinds for k, sig in kernel_signatures("joseph").items()}


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
            path, _ = _compile_cpu(name, host_source(name))
        except CompilerNotFound as exc:
            _cpu_libraries[name] = None
            log.warning("%s; falling back to the slow NumPy projector", exc)
            return None
        lib = ctypes.CDLL(str(path))
        for kernel, sig in kernel_signatures(name).items():
            fn = getattr(lib, f"host_{kernel}")
            fn.argtypes = [ctypes.c_void_p if p.pointer else _C_TYPES[p.ctype][1] for p in sig.params]
            fn.restype = None
        _cpu_libraries[name] = lib
        return lib


def _signature(kernel, args):
    sig = kernel_signatures("joseph").get(kernel)
    if sig is None:
        raise KeyError(f"no kernel {kernel!r} in joseph.cu; available: {sorted(kernel_signatures('joseph'))}")
    if len(args) != len(sig.params):
        raise TypeError(f"{kernel} takes {len(sig.params)} arguments ({', '.join(p.name for p in sig.params)}); "
                        f"got {len(args)}")
    return sig


def bind(kernel, **arguments):
    """The arguments of ``kernel`` in declaration order, from keyword arguments.

    Callers name every argument as ``joseph.cu`` declares it, so the order
    (and the list itself) is written once, in the source.

    Raises
    ------
    TypeError
        Naming the missing and the unknown arguments.
    """
    sig = kernel_signatures("joseph").get(kernel)
    if sig is None:
        raise KeyError(f"no kernel {kernel!r} in joseph.cu; available: {sorted(kernel_signatures('joseph'))}")
    names = [p.name for p in sig.params]
    missing = [n for n in names if n not in arguments]
    unknown = sorted(set(arguments) - set(names))
    if missing or unknown:
        raise TypeError(f"{kernel}({', '.join(names)}): missing {missing}, unknown {unknown}")
    return tuple(arguments[n] for n in names)


def launch_cpu(kernel, args, count):
    """Run ``kernel`` on the CPU.  ``args`` are NumPy arrays (C-contiguous, of
    the declared element type) or Python scalars, in the order of the kernel's
    declaration in ``joseph.cu``."""
    lib = cpu_library("joseph")
    sig = _signature(kernel, args)
    conv = []
    for p, a in zip(sig.params, args):
        if p.pointer:
            if not (isinstance(a, np.ndarray) and a.flags.c_contiguous and a.dtype == p.dtype):
                got = f"{type(a).__name__} {getattr(a, 'dtype', '')}"
                raise TypeError(f"{kernel}: argument {p.name} must be a C-contiguous NumPy {p.dtype} array; got {got}")
            if not p.const and not a.flags.writeable:
                raise TypeError(f"{kernel}: output argument {p.name} is read-only")
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


#: Largest x dimension of a CUDA grid.
MAX_GRID_X = 2**31 - 1


def launch_gpu(kernel, args, count, block=256):
    """Run ``kernel`` on the current GPU over ``count`` threads.

    Scalars are converted to the exact C type of their declaration (a Python
    int would otherwise reach an ``int`` argument as 64 bits).
    """
    sig = _signature(kernel, args)
    conv = tuple(a if p.pointer else p.dtype.type(a) for p, a in zip(sig.params, args))
    if count == 0:
        return
    blocks = (int(count) + block - 1) // block
    if blocks > MAX_GRID_X:
        raise ValueError(f"{kernel}: {count} threads need {blocks} blocks of {block}, more than CUDA allows ({MAX_GRID_X})")
    fn = gpu_module("joseph").get_function(kernel)
    fn((blocks,), (block,), conv)


# --------------------------------------------------------------------------------------------
# NVRTC without a GPU
# --------------------------------------------------------------------------------------------
def nvrtc_library_paths(nvidia_roots=None):
    """NVRTC shared libraries found on this machine, one per file, wheels first.

    Looks in the NVIDIA pip wheels (CUDA 12: ``nvidia/cuda_nvrtc/lib/libnvrtc.so.12``
    from ``nvidia-cuda-nvrtc-cu12``; CUDA 13: ``nvidia/cu13/lib/libnvrtc.so.13``
    from ``nvidia-cuda-nvrtc``), then ``$CUDA_HOME``, ``$CUDA_PATH``,
    ``/usr/local/cuda`` and the loader's search path.

    Parameters
    ----------
    nvidia_roots : list of str, optional
        Folders that hold the wheels' ``nvidia`` namespace package contents
        (default: ``nvidia.__path__``).
    """
    if nvidia_roots is None:
        try:
            import nvidia  # noqa: PLC0415 - namespace package of the NVIDIA wheels

            nvidia_roots = list(nvidia.__path__)
        except ImportError:
            nvidia_roots = []
    names = []
    for base in nvidia_roots:
        names += sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so*")))
        names += sorted(glob.glob(os.path.join(base, "*", "bin", "nvrtc64*.dll")))
    for root in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        names += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        names.append(found)
    out, seen = [], set()
    for n in names:
        base = os.path.basename(n)
        if "builtins" in base or ".alt." in base:
            continue
        real = os.path.realpath(n) if os.path.exists(n) else n
        if real not in seen:
            seen.add(real)
            out.append(n)
    return out


def _load_nvrtc(library=None):
    names = [library] if library else nvrtc_library_paths()
    errors = []
    for n in names:
        try:
            return ctypes.CDLL(n), n
        except OSError as exc:
            errors.append(f"{n}: {exc}")
    raise RuntimeError(
        "NVRTC library not found; `pip install nvidia-cuda-nvrtc-cu12` (part of petbind's `test` extra)"
        + (f"; tried {'; '.join(errors)}" if errors else "")
    )


def nvrtc_version(library=None):
    """``(major, minor)`` of an NVRTC library (default: the first found)."""
    nvrtc, _ = _load_nvrtc(library)
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def cupy_nvrtc_options(arch=DEFAULT_NVRTC_ARCH, defines=()):
    """The NVRTC options of :func:`gpu_module`'s ``RawModule`` on a device of ``arch``.

    CuPy (13 and 14, NVRTC backend, no jitify) appends ``-ftz=true``,
    ``-arch=sm_XX`` (it asks NVRTC for a cubin, i.e. a binary for exactly that
    device) and ``--device-as-default-execution-space`` to the options it is
    given (``cupy/cuda/compiler.py``: ``_compile_with_cache_cuda`` and
    ``_get_arch_for_options_for_nvrtc``).
    """
    cc = str(arch).replace("sm_", "").replace("compute_", "")
    if not cc.isdigit():
        raise ValueError(f"arch must look like 'sm_90' or '90'; got {arch!r}")
    return GPU_OPTIONS + tuple(f"-D{d}" for d in defines) + (
        "-ftz=true", f"-arch=sm_{cc}", "--device-as-default-execution-space")


@dataclass(frozen=True)
class NvrtcBuild:
    """Result of :func:`nvrtc_compile`: the PTX text, the cubin (ELF bytes),
    the options used and the NVRTC library and version that built them."""

    ptx: str
    cubin: bytes
    options: tuple
    library: str
    version: tuple


def nvrtc_compile(name="joseph", arch=DEFAULT_NVRTC_ARCH, library=None, defines=()):
    """Compile a kernel source with NVRTC exactly as CuPy's ``RawModule`` will,
    without needing a GPU.

    Parameters
    ----------
    name : str
        Kernel source name (``recon/kernels/<name>.cu``).
    arch : str
        Real architecture of the target device, e.g. ``"sm_90"`` (H100/H200).
    library : str, optional
        Path of the NVRTC library to use (default: the first of
        :func:`nvrtc_library_paths`).

    Returns
    -------
    NvrtcBuild

    Raises
    ------
    RuntimeError
        With NVRTC's log when the source does not compile.
    """
    nvrtc, path = _load_nvrtc(library)
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    prog = ctypes.c_void_p()
    src = kernel_source(name).encode()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None)
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed with code {rc}")
    opts = cupy_nvrtc_options(arch, defines)
    c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    try:
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), c_opts)
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, buf)
        if rc != 0:
            raise RuntimeError(
                f"NVRTC {major.value}.{minor.value} ({arch}) failed to compile {name}.cu:\n"
                f"{buf.value.decode(errors='replace')}"
            )
        nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(prog, ptx)
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return NvrtcBuild(ptx.value.decode(), cubin.raw, opts, path, (major.value, minor.value))
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


__all__ = [
    "KERNEL_SIGNATURES",
    "KernelParam",
    "KernelSignature",
    "parse_kernel_signatures",
    "kernel_signatures",
    "host_source",
    "bind",
    "nvrtc_library_paths",
    "nvrtc_version",
    "cupy_nvrtc_options",
    "NvrtcBuild",
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
