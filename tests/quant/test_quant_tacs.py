import numpy as np
import pytest

from petbind.quant.io import load_atlas, load_pet
from petbind.quant.tacs import extract_tacs, split_reference, tacs_from_image
from tests.quant_helpers import AFFINE, FRAME_END_S, FRAME_START_S, REGION_NAMES, atlas_labels, write_atlas, write_pet


def _slow_means(img, labels, idx):
    """Obvious oracle: loop over regions and frames with boolean masks."""
    out = np.zeros((img.shape[3], len(idx)))
    for j, k in enumerate(idx):
        m = labels == k
        for f in range(img.shape[3]):
            out[f, j] = img[..., f][m].mean()
    return out


def test_extract_matches_slow_loop():
    rng = np.random.default_rng(3)
    labels = atlas_labels()
    img = rng.normal(500.0, 200.0, size=(*labels.shape, FRAME_START_S.size)).astype(np.float32)
    t = extract_tacs(img, labels, REGION_NAMES, FRAME_START_S, FRAME_END_S)
    assert t.region_names == ["cerebellum", "putamen", "caudate"]
    np.testing.assert_allclose(t.values, _slow_means(img.astype(np.float64), labels, [1, 2, 3]), rtol=1e-12)


def test_region_subset_order_and_errors():
    rng = np.random.default_rng(4)
    labels = atlas_labels()
    img = rng.uniform(0, 1, size=(*labels.shape, FRAME_START_S.size))
    t = extract_tacs(img, labels, REGION_NAMES, FRAME_START_S, FRAME_END_S, regions=["caudate", "cerebellum"])
    np.testing.assert_allclose(t.values, _slow_means(img, labels, [3, 1]), rtol=1e-12)
    with pytest.raises(ValueError, match=r"myatlas: region\(s\) \['thalamus'\] not in the label table; available"):
        extract_tacs(img, labels, REGION_NAMES, FRAME_START_S, FRAME_END_S, regions=["thalamus"],
                     atlas_source="myatlas")
    names = {**REGION_NAMES, 4: "thalamus"}
    with pytest.raises(ValueError, match=r"myatlas: region\(s\) \['thalamus'\] have no voxels"):
        extract_tacs(img, labels, names, FRAME_START_S, FRAME_END_S, atlas_source="myatlas")


def test_split_reference():
    rng = np.random.default_rng(5)
    labels = atlas_labels()
    img = rng.uniform(0, 1, size=(*labels.shape, FRAME_START_S.size))
    t = extract_tacs(img, labels, REGION_NAMES, FRAME_START_S, FRAME_END_S)
    ref, names, tac = split_reference(t, "cerebellum")
    assert names == ["putamen", "caudate"]
    np.testing.assert_array_equal(ref, t.values[:, 0])
    np.testing.assert_array_equal(tac, t.values[:, 1:])
    with pytest.raises(ValueError, match=r"region 'cblm' not found; available regions: \['cerebellum'"):
        split_reference(t, "cblm")


def test_tacs_from_files_and_grid_mismatch(tmp_path):
    rng = np.random.default_rng(6)
    labels = atlas_labels()
    img = rng.uniform(10, 20, size=(*labels.shape, FRAME_START_S.size)).astype(np.float32)
    pet = load_pet(write_pet(tmp_path, img))
    atlas = load_atlas(*write_atlas(tmp_path))
    t = tacs_from_image(pet, atlas)
    np.testing.assert_allclose(t.values, _slow_means(img.astype(np.float64), labels, [1, 2, 3]), rtol=1e-10)
    shifted = AFFINE.copy()
    shifted[1, 3] += 2.0
    bad = load_atlas(*write_atlas(tmp_path, affine=shifted, stem="shifted"))
    with pytest.raises(ValueError, match=r"shifted\.nii\.gz: affine differs from .*pet\.nii\.gz"):
        tacs_from_image(pet, bad)
    small = load_atlas(*write_atlas(tmp_path, labels=labels[:-1], stem="small"))
    with pytest.raises(ValueError, match=r"small\.nii\.gz: grid shape \(9, 12, 6\) differs"):
        tacs_from_image(pet, small)
