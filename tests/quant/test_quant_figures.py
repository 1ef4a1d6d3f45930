import os

import numpy as np
import pytest
from matplotlib.image import imread

from petbind.quant import figures
from tests.quant_helpers import FRAME_END_S, FRAME_START_S, atlas_labels, srtm_tacs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=5000):
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC
    assert len(raw) > min_bytes
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn
    assert not [f for f in os.listdir(path.parent) if ".tmp" in f]


def test_tac_fit_figure(tmp_path):
    ref, tg = srtm_tacs([1.0, 2.0, 0.5])
    fitted = tg * 1.01
    fitted[:, 2] = np.nan  # failed fit: points only
    p = figures.plot_tac_fits(tmp_path / "fits.png", FRAME_START_S, FRAME_END_S, ref, tg, fitted,
                              ["putamen", "caudate", "thalamus"], model="srtm", bp_nd=[1.0, 2.0, np.nan])
    _check_png(p)
    with pytest.raises(ValueError, match="2 names"):
        figures.plot_tac_fits(tmp_path / "bad.png", FRAME_START_S, FRAME_END_S, ref, tg, tg, ["a", "b"])
    assert not (tmp_path / "bad.png").exists()


def test_map_and_change_montages(tmp_path):
    labels = atlas_labels().astype(float)
    bp = np.where(labels > 1, labels * 0.8, np.nan)
    _check_png(figures.plot_map_montage(tmp_path / "bp.png", bp, anatomy=labels, title="BP"))
    change = np.where(labels > 1, np.where(labels == 2, -0.5, 0.3), np.nan)
    _check_png(figures.plot_change_montage(tmp_path / "d.png", change, anatomy=labels))
    with pytest.raises(ValueError, match="anatomy shape"):
        figures.plot_map_montage(tmp_path / "x.png", bp, anatomy=labels[:-1])


def test_region_change_plot(tmp_path):
    regions = ["putamen", "caudate", "thalamus"]
    groups = {"drug": ([-0.8, -0.6, -0.1], [-1.0, -0.9, -0.3], [-0.6, -0.3, 0.1]),
              "placebo": ([0.0, 0.05, np.nan], [-0.2, -0.1, np.nan], [0.2, 0.2, np.nan])}
    _check_png(figures.plot_region_changes(tmp_path / "r.png", regions, groups))
