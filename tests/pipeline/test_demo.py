"""The demo's recovery table (petbind.pipeline.truth) against hand-computed group means, and the demo CLI."""

import json
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from petbind.pipeline.truth import recovery_table, recovery_verdicts

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import demo  # noqa: E402


def _write(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture()
def study(tmp_path):
    raw, deriv = tmp_path / "raw", tmp_path / "deriv"
    truth = []
    # subject, group, true (baseline, post), estimated (baseline, post)
    cases = [("sub-01", "drug", 1.0, 1.2, 1.05, 1.20), ("sub-02", "placebo", 1.2, 1.2, 1.10, 1.14),
             ("sub-03", "drug", 2.0, 2.4, 1.95, 2.45), ("sub-04", "placebo", 1.0, 1.1, 1.00, 1.08)]
    for sub, grp, tb, tp, eb, ep in cases:
        truth += [(sub, "ses-baseline", grp, "putamen", tb), (sub, "ses-postdose", grp, "putamen", tp)]
        for ses, v in (("ses-baseline", eb), ("ses-postdose", ep)):
            pet = deriv / sub / ses / "pet"
            _write(pet / f"{sub}_{ses}_desc-srtm_bpnd.tsv", ["region", "model", "bp_nd", "status"],
                   [("putamen", "srtm", v, 0)])
            (pet / f"{sub}_{ses}_desc-gtmpvc_tacs.json").write_text(json.dumps({"VoxelCount": {"putamen": 500}}))
            img = nib.Nifti1Image(np.zeros((2, 2, 2, 1), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
            nib.save(img, str(pet / f"{sub}_{ses}_rec-osem_pet.nii.gz"))
    _write(raw / "ground_truth.tsv", ["subject", "session", "group", "region", "bp_nd"], truth)
    _write(deriv / "group" / "group_by_time.tsv", ["region", "p_welch"], [("putamen", 0.04)])
    return raw, deriv


def test_recovery_table_group_means(study):
    raw, deriv = study
    (r,) = recovery_table(raw, deriv, "srtm", ("drug", "placebo"))
    assert r.region == "putamen" and r.volume_ml == pytest.approx(500 * 8 / 1000)
    assert r.true_baseline == pytest.approx(np.mean([1.0, 1.2, 2.0, 1.0]))
    assert r.est_baseline == pytest.approx(np.mean([1.05, 1.10, 1.95, 1.00]))
    assert r.true_delta["drug"] == pytest.approx(np.mean([0.2, 0.4]))
    assert r.est_delta["drug"] == pytest.approx(np.mean([0.15, 0.5]))
    assert r.se_delta["drug"] == pytest.approx(np.std([0.15, 0.5], ddof=1) / math.sqrt(2))
    assert r.est_delta["placebo"] == pytest.approx(np.mean([0.04, 0.08]))
    assert r.p_interaction == 0.04


def test_verdicts_can_fail(study):
    raw, deriv = study
    rows = recovery_table(raw, deriv, "srtm", ("drug", "placebo"))
    checks = dict((name.split(" ")[0], ok) for name, ok, _ in recovery_verdicts(rows, ("drug", "placebo")))
    assert checks["baseline"]  # ratio 1.275 / 1.3 = 0.98
    # placebo: estimated +0.06 vs true +0.05 +- 0.02 -> within; drug: 0.325 vs 0.3 +- 0.175 -> within
    assert checks["group"]
    rows[0].est_baseline *= 1.2
    assert not recovery_verdicts(rows, ("drug", "placebo"))[0][1]


def test_demo_refuses_one_subject(capsys):
    assert demo.main(["--subjects", "1", "--quiet"]) == 2
    assert "--subjects must be >= 2" in capsys.readouterr().err
