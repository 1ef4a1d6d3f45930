"""Device selection and the array namespace (``xp`` = NumPy or CuPy).

CuPy is imported lazily, only when a GPU is asked for or when an array is
already a CuPy array, so ``import recon`` works without CuPy.

The device is chosen by ``device=`` arguments or, where an argument is
``"auto"``, by the environment variable ``PETBIND_DEVICE`` (``auto``, ``cpu``
or ``gpu``).  ``auto`` means the GPU when CuPy sees one, else the CPU.
"""

from __future__ import annotations

import os
import sys

import numpy as np

__all__ = ["VALID_DEVICES", "resolve_device", "gpu_available", "array_module", "get_cupy", "to_device", "to_numpy"]

VALID_DEVICES = ("auto", "cpu", "gpu")


def get_cupy():
    """Import and return CuPy, or raise an error saying how to install it."""
    try:
        import cupy  # noqa: PLC0415 - deliberately lazy
    except Exception as exc:  # ImportError, or CUDA libraries missing
        raise RuntimeError(
            "a GPU was requested but CuPy cannot be imported "
            f"({exc.__class__.__name__}: {exc}); install the wheel for your CUDA major version, "
            "e.g. `pip install cupy-cuda12x`, or use device='cpu'"
        ) from exc
    return cupy


def gpu_available():
    """``True`` when CuPy imports and sees at least one CUDA device."""
    try:
        cupy = get_cupy()
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def resolve_device(device="auto"):
    """Turn ``"auto"``/``"cpu"``/``"gpu"`` (or ``None``) into ``"cpu"`` or ``"gpu"``.

    Raises
    ------
    ValueError
        For an unknown name (in the argument or in ``PETBIND_DEVICE``).
    RuntimeError
        When ``"gpu"`` is asked for and no GPU is usable.
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
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        get_cupy()  # raises with install advice when CuPy itself is missing
        raise RuntimeError("device='gpu' was requested but CuPy sees no CUDA device; use device='cpu'")
    return device


def array_module(*arrays):
    """NumPy or CuPy, whichever the arrays belong to (NumPy for plain data)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            return sys.modules["cupy"]
    return np


def to_device(array, device):
    """Move ``array`` to ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy) without copying when already there."""
    if device == "gpu":
        return get_cupy().asarray(array)
    return to_numpy(array)


def to_numpy(array):
    """Host copy of a NumPy or CuPy array."""
    if type(array).__module__.split(".")[0] == "cupy":
        return array.get()
    return np.asarray(array)
