"""Shared test configuration.

Tests marked ``gpu`` need CuPy and a CUDA device; without them they are
skipped with the reason shown by ``pytest -ra``.  Their CPU twins run the
same checks on every machine.
"""

import os

import numpy as np
import pytest

# Keep the compiled-kernel cache of a test run inside the run (a fresh CI
# machine builds once per session) unless the caller chose a folder.
os.environ.setdefault("PETBIND_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "petbind"))


def _gpu_reason():
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError or missing CUDA libraries
        return f"CuPy is not importable ({exc.__class__.__name__}); install cupy-cuda12x on a CUDA machine"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as exc:
        return f"CuPy sees no CUDA device ({exc.__class__.__name__}: {exc})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    checked = False
    for item in items:
        if "gpu" in item.keywords:
            if not checked:
                reason, checked = _gpu_reason(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
