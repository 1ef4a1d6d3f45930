"""Device selection and the array namespace (``xp`` = NumPy or CuPy).

CuPy is imported lazily, only when a GPU is asked for or when an array is
already a CuPy array, so ``import petbind`` works without CuPy.

The device is chosen by ``device=`` arguments or, where an argument is
``"auto"``, by the environment variable ``PETBIND_DEVICE`` (``auto``, ``cpu``
or ``gpu``).  ``auto`` means the GPU when CuPy works and sees one, else the
CPU, and says why in the log.  ``gpu`` fails with the real reason.

A GPU counts as usable only when CuPy imports, sees a device and runs a
small element-wise kernel (CuPy compiles those with NVRTC) and a matrix
product (cuBLAS): an install without its CUDA libraries fails there, once,
with CuPy's own error, instead of deep inside a reconstruction.

Installing CuPy: one wheel for the driver's CUDA major version, with the CUDA
libraries it loads, i.e. ``pip install 'petbind[gpu-cuda12]'`` or
``'petbind[gpu-cuda13]'`` (``cupy-cudaXXx[ctk]``).  Never install two CuPy
wheels into one environment: they overwrite each other's files.
"""

from __future__ import annotations

import logging
import os
import sys

import numpy as np

__all__ = [
    "VALID_DEVICES",
    "resolve_device",
    "gpu_available",
    "gpu_status",
    "array_module",
    "get_cupy",
    "to_device",
    "to_numpy",
    "to_namespace",
    "is_cupy_array",
]

log = logging.getLogger(__name__)

VALID_DEVICES = ("auto", "cpu", "gpu")

INSTALL_HINT = (
    "install one CuPy wheel with its CUDA libraries for the driver's CUDA major version: "
    "pip install 'petbind[gpu-cuda12]' (CUDA 12) or 'petbind[gpu-cuda13]' (CUDA 13), never both; "
    "or use device='cpu'"
)


def get_cupy():
    """Import and return CuPy, or raise an error saying why and how to install it."""
    try:
        import cupy  # noqa: PLC0415 - deliberately lazy
    except Exception as exc:  # ImportError, or CUDA libraries missing
        raise RuntimeError(
            f"a GPU was requested but CuPy cannot be imported ({exc.__class__.__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    return cupy


_status_memo: dict = {}
_logged: set = set()


def _probe(cupy):
    """Why the GPU is not usable through ``cupy``, or ``None`` when it is."""
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, driver too old, ...
        return f"CuPy {getattr(cupy, '__version__', '?')} cannot reach a CUDA device ({exc.__class__.__name__}: {exc})"
    if n < 1:
        return "CuPy sees no CUDA device"
    try:
        a = cupy.arange(4, dtype=cupy.float32)
        total = float((a * 2.0).sum())  # element-wise + reduction kernels: NVRTC
        m = cupy.ones((2, 2), dtype=cupy.float32)
        prod = float((m @ m)[0, 0])  # cuBLAS
    except Exception as exc:
        return (f"CuPy {getattr(cupy, '__version__', '?')} sees {n} CUDA device(s) but cannot run kernels "
                f"({exc.__class__.__name__}: {exc}); the CUDA libraries CuPy needs are missing: {INSTALL_HINT}")
    if total != 12.0 or prod != 2.0:
        return f"CuPy's self-check computed wrong values ({total}, {prod}); the GPU install is broken"
    return None


def gpu_status():
    """``(usable, reason)``: whether CuPy runs on a GPU here, and why not.

    The check (import, device count, one NVRTC kernel and one cuBLAS call) is
    run once per imported CuPy module.
    """
    try:
        cupy = get_cupy()
    except RuntimeError as exc:
        cause = exc.__cause__
        if isinstance(cause, ModuleNotFoundError) and cause.name == "cupy":
            return False, f"CuPy is not installed; {INSTALL_HINT}"
        return False, str(exc)  # CuPy is there but broken (e.g. a CUDA library it links is missing)
    key = id(cupy)
    memo = _status_memo.get(key)
    if memo is None or memo[0] is not cupy:
        reason = _probe(cupy)
        memo = _status_memo[key] = (cupy, reason)
    return memo[1] is None, memo[1]


def gpu_available():
    """``True`` when CuPy imports, sees a CUDA device and runs kernels.

    A CuPy that is installed but broken is logged as a warning (once), never
    swallowed silently.
    """
    ok, reason = gpu_status()
    if not ok and "not installed" not in reason and reason not in _logged:
        _logged.add(reason)
        log.warning("GPU not usable: %s", reason)
    return ok


def resolve_device(device="auto"):
    """Turn ``"auto"``/``"cpu"``/``"gpu"`` (or ``None``) into ``"cpu"`` or ``"gpu"``.

    Raises
    ------
    ValueError
        For an unknown name (in the argument or in ``PETBIND_DEVICE``).
    RuntimeError
        When ``"gpu"`` is asked for and no GPU is usable, with the reason.
    """
    if device is None:
        device = "auto"
    device = str(device).lower()
    if device not in VALID_DEVICES:
        raise ValueError(f"device must be one of {VALID_DEVICES}; got {device!r}")
    if device == "auto":
        env = os.environ.get("PETBIND_DEVICE", "auto").strip().lower() or "auto"
        if env not in VALID_DEVICES:
            raise ValueError(f"environment variable PETBIND_DEVICE must be one of {VALID_DEVICES}; got {env!r}")
        device = env
    if device == "auto":
        if gpu_available():
            return "gpu"
        _, reason = gpu_status()
        if ("auto", reason) not in _logged:
            _logged.add(("auto", reason))
            log.info("device 'auto' chose the CPU: %s", reason)
        return "cpu"
    if device == "gpu":
        ok, reason = gpu_status()
        if not ok:
            raise RuntimeError(f"device='gpu' was requested but the GPU is not usable: {reason}")
    return device


def is_cupy_array(a):
    """``True`` for a CuPy array (recognised by its type's module, without importing CuPy)."""
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(*arrays):
    """NumPy or CuPy, whichever the arrays belong to (NumPy for plain data)."""
    for a in arrays:
        if is_cupy_array(a):
            return sys.modules["cupy"]
    return np


def to_device(array, device):
    """Move ``array`` to ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy) without copying when already there."""
    if device == "gpu":
        return get_cupy().asarray(array)
    return to_numpy(array)


def to_numpy(array):
    """Host copy of a NumPy or CuPy array (no copy for NumPy input)."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)


def to_namespace(array, xp, dtype=None):
    """``array`` in namespace ``xp`` (NumPy or CuPy), copying between host and
    device only when it lives in the other one.

    Parameters
    ----------
    array : ndarray, cupy.ndarray or scalar
    xp : module
        ``numpy`` or ``cupy``.
    dtype : dtype, optional
    """
    if xp is np:
        a = to_numpy(array)
        return a if dtype is None else a.astype(dtype, copy=False)
    return xp.asarray(array, dtype=dtype)
