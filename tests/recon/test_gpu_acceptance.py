"""``benchmarks/gpu_acceptance.py`` (what ``scripts/gpu_check.sh`` runs on a lent
GPU) runs end to end on small problems, so its first GPU run counts."""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.gpu

HERE = os.path.dirname(os.path.abspath(__file__))


def test_acceptance_script_runs_every_check(cp, capsys):
    path = os.path.join(HERE, "..", "..", "benchmarks", "gpu_acceptance.py")
    spec = importlib.util.spec_from_file_location("gpu_acceptance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--size", "tiny"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "check" not in line]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[0] == "environment" and "BF-SRTM maps" in names and "TOF offsets > 2^31" in names
    statuses = [r.split("|")[2].strip() for r in rows]
    assert all(s == "ok" for s in statuses), out
