"""OutputSet (files that appear together or not at all) and the result writers of quant.results."""

import errno
import json
import os

import nibabel as nib
import numpy as np
import pytest

from petbind.core.files import OutputPathError, read_table_tsv, write_json
from petbind.quant.io import TACTable, load_atlas, read_tacs_tsv
from petbind.quant.outputs import OutputSet, OutputWriteError
from petbind.quant.results import MAP_SUFFIX, tacs_sidecar, write_parametric_maps, write_tacs
from tests.quant_helpers import AFFINE, FRAME_END_S, FRAME_START_S, atlas_labels, write_atlas


def _text(path, text):
    path.write_text(text)


def test_commit_publishes_everything_and_drops_unwritten_reservations(tmp_path):
    with OutputSet() as outs:
        outs.stage(tmp_path / "a.txt")
        outs.stage(tmp_path / "new" / "never.txt")  # reserved, never written
        outs.write(tmp_path / "a.txt", _text, "A")
        outs.write(tmp_path / "new" / "b.json", write_json, {"b": 1})
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["new"]
    assert (tmp_path / "a.txt").read_text() == "A"
    assert json.loads((tmp_path / "new" / "b.json").read_text()) == {"b": 1}
    assert sorted(os.listdir(tmp_path / "new")) == ["b.json"]  # no empty file, no temporary left
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "new"]


def test_exception_discards_files_and_created_folders(tmp_path):
    (tmp_path / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with OutputSet() as outs:
            outs.write(tmp_path / "old.txt", _text, "new")
            outs.write(tmp_path / "d1" / "d2" / "x.txt", _text, "x")
            raise RuntimeError("late failure")
    assert sorted(os.listdir(tmp_path)) == ["old.txt"]
    assert (tmp_path / "old.txt").read_text() == "old"


def test_writer_oserror_names_the_destination(tmp_path):
    def full(path):
        path.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with pytest.raises(OutputWriteError, match=r"b\.txt: cannot write output \(No space left on device\)"):
        with OutputSet() as outs:
            outs.write(tmp_path / "a.txt", _text, "A")
            outs.write(tmp_path / "b.txt", full)
    assert os.listdir(tmp_path) == []


def test_failed_rename_rolls_back_earlier_renames(tmp_path, monkeypatch):
    """Disk full on the 2nd of three renames: the 1st is undone, the old file comes back."""
    (tmp_path / "a.txt").write_text("old a")
    real = os.replace
    calls = []

    def fake(src, dst, *a, **kw):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    outs = OutputSet()
    for name in ("a.txt", "b.txt", "c.txt"):
        outs.write(tmp_path / name, _text, f"new {name}")
    monkeypatch.setattr(os, "replace", fake)
    with pytest.raises(OutputWriteError, match=r"b\.txt: cannot write output"):
        outs.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old a"


def test_stage_refuses_unsafe_paths_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "file", tmp_path / "link.tsv")
    outs = OutputSet()
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        outs.stage(tmp_path / "file" / "x.tsv")
    with pytest.raises(OutputPathError, match="symbolic link"):
        outs.stage(tmp_path / "link.tsv")
    outs.discard()
    assert sorted(os.listdir(tmp_path)) == ["file", "link.tsv"]


# ---------------------------------------------------------------------------------- result writers
def test_write_tacs_and_sidecar(tmp_path):
    atlas_nii, labels_tsv = write_atlas(tmp_path)
    atlas = load_atlas(atlas_nii, labels_tsv)
    rng = np.random.default_rng(40)
    table = TACTable(FRAME_START_S, FRAME_END_S, ["putamen", "caudate"], rng.uniform(0, 100, (FRAME_START_S.size, 2)))
    side = tacs_sidecar(table, atlas, ["pet.nii.gz", atlas_nii, labels_tsv],
                        pet_sidecar={"TracerRadionuclide": "F18", "FrameDuration": [1]},
                        pvc={"Method": "gtm", "FWHM_mm": [5, 5, 5]})
    out = write_tacs(tmp_path / "x_tacs.tsv", table, side)
    back = read_tacs_tsv(out)
    np.testing.assert_array_equal(back.values, table.values)  # exact round trip
    got = json.loads((tmp_path / "x_tacs.json").read_text())
    lab = atlas_labels()
    assert got["VoxelCount"] == {"putamen": int(np.sum(lab == 2)), "caudate": int(np.sum(lab == 3))}
    assert got["TracerRadionuclide"] == "F18" and "FrameDuration" not in got
    assert got["PartialVolumeCorrection"]["Method"] == "gtm" and "(gtm)" in got["Description"]
    assert got["frame_start"]["Units"] == "s" and got["Units"] == "Bq/mL"


def test_write_parametric_maps_names_units_and_values(tmp_path):
    from petbind.quant.models import parametric_maps, srtm_forward

    ref = 1e4 * (1 - np.exp(-(FRAME_START_S + 60) / 300)) * np.exp(-(FRAME_START_S + 60) / 4000)
    img = np.stack([srtm_forward(FRAME_START_S, FRAME_END_S, ref, 1.0, 0.3, bp) for bp in (0.5, 1.0, 1.5, 2.0)])
    img = img.reshape(2, 2, 1, FRAME_START_S.size)
    pm = parametric_maps("logan", FRAME_START_S, FRAME_END_S, ref, img, k2prime_per_min=0.3, progress=False)
    written = write_parametric_maps(tmp_path / "s", pm, AFFINE, {"Sources": ["pet.nii.gz"]})
    expected = [tmp_path / f"s_{MAP_SUFFIX.get(n, n)}.nii.gz" for n in pm.maps] + [tmp_path / "s_status.nii.gz"]
    assert written == expected
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in expected]
                                                  + [p.name.replace(".nii.gz", ".json") for p in expected])
    bp = nib.load(str(tmp_path / "s_bpnd.nii.gz"))
    np.testing.assert_array_equal(bp.affine, AFFINE)
    np.testing.assert_allclose(bp.get_fdata(), np.asarray(pm.maps["bp_nd"], dtype=np.float32))
    units = {n: json.loads((tmp_path / f"s_{MAP_SUFFIX.get(n, n)}.json").read_text())["Units"] for n in pm.maps}
    assert units["bp_nd"] == "unitless" and units["k2prime_per_min"] == "1/min"
    assert units["residual"] == "min (Logan plot)"  # Logan residuals are in plot coordinates
    status = json.loads((tmp_path / "s_status.json").read_text())
    assert status["StatusCodes"]["0"] == "ok" and status["Sources"] == ["pet.nii.gz"]
    assert nib.load(str(tmp_path / "s_status.nii.gz")).get_data_dtype() == np.int16


def test_fit_table_written_with_its_sidecar_or_not_at_all(tmp_path, monkeypatch):
    from petbind.quant.models import fit_model, srtm_forward
    from petbind.quant.results import FIT_COLUMNS, write_fit_tsv

    ref = 1e4 * (1 - np.exp(-(FRAME_START_S + 60) / 300)) * np.exp(-(FRAME_START_S + 60) / 4000)
    tac = srtm_forward(FRAME_START_S, FRAME_END_S, ref, 1.0, 0.3, 1.5)
    res = fit_model("mrtm", FRAME_START_S, FRAME_END_S, ref, tac)
    out = write_fit_tsv(tmp_path / "r_bpnd.tsv", res, ["putamen"], "cerebellum", {"Weights": "none"})
    header, rows = read_table_tsv(out)
    assert header[: len(FIT_COLUMNS)] == FIT_COLUMNS and rows[0]["region"] == "putamen"
    assert json.loads((tmp_path / "r_bpnd.json").read_text())["Weights"] == "none"

    def broken(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("petbind.quant.results.write_json", broken)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OutputWriteError, match=r"r2_bpnd\.json: cannot write output"):
        write_fit_tsv(tmp_path / "r2_bpnd.tsv", res, ["putamen"], "cerebellum")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
