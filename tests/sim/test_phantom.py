import numpy as np
import pytest

from petbind.recon.geometry import ImageGrid
from petbind.sim.phantom import activity_image, load_brain_phantom, read_label_table, resample_phantom

REQUIRED = [
    "scalp", "skull", "csf", "ventricles", "white_matter", "frontal_cortex", "temporal_cortex",
    "occipital_cortex", "caudate", "putamen", "ventral_striatum", "pallidum", "thalamus",
    "hippocampus", "brainstem", "raphe", "cerebellum",
]


@pytest.fixture(scope="module")
def phantom():
    return load_brain_phantom()


def test_every_named_region_present_and_table_consistent(phantom):
    names = list(phantom.label_table.values())
    assert len(set(names)) == len(names)
    for name in REQUIRED:
        assert name in names
    present = set(np.unique(phantom.labels).tolist())
    assert present == set(phantom.label_table), "every table entry appears in the image and vice versa"
    counts = np.bincount(phantom.labels.ravel())
    for idx in phantom.label_table:
        assert counts[idx] > 0


def test_geometry_is_head_sized(phantom):
    vox = np.abs(np.diag(phantom.affine)[:3])
    assert np.allclose(vox, 2.0)
    head = phantom.labels > 0
    # Above the neck: width 130-170 mm left-right, length 170-220 mm front-back.
    upper = head & (np.arange(head.shape[2])[None, None, :] * vox[2] + phantom.affine[2, 3] > 0)
    xs = np.nonzero(upper.any(axis=(1, 2)))[0]
    ys = np.nonzero(upper.any(axis=(0, 2)))[0]
    assert 130 <= (np.ptp(xs) + 1) * vox[0] <= 170
    assert 170 <= (np.ptp(ys) + 1) * vox[1] <= 220
    brain_names = [n for n in phantom.label_table.values() if n not in ("background", "scalp", "skull", "csf", "ventricles")]
    brain = np.isin(phantom.labels, [phantom.index_of(n) for n in brain_names])
    volume_ml = brain.sum() * np.prod(vox) / 1000
    assert 1100 <= volume_ml <= 1700  # adult brain volume


def test_mu_map_values_in_range(phantom):
    mu = phantom.mu_map_per_mm
    assert mu.shape == phantom.labels.shape
    assert np.all(mu[phantom.labels == 0] == 0)
    bone = mu[phantom.labels == phantom.index_of("skull")]
    soft = mu[(phantom.labels > 0) & (phantom.labels != phantom.index_of("skull"))]
    # NIST XCOM at 511 keV: water 0.0966 /cm, cortical bone ~0.17 /cm.
    assert np.all((bone > 0.015) & (bone < 0.019))
    assert np.all((soft > 0.0090) & (soft < 0.0105))


def test_label_table_errors(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("index\tlabel\n0\tbackground\n")
    with pytest.raises(ValueError, match="'index' and 'name'"):
        read_label_table(p)
    p.write_text("index\tname\n0\tbackground\n0\tbrain\n")
    with pytest.raises(ValueError, match="twice"):
        read_label_table(p)


def test_resample_integer_factor_matches_block_average(phantom):
    # 4 mm grid aligned with pairs of 2 mm voxels: fractions are exact block averages.
    src = phantom.grid
    shape = tuple(s // 2 for s in src.shape)
    grid = ImageGrid(shape, 4.0, src.origin_mm + 1.0)
    res = resample_phantom(grid, phantom)
    lab = phantom.labels[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]]
    idx = phantom.index_of("putamen")
    block = (lab == idx).reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(res.fractions[idx], block, atol=1e-6)
    np.testing.assert_allclose(res.fractions.sum(axis=0), 1.0, atol=1e-6)
    mu_block = phantom.mu_map_per_mm[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]]
    mu_block = mu_block.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(res.mu_map_per_mm, mu_block, rtol=1e-5, atol=1e-7)
    # Total activity is conserved by the partial-volume image.
    values = {"putamen": 10.0, "cerebellum": 3.0, "white_matter": 1.0}
    fine = activity_image(phantom, values)
    coarse = activity_image(res, values)
    np.testing.assert_allclose(coarse.sum() * 8, fine[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]].sum(), rtol=1e-5)


def test_resample_outside_field_is_background(phantom):
    grid = ImageGrid((4, 4, 4), 8.0, (400.0, 400.0, 400.0))
    res = resample_phantom(grid, phantom)
    assert np.all(res.labels == 0)
    np.testing.assert_allclose(res.fractions[0], 1.0)
    assert np.all(res.mu_map_per_mm == 0)


def test_activity_image_frames_and_errors(phantom):
    grid = ImageGrid((20, 24, 20), 8.0)
    res = resample_phantom(grid, phantom)
    tac = np.array([1.0, 2.0, 3.0])
    img = activity_image(res, {"cerebellum": tac})
    assert img.shape == grid.shape + (3,)
    np.testing.assert_allclose(img[..., 2], 3 * img[..., 0], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown region 'cortex'"):
        activity_image(res, {"cortex": 1.0})
