import os

import numpy as np
import pytest

from petbind.quant.io import TACTable, check_same_grid, load_atlas, load_pet, read_tacs_tsv, write_tacs_tsv
from petbind.core.files import atomic_output
from petbind.core.frames import validate_frame_times
from tests.quant_helpers import AFFINE, FRAME_DUR_S, FRAME_END_S, FRAME_START_S, atlas_labels, write_atlas, write_pet


def _table(rng, n_regions=3):
    vals = rng.normal(1000.0, 300.0, size=(FRAME_START_S.size, n_regions))
    return TACTable(FRAME_START_S, FRAME_END_S, [f"r{i}" for i in range(n_regions)], vals, source="mem")


def test_tsv_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    t = _table(rng)
    t.values[0, 0] = -1.2345678901234567e-3  # negative noise value survives unchanged
    p = write_tacs_tsv(tmp_path / "x_tacs.tsv", t)
    back = read_tacs_tsv(p)
    assert back.region_names == t.region_names
    np.testing.assert_array_equal(back.values, t.values)
    np.testing.assert_array_equal(back.frame_start_s, t.frame_start_s)
    np.testing.assert_array_equal(back.frame_end_s, t.frame_end_s)
    header = p.read_text().splitlines()[0].split("\t")
    assert header == ["frame_start", "frame_end", "r0", "r1", "r2"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp") or ".tmp." in f]


def test_column_missing_lists_names():
    t = _table(np.random.default_rng(1))
    np.testing.assert_array_equal(t.column("r1"), t.values[:, 1])
    with pytest.raises(ValueError, match=r"region 'nope' not found; available regions: \['r0', 'r1', 'r2'\]"):
        t.column("nope")


@pytest.mark.parametrize(
    "start,end,pattern",
    [
        ([0, 60, 30], [30, 90, 60], "not sorted"),
        ([0, 20, 60], [30, 60, 90], "overlap"),
        ([0, 30], [30, 30], "positive duration"),
        ([-5, 30], [30, 60], ">= 0"),
        ([0, np.nan], [30, 60], "finite"),
    ],
)
def test_validate_frames_errors(start, end, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_frame_times(start, end, "myfile.tsv")
    with pytest.raises(ValueError, match="myfile.tsv"):
        validate_frame_times(start, end, "myfile.tsv")


def test_frames_with_gap_accepted():
    s, e = validate_frame_times([0, 60], [30, 90], "x")
    np.testing.assert_array_equal(e, [30, 90])


def _write_tsv(path, text):
    path.write_text(text)
    return path


def test_read_tacs_bad_inputs_name_file_and_field(tmp_path):
    f = _write_tsv(tmp_path / "a.tsv", "frame_start\tframe_end\tputamen\n0\t30\t1.0\n60\t90\tn/a\n")
    with pytest.raises(ValueError, match=r"a\.tsv: column 'putamen' line 3 is 'n/a'"):
        read_tacs_tsv(f)
    f = _write_tsv(tmp_path / "b.tsv", "frame_start\tframe_end\tputamen\n0\t30\t1.0\n60\t90\tNaN\n")
    with pytest.raises(ValueError, match=r"b\.tsv: column 'putamen'"):
        read_tacs_tsv(f)
    f = _write_tsv(tmp_path / "c.tsv", "start\tframe_end\tputamen\n0\t30\t1.0\n")
    with pytest.raises(ValueError, match=r"c\.tsv: missing required column\(s\) \['frame_start'\]"):
        read_tacs_tsv(f)
    f = _write_tsv(tmp_path / "d.tsv", "frame_start\tframe_end\tputamen\n0\t30\tabc\n")
    with pytest.raises(ValueError, match=r"d\.tsv: column 'putamen' line 2: expected a number"):
        read_tacs_tsv(f)
    f = _write_tsv(tmp_path / "e.tsv", "frame_start\tframe_end\tputamen\n30\t60\t1\n0\t30\t2\n")
    with pytest.raises(ValueError, match=r"e\.tsv: frames not sorted"):
        read_tacs_tsv(f)
    f = _write_tsv(tmp_path / "f.tsv", "frame_start\tframe_end\n0\t30\n")
    with pytest.raises(ValueError, match=r"f\.tsv: no region columns"):
        read_tacs_tsv(f)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_tacs_tsv(tmp_path / "missing.tsv")


def test_negative_tac_values_allowed_and_counted(caplog):
    vals = np.ones((FRAME_START_S.size, 1))
    vals[:3, 0] = -0.5
    with caplog.at_level("WARNING", logger="petbind.quant.io"):
        t = TACTable(FRAME_START_S, FRAME_END_S, ["r"], vals, source="neg.tsv")
    assert t.values[0, 0] == -0.5
    assert "neg.tsv: 3 negative" in caplog.text


def test_load_pet_timing_from_sidecar_not_header(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.uniform(0, 100, size=(10, 12, 6, FRAME_START_S.size))
    side = {"FrameTimesStart": (FRAME_START_S + 100.0).tolist(), "FrameDuration": FRAME_DUR_S.tolist(),
            "InjectionStart": 100.0, "Units": "kBq/mL"}
    nii = write_pet(tmp_path, data, side)
    pet = load_pet(nii)
    np.testing.assert_allclose(pet.frame_start_s, FRAME_START_S)
    np.testing.assert_allclose(pet.frame_end_s, FRAME_END_S)
    np.testing.assert_allclose(pet.data, data.astype(np.float32) * 1000.0, rtol=1e-6)
    assert pet.affine.dtype == np.float64
    np.testing.assert_array_equal(pet.affine, AFFINE)


def test_load_pet_errors(tmp_path):
    data = np.ones((10, 12, 6, FRAME_START_S.size), dtype=np.float32)
    side = {"FrameTimesStart": FRAME_START_S[:-1].tolist(), "FrameDuration": FRAME_DUR_S[:-1].tolist()}
    nii = write_pet(tmp_path, data, side, stem="short")
    with pytest.raises(ValueError, match=r"short\.nii\.gz: image has 14 frames .*short\.json.* list 13"):
        load_pet(nii)
    side = {"FrameDuration": FRAME_DUR_S.tolist()}
    nii = write_pet(tmp_path, data, side, stem="nostart")
    with pytest.raises(ValueError, match=r"nostart\.json: field 'FrameTimesStart' missing"):
        load_pet(nii)
    side = {"FrameTimesStart": FRAME_START_S.tolist(), "FrameDuration": FRAME_DUR_S.tolist(), "Units": "counts"}
    nii = write_pet(tmp_path, data, side, stem="units")
    with pytest.raises(ValueError, match=r"units\.json: field 'Units' is 'counts'"):
        load_pet(nii)
    bad = data.copy()
    bad[0, 0, 0, 5] = np.nan
    nii = write_pet(tmp_path, bad, stem="nan")
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: 1 NaN/inf voxel\(s\) \(first in frame 5\)"):
        load_pet(nii)
    starts = FRAME_START_S.copy()
    starts[3] = starts[2] + 10.0
    side = {"FrameTimesStart": starts.tolist(), "FrameDuration": FRAME_DUR_S.tolist()}
    nii = write_pet(tmp_path, data, side, stem="ovl")
    with pytest.raises(ValueError, match=r"ovl\.json .*overlap"):
        load_pet(nii)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_pet(nii, tmp_path / "nope.json")


def test_load_atlas_and_errors(tmp_path):
    nii, tsv = write_atlas(tmp_path)
    at = load_atlas(nii, tsv)
    assert at.region_names == ["cerebellum", "putamen", "caudate"]
    assert at.index_of("putamen") == 2
    np.testing.assert_array_equal(at.labels, atlas_labels())
    with pytest.raises(ValueError, match=r"region 'thalamus' not in atlas; available regions: \['cerebellum'"):
        at.index_of("thalamus")
    # a label in the image that the TSV does not name
    nii2, tsv2 = write_atlas(tmp_path, names={1: "cerebellum", 2: "putamen"}, stem="partial")
    with pytest.raises(ValueError, match=r"partial\.nii\.gz: label value\(s\) \[3\] are not listed in .*partial\.tsv"):
        load_atlas(nii2, tsv2)
    (tmp_path / "dup.tsv").write_text("index\tname\n1\ta\n2\ta\n3\tb\n")
    with pytest.raises(ValueError, match=r"dup\.tsv: column 'name' value 'a' appears twice"):
        load_atlas(nii, tmp_path / "dup.tsv")
    (tmp_path / "noname.tsv").write_text("index\tlabel\n1\ta\n")
    with pytest.raises(ValueError, match=r"noname\.tsv: missing required column\(s\) \['name'\]"):
        load_atlas(nii, tmp_path / "noname.tsv")


def test_grid_mismatch_messages():
    with pytest.raises(ValueError, match=r"b\.nii: grid shape \(3, 3, 3\) differs from a\.nii"):
        check_same_grid((2, 3, 3, 5), AFFINE, "a.nii", (3, 3, 3), AFFINE, "b.nii")
    aff = AFFINE.copy()
    aff[0, 3] += 1.0
    with pytest.raises(ValueError, match=r"b\.nii: affine differs from a\.nii"):
        check_same_grid((3, 3, 3), AFFINE, "a.nii", (3, 3, 3), aff, "b.nii")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.tsv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target, make_parents=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.tsv"]
