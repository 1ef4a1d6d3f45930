"""Fault injection for petbind-study: every fault is one clear line (exit 2) and nothing is
written, or the right behaviour (stale results are redone, damaged outputs are rebuilt).

Each refused case checks: exit status 2; one line on stderr naming the file;
no new or changed file in the output folder.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from petbind.pipeline import cli
from petbind.recon.geometry import Scanner
from petbind.sim.study import StudyConfig, simulate_study

FRAMES_S = (120.0, 240.0, 600.0, 600.0, 900.0, 900.0)
SENS = 1.0


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Two subjects (drug, placebo), baseline and post-dose, on a tiny scanner, as listmode only
    (the faults of listmode files are the ones tested here)."""
    root = tmp_path_factory.mktemp("faults") / "raw"
    simulate_study(root, StudyConfig(num_subjects=2, scanner=Scanner.cylindrical(160.0, 64, 8, 12.0, name="tiny"),
                                     num_radial=29, max_ring_difference=3, head_offset_mm=(0.0, 0.0, -10.0),
                                     voxel_size_mm=12.0, frame_durations_s=FRAMES_S, sensitivity_cps_per_kbq=SENS,
                                     quiet=True, device="cpu", seed=5, write_listmode=True))
    for p in root.glob("sub-*/ses-*/pet/*_pet-sinograms.h5"):
        p.unlink()
    return root


@pytest.fixture()
def study(raw, tmp_path):
    return Path(shutil.copytree(raw, tmp_path / "raw"))


def args(study, out, *extra):
    return [str(study), "--out", str(out), "--sensitivity-cps-per-kbq", str(SENS), "--device", "cpu",
            "--iterations", "1", "--subsets", "4", "--n-permutations", "50", "--pvc-fwhm-mm", "15", "--quiet", *extra]


def snapshot(folder):
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def refused(capsys, argv, out, *names):
    """Run and assert: exit 2, one stderr line naming ``names``, output folder untouched."""
    before = snapshot(out)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("petbind-study: error:"), err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    assert snapshot(out) == before
    return lines[0]


# ---------------------------------------------------------------- inputs checked before anything runs
def test_second_listmode_file_is_refused_then_selected(study, tmp_path, capsys):
    pet = study / "sub-01" / "ses-baseline" / "pet"
    real = pet / "sub-01_ses-baseline_pet-listmode.h5"
    extra = pet / "sub-01_ses-baseline_acq-retest_pet-listmode.h5"
    shutil.copy(real, extra)
    shutil.copy(pet / "sub-01_ses-baseline_pet.json", pet / "sub-01_ses-baseline_acq-retest_pet.json")
    line = refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", real.name, extra.name)
    assert "--acq" in line


def test_subject_without_participants_row(study, tmp_path, capsys):
    p = study / "participants.tsv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(ln for ln in lines if not ln.startswith("sub-02")) + "\n")
    refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", "participants.tsv", "sub-02")


@pytest.mark.parametrize("typo", ["drugg", "Drug"])
def test_group_typo_is_refused(study, tmp_path, capsys, typo):
    p = study / "participants.tsv"
    p.write_text(p.read_text().replace("\tdrug\t", f"\t{typo}\t"))
    refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", "participants.tsv", typo)


def test_frame_times_in_minutes_are_refused(study, tmp_path, capsys):
    side = study / "sub-02" / "ses-postdose" / "pet" / "sub-02_ses-postdose_pet.json"
    d = json.loads(side.read_text())
    d["FrameDuration"] = [v / 60 for v in d["FrameDuration"]]
    d["FrameTimesStart"] = [v / 60 for v in d["FrameTimesStart"]]
    side.write_text(json.dumps(d))
    line = refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", side.name)
    assert "minutes" in line


def test_reference_as_target_is_refused(study, tmp_path, capsys):
    refused(capsys, args(study, tmp_path / "out", "--regions", "frontal_cortex", "cerebellum"), tmp_path / "out",
            "cerebellum", "--regions")


def test_missing_session_is_found_before_reconstruction(study, tmp_path, capsys):
    shutil.rmtree(study / "sub-02" / "ses-postdose")
    refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", "sub-02", "ses-postdose")


def test_corrupt_last_listmode_is_found_first(study, tmp_path, capsys):
    lm = study / "sub-02" / "ses-postdose" / "pet" / "sub-02_ses-postdose_pet-listmode.h5"
    data = lm.read_bytes()
    lm.write_bytes(data[: len(data) // 3])
    refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", lm.name)


def test_zero_event_file_is_named_as_such(study, tmp_path, capsys):
    from petbind.recon.rawdata.hdf5 import ListmodeReader, ListmodeWriter

    lm = study / "sub-02" / "ses-postdose" / "pet" / "sub-02_ses-postdose_pet-listmode.h5"
    r = ListmodeReader(lm)
    tmp = lm.with_name("x.h5")
    with ListmodeWriter(tmp, r.scanner, tof=r.tof, exam=r.exam, corrections=r.corrections):
        pass
    os.replace(tmp, lm)
    line = refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", lm.name)
    assert "no events" in line and "num-radial" not in line


def test_damaged_hdf5_metadata_is_one_line(study, tmp_path, capsys):
    lm = study / "sub-01" / "ses-postdose" / "pet" / "sub-01_ses-postdose_pet-listmode.h5"
    data = bytearray(lm.read_bytes())
    rng = np.random.default_rng(0)
    for i in rng.integers(0, 2048, 200):  # the superblock and root-group metadata live at the start
        data[int(i)] ^= 0xFF
    lm.write_bytes(bytes(data))
    refused(capsys, args(study, tmp_path / "out"), tmp_path / "out", lm.name)


# ---------------------------------------------------------------- output paths
@pytest.mark.parametrize("kind", ["symlink", "fifo", "file", "parent_file"])
def test_special_output_paths_are_refused(study, tmp_path, capsys, kind):
    target = tmp_path / "target"
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "elsewhere" / "x")
    elif kind == "fifo":
        out = tmp_path / "fifo"
        os.mkfifo(out)
    elif kind == "file":
        out = tmp_path / "plain"
        out.write_text("keep")
    else:
        (tmp_path / "afile").write_text("keep")
        out = tmp_path / "afile" / "deriv"
    target.mkdir()
    before = snapshot(tmp_path)
    rc = cli.main(args(study, out))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(out).st_mode)


def test_device_file_is_never_replaced(study, capsys):
    rc = cli.main(args(study, "/dev/full"))
    assert rc == 2
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    capsys.readouterr()


# ---------------------------------------------------------------- runs that must redo or refuse
@pytest.fixture(scope="module")
def done(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "deriv"
    assert cli.main(args(raw, out)) == 0
    return out


def _fit(out, sub="sub-01", ses="ses-baseline", model="srtm"):
    return out / sub / ses / "pet" / f"{sub}_{ses}_desc-{model}_bpnd.tsv"


def test_files_follow_the_umask(done):
    fit = _fit(done)
    assert stat.S_IMODE(fit.stat().st_mode) == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_changed_settings_are_never_served_stale(raw, done, tmp_path):
    """--reference white_matter --iterations 2 redoes recon, TACs, fits and the group tables."""
    out = tmp_path / "deriv"
    shutil.copytree(done, out)
    assert cli.main(args(raw, out, "--reference", "white_matter", "--iterations", "2")) == 0
    rows = _fit(out).read_text().splitlines()
    ref_col = rows[0].split("\t").index("reference")
    assert all(r.split("\t")[ref_col] == "white_matter" for r in rows[1:])
    assert "cerebellum" in {r.split("\t")[0] for r in rows[1:]}
    side = json.loads((out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_rec-osem_pet.json").read_text())
    assert side["ReconMethodParameterValues"][0] == 2
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Settings"]["reference"] == "white_matter"
    changes = (out / "group" / "subject_changes.tsv").read_text()
    assert "cerebellum" in changes and "\twhite_matter\t" not in changes


def test_truncated_image_is_rebuilt_on_resume(raw, done, tmp_path):
    out = tmp_path / "deriv"
    shutil.copytree(done, out)
    pet = out / "sub-02" / "ses-baseline" / "pet" / "sub-02_ses-baseline_rec-osem_pet.nii.gz"
    good = pet.read_bytes()
    pet.write_bytes(good[: len(good) // 2])
    assert cli.main(args(raw, out)) == 0
    import nibabel as nib

    assert nib.load(str(pet)).get_fdata().shape[-1] == len(FRAMES_S)


def test_second_run_on_the_same_folder_is_refused(raw, done, tmp_path, capsys):
    out = tmp_path / "deriv"
    shutil.copytree(done, out)
    from petbind.pipeline.run import study_lock

    with study_lock(out):
        refused(capsys, args(raw, out), out, str(out), "another petbind-study run")


def test_full_disk_is_one_line_and_leaves_nothing(raw, tmp_path, capsys, monkeypatch):
    """Disk full, simulated by making every rename of a finished output fail with ENOSPC
    (the atomic writer's commit step, petbind.core.files.os.replace)."""
    import petbind.core.files as files

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(files.os, "replace", full)
    out = tmp_path / "deriv"
    out.mkdir()
    rc = cli.main(args(raw, out))
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name != ".petbind.lock"]
    assert [p for p in leftovers if p.name.endswith(".tmp") or ".tmp." in p.name] == []


def test_cli_is_installed_and_reports_bad_input(raw, tmp_path):
    """The console script from pyproject exists and exits 2 with one line."""
    exe = shutil.which("petbind-study") or str(Path(sys.executable).with_name("petbind-study"))
    r = subprocess.run([exe, str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nothing" in r.stderr
