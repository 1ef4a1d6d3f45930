"""PNG figures for quantification results.

Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas
(no pyplot, no global backend switch, no display needed) and saved atomically
(temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from petbind.core.files import atomic_output

logger = logging.getLogger(__name__)

__all__ = ["plot_tac_fits", "plot_map_montage", "plot_change_montage", "plot_region_changes"]


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path, dpi: int = 100) -> Path:
    with atomic_output(path, make_parents=True) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    logger.debug("wrote %s", path)
    return Path(path)


def plot_tac_fits(
    path: str | os.PathLike,
    frame_start_s,
    frame_end_s,
    reference_tac,
    target_tacs,
    fitted,
    region_names: Sequence[str],
    model: str = "",
    reference_name: str = "reference",
    bp_nd: Sequence[float] | None = None,
) -> Path:
    """One panel per target region: measured TAC (points), model fit (line), reference (grey).

    Parameters
    ----------
    path : str or path-like
        Output PNG.
    frame_start_s, frame_end_s : array_like, shape (n_frames,)
        Frame timing (s); plotted at frame mid times in minutes.
    reference_tac : array_like, shape (n_frames,)
        Reference region TAC (Bq/mL).
    target_tacs, fitted : array_like, shape (n_frames, n_targets)
        Measured and fitted target TACs (Bq/mL).  ``fitted`` may hold NaN
        for failed fits (no line drawn).
    region_names : sequence of str
        Target names (panel titles).
    model : str
        Model name for the figure title.
    reference_name : str
    bp_nd : sequence of float, optional
        BP_ND per target, shown in the panel title.

    Returns
    -------
    pathlib.Path
    """
    t_min = 0.5 * (np.asarray(frame_start_s, float) + np.asarray(frame_end_s, float)) / 60.0
    tac = np.asarray(target_tacs, float).reshape(t_min.size, -1)
    fit = np.asarray(fitted, float).reshape(t_min.size, -1)
    ref = np.asarray(reference_tac, float)
    n = tac.shape[1]
    if len(region_names) != n or fit.shape != tac.shape:
        raise ValueError(
            f"plot_tac_fits: {len(region_names)} names, targets {tac.shape}, fitted {fit.shape}; expected matching"
        )
    ncol = min(4, max(1, n))
    nrow = math.ceil(n / ncol)
    fig = _new_figure(3.2 * ncol, 2.6 * nrow + 0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for k in range(nrow * ncol):
        ax = axes.flat[k]
        if k >= n:
            ax.set_axis_off()
            continue
        ax.plot(t_min, ref / 1e3, color="0.6", lw=1, label=reference_name)
        ax.plot(t_min, tac[:, k] / 1e3, "o", ms=3, color="C0", label="data")
        if np.any(np.isfinite(fit[:, k])):
            ax.plot(t_min, fit[:, k] / 1e3, "-", color="C3", lw=1.5, label="fit")
        title = region_names[k]
        if bp_nd is not None and np.isfinite(bp_nd[k]):
            title += f"  BP$_{{ND}}$={bp_nd[k]:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time (min)", fontsize=8)
        ax.set_ylabel("kBq/mL", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    if model:
        fig.suptitle(f"{model.upper()} fits", fontsize=11)
    return _save(fig, path)


def _pick_slices(volume: np.ndarray, n_slices: int, axis: int) -> list[int]:
    finite = np.isfinite(volume) & (volume != 0)
    other = tuple(a for a in range(3) if a != axis)
    has = np.flatnonzero(finite.any(axis=other))
    if has.size == 0:
        has = np.arange(volume.shape[axis])
    n = min(n_slices, has.size)
    return [int(has[i]) for i in np.linspace(0, has.size - 1, n).round().astype(int)]


def plot_map_montage(
    path: str | os.PathLike,
    volume,
    anatomy=None,
    n_slices: int = 8,
    axis: int = 2,
    title: str = "",
    label: str = "BP$_{ND}$",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.85,
) -> Path:
    """Montage of slices of a 3-D map over an optional anatomy/atlas image.

    Parameters
    ----------
    path : str or path-like
        Output PNG.
    volume : ndarray, shape (x, y, z)
        Map to show; NaN voxels are transparent.
    anatomy : ndarray, shape (x, y, z), optional
        Background (grey), e.g. a mean PET image or the atlas labels.
    n_slices : int
        Number of slices, spread over the slices that contain data.
    axis : int
        Slicing axis (2 = axial).
    title, label, cmap : str
        Figure title, colour bar label, colour map.
    vmin, vmax : float, optional
        Colour limits; default 2nd/98th percentile of finite values.
    alpha : float
        Overlay opacity when ``anatomy`` is given.

    Returns
    -------
    pathlib.Path
    """
    vol = np.asarray(volume, dtype=float)
    if vol.ndim != 3:
        raise ValueError(f"plot_map_montage: expected a 3-D map, got shape {vol.shape}")
    if anatomy is not None:
        anatomy = np.asarray(anatomy, dtype=float)
        if anatomy.shape != vol.shape:
            raise ValueError(f"plot_map_montage: anatomy shape {anatomy.shape} differs from map {vol.shape}")
    finite = vol[np.isfinite(vol)]
    if vmin is None:
        vmin = float(np.percentile(finite, 2)) if finite.size else 0.0
    if vmax is None:
        vmax = float(np.percentile(finite, 98)) if finite.size else 1.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    slices = _pick_slices(vol, n_slices, axis)
    ncol = min(4, len(slices))
    nrow = math.ceil(len(slices) / ncol)
    fig = _new_figure(2.6 * ncol + 0.8, 2.6 * nrow + 0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= len(slices):
            continue
        s = slices[k]
        # x to the right, y up: transpose and origin="lower" (RAS+ radiological-free view)
        sl = np.take(vol, s, axis=axis).T
        if anatomy is not None:
            ax.imshow(np.take(anatomy, s, axis=axis).T, cmap="gray", origin="lower", interpolation="nearest")
        im = ax.imshow(np.ma.masked_invalid(sl), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower",
                       interpolation="nearest", alpha=alpha if anatomy is not None else 1.0)
        ax.set_title(f"slice {s}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_change_montage(path: str | os.PathLike, change, anatomy=None, n_slices: int = 8, axis: int = 2,
                        title: str = "", label: str = "$\\Delta$BP$_{ND}$", limit: float | None = None) -> Path:
    """Montage of a change map with a diverging colour map symmetric about 0.

    Parameters
    ----------
    path : str or path-like
        Output PNG.
    change : ndarray, shape (x, y, z)
        Change map (e.g. post - baseline BP_ND, or percent change).
    anatomy : ndarray, shape (x, y, z), optional
    n_slices, axis : int
    title, label : str
    limit : float, optional
        Colour limit ``[-limit, limit]``; default 98th percentile of ``|change|``.

    Returns
    -------
    pathlib.Path
    """
    ch = np.asarray(change, dtype=float)
    finite = np.abs(ch[np.isfinite(ch)])
    if limit is None:
        limit = float(np.percentile(finite, 98)) if finite.size else 1.0
    limit = limit if limit > 0 else 1.0
    return plot_map_montage(path, ch, anatomy=anatomy, n_slices=n_slices, axis=axis, title=title, label=label,
                            cmap="RdBu_r", vmin=-limit, vmax=limit)


def plot_region_changes(
    path: str | os.PathLike,
    region_names: Sequence[str],
    groups: Mapping[str, tuple],
    ylabel: str = "$\\Delta$BP$_{ND}$ (post - baseline)",
    title: str = "",
) -> Path:
    """Per-region mean change with confidence intervals, one marker series per group.

    Parameters
    ----------
    path : str or path-like
        Output PNG.
    region_names : sequence of str
    groups : mapping str -> (mean, ci_low, ci_high)
        Each entry three arrays of shape (n_regions,); NaN entries are not drawn.
    ylabel, title : str

    Returns
    -------
    pathlib.Path
    """
    n = len(region_names)
    if n == 0:
        raise ValueError("plot_region_changes: no regions")
    fig = _new_figure(max(4.0, 0.7 * n + 2.0), 3.8)
    ax = fig.subplots()
    width = 0.7
    m = max(1, len(groups))
    x = np.arange(n, dtype=float)
    for g, (name, (mean, lo, hi)) in enumerate(groups.items()):
        mean, lo, hi = (np.asarray(v, dtype=float) for v in (mean, lo, hi))
        if mean.shape != (n,) or lo.shape != (n,) or hi.shape != (n,):
            raise ValueError(f"plot_region_changes: group '{name}' arrays must have shape ({n},)")
        xg = x - width / 2 + width * (g + 0.5) / m
        yerr = np.vstack([mean - lo, hi - mean])
        ax.errorbar(xg, mean, yerr=yerr, fmt="o", capsize=3, label=str(name))
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(region_names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
