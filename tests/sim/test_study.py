"""Study simulator (petbind.sim.study) and the petbind-simulate command."""

import csv
import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from petbind.recon.geometry import Scanner
from petbind.recon.rawdata.hdf5 import ListmodeReader
from petbind.recon.rawdata.sinograms import SinogramReader
from petbind.sim import cli
from petbind.sim.kinetics import AZ10419369_REFERENCE, FengInput, frame_times_s, simulate_regional_tacs
from petbind.sim.study import DEFAULT_DRUG_EFFECT, SCANNER_SETUPS, StudyConfig, session_file, simulate_study, study_truth

FRAMES = (60.0, 120.0, 300.0, 600.0)


def tiny_config(**kw):
    cfg = dict(
        num_subjects=2, frame_durations_s=FRAMES, scanner=Scanner.cylindrical(120.0, 64, 4, 10.0, name="tiny"),
        num_radial=35, span=1, voxel_size_mm=10.0, head_offset_mm=(0.0, 0.0, -20.0), sensitivity_cps_per_kbq=0.5,
        quiet=True, device="cpu", seed=3,
    )
    cfg.update(kw)
    return StudyConfig(**cfg)


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = tiny_config(write_images="true", between_subject_cv=0.0, test_retest_cv=0.0, r1_cv=0.0, write_listmode=True,
                      drug_effect={"hippocampus": 0.167, "occipital_cortex": -0.2})
    sessions = simulate_study(out, cfg)
    return out, cfg, sessions


def test_tree_and_tables(study):
    out, cfg, sessions = study
    parts = read_tsv(out / "participants.tsv")
    assert [p["participant_id"] for p in parts] == ["sub-01", "sub-02"]
    assert [p["group"] for p in parts] == ["drug", "placebo"]
    for sub in ("sub-01", "sub-02"):
        assert (out / sub / "anat" / f"{sub}_atlas.nii.gz").is_file()
        table = read_tsv(out / sub / "anat" / f"{sub}_atlas.tsv")
        assert {"cerebellum", "pallidum", "occipital_cortex"} <= {r["name"] for r in table}
        for ses in ("baseline", "postdose"):
            pet = out / sub / f"ses-{ses}" / "pet"
            for suffix in ("_pet-sinograms.h5", "_pet-listmode.h5", "_pet.json", "_pet.nii.gz"):
                assert (pet / f"{sub}_ses-{ses}{suffix}").is_file()
            assert session_file(out, sub, ses, "pet-sinograms.h5") == pet / f"{sub}_ses-{ses}_pet-sinograms.h5"
        rows = read_tsv(out / sub / f"{sub}_sessions.tsv")
        assert rows[0]["session_id"] == "ses-baseline" and float(rows[0]["hours_after_baseline"]) == 0
        assert 24 <= float(rows[1]["hours_after_baseline"]) <= 72
    assert not list(out.rglob("*.tmp*")), "no temporary files left behind"


def test_ground_truth_has_the_drug_effect(study):
    out, cfg, _ = study
    rows = read_tsv(out / "ground_truth.tsv")
    assert list(rows[0])[:5] == ["subject", "session", "group", "region", "bp_nd"]
    bp = {(r["subject"], r["session"], r["region"]): float(r["bp_nd"]) for r in rows}
    group = {r["subject"]: r["group"] for r in rows}
    regions = {r["region"] for r in rows}
    assert "scalp" not in regions and "cerebellum" in regions
    for sub, g in group.items():
        for region in regions:
            base, post = bp[(sub, "ses-baseline", region)], bp[(sub, "ses-postdose", region)]
            # No variability configured: placebo unchanged; drug changed by the configured fraction.
            factor = {"hippocampus": 1.167, "occipital_cortex": 0.8}.get(region, 1.0) if g == "drug" else 1.0
            assert post == pytest.approx(base * factor, rel=1e-6, abs=1e-12)
            assert base == pytest.approx(cfg.regions[region].bp_nd, rel=1e-6)


def test_default_effect_is_the_seed_studys():
    # Tiger et al. 2020: +16.7 % in the hippocampus after ketamine, no other significant change.
    assert DEFAULT_DRUG_EFFECT == {"hippocampus": 0.167}
    assert StudyConfig().drug_effect == {"hippocampus": 0.167}


def test_sinogram_files_hold_the_session(study):
    out, cfg, sessions = study
    path = session_file(out, "sub-02", "postdose", "pet-sinograms.h5")
    r = SinogramReader(path)
    fs, fe = frame_times_s(FRAMES)
    np.testing.assert_array_equal(r.frame_start_s, fs)
    np.testing.assert_array_equal(r.frame_end_s, fe)
    assert r.layout.num_radial == 35 and r.layout.span == 1 and r.scanner == cfg.scanner
    assert r.exam.isotope == "C11" and r.exam.tracer == "[11C]AZ10419369"
    assert r.exam.injected_activity_bq == pytest.approx(sessions[3].injected_activity_bq)
    c = r.corrections
    assert c.singles_counts.shape == (len(FRAMES), cfg.scanner.num_detectors)
    np.testing.assert_array_equal(c.singles_block_edges_s, np.concatenate([fs, fe[-1:]]))
    assert c.mu_map_per_mm.max() == pytest.approx(0.0172, rel=0.3)
    prompts = sum(int(r.prompts(k).sum()) for k in range(r.num_frames))
    delayeds = sum(int(r.delayeds(k).sum()) for k in range(r.num_frames))
    assert prompts > 1000
    # Delayeds estimate the randoms: randoms_fraction of the prompts.
    assert abs(delayeds / prompts - cfg.randoms_fraction) < 5 * math.sqrt(delayeds) / prompts + 0.01
    # The listmode file holds the same events, frame by frame.
    lm = ListmodeReader(session_file(out, "sub-02", "postdose", "pet-listmode.h5"))
    assert lm.num_events == prompts + delayeds and lm.corrections.equals(c)


def test_calibration_factor_is_inverse_kappa(study):
    # Oracle: a point source at the grid centre projected with the recon's sinogram projector.
    from petbind.recon.geometry import ImageGrid, SinogramLayout
    from petbind.recon.projector import SinogramProjector

    out, cfg, _ = study
    r = SinogramReader(session_file(out, "sub-01", "baseline", "pet-sinograms.h5"))
    atlas = nib.load(out / "sub-01" / "anat" / "sub-01_atlas.nii.gz")
    grid = ImageGrid.from_affine(atlas.shape, atlas.affine)
    centre = tuple(int(round(c)) for c in -grid.origin_mm / grid.voxel_size_mm)
    point = np.zeros(grid.shape, np.float32)
    point[centre] = 1.0
    proj = SinogramProjector(SinogramLayout(cfg.scanner, cfg.num_radial), grid, device="cpu")
    kappa = cfg.sensitivity_cps_per_kbq * np.prod(grid.voxel_size_mm) / 1000 / (1000 * proj.forward(point).sum(dtype=np.float64))
    assert r.corrections.calibration_factor == pytest.approx(1 / kappa, rel=1e-4)


def test_pet_json_and_images(study):
    out, cfg, sessions = study
    fs, fe = frame_times_s(FRAMES)
    truth = sessions[0]
    stem = out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline"
    meta = json.loads(stem.with_name(stem.name + "_pet.json").read_text())
    for key in ("TracerName", "TracerRadionuclide", "InjectedRadioactivity", "InjectedRadioactivityUnits",
                "FrameTimesStart", "FrameDuration", "TimeZero", "ScanStart", "InjectionStart", "Units"):
        assert key in meta
    assert meta["FrameTimesStart"] == list(fs) and meta["FrameDuration"] == list(fe - fs)
    assert meta["RawDataFiles"][0] == "sub-01_ses-baseline_pet-sinograms.h5"
    lam = math.log(2) / 1221.84
    assert meta["DecayCorrectionFactor"][0] == pytest.approx(lam * 60.0 / (1 - math.exp(-lam * 60.0)))
    img = nib.load(stem.with_name(stem.name + "_pet.nii.gz"))
    atlas = nib.load(out / "sub-01" / "anat" / "sub-01_atlas.nii.gz")
    assert img.shape == atlas.shape + (len(FRAMES),)
    # White-matter voxels at 10 mm are mostly white matter: their median follows the white-matter TAC
    # (oracle: the kinetics computed independently here from the session's truth).
    tacs = simulate_regional_tacs(truth.regions, fs, fe, model=cfg.model,
                                  plasma=FengInput().scaled(truth.injected_activity_bq / 400e6), reference=AZ10419369_REFERENCE)
    labels = {r["name"]: int(r["index"]) for r in read_tsv(out / "sub-01" / "anat" / "sub-01_atlas.tsv")}
    wm = np.asarray(atlas.dataobj) == labels["white_matter"]
    assert wm.sum() > 10
    np.testing.assert_allclose(np.median(np.asarray(img.dataobj)[wm], axis=0), tacs.tacs["white_matter"], rtol=0.2)


def test_determinism_and_variability(tmp_path):
    cfg = tiny_config(num_subjects=1, frame_durations_s=(60.0, 120.0))
    a = simulate_study(tmp_path / "a", cfg)
    b = simulate_study(tmp_path / "b", cfg)
    assert (tmp_path / "a" / "ground_truth.tsv").read_text() == (tmp_path / "b" / "ground_truth.tsv").read_text()
    ra = SinogramReader(session_file(tmp_path / "a", "sub-01", "baseline", "pet-sinograms.h5"))
    rb = SinogramReader(session_file(tmp_path / "b", "sub-01", "baseline", "pet-sinograms.h5"))
    np.testing.assert_array_equal(ra.prompts(1), rb.prompts(1))
    assert not (tmp_path / "a" / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_pet-listmode.h5").exists()
    # With variability switched on, subjects and sessions differ.
    _, sessions = study_truth(tiny_config(num_subjects=3).resolved())
    occ = [s.regions["occipital_cortex"].bp_nd for s in sessions]
    assert len(set(np.round(occ, 9))) == len(occ)
    assert a[0].regions["occipital_cortex"].bp_nd == b[0].regions["occipital_cortex"].bp_nd


def test_variability_matches_the_configured_spreads():
    # Oracle: the log-normal model.  Many subjects; SD of log BP between subjects (baseline) and of the
    # log ratio post/base in the placebo group (two independent session draws: sqrt(2) * cv).
    cfg = tiny_config(num_subjects=2000, between_subject_cv=0.15, test_retest_cv=0.04).resolved()
    _, sessions = study_truth(cfg)
    base = np.array([s.regions["frontal_cortex"].bp_nd for s in sessions if s.session == "baseline"])
    post = np.array([s.regions["frontal_cortex"].bp_nd for s in sessions if s.session == "postdose"])
    placebo = np.array([s.group == "placebo" for s in sessions if s.session == "baseline"])
    total = math.sqrt(0.15**2 + 0.04**2)
    assert np.std(np.log(base)) == pytest.approx(total, rel=0.1)
    assert np.std(np.log(post[placebo] / base[placebo])) == pytest.approx(math.sqrt(2) * 0.04, rel=0.1)
    drug = ~placebo
    assert np.exp(np.mean(np.log(post[drug] / base[drug]))) == pytest.approx(1.0, abs=0.01)
    hip = np.array([s.regions["hippocampus"].bp_nd for s in sessions]).reshape(-1, 2)  # (subject, session), in order
    assert np.exp(np.mean(np.log(hip[drug, 1] / hip[drug, 0]))) == pytest.approx(1.167, abs=0.01)


def test_noise_free_study_stores_expected_counts(tmp_path):
    simulate_study(tmp_path, tiny_config(num_subjects=1, frame_durations_s=(60.0, 120.0), poisson_noise=False))
    r = SinogramReader(session_file(tmp_path, "sub-01", "baseline", "pet-sinograms.h5"))
    p = r.prompts(0)
    assert p.dtype == np.float32 and p.sum() > 0 and np.any(p % 1 != 0)


def test_presets_and_config_errors(tmp_path):
    from petbind.recon.geometry import SCANNER_PRESETS

    assert set(SCANNER_SETUPS) == set(SCANNER_PRESETS)
    cfg = StudyConfig().resolved()
    assert cfg.scanner.name == "demo-small" and cfg.scanner.resolution_fwhm_mm == 6.5
    assert (cfg.num_radial, cfg.max_ring_difference, cfg.span, cfg.voxel_size_mm) == (40, 6, 1, 6.0)
    assert StudyConfig(scanner="mmr").resolved().span == 11
    for bad, match in (
        (dict(drug_effect={"amygdala": 0.2}), "drug_effect names unknown regions"),
        (dict(drug_effect={"cerebellum": 0.2}), "without specific binding"),
        (dict(drug_effect={"hippocampus": -1.0}), "> -1"),
        (dict(write_images="yes"), "write_images"),
        (dict(num_subjects=0), "num_subjects"),
        (dict(voxel_size_mm=0.0), "voxel_size_mm"),
        (dict(sensitivity_cps_per_kbq=-1.0), "sensitivity_cps_per_kbq"),
        (dict(scanner="pet3000"), "scanner 'pet3000' is unknown"),
        (dict(poisson_noise=False, write_listmode=True), "poisson_noise"),
    ):
        with pytest.raises(ValueError, match=match):
            simulate_study(tmp_path / "never", tiny_config(**bad))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, message", [
    (["--subjects", "0"], "--subjects: must be > 0"),
    (["--voxel-mm", "0"], "--voxel-mm: must be > 0"),
    (["--sensitivity", "-1"], "--sensitivity-cps-per-kbq: must be > 0"),
    (["--effect", "amygdala=0.1"], "unknown regions ['amygdala']"),
    (["--effect", "hippocampus=-1"], "FRACTION must be > -1"),
    (["--effect", "hippocampus=-1.5"], "FRACTION must be > -1"),
    (["--effect", "hippocampus"], "REGION=FRACTION"),
    (["--effect", "hippocampus=0.1", "--effect", "hippocampus=0.2"], "given twice"),
    (["--frames", "3x"], "--frames"),
    (["--kinetics", "3tcm"], "--kinetics"),
    (["--scanner", "pet3000"], "--scanner"),
    (["--no-noise", "--listmode"], "poisson_noise"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    try:
        rc = cli.main([str(out), *args])
    except SystemExit as exc:  # errors found by the parser
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("petbind-simulate: error:") and message in err[0]
    assert not out.exists(), "no folder left behind"


def test_cli_refuses_a_file_as_output(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert cli.main([str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_cli_effects_and_options(tmp_path):
    args = cli.build_parser().parse_args([str(tmp_path / "s"), "--subjects", "3", "--seed", "5", "--kinetics", "2tcm",
                                          "--effect", "hippocampus=0.2", "--effect", "ventral_striatum=0.1",
                                          "--scanner", "demo", "--frames", "2x1m,1x5m", "--voxel-mm", "8",
                                          "--sensitivity-cps-per-kbq", "3", "--listmode", "--quiet"])
    cfg = cli.config_from_args(args)
    assert cfg.drug_effect == {"hippocampus": 0.2, "ventral_striatum": 0.1}
    assert (cfg.num_subjects, cfg.seed, cfg.model, cfg.scanner.name) == (3, 5, "2tcm", "demo")
    assert cfg.frame_durations_s == (60.0, 60.0, 300.0) and cfg.voxel_size_mm == 8.0
    assert cfg.sensitivity_cps_per_kbq == 3.0 and cfg.write_listmode and cfg.quiet


def test_cli_writes_a_study(tmp_path):
    # The installed console script (or the thin script) end to end, on a short framing at a low count level.
    out = tmp_path / "s"
    res = subprocess.run(
        [sys.executable, "scripts/simulate_study.py", str(out), "--subjects", "1", "--frames", "1x1m,1x2m",
         "--sensitivity", "0.5", "--voxel-mm", "12", "--effect", "hippocampus=0.5", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and "%|" not in res.stderr  # --quiet: no summary, no progress bars
    rows = read_tsv(out / "ground_truth.tsv")
    hip = {r["session"]: float(r["bp_nd"]) for r in rows if r["region"] == "hippocampus"}
    assert rows[0]["group"] == "drug"
    # test-retest variation is log-normal 4.5 %: the +50 % is far outside it
    assert 1.3 < hip["ses-postdose"] / hip["ses-baseline"] < 1.7
    r = SinogramReader(session_file(out, "sub-01", "baseline", "pet-sinograms.h5"))
    assert r.num_frames == 2 and r.scanner.name == "demo-small" and r.scanner.resolution_fwhm_mm == 6.5
