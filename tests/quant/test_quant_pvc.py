"""Partial-volume correction (``petbind.quant.pvc``) against a blurred piecewise-constant phantom.

The checks live in ``pvc_cases.py``; the CPU tests here and their GPU twins
(marked ``gpu``, skipped with the reason when CuPy or a CUDA device is
missing) run the same ones.
"""

import numpy as np
import pytest

import pvc_cases as cases
from petbind.quant.io import Atlas, PETImage
from petbind.quant.pvc import GaussianPSF, gtm_correct, gtm_matrix, pvc_tacs, rbv_correct, voxel_size_from_affine

FWHMS = [6.0, (5.0, 7.0, 9.0)]
FWHM_IDS = ["isotropic", "anisotropic"]


# ------------------------------------------------------------------ CPU
def test_gtm_matrix_matches_full_image_computation():
    cases.check_gtm_matrix_against_slow(np)


@pytest.mark.parametrize("fwhm", FWHMS, ids=FWHM_IDS)
@pytest.mark.parametrize("background", ["region", "zero"])
def test_gtm_recovers_blurred_phantom(fwhm, background):
    cases.check_gtm_recovers_phantom(np, fwhm, background)


def test_gtm_with_axes_swapped_does_not_recover():
    cases.check_wrong_psf_is_detected(np)


def test_empty_region_is_nan_with_status(caplog):
    with caplog.at_level("WARNING", logger="petbind.quant.pvc"):
        cases.check_empty_region(np)
    assert "absent" in caplog.text


@pytest.mark.parametrize("background", ["region", "zero"])
def test_rbv_recovers_blurred_phantom(background):
    cases.check_rbv_recovers_phantom(np, background)


def test_rbv_float32_keeps_dtype():
    cases.check_rbv_recovers_phantom(np, "region", np.float32)


def test_iterative_yang_converges_to_phantom():
    cases.check_iterative_yang_converges(np)


def test_regional_means():
    cases.check_regional_means(np)


def test_background_matters_when_unlabelled_voxels_are_active():
    """Assuming no activity outside the atlas when there is some biases GTM (sanity of the option)."""
    lab = cases.phantom_labels()
    truth = cases.truth_values()
    image = cases.blur_oracle(cases.piecewise_image(lab, truth), 6.0)
    g = gtm_matrix(lab, cases.NAMES, GaussianPSF(6.0, cases.VOXEL_MM), background="zero")
    vals = gtm_correct(image, lab, g).values
    assert np.max(np.abs(vals / truth[:5] - 1)) > 0.05


def test_voxel_size_from_affine_and_sigma():
    assert voxel_size_from_affine(cases.AFFINE) == cases.VOXEL_MM
    psf = GaussianPSF.from_affine((5.0, 7.0, 9.0), cases.AFFINE)
    np.testing.assert_allclose(psf.sigma_voxels, cases.sigma_voxels((5.0, 7.0, 9.0)), rtol=1e-15)
    # FWHM of a sampled line profile of the blurred point equals the requested one.
    img = np.zeros((61, 61, 61))
    img[30, 30, 30] = 1.0
    p = GaussianPSF(8.0, 1.0).apply(img)[:, 30, 30]
    x = np.arange(61.0)
    # Second moment of the profile: sigma^2 = FWHM^2 / (8 ln 2).
    var = np.sum(p * (x - 30) ** 2) / np.sum(p)
    np.testing.assert_allclose(np.sqrt(var * 8 * np.log(2)), 8.0, rtol=1e-3)
    # 4-D: each frame blurred in space only, anisotropically, as scipy does it.
    frames = np.random.default_rng(0).random(cases.SHAPE + (2,))
    np.testing.assert_allclose(psf.apply(frames), cases.blur_oracle(frames, (5.0, 7.0, 9.0)), rtol=1e-12)


def test_gtm_reused_on_other_labels_is_refused():
    lab = cases.phantom_labels()
    g = gtm_matrix(lab, cases.NAMES, GaussianPSF(6.0, cases.VOXEL_MM))
    other = lab.copy()
    other[other == 4] = 3
    with pytest.raises(ValueError, match="rebuild"):
        gtm_correct(np.ones(cases.SHAPE), other, g)
    with pytest.raises(ValueError, match="grid"):
        rbv_correct(np.ones((4, 4, 4)), np.ones((4, 4, 4), int), g)


@pytest.mark.parametrize("kwargs,match", [
    ({"names": {1: "cortex"}}, "no region name"),
    ({"background": "ignore"}, "background must be one of"),
    ({"labels": np.full(cases.SHAPE, 1.5)}, "integer"),
    ({"labels": np.zeros((3, 3)), "names": {1: "a"}}, "3-D"),
])
def test_gtm_matrix_bad_input(kwargs, match):
    args = {"labels": cases.phantom_labels(), "names": cases.NAMES, "background": "region"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gtm_matrix(args["labels"], args["names"], GaussianPSF(6.0, 2.0), background=args["background"])


@pytest.mark.parametrize("fwhm,vox,match", [
    ((1.0, 2.0), 2.0, "three"),
    (-1.0, 2.0, ">= 0"),
    (5.0, (2.0, 0.0, 2.0), "> 0"),
])
def test_psf_bad_input(fwhm, vox, match):
    with pytest.raises(ValueError, match=match):
        GaussianPSF(fwhm, vox)


def _pet_and_atlas():
    lab = cases.phantom_labels()
    truth = cases.truth_values()
    fwhm = (5.0, 7.0, 9.0)
    image = cases.blur_oracle(cases.piecewise_image(lab, truth), fwhm)
    pet = PETImage(image, cases.AFFINE, np.array([0.0, 60, 120]), np.array([60.0, 120, 300]), {}, "pet.nii.gz")
    atlas = Atlas(lab.astype(np.int32), cases.AFFINE, dict(cases.NAMES), "atlas.nii.gz")
    return pet, atlas, truth, GaussianPSF.from_affine(fwhm, cases.AFFINE)


@pytest.mark.parametrize("method", ["gtm", "rbv"])
def test_pvc_tacs_corrects_reference_like_targets(method):
    pet, atlas, truth, psf = _pet_and_atlas()
    table = pvc_tacs(pet, atlas, psf, method=method)
    assert table.region_names == list(cases.NAMES.values())
    np.testing.assert_allclose(table.values, truth[:5].T, rtol=1e-9)
    assert method in table.source


def test_pvc_tacs_can_leave_reference_uncorrected():
    pet, atlas, truth, psf = _pet_and_atlas()
    table = pvc_tacs(pet, atlas, psf, regions=["striatum", "cerebellum"], uncorrected=["cerebellum"])
    observed = pet.data[atlas.labels == 5].mean(axis=0)
    np.testing.assert_allclose(table.column("cerebellum"), observed, rtol=1e-12)
    np.testing.assert_allclose(table.column("striatum"), truth[1], rtol=1e-9)
    assert "uncorrected" in table.source


def test_pvc_tacs_errors():
    pet, atlas, _truth, psf = _pet_and_atlas()
    with pytest.raises(ValueError, match="available regions"):
        pvc_tacs(pet, atlas, psf, regions=["nope"])
    with pytest.raises(ValueError, match="method must be one of"):
        pvc_tacs(pet, atlas, psf, method="mg")
    atlas.names[9] = "absent"
    with pytest.raises(ValueError, match="no voxels"):
        pvc_tacs(pet, atlas, psf, regions=["absent"])
    g = gtm_matrix(atlas.labels, atlas.names, GaussianPSF(3.0, cases.VOXEL_MM))
    with pytest.raises(ValueError, match="gtm was built with"):
        pvc_tacs(pet, atlas, psf, gtm=g)


# ------------------------------------------------------------------ GPU twins
@pytest.mark.gpu
def test_gpu_gtm_matrix_matches_full_image_computation(cp):
    cases.check_gtm_matrix_against_slow(cp)


@pytest.mark.gpu
@pytest.mark.parametrize("fwhm", FWHMS, ids=FWHM_IDS)
@pytest.mark.parametrize("background", ["region", "zero"])
def test_gpu_gtm_recovers_blurred_phantom(cp, fwhm, background):
    cases.check_gtm_recovers_phantom(cp, fwhm, background)


@pytest.mark.gpu
def test_gpu_gtm_with_axes_swapped_does_not_recover(cp):
    cases.check_wrong_psf_is_detected(cp)


@pytest.mark.gpu
def test_gpu_empty_region_is_nan_with_status(cp):
    cases.check_empty_region(cp)


@pytest.mark.gpu
@pytest.mark.parametrize("background", ["region", "zero"])
def test_gpu_rbv_recovers_blurred_phantom(cp, background):
    cases.check_rbv_recovers_phantom(cp, background)


@pytest.mark.gpu
def test_gpu_rbv_float32_keeps_dtype(cp):
    cases.check_rbv_recovers_phantom(cp, "region", np.float32)


@pytest.mark.gpu
def test_gpu_iterative_yang_converges_to_phantom(cp):
    cases.check_iterative_yang_converges(cp)


@pytest.mark.gpu
def test_gpu_regional_means(cp):
    cases.check_regional_means(cp)


@pytest.mark.gpu
def test_gpu_equals_cpu_on_noisy_image(cp):
    lab = cases.phantom_labels()
    rng = np.random.default_rng(3)
    image = cases.blur_oracle(cases.piecewise_image(lab, cases.truth_values()), 6.0) * rng.uniform(0.8, 1.2, cases.SHAPE + (3,))
    psf = GaussianPSF(6.0, cases.VOXEL_MM)
    g = gtm_matrix(lab, cases.NAMES, psf)
    gg = gtm_matrix(cp.asarray(lab), cases.NAMES, psf)
    np.testing.assert_allclose(gg.matrix.get(), g.matrix, rtol=1e-12)
    np.testing.assert_allclose(gtm_correct(cp.asarray(image), lab, gg).values.get(),
                               gtm_correct(image, lab, g).values, rtol=1e-10)
    np.testing.assert_allclose(rbv_correct(cp.asarray(image), lab, g).get(), rbv_correct(image, lab, g), rtol=1e-10)


# ------------------------------------------------------------------ command line
def _write_phantom_study(tmp_path):
    """Blurred phantom on the quant test frames, SRTM TACs per region, files on disk."""
    from tests.quant_helpers import FRAME_START_S, srtm_tacs, write_atlas, write_pet

    lab = cases.phantom_labels()
    ref, tg = srtm_tacs([1.0, 2.0, 1.5, 0.8], r1=1.0, k2_per_min=0.25)
    # rows: cortex, striatum, thalamus, raphe, cerebellum (reference), background
    truth = np.vstack([tg.T, ref, 0.4 * ref])
    assert truth.shape == (6, FRAME_START_S.size)
    image = cases.blur_oracle(cases.piecewise_image(lab, truth), (5.0, 7.0, 9.0))
    atlas, labels_tsv = write_atlas(tmp_path, labels=lab, names=cases.NAMES, affine=cases.AFFINE)
    pet = write_pet(tmp_path, image, affine=cases.AFFINE)
    return pet, atlas, labels_tsv, truth, lab


def test_cli_tacs_pvc_gtm(tmp_path):
    from petbind.quant.cli import main
    from petbind.quant.io import read_json, read_tacs_tsv

    pet, atlas, labels_tsv, truth, _lab = _write_phantom_study(tmp_path)
    base = ["tacs", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv), "--quiet"]
    assert main(base + ["--out", str(tmp_path / "pvc_tacs.tsv"), "--pvc", "gtm", "--psf-fwhm-mm", "5", "7", "9"]) == 0
    t = read_tacs_tsv(tmp_path / "pvc_tacs.tsv")
    # float32 image on disk: observed means carry ~1e-7 relative rounding, times cond(GTM) < 10.
    np.testing.assert_allclose(t.values, truth[:5].T, rtol=1e-5)
    side = read_json(tmp_path / "pvc_tacs.json")["PartialVolumeCorrection"]
    assert side["Method"] == "gtm" and side["FWHM_mm"] == [5.0, 7.0, 9.0]
    assert main(base + ["--out", str(tmp_path / "plain_tacs.tsv")]) == 0
    assert main(base + ["--out", str(tmp_path / "ref_tacs.tsv"), "--pvc", "rbv", "--psf-fwhm-mm", "5", "7", "9",
                        "--pvc-uncorrected", "cerebellum"]) == 0
    plain, mixed = read_tacs_tsv(tmp_path / "plain_tacs.tsv"), read_tacs_tsv(tmp_path / "ref_tacs.tsv")
    np.testing.assert_allclose(mixed.column("cerebellum"), plain.column("cerebellum"), rtol=1e-12)
    np.testing.assert_allclose(mixed.column("striatum"), truth[1], rtol=1e-5)
    assert np.max(np.abs(plain.column("striatum") / truth[1] - 1)) > 0.1  # PVE is there without PVC


@pytest.mark.parametrize("extra,message", [
    (["--pvc", "gtm"], "needs --psf-fwhm-mm"),
    (["--psf-fwhm-mm", "5"], "only used with --pvc"),
    (["--pvc", "gtm", "--psf-fwhm-mm", "5", "6"], "one or three"),
    (["--pvc-uncorrected", "cortex"], "needs --pvc"),
    (["--pvc", "gtm", "--psf-fwhm-mm", "5", "--pvc-uncorrected", "cortx"], "available regions"),
])
def test_cli_tacs_pvc_bad_options_exit_2(tmp_path, capsys, extra, message):
    from petbind.quant.cli import main

    pet, atlas, labels_tsv, _truth, _lab = _write_phantom_study(tmp_path)
    rc = main(["tacs", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv), "--quiet",
               "--out", str(tmp_path / "x_tacs.tsv")] + extra)
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x_tacs.tsv").exists()


def test_cli_map_pvc_rbv(tmp_path, monkeypatch):
    import nibabel as nib

    import petbind.quant.models
    from petbind.quant.cli import main

    record = {}
    real = petbind.quant.models.parametric_maps

    def spy(model, frame_start_s, frame_end_s, reference_tac, image_4d, **kwargs):
        record.update(reference_tac=np.asarray(reference_tac), image=np.asarray(image_4d))
        return real(model, frame_start_s, frame_end_s, reference_tac, image_4d, **kwargs)

    monkeypatch.setattr(petbind.quant.models, "parametric_maps", spy)
    pet, atlas, labels_tsv, truth, lab = _write_phantom_study(tmp_path)
    args = ["map", str(pet), "--atlas", str(atlas), "--labels", str(labels_tsv), "--reference", "cerebellum",
            "--model", "mrtm2", "--k2prime-per-min", "0.25", "--mask-regions", "striatum", "thalamus",
            "--quiet", "--pvc", "rbv", "--psf-fwhm-mm", "5", "7", "9"]
    assert main(args + ["--out-prefix", str(tmp_path / "rbv")]) == 0
    np.testing.assert_allclose(record["image"], cases.piecewise_image(lab, truth), rtol=1e-4)
    np.testing.assert_allclose(record["reference_tac"], truth[4], rtol=1e-5)
    bp = nib.load(str(tmp_path / "rbv_bpnd.nii.gz")).get_fdata()
    # MRTM2 on noiseless frame-mean SRTM TACs is within a few percent (as in test_quant_cli).
    np.testing.assert_allclose(bp[lab == 2], 2.0, rtol=0.05)
    np.testing.assert_allclose(bp[lab == 3], 1.5, rtol=0.05)
    assert main(args + ["--out-prefix", str(tmp_path / "u"), "--pvc-uncorrected-reference"]) == 0
    observed = cases.blur_oracle(cases.piecewise_image(lab, truth), (5.0, 7.0, 9.0))[lab == 5].mean(axis=0)
    np.testing.assert_allclose(record["reference_tac"], observed, rtol=1e-5)


def test_gtm_with_tissue_fractions_recovers_mixed_voxels():
    """Voxels that mix tissues: the fraction-weighted GTM recovers the true values exactly,
    the label GTM does not (oracle: Σ_j T_j f_j blurred with scipy directly)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    shape, voxel, fwhm = (20, 18, 16), 3.0, 7.0
    # smooth random fields -> soft partition of the image into 3 tissues + background
    raw = np.stack([gaussian_filter(rng.random(shape), 2.0) for _ in range(4)])
    raw = raw ** 6
    frac = raw / raw.sum(axis=0)
    labels = np.argmax(frac, axis=0).astype(np.int32)  # 0 = background
    names = {1: "a", 2: "b", 3: "c"}
    truth = {"a": 3.0, "b": 1.0, "c": 7.0, "background": 0.5}
    image = sum(truth[n] * frac[i] for i, n in names.items()) + truth["background"] * frac[0]
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2))) / voxel
    blurred = gaussian_filter(image, sigma, mode="constant", truncate=4.0)
    psf = GaussianPSF(fwhm, voxel)
    soft = gtm_correct(blurred, labels, gtm_matrix(labels, names, psf, fractions={n: frac[i] for i, n in names.items()}))
    hard = gtm_correct(blurred, labels, gtm_matrix(labels, names, psf))
    got = dict(zip(soft.region_names, np.asarray(soft.values)[:, 0]))
    for n, v in truth.items():
        assert got[n] == pytest.approx(v, rel=1e-9)
    worst = max(abs(np.asarray(hard.values)[i, 0] / truth[n] - 1) for i, n in enumerate(hard.region_names))
    assert worst > 0.02  # mixed voxels are a real error that only the fractions fix
    with pytest.raises(ValueError, match="no fraction map"):
        gtm_matrix(labels, names, psf, fractions={"a": frac[1]})
    with pytest.raises(ValueError, match="sum to more than 1"):
        gtm_matrix(labels, names, psf, fractions={n: frac[i] * 2 for i, n in names.items()})
