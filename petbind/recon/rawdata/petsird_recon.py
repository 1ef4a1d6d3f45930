"""Listmode OSEM straight from PETSIRD detector coordinates, for any scanner geometry.

A PETSIRD scanner need not be a ring: several module types, partial rings,
flat panels, depth-of-interaction layers.  Listmode reconstruction needs no
sinogram, only each event's two detector centres
(:meth:`~petbind.recon.rawdata.petsird_io.PetsirdGeometry.detector_positions_mm`)
and, for TOF, the TOF binning of the event's module-type pair.  Events are
grouped by module-type pair (one :class:`~petbind.recon.projector.ListmodeProjector`
per pair and subset, each with that pair's :class:`TOFParameters`), and the
groups of a subset are stacked into one operator (:class:`EventStack`) so that
the generic :func:`~petbind.recon.osem.osem` runs unchanged.

Model (as :mod:`petbind.recon.system`): for event ``i`` on the LOR of
detectors ``(a, b)``, ``ȳ_i = ε_ab [P x]_i`` with ``ε_ab`` the PETSIRD pair
efficiency summed over energy bins
(:meth:`~petbind.recon.rawdata.petsird_io.PetsirdGeometry.pair_efficiencies`),
and the sensitivity image is ``s = Σ_{a>b} ε_ab P_ab^T 1`` over every
detector pair (non-TOF; TOF kernels sum to the non-TOF projection).  Only
prompts are reconstructed; no randoms, scatter or attenuation correction.
The calibration factor, frame duration and decay are not applied, so the
image is in relative units.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from petbind.core.device import array_module, to_numpy
from petbind.recon.geometry import ImageGrid
from petbind.recon.operators import LinearOperator
from petbind.recon.osem import osem
from petbind.recon.projector import ListmodeProjector
from petbind.recon.rawdata.petsird_io import PetsirdEvents, PetsirdGeometry
from petbind.recon.system import SystemModel

__all__ = ["EventStack", "sensitivity_image", "PetsirdListmodeOSEM"]

log = logging.getLogger(__name__)


class EventStack(LinearOperator):
    """Several event projectors (1-D outputs) stacked into one operator.

    Parameters
    ----------
    projectors : sequence of LinearOperator
        Same ``in_shape``; each ``out_shape`` is ``(n_k,)``.

    Notes
    -----
    ``forward`` concatenates the outputs in the given order; ``back`` sums
    the adjoints of the matching slices, so the stack is exactly adjoint when
    its parts are.
    """

    def __init__(self, projectors):
        self.projectors = list(projectors)
        if not self.projectors:
            raise ValueError("EventStack needs at least one projector")
        self.in_shape = tuple(self.projectors[0].in_shape)
        for p in self.projectors:
            if tuple(p.in_shape) != self.in_shape or len(p.out_shape) != 1:
                raise ValueError(f"EventStack parts need in_shape {self.in_shape} and 1-D outputs; got {p!r}")
        sizes = [int(p.out_shape[0]) for p in self.projectors]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.out_shape = (int(self.bounds[-1]),)
        self.grid = getattr(self.projectors[0], "grid", None)

    @property
    def xp(self):
        return self.projectors[0].xp

    def _forward(self, x):
        xp = array_module(x)
        return xp.concatenate([p.forward(x) for p in self.projectors])

    def _back(self, y):
        out = None
        for p, lo, hi in zip(self.projectors, self.bounds[:-1], self.bounds[1:]):
            part = p.back(y[int(lo):int(hi)])
            out = part if out is None else out + part
        return out

    def __repr__(self):
        return f"EventStack(parts={len(self.projectors)}, out_shape={self.out_shape})"


def sensitivity_image(geometry, grid, use_efficiencies=True, device="auto", batch_pairs=1 << 20, progress=False):
    """``s = Σ_{a>b} ε_ab P_ab^T 1`` over every detector pair (non-TOF).

    Parameters
    ----------
    geometry : PetsirdGeometry
    grid : ImageGrid
    use_efficiencies : bool
        Weight pairs by :meth:`PetsirdGeometry.pair_efficiencies` (pairs with
        efficiency 0, e.g. modules not in coincidence, are left out);
        ``False`` weights every pair of distinct detectors by 1.
    device : {"auto", "cpu", "gpu"}
    batch_pairs : int
        Detector pairs back-projected at a time (bounds memory).
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    ndarray of float32, shape ``grid.shape``
        NumPy on the CPU, CuPy on the GPU.
    """
    if not isinstance(geometry, PetsirdGeometry):
        raise TypeError(f"geometry must be a PetsirdGeometry; got {type(geometry).__name__}")
    if not isinstance(grid, ImageGrid):
        raise TypeError(f"grid must be an ImageGrid; got {type(grid).__name__}")
    det = geometry.detector_array()
    d = geometry.num_detectors
    rows_per_batch = max(1, int(batch_pairs) // max(d, 1))
    total = None
    bar = tqdm(total=d, desc="sensitivity", unit="det", disable=not progress, leave=False)
    try:
        for a0 in range(1, d, rows_per_batch):
            a = np.arange(a0, min(d, a0 + rows_per_batch))
            first = np.repeat(a, a)  # detector a with every b < a
            second = np.arange(first.size) - np.repeat(np.cumsum(a) - a, a)
            w = geometry.pair_efficiencies(first, second) if use_efficiencies else np.ones(first.size)
            keep = w > 0
            if keep.any():
                proj = ListmodeProjector(det, grid, np.stack([first[keep], second[keep]], axis=1), device=device)
                part = proj.back(proj.xp.asarray(w[keep], dtype=np.float32))
                total = part if total is None else total + part
            bar.update(a.size)
    finally:
        bar.close()
    if total is None:
        raise ValueError(f"{geometry.where}: no detector pair has a non-zero efficiency; nothing can be reconstructed")
    return total


class PetsirdListmodeOSEM:
    """Listmode OSEM of PETSIRD prompts on detector coordinates (any geometry).

    Parameters
    ----------
    geometry : PetsirdGeometry
    grid : ImageGrid
    events : PetsirdEvents or iterable of PetsirdEvents
        E.g. ``PetsirdReader.events()``; delayed coincidences are left out.
    sensitivity : ndarray, shape ``grid.shape``, optional
        From :func:`sensitivity_image` (computed when omitted, with the same
        ``use_efficiencies``).
    num_subsets : int
        Events are split into interleaved subsets (event ``i`` in subset
        ``i mod num_subsets``).
    use_efficiencies : bool
        Multiply each event's LOR by its pair efficiency.
    use_tof : bool
        Use the TOF bins of each module-type pair (pairs with one TOF bin are
        non-TOF either way).
    resolution_fwhm_mm : float or sequence of 3 float, optional
        Image-space Gaussian resolution model.
    device : {"auto", "cpu", "gpu"}

    Examples
    --------
    ::

        r = PetsirdReader("scan.petsird")
        rec = PetsirdListmodeOSEM(r.geometry, ImageGrid((128, 128, 64), 2.0), r.events(), num_subsets=8)
        image = rec.reconstruct(num_iterations=3)
    """

    def __init__(self, geometry, grid, events, sensitivity=None, num_subsets=1, use_efficiencies=True, use_tof=True,
                 resolution_fwhm_mm=None, device="auto"):
        if not isinstance(geometry, PetsirdGeometry):
            raise TypeError(f"geometry must be a PetsirdGeometry; got {type(geometry).__name__}")
        if not isinstance(grid, ImageGrid):
            raise TypeError(f"grid must be an ImageGrid; got {type(grid).__name__}")
        ev = events if isinstance(events, PetsirdEvents) else PetsirdEvents.concatenate(list(events))
        ev = ev.select(ev.is_prompt)
        n = len(ev)
        num_subsets = int(num_subsets)
        if n == 0:
            raise ValueError("PetsirdListmodeOSEM: no prompt events to reconstruct")
        if not 1 <= num_subsets <= n:
            raise ValueError(f"num_subsets must be in [1, num_prompts={n}]; got {num_subsets}")
        self.geometry, self.grid, self.num_subsets = geometry, grid, num_subsets
        ids = geometry.detector_ids(ev.module_types, ev.detection_bins)
        t = ev.module_types.astype(np.int64)
        pair = np.maximum(t[:, 0], t[:, 1]) * geometry.num_module_types + np.minimum(t[:, 0], t[:, 1])
        weight = geometry.pair_efficiencies(ids[:, 0], ids[:, 1]) if use_efficiencies else np.ones(n)
        if np.any(weight <= 0):
            bad = int(np.flatnonzero(weight <= 0)[0])
            raise ValueError(
                f"{geometry.where}: prompt {bad} (detectors {ids[bad].tolist()}) lies on a LOR of efficiency 0 "
                "(modules not in coincidence or a dead detector); the data and the header disagree"
            )
        det = geometry.detector_array()
        tofs = {}
        for p in np.unique(pair).tolist():
            t1, t2 = divmod(p, geometry.num_module_types)
            tofs[p] = geometry.tof_parameters(t1, t2) if use_tof else None
        self.models = []
        for k in range(num_subsets):
            idx = np.arange(k, n, num_subsets)
            projs, factors = [], []
            for p, tof in tofs.items():
                sel = idx[pair[idx] == p]
                if sel.size == 0:
                    continue
                projs.append(ListmodeProjector(det, grid, ids[sel], tof_bins=None if tof is None else ev.tof_idx[sel].astype(np.int32),
                                               tof=tof, device=device))
                factors.append(weight[sel])
            stack = EventStack(projs)
            xp = stack.xp
            m = xp.asarray(np.concatenate(factors), dtype=np.float32) if use_efficiencies else None
            self.models.append(SystemModel(stack, m, None, resolution=resolution_fwhm_mm, grid=grid))
        self.xp = self.models[0].projector.xp
        if sensitivity is None:
            sensitivity = sensitivity_image(geometry, grid, use_efficiencies=use_efficiencies, device=device)
        if tuple(sensitivity.shape) != tuple(grid.shape):
            raise ValueError(f"sensitivity must have the image shape {grid.shape}; got {tuple(sensitivity.shape)}")
        sens = self.xp.asarray(sensitivity, dtype=self.xp.float32)
        if resolution_fwhm_mm is not None:
            sens = self.models[0].resolution.back(sens)
        self._sens = [sens / num_subsets] * num_subsets
        self.num_events = n

    def reconstruct(self, num_iterations, x0=None, progress=True, callback=None):
        """Run listmode OSEM.

        Returns
        -------
        ndarray, shape ``grid.shape``
            In the projectors' array namespace (NumPy on the CPU).
        """
        data = [self.xp.ones(m.out_shape, dtype=self.xp.float32) for m in self.models]
        x = osem(data, self.models, num_iterations, x0=x0, sensitivities=self._sens, progress=progress, callback=callback)
        return x if self.xp is not np else to_numpy(x)
