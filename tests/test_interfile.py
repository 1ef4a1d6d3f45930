"""STIR Interfile images and sinograms."""

import numpy as np
import pytest

from petbind.recon.geometry import Scanner, SinogramLayout
from petbind.recon.rawdata.interfile import (
    read_interfile_header,
    read_interfile_image,
    read_interfile_sinogram,
    write_interfile_image,
    write_interfile_sinogram,
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_image_round_trip_and_byte_layout(tmp_path, dtype):
    rng = np.random.default_rng(0)
    img = (rng.random((5, 4, 3)) * 100).astype(dtype)
    aff = np.diag([2.0, 2.5, 3.25, 1.0])
    aff[:3, 3] = [-4.0, -3.75, 1.5]
    path = tmp_path / "img.hv"
    write_interfile_image(path, img, aff)
    back, aff2 = read_interfile_image(path)
    np.testing.assert_array_equal(back, img)
    assert back.dtype == img.dtype
    np.testing.assert_array_equal(aff2, aff)
    # STIR layout: x fastest in the file, i.e. a C array (z, y, x), little endian
    raw = np.fromfile(tmp_path / "img.v", dtype=np.dtype(dtype).newbyteorder("<")).reshape(3, 4, 5)
    assert raw[2, 1, 4] == img[4, 1, 2]
    h = read_interfile_header(path)
    assert h["matrix size[1]"] == "5" and h["matrix size[3]"] == "3"
    assert float(h["first pixel offset (mm)[2]"]) == -3.75
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.hv", "img.v"]


def test_image_errors_name_file_and_key(tmp_path):
    path = tmp_path / "img.hv"
    write_interfile_image(path, np.zeros((4, 4, 2), np.float32), np.eye(4))
    (tmp_path / "img.v").write_bytes((tmp_path / "img.v").read_bytes()[:40])
    with pytest.raises(ValueError, match="img.hv.*name of data file.*truncated"):
        read_interfile_image(path)
    text = path.read_text().replace("!number format := float", "!number format := complex")
    path.write_text(text)
    with pytest.raises(ValueError, match="img.hv.*number format"):
        read_interfile_image(path)
    path.write_text(text.replace("!matrix size [2] := 4\n", ""))
    with pytest.raises(ValueError, match="img.hv.*matrix size\\[2\\]"):
        read_interfile_image(path)
    with pytest.raises(ValueError, match="affine"):
        rot = np.eye(4)
        rot[0, 1] = 0.1
        write_interfile_image(tmp_path / "r.hv", np.zeros((2, 2, 2)), rot)


@pytest.mark.parametrize("mrd,span", [(None, 1), (3, 1), (None, 3), (4, 3)])
def test_sinogram_round_trip(tmp_path, mrd, span):
    sc = Scanner.cylindrical(100.0, 16, 5, 4.0)
    layout = SinogramLayout(sc, 9, mrd, span)
    data = np.random.default_rng(1).random(layout.shape).astype(np.float32)
    path = tmp_path / "s.hs"
    write_interfile_sinogram(path, data, layout)
    s = read_interfile_sinogram(path)
    assert s.layout.shape == layout.shape and s.layout.span == layout.span
    assert s.layout.max_ring_difference == layout.max_ring_difference
    np.testing.assert_allclose(s.layout.scanner.crystal_xy_mm, sc.crystal_xy_mm, atol=1e-9)
    np.testing.assert_array_equal(s.data, data)


def test_sinogram_stir_segment_by_view_header(tmp_path):
    """A hand-written STIR-style header: SegmentByView order, STIR's default segment sequence 0,-1,+1."""
    nr, n, nt = 3, 8, 5
    nv = n // 2
    # segment -1: ring pairs (1,0),(2,1) -> 2 positions; 0: 3; +1: 2
    axial = {-1: 2, 0: 3, 1: 2}
    rng = np.random.default_rng(2)
    blocks = {s: rng.random((nv, axial[s], nt)).astype(np.float32) for s in (-1, 0, 1)}  # view, axial, tangential
    np.concatenate([blocks[s].ravel() for s in (0, -1, 1)]).astype("<f4").tofile(tmp_path / "stir.s")
    (tmp_path / "stir.hs").write_text(
        "!INTERFILE  :=\n!imaging modality := PT\nname of data file := stir.s\n!version of keys := STIR4.0\n"
        "!GENERAL DATA :=\n!GENERAL IMAGE DATA :=\n!type of data := PET\nimagedata byte order := LITTLEENDIAN\n"
        "!PET STUDY (General) :=\n!PET data type := Emission\napplied corrections := {None}\n"
        "!number format := float\n!number of bytes per pixel := 4\nnumber of dimensions := 4\n"
        "matrix axis label [4] := segment\n!matrix size [4] := 3\n"
        "matrix axis label [3] := view\n!matrix size [3] := 4\n"
        "matrix axis label [2] := axial coordinate\n!matrix size [2] := { 2,3,2}\n"
        "matrix axis label [1] := tangential coordinate\n!matrix size [1] := 5\n"
        "minimum ring difference per segment := { -1,0,1}\nmaximum ring difference per segment := { -1,0,1}\n"
        "Scanner parameters:=\nScanner type := userdefined\nNumber of rings := 3\n"
        "Number of detectors per ring := 8\nInner ring diameter (cm) := 20\nAverage depth of interaction (cm) := 0.5\n"
        "Distance between rings (cm) := 0.4\nEnd scanner parameters:=\n"
        "number of time frames := 1\n!END OF INTERFILE :=\n"
    )
    s = read_interfile_sinogram(tmp_path / "stir.hs")
    assert s.layout.scanner.radius_mm == pytest.approx(105.0)
    assert s.layout.shape == (7, nv, nt)
    # petbind plane order: segment 0 (3 planes), +1 (2), -1 (2)
    np.testing.assert_array_equal(s.data[0:3], blocks[0].transpose(1, 0, 2))
    np.testing.assert_array_equal(s.data[3:5], blocks[1].transpose(1, 0, 2))
    np.testing.assert_array_equal(s.data[5:7], blocks[-1].transpose(1, 0, 2))


def test_sinogram_errors(tmp_path):
    sc = Scanner.cylindrical(100.0, 16, 5, 4.0)
    layout = SinogramLayout(sc, 9, 2, 1)
    path = tmp_path / "s.hs"
    with pytest.raises(ValueError, match="shape"):
        write_interfile_sinogram(path, np.zeros((2, 2, 2), np.float32), layout)
    write_interfile_sinogram(path, np.zeros(layout.shape, np.float32), layout)
    text = path.read_text()
    path.write_text(text.replace("!matrix size [3] := { 3,4,5,4,3}", "!matrix size [3] := { 3,4,5,4}"))
    with pytest.raises(ValueError, match="s.hs.*matrix size\\[3\\]"):
        read_interfile_sinogram(path)
    path.write_text(text.replace("!matrix size [3] := { 3,4,5,4,3}", "!matrix size [3] := { 3,4,6,4,3}"))
    with pytest.raises(ValueError, match="s.hs.*segment 0"):
        read_interfile_sinogram(path)
    path.write_text(text.replace("segment sequence := { 0,1,-1,2,-2}", "segment sequence := { 0,1,1,2,-2}"))
    with pytest.raises(ValueError, match="s.hs.*segment sequence"):
        read_interfile_sinogram(path)
    (tmp_path / "x.hs").write_text("just text\n")
    with pytest.raises(ValueError, match="x.hs.*INTERFILE"):
        read_interfile_sinogram(tmp_path / "x.hs")
