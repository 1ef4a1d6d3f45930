"""Small synthetic PET studies for the quant tests (no recon import)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

FRAME_DUR_S = np.array([30.0] * 4 + [60.0] * 4 + [300.0] * 6)
FRAME_START_S = np.concatenate([[0.0], np.cumsum(FRAME_DUR_S)[:-1]])
FRAME_END_S = FRAME_START_S + FRAME_DUR_S

AFFINE = np.array([[2.0, 0, 0, -10.0], [0, 2.0, 0, -12.0], [0, 0, 2.5, -5.0], [0, 0, 0, 1.0]])
REGION_NAMES = {1: "cerebellum", 2: "putamen", 3: "caudate"}


def atlas_labels(shape=(10, 12, 6)) -> np.ndarray:
    """Three box regions on a (10, 12, 6) grid; label 0 elsewhere."""
    lab = np.zeros(shape, dtype=np.int16)
    lab[1:4, 1:5, 1:3] = 1
    lab[5:9, 2:6, 1:4] = 2
    lab[2:6, 7:11, 3:5] = 3
    return lab


def write_atlas(tmp: Path, labels=None, names=None, affine=AFFINE, stem="atlas"):
    labels = atlas_labels() if labels is None else labels
    names = REGION_NAMES if names is None else names
    nii = tmp / f"{stem}.nii.gz"
    tsv = tmp / f"{stem}.tsv"
    nib.save(nib.Nifti1Image(labels, affine), str(nii))
    tsv.write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in names.items()))
    return nii, tsv


def write_pet(tmp: Path, data, sidecar=None, affine=AFFINE, stem="pet"):
    nii = tmp / f"{stem}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(nii))
    side = {"FrameTimesStart": FRAME_START_S.tolist(), "FrameDuration": FRAME_DUR_S.tolist(),
            "Units": "Bq/mL", "TracerRadionuclide": "C11"} if sidecar is None else sidecar
    (tmp / f"{stem}.json").write_text(json.dumps(side))
    return nii


def srtm_tacs(bp_nd, r1=1.0, k2_per_min=0.3, t_end_min=None):
    """Reference TAC and SRTM target TACs on the test frames (frame-mean, fine-grid convolution).

    Returns (reference (n_frames,), targets (n_frames, n_targets)) in Bq/mL.
    """
    bp = np.atleast_1d(np.asarray(bp_nd, dtype=float))
    dt = 1.0 / 60.0  # 1 s grid in minutes
    t = np.arange(0.0, FRAME_END_S[-1] / 60.0 + dt, dt)
    cr = 20000.0 * t * np.exp(-t / 2.0) + 3000.0 * (1 - np.exp(-t / 3.0)) * np.exp(-t / 60.0)
    out = []
    for b in bp:
        k2a = k2_per_min / (1.0 + b)
        conv = np.convolve(cr, np.exp(-k2a * t))[: t.size] * dt
        ct = r1 * cr + (k2_per_min - r1 * k2a) * conv
        out.append(ct)
    mids = [(t >= s / 60.0) & (t < e / 60.0) for s, e in zip(FRAME_START_S, FRAME_END_S)]
    ref = np.array([cr[m].mean() for m in mids])
    tg = np.array([[c[m].mean() for c in out] for m in mids])
    return ref, tg
