"""MLEM/OSEM reconstruction, for sinograms and for listmode events.

The model is the one of :mod:`petbind.recon.system`: ``ȳ = A x + a`` with
``A = diag(m) P G``.  The OSEM update for subset ``k`` (Hudson & Larkin 1994,
IEEE TMI 13:601, eq. 2) is

.. math::

    x \\leftarrow \\frac{x}{A_k^T 1} \\; A_k^T \\frac{y_k}{A_k x + a_k}

and MLEM is OSEM with one subset (Shepp & Vardi 1982).  Listmode OSEM
(Parra & Barrett 1998, IEEE TMI 17:228) replaces the sum over sinogram bins
by a sum over events, each with measured count 1, and takes the sensitivity
``A^T 1`` over all possible LORs (divided by the number of subsets).

All array work uses the namespace of the projector (NumPy or CuPy).  Data,
factors and the image are moved to the device once, before the iterations;
nothing crosses between host and device inside the loop.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from petbind.core.device import array_module, to_namespace, to_numpy
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.projector import ListmodeProjector, SinogramProjector
from petbind.recon.system import SystemModel

log = logging.getLogger(__name__)

__all__ = ["osem", "SinogramOSEM", "ListmodeOSEM", "sinogram_osem_memory"]


def _check_counts(name, y):
    # Checked where the data lie (two reductions on a GPU, no copy to the host).
    xp = array_module(y)
    if not bool(xp.all(xp.isfinite(y))):
        raise ValueError(f"{name} contains NaN or infinite values; measured counts must be finite")
    if bool(xp.any(y < 0)):
        raise ValueError(f"{name} contains negative values; measured counts must be >= 0 (subtract nothing before OSEM)")


def _back_ratio(model, x, y):
    """``A^T (y / ȳ)`` with 0 where ``ȳ <= 0``; a model's own lean version when it has one."""
    fn = getattr(model, "back_ratio", None)
    if fn is not None:
        return fn(x, y)
    xp = array_module(x)
    ybar = model.expected_counts(x)
    ratio = xp.where(ybar > 0, y / xp.where(ybar > 0, ybar, 1.0), 0.0).astype(xp.float32)
    return model.back(ratio)


def osem(data, models, num_iterations, x0=None, sensitivities=None, progress=True, callback=None):
    """Generic OSEM over subsets.

    Parameters
    ----------
    data : sequence of ndarray or float
        Measured counts per subset (``data[k].shape == models[k].out_shape``),
        already in the models' array namespace, or a number (1 for listmode
        events).
    models : sequence of SystemModel
        One per subset (``expected_counts``, ``back``).
    num_iterations : int
        Full passes over all subsets.
    x0 : ndarray, optional
        Start image (positive); default ones.
    sensitivities : sequence of ndarray, optional
        ``A_k^T 1`` per subset; computed when omitted.
    progress : bool
        Show a tqdm bar (subset updates).
    callback : callable, optional
        ``callback(iteration, x)`` after each full iteration.

    Returns
    -------
    ndarray
        The image, in the models' array namespace.
    """
    if len(data) != len(models) or not models:
        raise ValueError(f"need one data array per subset model; got {len(data)} data and {len(models)} models")
    if int(num_iterations) < 1:
        raise ValueError(f"num_iterations must be >= 1; got {num_iterations}")
    xp = _namespace(models[0])
    if sensitivities is None:
        sensitivities = [m.sensitivity(xp=xp) for m in models]
    # Voxels no LOR sees stay zero instead of dividing by zero.
    inv_sens = []
    for s in sensitivities:
        s = to_namespace(s, xp, np.float32)
        pos = s > 0
        inv_sens.append(xp.where(pos, 1.0 / xp.where(pos, s, 1.0), 0.0).astype(xp.float32))
    x = xp.ones(models[0].in_shape, dtype=xp.float32) if x0 is None else to_namespace(x0, xp, np.float32).copy()
    bar = tqdm(total=int(num_iterations) * len(models), desc="OSEM", unit="subset", disable=not progress, leave=False)
    try:
        for it in range(int(num_iterations)):
            for k, model in enumerate(models):
                corr = _back_ratio(model, x, data[k])
                corr *= inv_sens[k]
                x *= corr
                del corr
                bar.update()
            if callback is not None:
                callback(it + 1, x)
    finally:
        bar.close()
    return x


def _namespace(model):
    proj = getattr(model, "projector", None)
    xp = getattr(proj, "xp", None)
    return xp if xp is not None else np


class SinogramOSEM:
    """OSEM for (TOF) sinograms with view subsets.

    Parameters
    ----------
    layout : SinogramLayout
    grid : ImageGrid
    tof : TOFParameters, optional
    multiplicative : ndarray, optional
        ``m`` per bin, shape ``layout.shape`` (normalisation × attenuation ×
        any global scale such as frame duration × calibration).
    additive : ndarray, optional
        Expected randoms + scatter, shape of the data.
    resolution_fwhm_mm : float or sequence of 3 float, optional
        Image-space Gaussian resolution model (PSF).
    num_subsets : int
    device : {"auto", "cpu", "gpu"}

    Examples
    --------
    >>> from petbind.recon.geometry import Scanner, SinogramLayout, ImageGrid
    >>> lay = SinogramLayout(Scanner.cylindrical(60.0, 32, 1, 4.0), 15)
    >>> rec = SinogramOSEM(lay, ImageGrid((16, 16, 1), 4.0), num_subsets=4, device="cpu")
    >>> import numpy as np
    >>> img = rec.reconstruct(np.ones(lay.shape, np.float32), num_iterations=1, progress=False)
    >>> img.shape
    (16, 16, 1)
    """

    def __init__(
        self,
        layout,
        grid,
        tof=None,
        multiplicative=None,
        additive=None,
        resolution_fwhm_mm=None,
        num_subsets=1,
        device="auto",
    ):
        if not isinstance(layout, SinogramLayout):
            raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
        if not isinstance(grid, ImageGrid):
            raise TypeError(f"grid must be an ImageGrid; got {type(grid).__name__}")
        if tof is not None and not isinstance(tof, TOFParameters):
            raise TypeError(f"tof must be TOFParameters or None; got {type(tof).__name__}")
        self.layout, self.grid, self.tof = layout, grid, tof
        self.data_shape = layout.shape + (() if tof is None else (tof.num_bins,))
        if multiplicative is not None and tuple(multiplicative.shape) != layout.shape:
            raise ValueError(f"multiplicative factors must have shape {layout.shape}; got {tuple(multiplicative.shape)}")
        if additive is not None and tuple(additive.shape) != self.data_shape:
            raise ValueError(f"additive term must have the data shape {self.data_shape}; got {tuple(additive.shape)}")
        self.subsets = layout.view_subsets(num_subsets)
        self.num_subsets = len(self.subsets)
        self.models = []
        for k, views in enumerate(self.subsets):
            proj = SinogramProjector(layout, grid, tof=tof, views=views, device=device)
            xp = proj.xp
            m = None if multiplicative is None else self._subset(multiplicative, k, xp)
            a = None if additive is None else self._subset(additive, k, xp)
            self.models.append(SystemModel(proj, m, a, resolution=resolution_fwhm_mm, grid=grid))
        self.xp = self.models[0].projector.xp
        self._sens = None

    def _subset(self, array, k, xp):
        """Views ``k, k + S, ...`` of ``array`` in namespace ``xp``, float32: a
        strided view (no copy) of an array already there, else one copy."""
        # view_subsets interleaves the views, so a subset is a slice.
        part = array[:, k :: self.num_subsets]
        if array_module(array) is xp and part.dtype == np.float32:
            return part
        return to_namespace(part, xp, np.float32)

    def set_additive(self, additive):
        """Replace the additive term ``a`` (randoms + scatter, counts per bin).

        One OSEM object serves every frame of a dynamic scan (the projectors,
        the multiplicative factors and the sensitivities do not change between
        frames); only the background does.

        Parameters
        ----------
        additive : ndarray or None
            Shape of the data (``layout.shape`` [+ TOF bins]); ``None``
            removes the additive term.
        """
        if additive is not None and tuple(additive.shape) != self.data_shape:
            raise ValueError(f"additive term must have the data shape {self.data_shape}; got {tuple(additive.shape)}")
        for k, model in enumerate(self.models):
            model.additive = None if additive is None else self._subset(additive, k, model.xp)

    def sensitivities(self):
        """``A_k^T 1`` per subset (cached)."""
        if self._sens is None:
            self._sens = [m.sensitivity(xp=self.xp) for m in self.models]
        return self._sens

    def reconstruct(self, prompts, num_iterations, x0=None, progress=True, callback=None, additive=None):
        """Reconstruct measured prompts (shape ``layout.shape`` [+ TOF]).

        Parameters
        ----------
        prompts : ndarray
            Measured counts per bin (NumPy or CuPy).
        num_iterations : int
        x0 : ndarray, optional
            Start image (default: ones).
        progress : bool
        callback : callable, optional
            ``callback(iteration, x)`` after each iteration.
        additive : ndarray, optional
            This frame's additive term (see :meth:`set_additive`); when
            omitted, the term set last (or at construction) is used.

        Returns
        -------
        ndarray, shape ``grid.shape``
            Of the array type of ``prompts``.
        """
        if tuple(prompts.shape) != self.data_shape:
            raise ValueError(f"prompts must have shape {self.data_shape}; got {tuple(prompts.shape)}")
        _check_counts("prompts", prompts)
        if additive is not None:
            self.set_additive(additive)
        xp = self.xp
        # Device prompts are used in place (strided views); host prompts are
        # copied once, subset by subset: the data occupy D bytes on the device.
        data = [self._subset(prompts, k, xp) for k in range(self.num_subsets)]
        x = osem(data, self.models, num_iterations, x0=x0, sensitivities=self.sensitivities(),
                 progress=progress, callback=callback)
        return to_namespace(x, array_module(prompts))


class ListmodeOSEM:
    """Listmode OSEM: events split into interleaved subsets.

    Parameters
    ----------
    scanner : Scanner
    grid : ImageGrid
    detector_ids : ndarray of int, shape (num_events, 2)
    sensitivity : ndarray, shape ``grid.shape``
        ``A^T 1`` over all LORs the scanner could record (e.g. from
        :meth:`SinogramOSEM.sensitivities` summed, or a SystemModel on the
        full sinogram).  Events of a TOF scan need the non-TOF sensitivity.
    tof_bins : ndarray of int, shape (num_events,), optional
    tof : TOFParameters, optional
    multiplicative : ndarray, shape (num_events,), optional
        ``m`` of each event's LOR.
    additive : ndarray, shape (num_events,), optional
        Expected randoms + scatter in each event's LOR (and TOF bin).
    resolution_fwhm_mm : optional
        Image-space resolution model.
    num_subsets : int
    device : {"auto", "cpu", "gpu"}
    """

    def __init__(
        self,
        scanner,
        grid,
        detector_ids,
        sensitivity,
        tof_bins=None,
        tof=None,
        multiplicative=None,
        additive=None,
        resolution_fwhm_mm=None,
        num_subsets=1,
        device="auto",
    ):
        if not isinstance(scanner, Scanner):
            raise TypeError(f"scanner must be a Scanner; got {type(scanner).__name__}")
        ids = np.asarray(to_numpy(detector_ids))
        n = ids.shape[0] if ids.ndim == 2 else -1
        if ids.ndim != 2 or ids.shape[1] != 2:
            raise ValueError(f"detector_ids must have shape (num_events, 2); got {ids.shape}")
        for name, arr in (("multiplicative", multiplicative), ("additive", additive), ("tof_bins", tof_bins)):
            if arr is not None and tuple(arr.shape) != (n,):
                raise ValueError(f"{name} must have one entry per event ({n}); got shape {tuple(arr.shape)}")
        if tuple(sensitivity.shape) != tuple(grid.shape):
            raise ValueError(f"sensitivity must have the image shape {grid.shape}; got {tuple(sensitivity.shape)}")
        num_subsets = int(num_subsets)
        if not 1 <= num_subsets <= max(n, 1):
            raise ValueError(f"num_subsets must be in [1, num_events={n}]; got {num_subsets}")
        self.models, self.subsets = [], [np.arange(k, n, num_subsets) for k in range(num_subsets)]
        for idx in self.subsets:
            proj = ListmodeProjector(
                scanner, grid, ids[idx], tof_bins=None if tof_bins is None else np.asarray(to_numpy(tof_bins))[idx],
                tof=tof, device=device,
            )
            xp = proj.xp
            m = None if multiplicative is None else xp.asarray(to_numpy(multiplicative)[idx], dtype=xp.float32)
            a = None if additive is None else xp.asarray(to_numpy(additive)[idx], dtype=xp.float32)
            self.models.append(SystemModel(proj, m, a, resolution=resolution_fwhm_mm, grid=grid))
        self.xp = self.models[0].projector.xp
        sens = self.xp.asarray(sensitivity, dtype=self.xp.float32) / num_subsets
        self._sens = [sens] * num_subsets

    def reconstruct(self, num_iterations, x0=None, progress=True, callback=None):
        """Run listmode OSEM; returns the image in the projector's array namespace."""
        # Every event counts 1: a scalar, not an array of ones per subset.
        data = [1.0] * len(self.models)
        return osem(data, self.models, num_iterations, x0=x0, sensitivities=self._sens,
                    progress=progress, callback=callback)


def sinogram_osem_memory(layout, grid, tof=None, num_subsets=1, multiplicative=True, additive=True,
                         resolution=False):
    """Device memory of :class:`SinogramOSEM` reconstructing one frame (bytes).

    A model of the arrays the reconstruction keeps on its device and of the
    largest set alive at once, to answer "does this scan fit on this GPU?"
    without allocating it.  ``tests/recon/test_osem_memory.py`` checks it against
    the allocations counted by the CuPy stand-in.

    Parameters
    ----------
    layout : SinogramLayout
    grid : ImageGrid
    tof : TOFParameters, optional
    num_subsets : int
    multiplicative, additive, resolution : bool
        Whether ``m``, ``a`` and an image-space PSF are used.

    Returns
    -------
    dict
        Bytes per part (``data``, ``additive``, ``multiplicative``,
        ``tables``, ``sensitivities``, ``images``, ``subset_work``) and
        ``total`` (the peak).

    Notes
    -----
    With ``D`` the TOF data (float32), ``N`` the non-TOF data, ``S`` the
    subsets, ``I`` an image and ``D_k`` the largest subset:
    ``peak = D (prompts) + D (a) + N (m) + 2 S I (A_k^T 1 and its inverse)
    + (4 + 3 [PSF]) I + 1.25 D_k`` (the projection buffer, reused in place
    for the ratio, and a boolean mask), plus the small detector tables.
    Host prompts are copied subset by subset (device prompts are used as
    views, the caller's ``D``).  The TOF sensitivity is made from non-TOF
    arrays (:meth:`SinogramProjector.back_tof_summed`).
    """
    f = 4
    subsets = layout.view_subsets(num_subsets)
    t = 1 if tof is None else int(tof.num_bins)
    n_lor = layout.num_planes * layout.num_views * layout.num_radial
    largest = layout.num_planes * max(len(v) for v in subsets) * layout.num_radial
    image = int(np.prod(grid.shape)) * f
    span_factor = 0 if np.all(layout.plane_multiplicity == 1) else 1
    tables = sum(
        f * (2 * layout.scanner.crystals_per_ring + 2 * layout.num_planes + len(v) + 9 + span_factor * layout.num_planes)
        for v in subsets
    )
    parts = {
        "data": n_lor * t * f,
        "additive": n_lor * t * f if additive else 0,
        "multiplicative": n_lor * f if multiplicative else 0,
        "tables": tables,
        "sensitivities": 2 * len(subsets) * image,
        "images": (4 + (3 if resolution else 0)) * image,
        "subset_work": largest * t * f + largest * t,
    }
    parts["total"] = sum(parts.values())
    return parts
