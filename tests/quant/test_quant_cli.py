import importlib.util
import json
import nibabel as nib
import numpy as np
import pytest

from petbind.quant.cli import main
from petbind.quant.results import FIT_COLUMNS
from petbind.quant.io import TACTable, write_tacs_tsv
from petbind.core.files import read_table_tsv
from tests.quant_helpers import (AFFINE, FRAME_END_S, FRAME_START_S, atlas_labels, srtm_tacs, write_atlas,
                                 write_pet)


def _image_from_tacs(labels, tacs_by_label):
    img = np.zeros((*labels.shape, FRAME_START_S.size), dtype=np.float32)
    for k, tac in tacs_by_label.items():
        img[labels == k] = tac
    return img


def _subject_image(bp_putamen, bp_caudate, r1=1.0):
    ref, tg = srtm_tacs([bp_putamen, bp_caudate], r1=r1, k2_per_min=0.25)
    return _image_from_tacs(atlas_labels(), {1: ref, 2: tg[:, 0], 3: tg[:, 1]})


def test_tacs_fit_compare_end_to_end(tmp_path):
    atlas, labels_tsv = write_atlas(tmp_path)
    rng = np.random.default_rng(30)
    study = tmp_path / "study"
    groups = ["drug", "drug", "drug", "placebo", "placebo", "placebo"]
    true_delta = []
    for i, g in enumerate(groups):
        pid = f"sub-{i + 1:02d}"
        bp_base = rng.uniform(1.5, 3.0, 2)
        bp_post = bp_base * (0.6 if g == "drug" else 1.0) + rng.normal(0, 0.05, 2)
        true_delta.append(bp_post - bp_base)
        for ses, bp in (("baseline", bp_base), ("postdose", bp_post)):
            d = study / pid / f"ses-{ses}" / "pet"
            d.mkdir(parents=True)
            stem = f"{pid}_ses-{ses}"
            pet = write_pet(d, _subject_image(*bp), stem=f"{stem}_pet")
            tacs = d / f"{stem}_tacs.tsv"
            assert main(["tacs", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv),
                         "--out", str(tacs), "--quiet"]) == 0
            assert main(["fit", str(tacs), "--reference", "cerebellum", "--model", "srtm", "--weights", "counts",
                         "--out", str(d / f"{stem}_bpnd.tsv"), "--quiet"]) == 0
            # the TAC sidecar carries the radionuclide through to the fit
            assert json.loads((d / f"{stem}_tacs.json").read_text())["TracerRadionuclide"] == "C11"
            assert json.loads((d / f"{stem}_bpnd.json").read_text())["HalfLifeMin"] == pytest.approx(20.364)
    (study / "participants.tsv").write_text(
        "participant_id\tgroup\n" + "".join(f"sub-{i + 1:02d}\t{g}\n" for i, g in enumerate(groups)))

    header, rows = read_table_tsv(study / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_bpnd.tsv")
    assert header[: len(FIT_COLUMNS)] == FIT_COLUMNS
    assert [r["region"] for r in rows] == ["putamen", "caudate"]
    assert all(r["model"] == "srtm" and r["status"] == "0" for r in rows)

    out = tmp_path / "results"
    assert main(["compare", "--study", str(study), "--out-dir", str(out), "--n-permutations", "1000",
                 "--quiet"]) == 0
    _, within = read_table_tsv(out / "within_group.tsv")
    true_delta = np.array(true_delta)
    for g, sel in (("drug", slice(0, 3)), ("placebo", slice(3, 6))):
        got = [float(r["mean_delta_bp_nd"]) for r in within if r["group"] == g]
        # SRTM on noiseless frame means recovers BP_ND to a few percent, so ΔBP_ND to ~0.1
        np.testing.assert_allclose(got, true_delta[sel].mean(axis=0), atol=0.1)
    _, inter = read_table_tsv(out / "group_by_time.tsv")
    assert [r["region"] for r in inter] == ["putamen", "caudate"]
    assert all(float(r["difference"]) < -0.5 for r in inter)  # drug lowers BP_ND by 40 %
    assert (out / "region_changes.png").stat().st_size > 5000

    # two-session mode on one subject
    b = study / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_bpnd.tsv"
    p = study / "sub-01" / "ses-postdose" / "pet" / "sub-01_ses-postdose_bpnd.tsv"
    assert main(["compare", "--baseline", str(b), "--post", str(p), "--out-prefix", str(tmp_path / "s1"),
                 "--quiet"]) == 0
    _, ch = read_table_tsv(tmp_path / "s1_change.tsv")
    bb = {r["region"]: float(r["bp_nd"]) for r in read_table_tsv(b)[1]}
    pp = {r["region"]: float(r["bp_nd"]) for r in read_table_tsv(p)[1]}
    for r in ch:
        assert float(r["delta_bp_nd"]) == pytest.approx(pp[r["region"]] - bb[r["region"]])
        assert float(r["percent_change"]) == pytest.approx(
            100 * (pp[r["region"]] - bb[r["region"]]) / bb[r["region"]])


def _tac_file(tmp_path, bp=(1.0, 2.0)):
    ref, tg = srtm_tacs(list(bp), r1=1.0, k2_per_min=0.25)
    t = TACTable(FRAME_START_S, FRAME_END_S, ["cerebellum", "putamen", "caudate"], np.column_stack([ref, tg]))
    return write_tacs_tsv(tmp_path / "x_tacs.tsv", t)


@pytest.mark.parametrize("model", ["srtm", "bfsrtm", "srtm2", "mrtm", "mrtm2", "logan"])
def test_fit_every_model_columns_and_recovery(tmp_path, model):
    tacs = _tac_file(tmp_path)
    out = tmp_path / f"{model}_bpnd.tsv"
    fig = tmp_path / f"{model}.png"
    assert main(["fit", str(tacs), "--reference", "cerebellum", "--model", model, "--out", str(out),
                 "--figure", str(fig), "--quiet"]) == 0
    header, rows = read_table_tsv(out)
    assert header[:7] == ["region", "model", "bp_nd", "r1", "k2_per_min", "k2prime_per_min", "status"]
    assert [r["region"] for r in rows] == ["putamen", "caudate"]
    np.testing.assert_allclose([float(r["bp_nd"]) for r in rows], [1.0, 2.0], rtol=0.05)
    assert fig.stat().st_size > 5000


def test_fit_passes_options_to_model(tmp_path, monkeypatch):
    """Wiring: the CLI hands weights, t*, k2' and the half-life to fit_model unchanged."""
    import petbind.quant.models

    seen = {}
    real = petbind.quant.models.fit_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(petbind.quant.models, "fit_model", spy)
    tacs = _tac_file(tmp_path)
    assert main(["fit", str(tacs), "--reference", "cerebellum", "--model", "mrtm2", "--weights", "duration",
                 "--tstar-min", "10", "--k2prime-per-min", "0.2", "--half-life-min", "109.77",
                 "--out", str(tmp_path / "r.tsv"), "--quiet"]) == 0
    assert seen == dict(weights="duration", tstar_min=10.0, k2prime_per_min=0.2, half_life_min=109.77)
    _, rows = read_table_tsv(tmp_path / "r.tsv")
    assert all(float(r["k2prime_per_min"]) == 0.2 for r in rows)


def test_half_life_from_tac_sidecar(tmp_path):
    tacs = _tac_file(tmp_path)
    (tmp_path / "x_tacs.json").write_text(json.dumps({"TracerRadionuclide": "F-18"}))
    assert main(["fit", str(tacs), "--reference", "cerebellum", "--model", "bfsrtm", "--weights", "counts",
                 "--out", str(tmp_path / "r_bpnd.tsv"), "--quiet"]) == 0
    assert json.loads((tmp_path / "r_bpnd.json").read_text())["HalfLifeMin"] == pytest.approx(109.77)
    (tmp_path / "x_tacs.json").write_text(json.dumps({"TracerRadionuclide": "Xe133"}))
    assert main(["fit", str(tacs), "--reference", "cerebellum", "--model", "bfsrtm", "--weights", "counts",
                 "--out", str(tmp_path / "r_bpnd.tsv"), "--quiet"]) == 2


def test_bad_input_exit_code_2(tmp_path, capsys):
    tacs = _tac_file(tmp_path)
    rc = main(["fit", str(tacs), "--reference", "cblm", "--model", "srtm", "--out", str(tmp_path / "r.tsv")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "x_tacs.tsv: region 'cblm' not found; available regions: ['cerebellum', 'putamen', 'caudate']" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "r.tsv").exists()

    rc = main(["fit", str(tmp_path / "none.tsv"), "--reference", "c", "--model", "srtm", "--out",
               str(tmp_path / "r.tsv")])
    assert rc == 2 and "none.tsv: TSV file not found" in capsys.readouterr().err

    rc = main(["fit", str(tacs), "--reference", "cerebellum", "--model", "srtm", "--tstar-min", "-3",
               "--out", str(tmp_path / "r.tsv")])
    assert rc == 2 and "--tstar-min must be >= 0" in capsys.readouterr().err

    (tmp_path / "bad_tacs.tsv").write_text("frame_start\tframe_end\tcerebellum\n0\t60\t1\n30\t90\t2\n")
    rc = main(["fit", str(tmp_path / "bad_tacs.tsv"), "--reference", "cerebellum", "--model", "srtm",
               "--out", str(tmp_path / "r.tsv")])
    assert rc == 2 and "bad_tacs.tsv: frames 0 and 1 overlap" in capsys.readouterr().err

    atlas, labels_tsv = write_atlas(tmp_path)
    img = np.ones((*atlas_labels().shape, FRAME_START_S.size - 1), dtype=np.float32)
    pet = write_pet(tmp_path, img, stem="short")
    rc = main(["tacs", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv), "--out",
               str(tmp_path / "t.tsv")])
    err = capsys.readouterr().err
    assert rc == 2 and "short.nii.gz: image has 13 frames" in err and "short.json" in err

    rc = main(["compare", "--baseline", str(tacs), "--post", str(pet), "--out-prefix", str(tmp_path / "c")])
    assert rc == 2 and "compare like with like" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main(["fit", str(tacs), "--reference", "cerebellum", "--model", "ma1", "--out", "r.tsv"])
    assert exc.value.code == 2


def test_map_with_real_models(tmp_path, monkeypatch):
    import petbind.quant.models

    record = {}
    real = petbind.quant.models.parametric_maps

    def spy(model, frame_start_s, frame_end_s, reference_tac, image_4d, **kwargs):
        record.update(reference_tac=np.asarray(reference_tac), **kwargs)
        return real(model, frame_start_s, frame_end_s, reference_tac, image_4d, **kwargs)

    monkeypatch.setattr(petbind.quant.models, "parametric_maps", spy)
    atlas, labels_tsv = write_atlas(tmp_path)
    img = _subject_image(1.0, 2.0, r1=1.1)
    pet = write_pet(tmp_path, img, sidecar={"FrameTimesStart": FRAME_START_S.tolist(),
                                            "FrameDuration": FRAME_DUR_S_LIST, "TracerRadionuclide": "F18"})
    prefix = tmp_path / "sub-01_ses-baseline"
    assert main(["map", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv), "--reference", "cerebellum",
                 "--model", "bfsrtm", "--weights", "counts", "--mask-regions", "putamen", "caudate",
                 "--out-prefix", str(prefix), "--figure", str(tmp_path / "m.png"), "--quiet"]) == 0
    labels = atlas_labels()
    inside = (labels == 2) | (labels == 3)
    np.testing.assert_allclose(record["reference_tac"], img[labels == 1][0], rtol=1e-6)
    np.testing.assert_array_equal(record["mask"], inside)
    assert record["half_life_min"] == pytest.approx(109.77) and record["weights"] == "counts"
    bp = nib.load(str(tmp_path / "sub-01_ses-baseline_bpnd.nii.gz"))
    np.testing.assert_array_equal(bp.affine, AFFINE)
    bpd = bp.get_fdata()
    assert np.all(np.isnan(bpd[~inside]))
    np.testing.assert_allclose(bpd[labels == 2], 1.0, rtol=0.05)
    np.testing.assert_allclose(bpd[labels == 3], 2.0, rtol=0.05)
    # every voxel equals the regional fit of its (identical) TAC
    reg = petbind.quant.models.fit_model("bfsrtm", FRAME_START_S, FRAME_END_S, img[labels == 1][0],
                                 np.stack([img[labels == 2][0], img[labels == 3][0]], axis=1),
                                 weights="counts", half_life_min=109.77)
    np.testing.assert_allclose(bpd[labels == 2], reg.parameters["bp_nd"][0], rtol=1e-5)
    np.testing.assert_allclose(bpd[labels == 3], reg.parameters["bp_nd"][1], rtol=1e-5)
    for suffix in ("r1", "k2", "k2prime", "status"):
        assert (tmp_path / f"sub-01_ses-baseline_{suffix}.nii.gz").exists()
        assert (tmp_path / f"sub-01_ses-baseline_{suffix}.json").exists()
    assert (tmp_path / "m.png").stat().st_size > 5000
    # a post-dose map with 30 % less binding through compare
    post = bp.get_fdata() * 0.7
    nib.save(nib.Nifti1Image(post.astype(np.float32), AFFINE), str(tmp_path / "post_bpnd.nii.gz"))
    assert main(["compare", "--baseline", str(prefix) + "_bpnd.nii.gz", "--post", str(tmp_path / "post_bpnd.nii.gz"),
                 "--out-prefix", str(tmp_path / "d"), "--quiet"]) == 0
    pct = nib.load(str(tmp_path / "d_pctchange-bpnd.nii.gz")).get_fdata()
    np.testing.assert_allclose(pct[inside], -30.0, atol=1e-3)
    assert np.all(np.isnan(pct[~inside]))
    assert (tmp_path / "d_delta-bpnd.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy installed: the no-CuPy error path cannot run")
def test_map_gpu_without_cupy_exit_2(tmp_path, capsys):
    atlas, labels_tsv = write_atlas(tmp_path)
    pet = write_pet(tmp_path, _subject_image(1.0, 2.0))
    rc = main(["map", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv), "--reference", "cerebellum",
               "--model", "bfsrtm", "--device", "gpu", "--out-prefix", str(tmp_path / "m")])
    assert rc == 2 and "--device gpu needs CuPy" in capsys.readouterr().err


def test_map_bad_reference_exit_2(tmp_path, capsys):
    atlas, labels_tsv = write_atlas(tmp_path)
    pet = write_pet(tmp_path, _subject_image(1.0, 2.0))
    rc = main(["map", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv), "--reference", "cerebelum",
               "--model", "bfsrtm", "--out-prefix", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "region(s) ['cerebelum'] not in the label table; available regions: ['cerebellum'" in err


FRAME_DUR_S_LIST = (FRAME_END_S - FRAME_START_S).tolist()
