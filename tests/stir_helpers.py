"""Where the STIR reference data live, for the STIR and mMR tests."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: small headers copied into the repository (see tests/data/README.md)
LOCAL = ROOT / "tests" / "data" / "stir"
#: the full STIR data (listmode, STIR's sinograms and images): ../shared relative to the repository root
SHARED = ROOT.parent / "shared" / "data" / "stir"


def shared_file(name):
    """Path of a file in ../shared/data/stir, or skip the test saying why."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"needs {path} (STIR reference data in ../shared, absent on this machine)")
    return path


def stage(tmp_path, names):
    """Copy shared files (gunzipping ``.gz``) into ``tmp_path``; return ``tmp_path``."""
    for name in names:
        src = shared_file(name)
        if name.endswith(".gz"):
            with gzip.open(src, "rb") as fi, open(tmp_path / name[:-3], "wb") as fo:
                shutil.copyfileobj(fi, fo)
        else:
            shutil.copy(src, tmp_path / name)
    return tmp_path
