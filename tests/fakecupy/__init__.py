"""A strict CuPy stand-in for tests: NumPy underneath, CuPy's rules on top.

CI has no GPU, yet every CuPy code path of petbind should run on every
commit.  This package builds module objects named ``cupy``, ``cupy.cuda``,
``cupyx.scipy.ndimage`` ... that behave like CuPy where GPU code usually goes
wrong, and computes with NumPy:

* **Separate memories.**  ``ndarray`` holds a private NumPy buffer.  Implicit
  conversion to NumPy (``np.asarray``, ``np.testing``, ``float(np_array +
  cp_array)``) raises ``TypeError`` as CuPy does; mixing a NumPy array into a
  CuPy operation raises ``TypeError``; ``asarray`` copies host data in and
  ``get``/``asnumpy`` copy it out, so host and device never alias.
* **Only CuPy's names.**  Module attributes and ``ndarray`` attributes are
  limited to those of CuPy 14.2 (``cupy_api_names.json``, listed with
  ``dir()`` from the ``cupy-cuda12x`` 14.2.0 wheel); a NumPy-only name raises
  ``AttributeError``.
* **CuPy's results.**  Reductions return 0-d arrays, not scalars; ``empty``
  is filled with NaN (or -1) garbage.
* **Counters.**  :data:`stats` counts host-to-device and device-to-host
  copies (with bytes), synchronisations (scalar conversions, ``get``,
  boolean masks, ``nonzero``/``unique``/``bincount``), kernel launches, and
  the live and peak bytes of device arrays (by underlying buffer).
* **Checked kernels.**  ``RawModule(code=...)`` parses the kernel
  declarations of ``code`` with petbind's signature parser; a launch checks
  the grid covers the thread count, pointer arguments are C-contiguous
  device arrays of the declared element type and of the extent the argument
  needs, scalars are NumPy scalars of the declared C type, ids and bins lie
  in range; then it runs the project's CPU build of the same kernel.

:func:`install` puts the modules into ``sys.modules`` through a pytest
``monkeypatch`` (undone after the test).  The real ``pytest -m gpu`` on a GPU
stays the final word: ``tests/conftest.py`` only installs the stand-in when
CuPy cannot reach a CUDA device.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from . import _core
from ._core import Stats, ndarray, stats

__all__ = ["install", "build_modules", "stats", "Stats", "ndarray", "API_NAMES"]

API_NAMES = json.loads((Path(__file__).parent / "cupy_api_names.json").read_text())


def build_modules():
    """Fresh module objects ``{"cupy": ..., "cupy.cuda": ..., ...}`` of the stand-in."""
    return _core.build_modules(API_NAMES)


def install(monkeypatch):
    """Install the stand-in into ``sys.modules`` for one test; returns the ``cupy`` module.

    The previous entries (a real CuPy without a device, or none) come back
    when the test ends; petbind's memoised GPU kernel modules are cleared
    before and after, so nothing compiled for the stand-in leaks out.
    """
    from petbind.recon import kernels

    mods = build_modules()
    for name in list(sys.modules):
        if name == "cupy" or name.startswith(("cupy.", "cupyx", "cupy_backends")):
            monkeypatch.delitem(sys.modules, name)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(kernels, "_gpu_modules", {})
    stats.reset()
    return mods["cupy"]


def is_standin(module):
    """``True`` for the stand-in's ``cupy`` module."""
    return isinstance(module, types.ModuleType) and getattr(module, "__standin__", False)
