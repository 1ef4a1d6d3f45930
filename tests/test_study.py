import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from petbind.recon.geometry import Scanner
from petbind.recon.rawdata.hdf5 import ListmodeReader
from petbind.sim.kinetics import AZ10419369_REFERENCE, FengInput, frame_times_s, simulate_regional_tacs
from petbind.sim.study import StudyConfig, simulate_study, study_truth

FRAMES = (60.0, 120.0, 300.0, 600.0)


def tiny_config(**kw):
    cfg = dict(
        num_subjects=2, frame_durations_s=FRAMES, scanner=Scanner.cylindrical(120.0, 64, 4, 10.0, name="tiny"),
        num_radial=35, voxel_size_mm=10.0, head_offset_mm=(0.0, 0.0, -20.0), sensitivity_cps_per_kbq=0.5,
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
    cfg = tiny_config(write_images="true", between_subject_cv=0.0, test_retest_cv=0.0, r1_cv=0.0)
    sessions = simulate_study(out, cfg)
    return out, cfg, sessions


def test_tree_and_tables(study):
    out, cfg, sessions = study
    parts = read_tsv(out / "participants.tsv")
    assert [p["participant_id"] for p in parts] == ["sub-01", "sub-02"]
    assert {p["group"] for p in parts} == {"drug", "placebo"}
    for sub in ("sub-01", "sub-02"):
        assert (out / sub / "anat" / f"{sub}_atlas.nii.gz").is_file()
        table = read_tsv(out / sub / "anat" / f"{sub}_atlas.tsv")
        assert {"cerebellum", "pallidum", "occipital_cortex"} <= {r["name"] for r in table}
        for ses in ("baseline", "postdose"):
            pet = out / sub / f"ses-{ses}" / "pet"
            for suffix in ("_pet-listmode.h5", "_pet.json", "_pet.nii.gz"):
                assert (pet / f"{sub}_ses-{ses}{suffix}").is_file()
        rows = read_tsv(out / sub / f"{sub}_sessions.tsv")
        assert rows[0]["session_id"] == "ses-baseline" and float(rows[0]["hours_after_baseline"]) == 0
        assert 24 <= float(rows[1]["hours_after_baseline"]) <= 72
    assert not list(out.rglob("*.tmp")), "no temporary files left behind"


def test_ground_truth_has_the_drug_effect(study):
    out, cfg, _ = study
    rows = read_tsv(out / "ground_truth.tsv")
    assert set(rows[0]) == {"subject", "session", "group", "region", "bp_nd", "r1"}
    bp = {(r["subject"], r["session"], r["region"]): float(r["bp_nd"]) for r in rows}
    group = {r["subject"]: r["group"] for r in rows}
    regions = {r["region"] for r in rows}
    assert "scalp" not in regions and "cerebellum" in regions
    for sub, g in group.items():
        for region in regions:
            base, post = bp[(sub, "ses-baseline", region)], bp[(sub, "ses-postdose", region)]
            # No variability configured: placebo unchanged; drug changed by the configured fraction.
            expected = base * (1 + cfg.drug_effect.get(region, 0.0)) if g == "drug" else base
            assert post == pytest.approx(expected, rel=1e-5, abs=1e-9)
            assert base == pytest.approx(cfg.regions[region].bp_nd, rel=1e-5)
    assert bp[("sub-01", "ses-baseline", "pallidum")] == pytest.approx(1.8, rel=1e-5)


def test_pet_json_and_images(study):
    out, cfg, sessions = study
    fs, fe = frame_times_s(FRAMES)
    truth = sessions[0]
    stem = out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline"
    meta = json.loads(stem.with_name(stem.name + "_pet.json").read_text())
    for key in ("TracerName", "TracerRadionuclide", "InjectedRadioactivity", "InjectedRadioactivityUnits",
                "FrameTimesStart", "FrameDuration", "TimeZero", "ScanStart", "InjectionStart", "Units"):
        assert key in meta
    assert meta["TracerRadionuclide"] == "C11"
    assert meta["FrameTimesStart"] == list(fs) and meta["FrameDuration"] == list(fe - fs)
    assert meta["InjectedRadioactivity"] == pytest.approx(truth.injected_activity_bq / 1e6)
    lam = math.log(2) / 1221.84
    dcf0 = lam * 60.0 / (1 - math.exp(-lam * 60.0))
    assert meta["DecayCorrectionFactor"][0] == pytest.approx(dcf0)
    img = nib.load(stem.with_name(stem.name + "_pet.nii.gz"))
    atlas = nib.load(out / "sub-01" / "anat" / "sub-01_atlas.nii.gz")
    assert img.shape == atlas.shape + (len(FRAMES),)
    np.testing.assert_allclose(img.affine, atlas.affine)
    # Voxels labelled white matter at 10 mm are mostly white matter: their values lie between the
    # white-matter TAC and the brightest regional TAC; the median is close to the WM TAC (oracle:
    # the kinetics computed independently here from the session's truth).
    tacs = simulate_regional_tacs(truth.regions, fs, fe, model=cfg.model,
                                  plasma=FengInput().scaled(truth.injected_activity_bq / 400e6), reference=AZ10419369_REFERENCE)
    labels = {r["name"]: int(r["index"]) for r in read_tsv(out / "sub-01" / "anat" / "sub-01_atlas.tsv")}
    data = np.asarray(img.dataobj)
    wm = np.asarray(atlas.dataobj) == labels["white_matter"]
    assert wm.sum() > 10
    med = np.median(data[wm], axis=0)
    np.testing.assert_allclose(med, tacs.tacs["white_matter"], rtol=0.2)


def test_listmode_files(study):
    out, cfg, sessions = study
    r = ListmodeReader(out / "sub-02" / "ses-postdose" / "pet" / "sub-02_ses-postdose_pet-listmode.h5")
    assert r.num_events > 1000
    assert r.exam.isotope == "C11" and r.exam.tracer == "[11C]AZ10419369"
    assert r.exam.injected_activity_bq == pytest.approx(sessions[3].injected_activity_bq)
    assert r.corrections.singles_counts.shape == (len(FRAMES), cfg.scanner.num_detectors)
    assert r.corrections.mu_map_per_mm.max() == pytest.approx(0.0172, rel=0.3)
    prompts = delayeds = 0
    last = 0.0
    for chunk in r.chunks():
        assert chunk.time_ms[0] >= last
        last = chunk.time_ms[-1]
        prompts += int(chunk.is_prompt.sum())
        delayeds += int((~chunk.is_prompt).sum())
    assert last < sum(FRAMES) * 1000
    # Delayeds estimate the randoms: about randoms_fraction of the prompts.
    assert abs(delayeds / prompts - cfg.randoms_fraction) < 5 * math.sqrt(delayeds) / prompts + 0.01


def test_determinism_and_variability(tmp_path):
    cfg = tiny_config(num_subjects=1, write_listmode=True)
    a = simulate_study(tmp_path / "a", cfg)
    b = simulate_study(tmp_path / "b", cfg)
    assert (tmp_path / "a" / "ground_truth.tsv").read_text() == (tmp_path / "b" / "ground_truth.tsv").read_text()
    ra = ListmodeReader(tmp_path / "a" / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_pet-listmode.h5")
    rb = ListmodeReader(tmp_path / "b" / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_pet-listmode.h5")
    ca, cb = next(iter(ra.chunks())), next(iter(rb.chunks()))
    np.testing.assert_array_equal(ca.detector_ids, cb.detector_ids)
    np.testing.assert_array_equal(ca.time_ms, cb.time_ms)
    # With variability switched on, subjects and sessions differ.
    _, sessions = study_truth(tiny_config(num_subjects=3))
    occ = [s.regions["occipital_cortex"].bp_nd for s in sessions]
    assert len(set(np.round(occ, 9))) == len(occ)
    assert a[0].regions["occipital_cortex"].bp_nd == b[0].regions["occipital_cortex"].bp_nd


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="drug_effect names regions"):
        simulate_study(tmp_path, tiny_config(drug_effect={"amygdala": -0.2}))
    with pytest.raises(ValueError, match="write_images"):
        simulate_study(tmp_path, tiny_config(write_images="yes"))


def test_cli_images_only(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "scripts/simulate_study.py", str(tmp_path / "s"), "--subjects", "1", "--no-listmode",
         "--images", "noisy", "--quiet", "--voxel-mm", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "simulated 2 sessions" in res.stdout
    img = nib.load(tmp_path / "s" / "sub-01" / "ses-postdose" / "pet" / "sub-01_ses-postdose_pet.nii.gz")
    assert img.shape[-1] == 36 and np.isfinite(np.asarray(img.dataobj)).all()


def test_calibration_factor_is_inverse_kappa(study):
    # Oracle: a point source at the grid centre projected with the sinogram projector.
    from petbind.recon.geometry import ImageGrid, SinogramLayout
    from petbind.recon.projector import SinogramProjector

    out, cfg, _ = study
    r = ListmodeReader(out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_pet-listmode.h5")
    atlas = nib.load(out / "sub-01" / "anat" / "sub-01_atlas.nii.gz")
    grid = ImageGrid.from_affine(atlas.shape, atlas.affine)
    centre = tuple(int(round(c)) for c in -grid.origin_mm / grid.voxel_size_mm)
    point = np.zeros(grid.shape, np.float32)
    point[centre] = 1.0
    proj = SinogramProjector(SinogramLayout(cfg.scanner, cfg.num_radial), grid, device="cpu")
    kappa = cfg.sensitivity_cps_per_kbq * np.prod(grid.voxel_size_mm) / 1000 / (1000 * proj.forward(point).sum(dtype=np.float64))
    assert r.corrections.calibration_factor == pytest.approx(1 / kappa, rel=1e-4)


def test_petsird_copy_holds_the_same_events(tmp_path):
    """With write_petsird each session also gets a PETSIRD file with the same events."""
    from petbind.recon.rawdata.petsird_io import PetsirdReader

    simulate_study(tmp_path, tiny_config(num_subjects=1, write_petsird=True, frame_durations_s=(60.0, 120.0)))
    pet = tmp_path / "sub-01" / "ses-baseline" / "pet"
    h5 = ListmodeReader(pet / "sub-01_ses-baseline_pet-listmode.h5")
    ps = PetsirdReader(pet / "sub-01_ses-baseline_pet-listmode.petsird")

    def keyed(chunks):
        rows = []
        for c in chunks:
            ids = np.sort(c.detector_ids, axis=1)  # LOR orientation is not part of the event
            rows.append(np.column_stack([np.floor(c.time_ms), ids, c.is_prompt]))
        rows = np.concatenate(rows)
        return rows[np.lexsort(rows.T[::-1])]

    np.testing.assert_array_equal(keyed(ps.chunks()), keyed(h5.chunks()))
    assert ps.scanner == h5.scanner
