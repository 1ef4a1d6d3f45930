import itertools
import json
import math

import nibabel as nib
import numpy as np
import pytest
import scipy.stats as ss

from petbind.quant import compare, stats, study_files
from petbind.core.files import read_table_tsv, write_table_tsv
from tests.quant_helpers import AFFINE

REGIONS = ["putamen", "caudate", "thalamus"]


def _write_fit(path, values, regions=REGIONS):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table_tsv(path, ["region", "model", "bp_nd", "r1", "k2_per_min", "k2prime_per_min", "status"],
                    [[r, "srtm", v, 1.0, 0.3, math.nan, 0] for r, v in zip(regions, values)])
    return path


def test_regional_change_hand_values(tmp_path):
    b = _write_fit(tmp_path / "b_bpnd.tsv", [2.0, 1.5, 0.0])
    p = _write_fit(tmp_path / "p_bpnd.tsv", [1.0, 1.8, 0.2])
    rows = compare.regional_change(compare.read_bpnd_tsv(b), compare.read_bpnd_tsv(p))
    assert [r[0] for r in rows] == REGIONS
    np.testing.assert_allclose([r[3] for r in rows], [-1.0, 0.3, 0.2])
    np.testing.assert_allclose([r[4] for r in rows], [-50.0, 20.0, np.nan])  # baseline 0 -> n/a
    out = compare.write_regional_change(tmp_path / "x_change.tsv", rows)
    header, back = read_table_tsv(out)
    assert header == compare.REGIONAL_CHANGE_COLUMNS
    assert back[2]["percent_change"] == "n/a"


def test_regional_change_region_mismatch(tmp_path):
    b = _write_fit(tmp_path / "b_bpnd.tsv", [2.0, 1.5, 1.0])
    p = _write_fit(tmp_path / "p_bpnd.tsv", [1.0, 1.8], regions=["putamen", "caudate"])
    with pytest.raises(ValueError, match=r"p_bpnd\.tsv: regions differ from .*b_bpnd\.tsv: missing \['thalamus'\]"):
        compare.regional_change(compare.read_bpnd_tsv(b), compare.read_bpnd_tsv(p), str(b), str(p))


def test_change_maps(tmp_path):
    rng = np.random.default_rng(20)
    b = rng.uniform(0.5, 3.0, (5, 4, 3))
    b[0, 0, 0] = -0.1
    p = b * 0.7
    nib.save(nib.Nifti1Image(b.astype(np.float32), AFFINE), str(tmp_path / "b_bpnd.nii.gz"))
    nib.save(nib.Nifti1Image(p.astype(np.float32), AFFINE * 1.0), str(tmp_path / "p_bpnd.nii.gz"))
    res = compare.change_maps(tmp_path / "b_bpnd.nii.gz", tmp_path / "p_bpnd.nii.gz", tmp_path / "sub-01")
    d = nib.load(str(res["delta"]))
    pc = nib.load(str(res["percent"]))
    np.testing.assert_array_equal(d.affine, AFFINE)
    b32, p32 = b.astype(np.float32).astype(float), p.astype(np.float32).astype(float)
    np.testing.assert_allclose(d.get_fdata(), p32 - b32, atol=1e-6)
    pct = pc.get_fdata()
    assert np.isnan(pct[0, 0, 0])
    np.testing.assert_allclose(pct.reshape(-1)[1:], -30.0, atol=1e-4)
    side = json.loads((tmp_path / "sub-01_pctchange-bpnd.json").read_text())
    assert side["Units"] == "percent"
    shifted = AFFINE.copy()
    shifted[2, 3] += 5.0
    nib.save(nib.Nifti1Image(p.astype(np.float32), shifted), str(tmp_path / "q_bpnd.nii.gz"))
    with pytest.raises(ValueError, match=r"q_bpnd\.nii\.gz: affine differs from .*b_bpnd\.nii\.gz"):
        compare.change_maps(tmp_path / "b_bpnd.nii.gz", tmp_path / "q_bpnd.nii.gz", tmp_path / "bad")


def make_study(root, rng, n_drug=4, n_placebo=3, effect=-0.4, nan_at=None):
    """Study folder with known BP_ND; returns (baseline, post, groups) arrays."""
    root.mkdir(parents=True, exist_ok=True)
    groups = ["drug"] * n_drug + ["placebo"] * n_placebo
    n = len(groups)
    base = rng.uniform(1.0, 3.0, (n, len(REGIONS))).round(3)
    post = base + rng.normal(0.0, 0.1, base.shape).round(3)
    post[:n_drug] += effect * base[:n_drug]
    if nan_at is not None:
        post[nan_at] = np.nan
    lines = ["participant_id\tgroup\tage"]
    for i, g in enumerate(groups):
        pid = f"sub-{i + 1:02d}"
        lines.append(f"{pid if i % 2 else pid[4:]}\t{g}\t40")  # with and without the sub- prefix
        _write_fit(root / pid / "ses-baseline" / "pet" / f"{pid}_ses-baseline_bpnd.tsv", base[i])
        _write_fit(root / pid / "ses-postdose" / f"{pid}_ses-postdose_bpnd.tsv", post[i])
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return base, post, np.array(groups)


def test_study_statistics_against_scipy_and_enumeration(tmp_path):
    rng = np.random.default_rng(21)
    base, post, groups = make_study(tmp_path / "study", rng)
    out = compare.run_study(tmp_path / "study", tmp_path / "out", n_permutations=10000, seed=3)
    header, rows = read_table_tsv(out["within_group"])
    assert header == compare.WITHIN_GROUP_COLUMNS
    for g in ("drug", "placebo"):
        sel = groups == g
        grows = [r for r in rows if r["group"] == g]
        assert [r["region"] for r in grows] == REGIONS
        p_raw = []
        for j, r in enumerate(grows):
            ref = ss.ttest_rel(post[sel, j], base[sel, j])
            assert float(r["t"]) == pytest.approx(ref.statistic, rel=1e-9)
            assert float(r["p_t"]) == pytest.approx(ref.pvalue, rel=1e-9)
            assert float(r["mean_delta_bp_nd"]) == pytest.approx(np.mean(post[sel, j] - base[sel, j]))
            wref = ss.wilcoxon(post[sel, j] - base[sel, j], method="exact")
            assert float(r["p_wilcoxon"]) == pytest.approx(wref.pvalue, rel=1e-9)
            assert int(r["n"]) == sel.sum()
            p_raw.append(ref.pvalue)
        np.testing.assert_allclose([float(r["p_t_holm"]) for r in grows], stats.holm(p_raw), rtol=1e-9)
        np.testing.assert_allclose([float(r["p_t_fdr_bh"]) for r in grows], stats.benjamini_hochberg(p_raw),
                                   rtol=1e-9)
    header, rows = read_table_tsv(out["group_by_time"])
    assert header == compare.INTERACTION_COLUMNS
    d = post - base
    for j, r in enumerate(rows):
        assert (r["group_a"], r["group_b"], r["region"]) == ("drug", "placebo", REGIONS[j])
        a, b = d[groups == "drug", j], d[groups == "placebo", j]
        ref = ss.ttest_ind(a, b, equal_var=False)
        assert float(r["welch_t"]) == pytest.approx(ref.statistic, rel=1e-9)
        assert float(r["p_welch"]) == pytest.approx(ref.pvalue, rel=1e-9)
        # 35 relabelings of 4 + 3: enumerated by the code, and here by brute force
        x = np.concatenate([a, b])
        obs = abs(a.mean() - b.mean())
        hits = [abs(x[list(c)].mean() - np.delete(x, list(c)).mean()) >= obs - 1e-12
                for c in itertools.combinations(range(7), 4)]
        assert float(r["p_permutation"]) == pytest.approx(np.mean(hits))
        assert r["permutation_exact"] == "true"
    assert out["region_changes_png"].stat().st_size > 5000
    _, subj = read_table_tsv(out["subject_changes"])
    assert len(subj) == 7 * 3 and subj[0]["participant_id"] == "sub-01"


def test_study_nan_subject_left_out_of_that_region_only(tmp_path, caplog):
    rng = np.random.default_rng(22)
    base, post, groups = make_study(tmp_path / "s", rng, nan_at=(0, 1))
    data = compare.load_study(tmp_path / "s")
    with caplog.at_level("WARNING", logger="petbind.quant.compare"):
        rows = compare.within_group_statistics(data)
    cols = compare.WITHIN_GROUP_COLUMNS
    drug = [r for r in rows if r[0] == "drug"]
    assert [r[cols.index("n")] for r in drug] == [4, 3, 4]
    ref = ss.ttest_rel(post[1:4, 1], base[1:4, 1])
    assert drug[1][cols.index("p_t")] == pytest.approx(ref.pvalue, rel=1e-9)
    assert "1 subject(s) without BP_ND left out" in caplog.text


def test_permutation_seed_reproducible_random_mode(tmp_path):
    rng = np.random.default_rng(23)
    make_study(tmp_path / "s", rng, n_drug=8, n_placebo=8)
    data = compare.load_study(tmp_path / "s")
    r1 = compare.interaction_statistics(data, n_permutations=500, seed=5)
    r2 = compare.interaction_statistics(data, n_permutations=500, seed=5)
    col = compare.INTERACTION_COLUMNS.index("p_permutation")
    assert [r[col] for r in r1] == [r[col] for r in r2]
    assert all(r[compare.INTERACTION_COLUMNS.index("permutation_exact")] is False for r in r1)


def test_study_layout_errors(tmp_path):
    rng = np.random.default_rng(24)
    make_study(tmp_path / "s", rng)
    (tmp_path / "s" / "sub-03" / "ses-postdose" / "sub-03_ses-postdose_bpnd.tsv").unlink()
    with pytest.raises(ValueError, match=r"sub-03/ses-postdose: no file matching \['\*_bpnd.tsv'\]"):
        compare.load_study(tmp_path / "s")
    make_study(tmp_path / "t", rng)
    _write_fit(tmp_path / "t" / "sub-02" / "ses-baseline" / "extra_bpnd.tsv", [1, 2, 3])
    with pytest.raises(ValueError, match=r"sub-02/ses-baseline: 2 files match"):
        compare.load_study(tmp_path / "t")
    assert compare.load_study(tmp_path / "t", result_pattern="sub-*_bpnd.tsv").baseline.shape == (7, 3)
    with pytest.raises(ValueError, match=r"ses-pre: session folder not found"):
        compare.load_study(tmp_path / "s", baseline_session="pre")
    make_study(tmp_path / "u", rng)
    (tmp_path / "u" / "participants.tsv").write_text("participant_id\tarm\n01\tdrug\n")
    with pytest.raises(ValueError, match=r"participants\.tsv: missing required column\(s\) \['group'\]"):
        compare.load_study(tmp_path / "u")
    make_study(tmp_path / "v", rng)
    _write_fit(tmp_path / "v" / "sub-04" / "ses-postdose" / "sub-04_ses-postdose_bpnd.tsv", [1, 2],
               regions=["putamen", "striatum"])
    with pytest.raises(ValueError, match=r"sub-04_ses-postdose_bpnd\.tsv: regions differ .*missing \['caudate', "
                                         r"'thalamus'\], extra \['striatum'\]"):
        compare.load_study(tmp_path / "v")


def test_voxelwise_t_maps(tmp_path):
    rng = np.random.default_rng(25)
    make_study(tmp_path / "s", rng, n_drug=3, n_placebo=3)
    maps_b, maps_p = [], []
    for i in range(6):
        pid = f"sub-{i + 1:02d}"
        b = rng.uniform(1, 2, (4, 3, 2))
        p = b - 0.3 + rng.normal(0, 0.05, b.shape)
        maps_b.append(b.astype(np.float32).astype(float))
        maps_p.append(p.astype(np.float32).astype(float))
        for ses, arr in (("baseline", b), ("postdose", p)):
            nib.save(nib.Nifti1Image(arr.astype(np.float32), AFFINE),
                     str(tmp_path / "s" / pid / f"ses-{ses}" / f"{pid}_ses-{ses}_bpnd.nii.gz"))
    out = compare.run_study(tmp_path / "s", tmp_path / "o", voxelwise=True, n_permutations=100)
    t = nib.load(str(out["drug_tmap"])).get_fdata()
    ref = ss.ttest_rel(np.stack(maps_p[:3]), np.stack(maps_b[:3]), axis=0).statistic
    np.testing.assert_allclose(t, ref, rtol=1e-4)
    np.testing.assert_array_equal(nib.load(str(out["placebo_tmap"])).affine, AFFINE)
    p = nib.load(str(out["drug_p"])).get_fdata()
    q = nib.load(str(out["drug_pfdr"])).get_fdata()
    np.testing.assert_allclose(q.ravel(), stats.benjamini_hochberg(p.ravel()), rtol=1e-5)
    assert np.all(q >= p - 1e-7)


# ------------------------------------------------------------------ declared groups (issue 9 item 3)
def _set_group(root, pid, group):
    path = root / "participants.tsv"
    lines = path.read_text().splitlines()
    out = [lines[0]]
    for ln in lines[1:]:
        cells = ln.split("\t")
        if cells[0] in (pid, pid[4:]):
            cells[1] = group
        out.append("\t".join(cells))
    path.write_text("\n".join(out) + "\n")


@pytest.mark.parametrize("typo,hint", [("drugg", "; did you mean 'drug'"), ("Drug", "; did you mean 'drug'"),
                                       ("verum", "")])
def test_declared_groups_refuse_an_undeclared_group(tmp_path, typo, hint):
    make_study(tmp_path / "s", np.random.default_rng(26))
    _set_group(tmp_path / "s", "sub-02", typo)
    with pytest.raises(ValueError, match=rf"participants\.tsv: participant 'sub-02' has group '{typo}', which is not "
                                         rf"one of the declared groups \['drug', 'placebo'\]{hint}"):
        compare.run_study(tmp_path / "s", tmp_path / "o", groups=("drug", "placebo"), figures=False)
    assert not (tmp_path / "o").exists()
    # without declared groups the typo is a group of its own (the old behaviour, kept for callers)
    assert study_files.load_study(tmp_path / "s").group_names == ["drug", typo, "placebo"]


def test_declared_group_without_participant(tmp_path):
    make_study(tmp_path / "s", np.random.default_rng(27))
    with pytest.raises(ValueError, match=r"participants\.tsv: declared group 'control' has no participant"):
        study_files.load_study(tmp_path / "s", groups=("drug", "placebo", "control"))
    with pytest.raises(TypeError, match="sequence of group names"):
        study_files.load_study(tmp_path / "s", groups="drug")
    with pytest.raises(ValueError, match="declared once"):
        study_files.load_study(tmp_path / "s", groups=("drug", "drug"))


def test_subject_folder_missing_from_participants(tmp_path, caplog):
    base, post, groups = make_study(tmp_path / "s", np.random.default_rng(28))
    _write_fit(tmp_path / "s" / "sub-99" / "ses-baseline" / "sub-99_ses-baseline_bpnd.tsv", [1, 2, 3])
    _write_fit(tmp_path / "s" / "sub-99" / "ses-postdose" / "sub-99_ses-postdose_bpnd.tsv", [1, 2, 3])
    with pytest.raises(ValueError, match=r"sub-99: subject folder has no row in .*participants\.tsv"):
        compare.run_study(tmp_path / "s", tmp_path / "o", groups=("drug", "placebo"))
    assert not (tmp_path / "o").exists()
    with caplog.at_level("WARNING", logger="petbind.quant.study_files"):
        data = study_files.load_study(tmp_path / "s")
    assert "['sub-99'] have no row" in caplog.text and data.baseline.shape == (7, 3)


def test_declared_group_order_sets_table_order(tmp_path):
    make_study(tmp_path / "s", np.random.default_rng(29))
    plain = compare.run_study(tmp_path / "s", tmp_path / "a", n_permutations=100, figures=False)
    swapped = compare.run_study(tmp_path / "s", tmp_path / "b", n_permutations=100, figures=False,
                                groups=("placebo", "drug"))
    _, a = read_table_tsv(plain["group_by_time"])
    _, b = read_table_tsv(swapped["group_by_time"])
    assert [r["group_a"] for r in b] == ["placebo"] * 3
    for ra, rb in zip(a, b):  # same test with the roles swapped
        assert float(rb["difference"]) == pytest.approx(-float(ra["difference"]), rel=1e-12)
        assert float(rb["p_welch"]) == pytest.approx(float(ra["p_welch"]), rel=1e-12)
        assert float(rb["p_permutation"]) == float(ra["p_permutation"])
    _, wb = read_table_tsv(swapped["within_group"])
    assert [r["group"] for r in wb] == ["placebo"] * 3 + ["drug"] * 3


def test_cli_compare_groups_typo_exit_2(tmp_path, capsys):
    from petbind.quant.cli import main

    make_study(tmp_path / "s", np.random.default_rng(30))
    _set_group(tmp_path / "s", "sub-05", "Placebo")
    rc = main(["compare", "--study", str(tmp_path / "s"), "--out-dir", str(tmp_path / "o"), "--groups", "drug",
               "placebo", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "participants.tsv: participant 'sub-05' has group 'Placebo'" in err and "did you mean 'placebo'" in err
    assert not (tmp_path / "o").exists()


def test_run_study_failing_figure_writes_nothing(tmp_path, monkeypatch):
    from petbind.quant import figures

    make_study(tmp_path / "s", np.random.default_rng(31))
    out = tmp_path / "o"
    out.mkdir()

    def broken(*args, **kwargs):
        raise ValueError("plot_region_changes: broken on purpose")

    monkeypatch.setattr(figures, "plot_region_changes", broken)
    with pytest.raises(ValueError, match="broken on purpose"):
        compare.run_study(tmp_path / "s", out, n_permutations=100)
    assert list(out.iterdir()) == []
