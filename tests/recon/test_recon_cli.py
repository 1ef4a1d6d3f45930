"""petbind-recon end to end on tiny inputs (in process through main(argv))."""

import json

import nibabel as nib
import numpy as np
import pytest

from petbind.recon.cli import main
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout
from petbind.recon.projector import SinogramProjector
from petbind.recon.rawdata.schema import ExamInfo
from petbind.recon.rawdata.hdf5 import ListmodeWriter
from petbind.recon.rawdata.sinograms import write_sinograms_h5
from petbind.recon.rawdata.interfile import write_interfile_image, write_interfile_sinogram
from stir_helpers import stage

HOT_MM = np.array([29.4, -19.6, 2.5])  # a voxel centre of the CLI's default grid for this scanner (9.8 mm pitch)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A 4-ring, 64-crystal scanner; counts of a warm disc with a hot spot, Poisson sampled (seeded)."""
    folder = tmp_path_factory.mktemp("cli")
    scanner = Scanner.cylindrical(100.0, 64, 4, 5.0, name="tiny")
    layout = SinogramLayout(scanner, 63, 3, 1)
    grid = ImageGrid((41, 41, 8), 2.45, (-49.0, -49.0, -8.75))
    x = np.zeros(grid.shape, np.float32)
    c = grid.voxel_centres_mm()
    x[np.hypot(c[..., 0], c[..., 1]) < 60] = 1.0
    x[np.linalg.norm(c - HOT_MM, axis=-1) < 6] = 8.0
    expected = SinogramProjector(layout, grid, device="cpu").forward(x) * 0.1
    rng = np.random.default_rng(7)
    counts = rng.poisson(expected).astype(np.int64)
    pairs = layout.detector_pairs().reshape(-1, 2)
    ids = np.repeat(pairs, counts.reshape(-1), axis=0)
    n_del = ids.shape[0] // 20
    delayed = np.stack([rng.integers(0, 64, n_del), rng.integers(0, 4, n_del)], 1)
    d_ids = np.stack([delayed[:, 1] * 64 + delayed[:, 0], ((delayed[:, 1] + 1) % 4) * 64 + (delayed[:, 0] + 32) % 64], 1)
    all_ids = np.concatenate([ids, d_ids])
    prompt = np.concatenate([np.ones(len(ids), bool), np.zeros(n_del, bool)])
    t = rng.uniform(0, 20_000.0, len(all_ids))
    order = np.argsort(t)
    exam = ExamInfo(tracer="FDG", isotope="F18", half_life_s=6586.2)  # Interfile has no injection-to-scan time
    lm = folder / "lm.h5"
    with ListmodeWriter(lm, scanner, exam=exam) as w:
        w.append(all_ids[order].astype(np.int32), None, np.round(t[order]), prompt[order])
    return dict(folder=folder, scanner=scanner, layout=layout, counts=counts.astype(np.float32), listmode=lm, exam=exam)


def _hot_spot_mm(path):
    img = nib.load(path)
    a = np.asarray(img.get_fdata())
    if a.ndim == 4:
        a = a.sum(-1)
    i = np.unravel_index(np.argmax(a), a.shape)
    return img.affine[:3, :3] @ np.array(i) + img.affine[:3, 3], a


def test_listmode_one_frame_gives_3d_image_and_sidecar(scan, tmp_path):
    out = tmp_path / "r.nii.gz"
    assert main([str(scan["listmode"]), "--out", str(out), "--iterations", "3", "--subsets", "4", "--device", "cpu", "--quiet"]) == 0
    pos, a = _hot_spot_mm(out)
    assert a.ndim == 3 and np.all(np.isfinite(a))
    assert np.linalg.norm(pos[:2] - HOT_MM[:2]) < 9.8 + 1e-6  # within one voxel transaxially
    side = json.loads((tmp_path / "r.json").read_text())
    assert side["FrameDuration"] == [pytest.approx(20.0, abs=0.01)] and side["FrameTimesStart"] == [0.0]
    assert side["ImageDecayCorrected"] is True and side["TracerName"] == "FDG"
    assert side["RandomsCorrection"].startswith("delayed")
    assert set(side["CorrectionsNotApplied"]) == {"Attenuation", "Calibration", "DeadTime", "Normalisation", "Scatter"}
    assert side["Units"] == "arbitrary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.nii.gz"]


def test_listmode_frames_give_4d_image(scan, tmp_path):
    out = tmp_path / "d.nii.gz"
    assert main([str(scan["listmode"]), "--out", str(out), "--frames", "2x10s", "--iterations", "2", "--subsets", "4",
                 "--device", "cpu", "--quiet"]) == 0
    a = np.asarray(nib.load(out).get_fdata())
    assert a.shape[-1] == 2 and a.ndim == 4
    side = json.loads((tmp_path / "d.json").read_text())
    assert side["FrameTimesStart"] == [0.0, 10.0] and side["FrameDuration"] == [10.0, 10.0]
    # the same activity in both frames (decay over 20 s of F-18 is 0.2 %): totals within Poisson noise
    assert a[..., 0].sum() == pytest.approx(a[..., 1].sum(), rel=0.05)


def test_sinogram_inputs_hdf5_and_stir_interfile_reconstruct_the_same(scan, tmp_path):
    h5 = tmp_path / "s.h5"
    write_sinograms_h5(h5, scan["layout"], [0.0], [20.0], prompts=scan["counts"][None], exam=scan["exam"])
    hs = tmp_path / "s.hs"
    write_interfile_sinogram(hs, scan["counts"], scan["layout"], exam=scan["exam"], frame_start_s=0.0, frame_duration_s=20.0)
    args = ["--iterations", "2", "--subsets", "4", "--device", "cpu", "--quiet"]
    assert main([str(h5), "--out", str(tmp_path / "a.nii.gz"), *args]) == 0
    assert main([str(hs), "--out", str(tmp_path / "b.nii.gz"), *args]) == 0
    a = nib.load(tmp_path / "a.nii.gz")
    b = nib.load(tmp_path / "b.nii.gz")
    np.testing.assert_allclose(a.affine, b.affine)
    np.testing.assert_allclose(b.get_fdata(), a.get_fdata(), rtol=1e-3, atol=1e-4 * float(a.get_fdata().max()))
    pos, _ = _hot_spot_mm(tmp_path / "b.nii.gz")
    assert np.linalg.norm(pos[:2] - HOT_MM[:2]) < 9.8 + 1e-6
    side = json.loads((tmp_path / "b.json").read_text())
    assert "Randoms" in side["CorrectionsNotApplied"] and side["InputFormat"] == "STIR Interfile"


def test_mmr_listmode_header_runs(tmp_path):
    folder = stage(tmp_path, ["PET_ACQ_small.l.hdr.STIR", "small_listmode_file.l"])
    out = tmp_path / "m.nii.gz"
    assert main([str(folder / "PET_ACQ_small.l.hdr.STIR"), "--out", str(out), "--max-ring-difference", "5",
                 "--voxel-size-mm", "10", "--fov-mm", "300", "--iterations", "1", "--subsets", "2", "--device", "cpu",
                 "--quiet"]) == 0
    a = np.asarray(nib.load(out).get_fdata())
    assert a.ndim == 3 and np.all(np.isfinite(a)) and a.max() > 0
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["ManufacturersModelName"] == "Siemens mMR" and side["SinogramLayout"]["span"] == 11
    assert side["FrameStatistics"][0]["prompts"] == 218_881


@pytest.mark.parametrize("make, extra, match", [
    (lambda d: d / "missing.h5", [], "missing.h5: no such file"),
    (lambda d: (d / "t.txt").write_text("hello") and d / "t.txt", [], "t.txt: not a petbind HDF5"),
    (lambda d: write_interfile_image(d / "i.hv", np.zeros((3, 3, 3), np.float32), np.eye(4)) or d / "i.hv", [],
     "i.hv: field '!PET data type'"),
    (lambda d: d / "s.hs", ["--frames", "2x10s"], "holds sinograms binned in fixed frames"),
])
def test_bad_input_exits_2_with_one_line(scan, tmp_path, capsys, make, extra, match):
    write_interfile_sinogram(tmp_path / "s.hs", scan["counts"], scan["layout"])
    path = make(tmp_path)
    assert main([str(path), "--out", str(tmp_path / "o.nii.gz"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("petbind-recon: error:") and match in err[0]
    assert not (tmp_path / "o.nii.gz").exists()


def test_bad_options_exit_2(scan, tmp_path, capsys):
    assert main([str(scan["listmode"]), "--out", str(tmp_path / "o.txt"), "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(scan["listmode"]), "--out", str(tmp_path / "o.nii.gz"), "--device", "tpu"])
    assert e.value.code == 2
    assert main([str(scan["listmode"]), "--out", str(tmp_path / "o.nii.gz"), "--frames", "2xfoo", "--quiet"]) == 2
    assert "--frames" in capsys.readouterr().err


def test_arc_corrected_view_mashed_stir_data_reconstruct_with_their_own_lors(tmp_path):
    from petbind.recon.rawdata.stir import StirProjData, StirSegment
    from petbind.recon.system import LORProjector

    pd = StirProjData(384, 16, 380.0, 6.75, -0.46875, [StirSegment(0, 0, 0, 16)], 96, 96, arc_corrected=True,
                      bin_size_mm=6.0)
    grid = ImageGrid((61, 61, 16), (6.0, 6.0, 6.75))
    x = np.zeros(grid.shape, np.float32)
    c = grid.voxel_centres_mm()
    x[np.hypot(c[..., 0], c[..., 1]) < 120] = 1.0
    hot = np.array([-60.0, 42.0, 0.0])  # a voxel centre: x, y on the 6 mm grid
    x[np.linalg.norm(c[..., :2] - hot[:2], axis=-1) < 10] = 6.0
    y = LORProjector(*pd.lor_endpoints_mm(0), grid, device="cpu").forward(x)
    y.astype("<f4").tofile(tmp_path / "u.s")  # SegmentBySinogram: (axial, view, tangential)
    (tmp_path / "u.hs").write_text(
        "!INTERFILE :=\nname of data file := u.s\noriginating system := PRT-1\n!PET data type := Emission\n"
        "applied corrections := {arc correction}\n!number format := float\n!number of bytes per pixel := 4\n"
        "number of dimensions := 4\nmatrix axis label [4] := segment\n!matrix size [4] := 1\n"
        "matrix axis label [3] := axial coordinate\n!matrix size [3] := {16}\nmatrix axis label [2] := view\n"
        "!matrix size [2] := 96\nmatrix axis label [1] := tangential coordinate\n!matrix size [1] := 96\n"
        "minimum ring difference per segment := {0}\nmaximum ring difference per segment := {0}\n"
        "default bin size (cm) := 0.6\nview offset (degrees) := -0.46875\nimage duration (sec)[1] := 60\n"
        "!END OF INTERFILE :=\n"
    )
    out = tmp_path / "u.nii.gz"
    assert main([str(tmp_path / "u.hs"), "--out", str(out), "--voxel-size-mm", "6", "6", "6.75", "--fov-mm", "366",
                 "--iterations", "3", "--subsets", "4", "--device", "cpu", "--quiet"]) == 0
    pos, a = _hot_spot_mm(out)
    assert np.linalg.norm(pos[:2] - hot[:2]) < 6.0 + 1e-6
    side = json.loads((tmp_path / "u.json").read_text())
    assert "SinogramLayout" not in side and "arc correction" in side["Notes"][0]


def test_petsird_input(scan, tmp_path):
    from petbind.recon.rawdata.convert import convert

    src = tmp_path / "lm.petsird"
    convert(str(scan["listmode"]), str(src), quiet=True)
    out = tmp_path / "p.nii.gz"
    assert main([str(src), "--out", str(out), "--iterations", "3", "--subsets", "4", "--device", "cpu", "--quiet"]) == 0
    pos, a = _hot_spot_mm(out)
    assert np.linalg.norm(pos[:2] - HOT_MM[:2]) < 9.8 + 1e-6
    assert json.loads((tmp_path / "p.json").read_text())["InputFormat"] == "PETSIRD"
