"""Geometry: grids, scanners, sinogram layouts and TOF parameters."""

import numpy as np
import pytest

from petbind.recon.geometry import SPEED_OF_LIGHT_MM_PER_PS, ImageGrid, Scanner, SinogramLayout, TOFParameters


def test_image_grid_centred_and_affine():
    g = ImageGrid((4, 6, 3), (2.0, 1.5, 3.0))
    np.testing.assert_allclose(g.origin_mm, [-3.0, -3.75, -3.0])
    centres = g.voxel_centres_mm()
    np.testing.assert_allclose(centres.reshape(-1, 3).mean(0), 0.0, atol=1e-12)
    # the affine maps voxel indices to the voxel centres
    ijk = np.array([3, 5, 2, 1.0])
    np.testing.assert_allclose((g.affine @ ijk)[:3], centres[3, 5, 2])
    assert ImageGrid.from_affine(g.shape, g.affine) == g
    assert "voxel_size_mm=(2, 1.5, 3)" in repr(g)
    with pytest.raises(ValueError, match="3 positive integers"):
        ImageGrid((4, 4), 1.0)
    with pytest.raises(ValueError, match="positive"):
        ImageGrid((4, 4, 4), (1.0, -1.0, 1.0))


def test_cylindrical_scanner_positions():
    s = Scanner.cylindrical(330.0, 400, 16, 4.0)
    pos = s.detector_positions_mm()
    assert pos.shape == (6400, 3)
    np.testing.assert_allclose(np.hypot(pos[:, 0], pos[:, 1]), 330.0)
    np.testing.assert_allclose(np.unique(pos[:, 2]), (np.arange(16) - 7.5) * 4.0)
    # id = ring * crystals_per_ring + crystal
    np.testing.assert_allclose(pos[3 * 400 + 17, :2], s.crystal_xy_mm[17])


def test_polygon_modules_are_flat():
    s = Scanner.polygon(8, 10, 4.0, 200.0, 2, 4.0, gap_crystals_per_module=1)
    assert s.crystals_per_ring == 88
    assert (~s.crystal_mask).sum() == 8
    module = s.crystal_xy_mm[:11]
    # all crystals of a module lie on the line x = 200 (module 0 faces +x)
    np.testing.assert_allclose(module[:, 0], 200.0)
    np.testing.assert_allclose(np.diff(module[:, 1]), 4.0)


def test_hrrt_preset_is_an_octagon():
    s = Scanner.hrrt()
    assert s.crystals_per_ring == 576 and s.num_rings == 104
    phi = np.arctan2(s.crystal_xy_mm[:, 1], s.crystal_xy_mm[:, 0])
    # each head's crystals lie on a line at 234.5 mm whose normal is the head's direction
    for head in range(8):
        xy = s.crystal_xy_mm[head * 72:(head + 1) * 72]
        normal = np.array([np.cos(head * np.pi / 4), np.sin(head * np.pi / 4)])
        np.testing.assert_allclose(xy @ normal, 234.5, atol=1e-9)
    assert np.ptp(phi) > 0


def test_mmr_preset():
    s = Scanner.mmr()
    assert s.crystals_per_ring == 504 and s.num_rings == 64
    assert (~s.crystal_mask).sum() == 56
    assert s.radius_mm == pytest.approx(328.0, abs=2.0)
    np.testing.assert_allclose(np.diff(s.ring_z_mm), 4.0625)
    # The mMR's span-11 sinogram with maximum ring difference 60 has 837 planes
    assert SinogramLayout(s, 344, max_ring_difference=60, span=11).shape == (837, 252, 344)


@pytest.mark.parametrize("span", [1, 3, 5])
def test_layout_planes_cover_each_ring_pair_once(span):
    s = Scanner.cylindrical(100.0, 32, 7, 4.0)
    lay = SinogramLayout(s, 15, max_ring_difference=5, span=span)
    nr = s.num_rings
    expected_pairs = sum(1 for a in range(nr) for b in range(nr) if abs(a - b) <= 5)
    assert lay.plane_multiplicity.sum() == expected_pairs
    if span == 1:
        assert lay.num_planes == expected_pairs
    # segment 0 of span 3 has 2 * num_rings - 1 planes (direct and cross planes)
    if span == 3:
        assert (lay.plane_segment == 0).sum() == 2 * nr - 1
    # plane z positions are the mean ring positions of their pairs
    z = s.ring_z_mm
    for p in range(lay.num_planes):
        pairs = lay.ring_pairs[lay.plane_of_ring_pair == p]
        np.testing.assert_allclose(lay.plane_z_mm[p], [z[pairs[:, 0]].mean(), z[pairs[:, 1]].mean()])


def test_layout_crystal_pairs_are_parallel_within_a_view():
    s = Scanner.cylindrical(100.0, 64, 1, 4.0)
    lay = SinogramLayout(s, 21)
    st, en = lay.lor_endpoints_mm()
    d = en[0] - st[0]
    ang = np.arctan2(d[..., 1], d[..., 0]) % np.pi
    # within a view the LOR angles differ by at most half a crystal step
    rel = (ang - ang[:, :1] + np.pi / 2) % np.pi - np.pi / 2
    assert np.all(np.ptp(rel, axis=1) <= np.pi / 64 + 1e-6)
    # radial offset increases monotonically along the radial axis
    mid = 0.5 * (st[0] + en[0])
    normal = np.stack([-np.sin(ang), np.cos(ang)], -1)
    r = (mid[..., :2] * normal).sum(-1)
    assert np.all(np.abs(np.diff(np.abs(r[5]))) > 0)
    assert len(lay.view_subsets(4)) == 4
    assert sorted(np.concatenate(lay.view_subsets(4)).tolist()) == list(range(lay.num_views))


def test_layout_detector_pairs_match_endpoints():
    s = Scanner.cylindrical(100.0, 32, 3, 4.0)
    lay = SinogramLayout(s, 15)
    pairs = lay.detector_pairs()
    pos = s.detector_positions_mm()
    st, en = lay.lor_endpoints_mm()
    np.testing.assert_allclose(pos[pairs[..., 0]], st)
    np.testing.assert_allclose(pos[pairs[..., 1]], en)


def test_layout_bad_arguments():
    s = Scanner.cylindrical(100.0, 32, 3, 4.0)
    with pytest.raises(ValueError, match="num_radial"):
        SinogramLayout(s, 40)
    with pytest.raises(ValueError, match="span"):
        SinogramLayout(s, 15, span=2)
    with pytest.raises(ValueError, match="max_ring_difference"):
        SinogramLayout(s, 15, max_ring_difference=3)


def test_tof_parameters_units():
    tof = TOFParameters(num_bins=13, bin_width_mm=20.0, fwhm_ps=400.0)
    assert tof.fwhm_mm == pytest.approx(400 * SPEED_OF_LIGHT_MM_PER_PS / 2)  # ~60 mm
    assert tof.sigma_mm == pytest.approx(tof.fwhm_mm / 2.354820045, rel=1e-9)
    np.testing.assert_allclose(tof.bin_centres_mm()[[0, 6, 12]], [-120.0, 0.0, 120.0])
    t2 = TOFParameters.from_bin_width_ps(13, 2 * 20.0 / SPEED_OF_LIGHT_MM_PER_PS, 400.0)
    assert t2.bin_width_mm == pytest.approx(20.0)
    with pytest.raises(ValueError):
        TOFParameters(0, 1.0, 100.0)


def test_presets_know_their_resolution():
    from petbind.recon.geometry import SCANNER_PRESETS

    # published (mMR: Delso 2011; HRRT: de Jong 2007) and stated (demo scanners) FWHM, mm
    expected = {"mmr": 4.3, "hrrt": 2.5, "demo": 3.5, "demo-small": 6.5}
    assert set(SCANNER_PRESETS) == set(expected)
    for name, fwhm in expected.items():
        s = Scanner.preset(name)
        assert s.name == name and s.resolution_fwhm_mm == fwhm
    assert Scanner.cylindrical(100.0, 16, 2, 4.0).resolution_fwhm_mm is None
    with pytest.raises(ValueError, match="unknown scanner 'pet3000'; choose one of demo-small, demo"):
        Scanner.preset("pet3000")
    with pytest.raises(ValueError, match="resolution_fwhm_mm"):
        Scanner.cylindrical(100.0, 16, 2, 4.0, resolution_fwhm_mm=-1.0)
