"""STIR Interfile images and projection data, read and written with STIR's conventions.

The oracles are STIR's own files (../shared/data/stir), header-level facts
applied by formulas written here from STIR's documentation, and crystal
positions computed from STIR's detector numbering.
"""

import logging

import numpy as np
import pytest

from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.projector import SinogramProjector
from petbind.recon.rawdata.interfile import (
    read_interfile_header,
    read_interfile_image,
    read_interfile_sinogram,
    stir_projdata_from_header,
    write_interfile_image,
    write_interfile_sinogram,
)
from petbind.recon.rawdata.stir import StirProjData, StirSegment, scanner_from_stir_name
from petbind.recon.system import LORProjector
from stir_helpers import LOCAL, stage


# ------------------------------------------------------------------------------------------------
# STIR's rules, written out independently for the oracles
# ------------------------------------------------------------------------------------------------
def stir_image_positions(h, shape):
    """STIR coordinates (x, y from the axis, z from the scanner centre) of every voxel, from header facts."""
    v = [float(h[f"scaling factor (mm/pixel)[{i}]"]) for i in (1, 2, 3)]
    fpo = [float(h[f"first pixel offset (mm)[{i}]"]) if f"first pixel offset (mm)[{i}]" in h else None for i in (1, 2, 3)]
    nx, ny, nz = shape
    x = (fpo[0] if fpo[0] is not None else -(nx // 2) * v[0]) + np.arange(nx) * v[0]
    y = (fpo[1] if fpo[1] is not None else -(ny // 2) * v[1]) + np.arange(ny) * v[1]
    z = (np.arange(nz) - (nz - 1) / 2) * v[2] + (fpo[2] or 0.0)
    return x, y, z


def stir_detector_xyz(d, ring, n, num_rings, radius, spacing, view_offset_deg=0.0):
    """STIR detector position in petbind's frame: STIR's (R sin psi, -R cos psi, z) reflected through the centre."""
    psi = 2 * np.pi * np.asarray(d) / n + np.radians(view_offset_deg)
    z = (np.asarray(ring) - (num_rings - 1) / 2) * spacing
    return np.stack(np.broadcast_arrays(-radius * np.sin(psi), radius * np.cos(psi), -z), axis=-1)


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_image_written_lands_where_stir_puts_it(tmp_path, dtype):
    rng = np.random.default_rng(0)
    img = (rng.random((5, 4, 3)) * 100).astype(dtype)
    aff = np.diag([2.0, 2.5, 3.25, 1.0])
    aff[:3, 3] = [-4.0, -3.75, 11.5]  # x centred (5 voxels); y, z shifted
    path = tmp_path / "img.hv"
    write_interfile_image(path, img, aff)
    back, aff2 = read_interfile_image(path)
    np.testing.assert_array_equal(back, img)
    assert back.dtype == img.dtype
    np.testing.assert_allclose(aff2, aff, atol=1e-12)
    # the file as STIR reads it: x fastest, voxel positions by STIR's rules, petbind = reflection of STIR
    h = read_interfile_header(path)
    raw = np.fromfile(tmp_path / "img.v", dtype=np.dtype(dtype).newbyteorder("<")).reshape(3, 4, 5).transpose(2, 1, 0)
    xs, ys, zs = stir_image_positions(h, raw.shape)
    grid = ImageGrid.from_affine(img.shape, aff)
    px, py, pz = grid.axis_centres_mm()
    for i, j, k in np.ndindex(raw.shape):
        a, b, c = np.argmin(np.abs(px + xs[i])), np.argmin(np.abs(py + ys[j])), np.argmin(np.abs(pz + zs[k]))
        assert abs(px[a] + xs[i]) < 1e-9 and abs(py[b] + ys[j]) < 1e-9 and abs(pz[c] + zs[k]) < 1e-9
        assert raw[i, j, k] == img[a, b, c]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.hv", "img.v"]


def test_centred_image_has_stir_default_origin(tmp_path, caplog):
    grid = ImageGrid((7, 7, 5), (2.0, 2.0, 3.0))  # centred on the scanner: STIR's default placement
    write_interfile_image(tmp_path / "c.hv", np.zeros(grid.shape, np.float32), grid.affine)
    h = read_interfile_header(tmp_path / "c.hv")
    assert float(h["first pixel offset (mm)[1]"]) == pytest.approx(-6.0)  # -(7 // 2) voxels
    assert float(h["first pixel offset (mm)[3]"]) == pytest.approx(0.0)  # middle plane at the scanner centre
    with caplog.at_level(logging.WARNING):
        write_interfile_image(tmp_path / "e.hv", np.zeros((6, 6, 2), np.float32), ImageGrid((6, 6, 2), 2.0).affine)
    assert "ray-tracing projector" in caplog.text


def test_stir_image_is_centred_and_flipped(tmp_path):
    folder = stage(tmp_path, ["test_image_3.hv", "test_image_3.v.gz"])
    img, aff = read_interfile_image(folder / "test_image_3.hv")
    assert img.shape == (97, 97, 31)
    # no first pixel offsets: x/y centred on voxel 48, middle plane at the scanner centre
    np.testing.assert_allclose(aff[:3, 3], [-48 * 3.1088, -48 * 3.1088, -15 * 3.375], atol=1e-9)
    raw = np.fromfile(folder / "test_image_3.v", "<f4").reshape(31, 97, 97).transpose(2, 1, 0)
    np.testing.assert_array_equal(img, raw[::-1, ::-1, ::-1])


def test_stir_sensitivity_image_matches_backprojection_of_the_utah_geometry(tmp_path):
    """STIR's sensitivity image against petbind's back-projection of the Utah header's LORs
    (arc-corrected, view mashing 2): the axial placement (image origin rules) must agree."""
    folder = stage(tmp_path, ["RPTsens_seg4.hv", "RPTsens_seg4.v.gz"])
    img, aff = read_interfile_image(folder / "RPTsens_seg4.hv")
    h = read_interfile_header(LOCAL / "Utahscat600k_ca_seg4.hs")
    pd, _, _ = stir_projdata_from_header(h, "Utah")
    assert pd.arc_corrected and pd.view_mashing == 2 and pd.radius_mm == 380.0 and pd.bin_size_mm == 3.1088
    grid = ImageGrid.from_affine(img.shape, aff)
    parts = [pd.lor_endpoints_mm(i) for i in range(len(pd.segments))]
    start = np.concatenate([p[0].reshape(-1, 3) for p in parts])
    end = np.concatenate([p[1].reshape(-1, 3) for p in parts])
    proj = LORProjector(start, end, grid, device="cpu")
    bp = proj.back(np.ones(proj.out_shape, np.float32))
    a, b = img.sum((0, 1)), bp.sum((0, 1))
    assert np.corrcoef(a, b)[0, 1] > 0.99
    assert np.corrcoef(a[1:], b[:-1])[0, 1] < 0.9  # one plane off is visibly wrong


def test_image_errors_name_file_and_key(tmp_path):
    path = tmp_path / "img.hv"
    write_interfile_image(path, np.zeros((4, 4, 2), np.float32), ImageGrid((4, 4, 2), 1.0, (-1.5, -2.0, -0.5)).affine)
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


# ------------------------------------------------------------------------------------------------
# projection data: STIR's own file
# ------------------------------------------------------------------------------------------------
def test_stir_file_read_and_rewritten_bin_for_bin(tmp_path):
    """Read STIR's lm_to_projdata output, write it again: STIR reads the same numbers in the same bins."""
    folder = stage(tmp_path, ["stir_lm_to_projdata_span11.hs", "stir_lm_to_projdata_span11.s.gz"])
    s = read_interfile_sinogram(folder / "stir_lm_to_projdata_span11.hs")
    assert s.layout.shape == (357, 252, 345) and s.layout.span == 11 and s.layout.max_ring_difference == 16
    assert s.data.sum() == 85_180
    out = tmp_path / "out.hs"
    write_interfile_sinogram(out, s.data, s.layout)
    h = read_interfile_header(out)
    assert h["originating system"] == "Siemens mMR"
    assert h["minimum ring difference per segment"] == ["-16", "-5", "6"]
    assert h["maximum ring difference per segment"] == ["-6", "5", "16"]
    assert h["matrix size[3]"] == ["115", "127", "115"] and h["matrix axis label[3]"] == "axial coordinate"
    assert h["matrix size[1]"] == "345"  # STIR's -172..171 plus +172, which petbind's remap needs
    mine = np.fromfile(tmp_path / "out.s", "<f4")
    stir = np.fromfile(folder / "stir_lm_to_projdata_span11.s", "<f4")
    a = b = 0
    for n in (115, 127, 115):
        seg_mine = mine[a:a + n * 252 * 345].reshape(n, 252, 345)  # SegmentBySinogram
        seg_stir = stir[b:b + n * 252 * 344].reshape(252, n, 344).transpose(1, 0, 2)  # SegmentByView
        np.testing.assert_array_equal(seg_mine[..., :344], seg_stir)
        assert not seg_mine[..., 344].any()
        a, b = a + n * 252 * 345, b + n * 252 * 344
    again = read_interfile_sinogram(out)
    np.testing.assert_array_equal(again.data, s.data)


# ------------------------------------------------------------------------------------------------
# projection data: crystal-pair and projection oracles (run everywhere)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_radial, view_offset", [(31, 0.0), (30, 7.5)])
def test_written_sinogram_bins_are_the_crystal_pairs_stir_reads(tmp_path, num_radial, view_offset):
    n, r, radius, spacing = 64, 4, 120.0, 5.0
    pd0 = StirProjData(n, r, radius, spacing, view_offset, [StirSegment(0, 0, 0, 4)], n // 2, 3)
    layout = SinogramLayout(pd0.scanner(), num_radial, 2, 1)
    data = np.arange(layout.num_bins, dtype=np.float64).reshape(layout.shape) + 1  # bin index + 1
    write_interfile_sinogram(tmp_path / "s.hs", data, layout)
    h = read_interfile_header(tmp_path / "s.hs")
    nt = int(h["matrix size[1]"])
    assert nt == num_radial + (num_radial % 2 == 0)
    assert float(h["view offset (degrees)"]) == pytest.approx(view_offset)
    assert float(h["inner ring diameter (cm)"]) / 2 * 10 + float(h["average depth of interaction (cm)"]) * 10 == pytest.approx(radius)
    raw = np.fromfile(tmp_path / "s.s", "<f8")
    start, end = layout.lor_endpoints_mm()
    start, end = start.reshape(-1, 3), end.reshape(-1, 3)
    pos, checked = 0, 0
    for lo, hi, na in zip(h["minimum ring difference per segment"], h["maximum ring difference per segment"], h["matrix size[3]"]):
        rd, na = int(lo), int(na)
        assert int(hi) == rd
        block = raw[pos:pos + na * (n // 2) * nt].reshape(na, n // 2, nt)
        pos += block.size
        for a, v, ti in np.ndindex(block.shape):
            t = ti - nt // 2
            d1, d2 = (v + t // 2) % n, (v - (t + 1) // 2 + n // 2) % n
            s_sum = 2 * a - (na - 1) + (r - 1)
            r1, r2 = (s_sum - rd) // 2, (s_sum + rd) // 2
            p1 = stir_detector_xyz(d1, r1, n, r, radius, spacing, view_offset)
            p2 = stir_detector_xyz(d2, r2, n, r, radius, spacing, view_offset)
            value = block[a, v, ti]
            if value == 0:  # only a radial position petbind's layout lacks
                assert abs(t) == num_radial // 2 and num_radial % 2 == 0
                continue
            b = int(value) - 1
            same = np.allclose(start[b], p1, atol=1e-6) and np.allclose(end[b], p2, atol=1e-6)
            flipped = np.allclose(start[b], p2, atol=1e-6) and np.allclose(end[b], p1, atol=1e-6)
            assert same or flipped, (a, v, t)
            checked += 1
    assert checked == layout.num_bins  # every petbind bin written once


def _stir_file(folder, pd, blocks, order, by_view=True, extra=""):
    """Write a STIR projection-data file by hand: segments in ``order`` (indices into pd.segments)."""
    nv, nt = pd.num_views, pd.num_tangential
    parts = [blocks[i].transpose(1, 0, 2) if by_view else blocks[i] for i in order]
    np.concatenate([p.astype("<f4").ravel() for p in parts]).tofile(folder / "p.s")
    segs = [pd.segments[i] for i in order]
    lst = lambda xs: "{" + ",".join(str(x) for x in xs) + "}"  # noqa: E731
    ax, vw = ("2", "3") if by_view else ("3", "2")
    (folder / "p.hs").write_text(
        "!INTERFILE :=\nname of data file := p.s\n" + extra + "!PET data type := Emission\n"
        "!number format := float\n!number of bytes per pixel := 4\nnumber of dimensions := 4\n"
        f"matrix axis label [4] := segment\n!matrix size [4] := {len(segs)}\n"
        f"matrix axis label [{vw}] := view\n!matrix size [{vw}] := {nv}\n"
        f"matrix axis label [{ax}] := axial coordinate\n!matrix size [{ax}] := {lst(s.num_axial for s in segs)}\n"
        f"matrix axis label [1] := tangential coordinate\n!matrix size [1] := {nt}\n"
        f"minimum ring difference per segment := {lst(s.min_ring_difference for s in segs)}\n"
        f"maximum ring difference per segment := {lst(s.max_ring_difference for s in segs)}\n"
        "!END OF INTERFILE :=\n"
    )
    return folder / "p.hs"


@pytest.mark.parametrize("num_tangential, by_view", [(129, True), (128, False)])
def test_projection_in_stir_conventions_equals_petbind_projection(tmp_path, num_tangential, by_view):
    """An asymmetric phantom projected along STIR's LORs (phi, s, m of each STIR bin), stored as STIR stores it
    (segments 0, -1, +1), read back: equals petbind's own projection of the phantom."""
    segs = [StirSegment(0, 0, 0, 16), StirSegment(-1, -1, -1, 15), StirSegment(1, 1, 1, 15)]
    pd = StirProjData(384, 16, 380.0, 6.75, 0.0, segs, 192, num_tangential)
    grid = ImageGrid((48, 48, 16), (6.0, 6.0, 6.75))
    x = np.zeros(grid.shape, np.float32)
    x[10:20, 25:30, 3:6] = 1
    x[30:33, 10:40, 8:12] = 2
    x[22:26, 22:26, :] = 0.5
    blocks = [LORProjector(*pd.lor_endpoints_mm(i), grid, device="cpu").forward(x) for i in range(3)]
    hs = _stir_file(tmp_path, pd, blocks, [0, 1, 2], by_view, extra="originating system := PRT-1\n")
    s = read_interfile_sinogram(hs)
    assert s.layout.scanner.name == "PRT-1" and s.layout.num_radial == 129
    ref = SinogramProjector(s.layout, grid, device="cpu").forward(x)
    m = s.measured
    assert m.mean() > 0.98
    assert np.corrcoef(ref[m], s.data[m])[0, 1] > 0.9995
    assert s.data.sum() == pytest.approx(ref[m].sum(), rel=1e-3)


def test_segment_order_comes_from_the_header_lists(tmp_path):
    segs = [StirSegment(0, 0, 0, 4), StirSegment(-1, -1, -1, 3), StirSegment(1, 1, 1, 3)]
    pd = StirProjData(16, 4, 60.0, 4.0, 0.0, segs, 8, 7)
    rng = np.random.default_rng(2)
    blocks = [rng.random((s.num_axial, 8, 7)) for s in segs]
    a = read_interfile_sinogram(_stir_file(tmp_path, pd, blocks, [1, 0, 2], extra="number of rings := 4\n"
                                           "number of detectors per ring := 16\ninner ring diameter (cm) := 12\n"
                                           "distance between rings (cm) := 0.4\n"))
    b = read_interfile_sinogram(_stir_file(tmp_path, pd, blocks, [2, 1, 0], extra="number of rings := 4\n"
                                           "number of detectors per ring := 16\ninner ring diameter (cm) := 12\n"
                                           "distance between rings (cm) := 0.4\n"))
    np.testing.assert_array_equal(a.data, b.data)
    assert a.data.sum() == pytest.approx(sum(bl.sum() for bl in blocks), rel=1e-6)


@pytest.mark.parametrize("name, detectors, rings", [("Siemens mMR", 504, 64), ("ECAT 931", 512, 8), ("ECAT 953", 384, 16),
                                                    ("ECAT 962", 576, 32), ("PRT-1", 384, 16)])
def test_scanner_name_alone_is_enough(tmp_path, name, detectors, rings):
    sc = scanner_from_stir_name(name)
    assert (sc.crystals_per_ring, sc.num_rings) == (detectors, rings)
    pd = StirProjData(detectors, rings, sc.radius_mm, float(np.diff(sc.ring_z_mm)[0]), 0.0,
                      [StirSegment(0, 0, 0, rings)], detectors // 2, 5)
    hs = _stir_file(tmp_path, pd, [np.ones((rings, detectors // 2, 5))], [0], extra=f"originating system := {name}\n")
    s = read_interfile_sinogram(hs)
    assert s.layout.scanner == sc
    assert s.data[s.measured].min() == 1


def test_arc_corrected_and_mashed_data_keep_their_own_lors(tmp_path):
    text = (LOCAL / "Utahscat600k_ca_seg4.hs").read_text()
    h = read_interfile_header(LOCAL / "Utahscat600k_ca_seg4.hs")
    pd, by_view, _ = stir_projdata_from_header(h, "Utah")
    nsino = sum(s.num_axial for s in pd.segments)
    np.arange(nsino * 96 * 128, dtype="<f4").tofile(tmp_path / "Utahscat600k_ca_seg4.s")
    (tmp_path / "u.hs").write_text(text)
    s = read_interfile_sinogram(tmp_path / "u.hs")
    assert s.layout is None and s.data.shape == (nsino, 96, 128)
    start, end = s.lor_endpoints_mm()
    assert start.shape == (nsino, 96, 128, 3)
    # arc-corrected: bin t lies |t| * 3.1088 mm from the axis; the view offset makes view 0 vertical
    d = end[..., :2] - start[..., :2]
    dist = np.abs(d[..., 0] * start[..., 1] - d[..., 1] * start[..., 0]) / np.hypot(d[..., 0], d[..., 1])
    np.testing.assert_allclose(dist[0, 7], np.abs(np.arange(128) - 64) * 3.1088, atol=1e-6)
    np.testing.assert_allclose(d[0, 0, 64, 0], 0, atol=1e-6)
    with pytest.raises(ValueError, match="arc correction"):
        pd.default_layout()


def test_view_mashed_crystal_pair_data_are_refused_as_crystal_pairs():
    pd = StirProjData(16, 2, 60.0, 4.0, 0.0, [StirSegment(0, 0, 0, 2)], 4, 5)
    with pytest.raises(ValueError, match="view mashing 2"):
        pd.default_layout()


def test_tof_sinogram_round_trip_and_direction(tmp_path):
    n, r = 32, 2
    sc = StirProjData(n, r, 100.0, 4.0, 0.0, [StirSegment(0, 0, 0, 2)], 16, 3).scanner()
    layout = SinogramLayout(sc, 15, 0, 1)
    tof = TOFParameters(5, 20.0, 300.0)
    # a point source off-centre along x: TOF puts it towards +x whichever end a bin starts from
    grid = ImageGrid((40, 40, 2), 5.0)
    x = np.zeros(grid.shape, np.float32)
    x[29, 20, :] = 1  # x = +47.5 mm, y = +2.5 mm
    proj = SinogramProjector(layout, grid, tof=tof, device="cpu")
    y = proj.forward(x)
    write_interfile_sinogram(tmp_path / "t.hs", y, layout, tof=tof)
    h = read_interfile_header(tmp_path / "t.hs")
    assert h["number of dimensions"] == "5" and h["matrix axis label[5]"] == "timing positions"
    assert float(h["size of unmashed tof time bins (ps)"]) == pytest.approx(20.0 * 2 / 0.299792458)
    back = read_interfile_sinogram(tmp_path / "t.hs")
    np.testing.assert_allclose(back.data, y)
    assert back.tof.num_bins == 5 and back.tof.bin_width_mm == pytest.approx(20.0)
    # STIR's view: timing position k is centred k * w from the midpoint towards the bin's first detector
    raw = np.fromfile(tmp_path / "t.s", "<f4").reshape(5, 2, 16, 15)  # timing, axial, view, tangential
    d1 = (np.arange(16)[:, None] + np.floor_divide(np.arange(15) - 7, 2)) % n
    d2 = (np.arange(16)[:, None] - np.floor_divide(np.arange(15) - 6, 2) + n // 2) % n
    p1 = stir_detector_xyz(d1, 0, n, r, 100.0, 4.0)[..., :2]
    p2 = stir_detector_xyz(d2, 0, n, r, 100.0, 4.0)[..., :2]
    u = (p1 - p2) / np.linalg.norm(p1 - p2, axis=-1, keepdims=True)
    along = ((np.array([47.5, 2.5]) - (p1 + p2) / 2) * u).sum(-1)  # source position towards d1 (mm)
    prof = raw[:, 0]
    hit = prof.sum(0) > 0.5 * prof.sum(0).max()
    peak = (np.arange(5) - 2)[prof.argmax(0)] * 20.0
    assert hit.sum() >= 5
    np.testing.assert_array_less(np.abs(peak[hit] - along[hit]), 10.0 + 1e-6)


def test_sinogram_errors(tmp_path):
    sc = Scanner.cylindrical(100.0, 16, 5, 4.0)
    layout = SinogramLayout(sc, 9, 2, 1)
    path = tmp_path / "s.hs"
    with pytest.raises(ValueError, match="shape"):
        write_interfile_sinogram(path, np.zeros((2, 2, 2), np.float32), layout)
    write_interfile_sinogram(path, np.zeros(layout.shape, np.float32), layout)
    text = path.read_text()
    assert "matrix size [3] := { 3,4,5,4,3}" in text
    path.write_text(text.replace("!matrix size [3] := { 3,4,5,4,3}", "!matrix size [3] := { 3,4,5,4}"))
    with pytest.raises(ValueError, match="s.hs.*matrix size\\[3\\]"):
        read_interfile_sinogram(path)
    path.write_text(text.replace("!matrix size [3] := { 3,4,5,4,3}", "!matrix size [3] := { 3,4,6,4,3}"))
    with pytest.raises(ValueError, match="s.hs.*segment 0"):
        read_interfile_sinogram(path)
    path.write_text(text.replace("!END OF", "segment sequence := {0,1,-1,2,-2}\n!END OF"))
    with pytest.raises(ValueError, match="s.hs.*segment sequence.*petbind < 0.3"):
        read_interfile_sinogram(path)
    path.write_text(text.replace("Inner ring diameter (cm)", "Inner ring").replace("originating system := userdefined", "originating system := Foo"))
    with pytest.raises(ValueError, match="s.hs.*inner ring diameter.*not one of STIR's scanners"):
        read_interfile_sinogram(path)
    # GE-style segments (0 holds -1..1, the others 2 ring differences) are not a petbind span
    path.write_text(text.replace("{ -2,-1,0,1,2}", "{ -2,-1,-1,1,2}", 1).replace("{ -2,-1,0,1,2}", "{ -2,-2,1,1,2}", 1))
    with pytest.raises(ValueError, match="s.hs"):
        read_interfile_sinogram(path)
    (tmp_path / "x.hs").write_text("just text\n")
    with pytest.raises(ValueError, match="x.hs.*INTERFILE"):
        read_interfile_sinogram(tmp_path / "x.hs")
