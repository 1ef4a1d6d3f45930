"""The demo's summary table: group means of true and estimated ΔBP_ND."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import demo  # noqa: E402


def _write(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def test_summary_rows_group_means(tmp_path):
    raw, group = tmp_path / "raw", tmp_path / "group"
    raw.mkdir()
    group.mkdir()
    truth = []
    for sub, grp, base, post in [("sub-01", "drug", 1.0, 0.8), ("sub-02", "placebo", 1.2, 1.3), ("sub-03", "drug", 2.0, 1.4)]:
        truth.append((sub, "ses-baseline", grp, "putamen", base))
        truth.append((sub, "ses-postdose", grp, "putamen", post))
    _write(raw / "ground_truth.tsv", ["subject", "session", "group", "region", "bp_nd"], truth)
    _write(
        group / "subject_changes.tsv",
        ["participant_id", "group", "region", "delta_bp_nd"],
        [("sub-01", "drug", "putamen", -0.1), ("sub-02", "placebo", "putamen", 0.05), ("sub-03", "drug", "putamen", "n/a")],
    )
    _write(group / "group_by_time.tsv", ["region", "p_welch", "p_permutation"], [("putamen", 0.04, 0.1)])
    rows = demo.summary_rows(raw, group, {"putamen": 43})
    assert len(rows) == 1
    r = rows[0]
    assert r["true_drug"] == pytest.approx(np.mean([-0.2, -0.6]))
    assert r["true_placebo"] == pytest.approx(0.1)
    assert r["est_drug"] == pytest.approx(-0.1)  # the n/a subject is left out
    assert r["est_placebo"] == pytest.approx(0.05)
    assert (r["p_welch"], r["p_permutation"], r["voxels"]) == (0.04, 0.1, 43)
    table = demo.format_table(rows)
    assert "putamen" in table and "-0.400" in table and "0.040" in table


def test_demo_refuses_one_subject(capsys):
    assert demo.main(["--subjects", "1", "--quiet"]) == 2
    assert "--subjects must be >= 2" in capsys.readouterr().err
