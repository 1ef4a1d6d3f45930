"""Slow, obviously-correct NumPy Joseph projectors.

These are the oracle the compiled kernels are tested against, and the
fallback used (with a warning) when no C++ compiler exists.  One Python
iteration per LOR; the samples along a LOR are vectorised.  Same conventions
as ``joseph.cu`` (see ``recon/geometry.py``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

__all__ = ["forward_reference", "back_reference"]


def _samples(start, end, grid):
    """Joseph samples of one LOR.

    Returns flat voxel indices (S, 4), bilinear weights (S, 4), the ray length
    per sample (mm) and each sample's signed distance from the LOR midpoint (mm).
    """
    shape = np.asarray(grid.shape)
    vox = np.asarray(grid.voxel_size_mm, dtype=np.float64)
    origin = np.asarray(grid.origin_mm, dtype=np.float64)
    start = np.asarray(start, dtype=np.float64)
    d = np.asarray(end, dtype=np.float64) - start
    a = int(np.argmax(np.abs(d) / vox))
    empty = (np.zeros((0, 4), int), np.zeros((0, 4)), 0.0, np.zeros(0))
    if d[a] == 0:
        return empty
    b, c = (a + 1) % 3, (a + 2) % 3
    length = np.linalg.norm(d)
    step = vox[a] * length / abs(d[a])
    i = np.arange(shape[a])
    t = (origin[a] + i * vox[a] - start[a]) / d[a]
    keep = (t >= 0) & (t <= 1)
    i, t = i[keep], t[keep]
    ub = (start[b] + t * d[b] - origin[b]) / vox[b]
    uc = (start[c] + t * d[c] - origin[c]) / vox[c]
    jb, jc = np.floor(ub).astype(int), np.floor(uc).astype(int)
    fb, fc = ub - jb, uc - jc
    idx = np.full((i.size, 4), -1, dtype=np.int64)
    w = np.empty((i.size, 4))
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    for q, (ob, oc, wq) in enumerate(
        [(0, 0, (1 - fb) * (1 - fc)), (1, 0, fb * (1 - fc)), (0, 1, (1 - fb) * fc), (1, 1, fb * fc)]
    ):
        kb, kc = jb + ob, jc + oc
        ok = (kb >= 0) & (kb < shape[b]) & (kc >= 0) & (kc < shape[c])
        idx[ok, q] = i[ok] * strides[a] + kb[ok] * strides[b] + kc[ok] * strides[c]
        w[:, q] = wq
    return idx, w, step, (t - 0.5) * length


def _tof_weights(x, tof):
    """(S, num_bins) TOF weights: Gaussian truncated at ±num_sigmas·σ, renormalised
    over the bins it overlaps."""
    sigma, half = tof.sigma_mm, tof.num_sigmas * tof.sigma_mm
    lower = tof.bin_centres_mm() - 0.5 * tof.bin_width_mm
    edges = np.append(lower, lower[-1] + tof.bin_width_mm)
    clipped = np.clip(edges[None, :], x[:, None] - half, x[:, None] + half)
    mass = np.diff(erf((clipped - x[:, None]) / (np.sqrt(2) * sigma)), axis=1)
    total = mass.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, mass / np.where(total > 0, total, 1), 0.0)


def forward_reference(image, lor_start, lor_end, grid, tof=None, tof_bin=None):
    """Line integrals of ``image`` along each LOR (image units × mm).

    Returns shape (N,), or (N, num_bins) with ``tof`` and no ``tof_bin``.
    """
    flat = np.asarray(image, dtype=np.float64).ravel()
    start = np.asarray(lor_start, dtype=np.float64).reshape(-1, 3)
    end = np.asarray(lor_end, dtype=np.float64).reshape(-1, 3)
    n = start.shape[0]
    out = np.zeros((n, tof.num_bins) if (tof is not None and tof_bin is None) else n)
    for k in range(n):
        idx, w, step, x = _samples(start[k], end[k], grid)
        vals = (np.where(idx >= 0, flat[np.maximum(idx, 0)], 0.0) * w).sum(axis=1) * step
        if tof is None:
            out[k] = vals.sum()
        elif tof_bin is None:
            out[k] = vals @ _tof_weights(x, tof)
        else:
            out[k] = vals @ _tof_weights(x, tof)[:, int(tof_bin[k])]
    return out


def back_reference(values, lor_start, lor_end, grid, tof=None, tof_bin=None):
    """Adjoint of :func:`forward_reference`: an image of ``grid.shape``."""
    img = np.zeros(grid.num_voxels)
    start = np.asarray(lor_start, dtype=np.float64).reshape(-1, 3)
    end = np.asarray(lor_end, dtype=np.float64).reshape(-1, 3)
    values = np.asarray(values, dtype=np.float64)
    for k in range(start.shape[0]):
        idx, w, step, x = _samples(start[k], end[k], grid)
        if tof is None:
            s = np.full(idx.shape[0], values[k])
        elif tof_bin is None:
            s = _tof_weights(x, tof) @ values[k]
        else:
            s = _tof_weights(x, tof)[:, int(tof_bin[k])] * values[k]
        contrib = w * (s * step)[:, None]
        ok = idx >= 0
        np.add.at(img, idx[ok], contrib[ok])
    return img.reshape(grid.shape)
