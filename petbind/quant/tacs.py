"""Regional time-activity curves from a 4-D PET image and a label atlas.

The regional mean of frame ``f`` in region ``r`` is

.. math:: C_r(f) = \\frac{1}{|R_r|} \\sum_{v \\in R_r} I(v, f)

computed for all regions at once with ``numpy.bincount`` (one call per frame,
never a Python loop over voxels).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from tqdm import tqdm

from petbind.quant.io import Atlas, PETImage, TACTable, check_same_grid

logger = logging.getLogger(__name__)

__all__ = ["extract_tacs", "tacs_from_image", "split_reference"]


def extract_tacs(
    image_4d: np.ndarray,
    labels: np.ndarray,
    names: dict,
    frame_start_s,
    frame_end_s,
    regions: Sequence[str] | None = None,
    source: str = "image",
    atlas_source: str = "atlas",
    progress: bool = False,
) -> TACTable:
    """Mean activity per region and frame.

    Parameters
    ----------
    image_4d : ndarray, shape (x, y, z, t)
        Activity concentration (Bq/mL).
    labels : ndarray of int, shape (x, y, z)
        Region labels, 0 = background.
    names : dict[int, str]
        Label index -> region name.
    frame_start_s, frame_end_s : array_like, shape (t,)
        Frame timing, seconds from injection.
    regions : sequence of str, optional
        Subset of region names, in output order; default all named regions
        in increasing label order.
    source, atlas_source : str
        File names used in error messages.
    progress : bool
        Show a tqdm progress bar over frames (large images).

    Returns
    -------
    TACTable
        Values in Bq/mL, one column per region.

    Raises
    ------
    ValueError
        Shape mismatch, a requested region that is not in ``names`` (message
        lists available names), or a region with no voxels.
    """
    image_4d = np.asarray(image_4d)
    labels = np.asarray(labels)
    if image_4d.ndim != 4:
        raise ValueError(f"{source}: expected a 4-D (x, y, z, t) image, got shape {image_4d.shape}")
    if labels.shape != image_4d.shape[:3]:
        raise ValueError(
            f"{atlas_source}: label grid {labels.shape} differs from {source} grid {image_4d.shape[:3]}"
        )
    name_to_index = {str(v): int(k) for k, v in names.items()}
    if regions is None:
        regions = [names[k] for k in sorted(names)]
    else:
        regions = list(regions)
        missing = [r for r in regions if r not in name_to_index]
        if missing:
            raise ValueError(
                f"{atlas_source}: region(s) {missing} not in the label table; available regions: "
                f"{[names[k] for k in sorted(names)]}"
            )
    if not regions:
        raise ValueError(f"{atlas_source}: no regions to extract")
    idx = np.array([name_to_index[r] for r in regions], dtype=np.int64)

    flat_labels = labels.reshape(-1).astype(np.int64)
    n_bins = int(max(flat_labels.max(initial=0), idx.max())) + 1
    counts = np.bincount(flat_labels, minlength=n_bins)
    empty = [r for r, i in zip(regions, idx) if counts[i] == 0]
    if empty:
        raise ValueError(f"{atlas_source}: region(s) {empty} have no voxels in the label image")

    n_frames = image_4d.shape[3]
    flat_img = image_4d.reshape(-1, n_frames)
    values = np.empty((n_frames, idx.size), dtype=np.float64)
    for f in tqdm(range(n_frames), desc="regional means", unit="frame", disable=not progress):
        # bincount accumulates in float64 whatever the image dtype.
        sums = np.bincount(flat_labels, weights=flat_img[:, f], minlength=n_bins)
        values[f] = sums[idx] / counts[idx]
    logger.debug("extracted %d regions x %d frames from %s", idx.size, n_frames, source)
    return TACTable(frame_start_s, frame_end_s, regions, values, source=f"TACs of {source}")


def tacs_from_image(pet: PETImage, atlas: Atlas, regions: Sequence[str] | None = None,
                    progress: bool = False) -> TACTable:
    """:func:`extract_tacs` for loaded files, after checking that grids match.

    Parameters
    ----------
    pet : PETImage
    atlas : Atlas
    regions : sequence of str, optional
    progress : bool
        Progress bar over frames.

    Returns
    -------
    TACTable

    Raises
    ------
    ValueError
        If the atlas grid (shape or affine) differs from the image grid.
    """
    check_same_grid(pet.data.shape, pet.affine, pet.path, atlas.labels.shape, atlas.affine, atlas.path)
    return extract_tacs(pet.data, atlas.labels, atlas.names, pet.frame_start_s, pet.frame_end_s,
                        regions=regions, source=pet.path, atlas_source=atlas.path, progress=progress)


def split_reference(table: TACTable, reference: str, targets: Sequence[str] | None = None):
    """Split a TAC table into the reference TAC and the target TACs.

    Parameters
    ----------
    table : TACTable
    reference : str
        Reference region name (e.g. cerebellar grey matter).
    targets : sequence of str, optional
        Target regions; default all regions except the reference.

    Returns
    -------
    reference_tac : ndarray, shape (n_frames,)
    target_names : list of str
    target_tacs : ndarray, shape (n_frames, n_targets)

    Raises
    ------
    ValueError
        Reference or target missing (message lists available names), or no
        target left.
    """
    ref = table.column(reference)
    if targets is None:
        targets = [n for n in table.region_names if n != reference]
    else:
        targets = list(targets)
        if reference in targets:
            raise ValueError(f"{table.source}: the reference region '{reference}' is also a target; it would be "
                             "fitted against itself")
        for t in targets:
            table.column(t)  # raises with the list of names
    if not targets:
        raise ValueError(f"{table.source}: no target region besides reference '{reference}'")
    tac = np.stack([table.column(t) for t in targets], axis=1)
    return ref, targets, tac
