"""Shared test configuration.

GPU tests
---------
Tests marked ``gpu`` run CuPy code paths.  Where CuPy reaches a CUDA device
they use the real CuPy (``pytest -m gpu`` on a GPU machine is the final
word).  Elsewhere, as on CI, they run through the strict NumPy-backed CuPy
stand-in of ``tests/fakecupy``, installed into ``sys.modules`` for the one
test and removed after it, so every ``xp`` path executes on every commit.

* ``cp`` (fixture): the CuPy module a GPU test should use.
* ``@pytest.mark.real_gpu`` (with ``gpu``): the test needs the real device
  (timing, CuPy's own compiler); without one it is skipped with the reason.
* ``PETBIND_CUPY_STANDIN=0`` turns the stand-in off: ``gpu`` tests are then
  skipped with the reason when no device is usable.
"""

import os
import re

import numpy as np
import pytest

import fakecupy

# Keep the compiled-kernel cache of a test run inside the run (a fresh CI
# machine builds once per session) unless the caller chose a folder.
os.environ.setdefault("PETBIND_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "petbind"))

_real_gpu_reason = []  # memo: [reason or None]


def real_gpu_reason():
    """``None`` when the real CuPy reaches a CUDA device, else why not."""
    if not _real_gpu_reason:
        reason = None
        try:
            import cupy
        except Exception as exc:  # ImportError or missing CUDA libraries
            reason = f"CuPy is not importable ({exc.__class__.__name__}: {exc})"
        else:
            try:
                if cupy.cuda.runtime.getDeviceCount() < 1:
                    reason = "CuPy sees no CUDA device"
            except Exception as exc:
                reason = f"CuPy sees no CUDA device ({exc.__class__.__name__}: {exc})"
        _real_gpu_reason.append(reason)
    return _real_gpu_reason[0]


def standin_enabled():
    return os.environ.get("PETBIND_CUPY_STANDIN", "1").strip() not in ("0", "no", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_gpu: with gpu, needs the real CUDA device, not the CuPy stand-in")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" not in item.keywords:
            continue
        reason = real_gpu_reason()
        if reason is None:
            continue
        if "real_gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"needs a real GPU: {reason}"))
        elif not standin_enabled():
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}; CuPy stand-in off (PETBIND_CUPY_STANDIN=0)"))


# Dependencies that a GPU machine running only `pytest -m gpu` may lack (see
# scripts/gpu_check.sh); the modules that need them hold no gpu tests.
_OPTIONAL_FOR_GPU_RUNS = ("nibabel", "matplotlib", "petsird", "skimage", "dask", "distributed")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """In a ``-m gpu`` run, a test module that cannot be imported for lack of an
    optional dependency is skipped with that reason instead of stopping the run."""
    outcome = yield
    rep = outcome.get_result()
    if not (rep.failed and isinstance(collector, pytest.Module)):
        return
    if "gpu" not in (collector.config.getoption("markexpr", "") or ""):
        return
    m = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", str(rep.longrepr))
    if m and m.group(1).split(".")[0] in _OPTIONAL_FOR_GPU_RUNS:
        rep.outcome = "skipped"
        rep.longrepr = (str(collector.path), 0, f"Skipped: {m.group(1)} is not installed (-m gpu run)")


@pytest.fixture(autouse=True)
def _cupy_for_gpu_tests(request, monkeypatch):
    """Install the CuPy stand-in for a ``gpu`` test on a machine without a usable GPU."""
    if "gpu" in request.keywords and real_gpu_reason() is not None:
        return fakecupy.install(monkeypatch)
    return None


@pytest.fixture
def cp(request, _cupy_for_gpu_tests):
    """The CuPy module of a ``gpu`` test: real on a GPU machine, else the stand-in."""
    if "gpu" not in request.keywords:
        raise RuntimeError(f"{request.node.name} uses the cp fixture but is not marked gpu")
    if _cupy_for_gpu_tests is not None:
        return _cupy_for_gpu_tests
    import cupy

    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
