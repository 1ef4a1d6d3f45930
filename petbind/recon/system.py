"""The PET system model, in one place: ``ȳ = m ⊙ P(G x) + a``.

* ``x``: activity image (Bq/mL) on an :class:`~petbind.recon.geometry.ImageGrid`.
* ``G``: optional image-space resolution model, a separable Gaussian
  (:class:`GaussianFilter`, self-adjoint).
* ``P``: a projector (line integrals, image units × mm), e.g.
  ``petbind.recon.projector.SinogramProjector`` or :class:`LORProjector`.
* ``m``: multiplicative factors per LOR: normalisation (product of crystal
  efficiencies, :func:`normalisation_factors`) × attenuation
  (``exp(-P μ)``, :func:`attenuation_factors`), optionally times a global
  scale (acquisition time, decay, calibration).  For TOF data ``m`` has the
  non-TOF sinogram shape and applies to every TOF bin.
* ``a``: additive expected background (randoms + scatter), same shape as
  ``P``'s output (or broadcastable to it).

The simulator (:mod:`petbind.sim.acquisition`) and the OSEM reconstruction use this
module, so the data are generated and reconstructed with the same model.
"""

from __future__ import annotations

import math

import numpy as np

from petbind.core.device import array_module, to_numpy
from petbind.recon.geometry import ImageGrid, SinogramLayout, TOFParameters
from petbind.recon.operators import Composition, Identity, LinearOperator, Multiply

__all__ = [
    "GaussianFilter",
    "LORProjector",
    "LORMultiply",
    "SystemModel",
    "attenuation_factors",
    "normalisation_factors",
    "randoms_from_singles",
]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


class GaussianFilter(LinearOperator):
    """Separable Gaussian image blur (the image-space resolution model ``G``).

    Parameters
    ----------
    grid : ImageGrid
    fwhm_mm : float or sequence of 3 float
        Full width at half maximum along ``(x, y, z)`` (mm); 0 leaves an axis alone.
    truncate : float
        The kernel is cut at ``truncate`` standard deviations and normalised
        to sum 1.

    Notes
    -----
    Zero boundary (the image is taken as 0 outside the grid), so the matrix is
    a symmetric Toeplitz matrix per axis and the operator is exactly
    self-adjoint: ``back`` is ``forward``.  Works on NumPy and CuPy arrays.
    """

    def __init__(self, grid, fwhm_mm, truncate=3.0):
        if not isinstance(grid, ImageGrid):
            raise TypeError(f"grid must be an ImageGrid; got {type(grid).__name__}")
        fwhm = np.asarray(fwhm_mm, dtype=float).reshape(-1)
        if fwhm.size == 1:
            fwhm = np.repeat(fwhm, 3)
        if fwhm.size != 3 or np.any(~np.isfinite(fwhm)) or np.any(fwhm < 0):
            raise ValueError(f"fwhm_mm must be a non-negative scalar or 3 values (x, y, z); got {fwhm_mm!r}")
        if not truncate > 0:
            raise ValueError(f"truncate must be positive; got {truncate}")
        self.grid = grid
        self.fwhm_mm = fwhm
        self.in_shape = self.out_shape = tuple(grid.shape)
        self.kernels = []
        for a in range(3):
            sigma_vox = fwhm[a] * _FWHM_TO_SIGMA / grid.voxel_size_mm[a]
            if sigma_vox == 0:
                self.kernels.append(None)
                continue
            r = max(1, int(math.ceil(truncate * sigma_vox)))
            k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_vox) ** 2)
            self.kernels.append(k / k.sum())

    def _forward(self, x):
        xp = array_module(x)
        out = x
        for axis, k in enumerate(self.kernels):
            if k is None:
                continue
            r = (k.size - 1) // 2
            n = out.shape[axis]
            pad = [(0, 0)] * out.ndim
            pad[axis] = (r, r)
            padded = xp.pad(out, pad)
            acc = xp.zeros_like(out)
            for j, w in enumerate(k):
                sl = [slice(None)] * out.ndim
                sl[axis] = slice(j, j + n)
                acc += out.dtype.type(w) * padded[tuple(sl)]
            out = acc
        return out

    _back = _forward

    def __repr__(self):
        f = ", ".join(f"{v:g}" for v in self.fwhm_mm)
        return f"GaussianFilter(shape={self.in_shape}, fwhm_mm=({f}))"


class LORProjector(LinearOperator):
    """Projector for an explicit set of LORs (e.g. a chunk of sinogram planes).

    Parameters
    ----------
    lor_start_mm, lor_end_mm : ndarray, shape (..., 3)
        LOR end points (mm).
    grid : ImageGrid
    tof : TOFParameters, optional
    device : {"auto", "cpu", "gpu"}

    Notes
    -----
    ``out_shape`` is ``lor_start_mm.shape[:-1]`` (plus ``(tof.num_bins,)``).
    Wraps :func:`petbind.recon.projector.forward_project` and its exact adjoint
    :func:`petbind.recon.projector.back_project`.
    """

    def __init__(self, lor_start_mm, lor_end_mm, grid, tof=None, device="auto"):
        start = np.ascontiguousarray(lor_start_mm, dtype=np.float32)
        end = np.ascontiguousarray(lor_end_mm, dtype=np.float32)
        if start.shape != end.shape or start.ndim < 2 or start.shape[-1] != 3:
            raise ValueError(f"lor_start_mm and lor_end_mm need equal shapes (..., 3); got {start.shape}, {end.shape}")
        if tof is not None and not isinstance(tof, TOFParameters):
            raise TypeError(f"tof must be TOFParameters or None; got {type(tof).__name__}")
        self.lor_shape = start.shape[:-1]
        self._start, self._end = start.reshape(-1, 3), end.reshape(-1, 3)
        self.grid, self.tof, self.device = grid, tof, device
        self.in_shape = tuple(grid.shape)
        self.out_shape = tuple(self.lor_shape) + ((tof.num_bins,) if tof is not None else ())

    def _forward(self, x):
        from petbind.recon.projector import forward_project  # noqa: PLC0415 - keeps this module importable alone

        y = forward_project(x, self._start, self._end, self.grid, tof=self.tof, device=self.device)
        return y.reshape(self.out_shape)

    def _back(self, y):
        from petbind.recon.projector import back_project  # noqa: PLC0415

        flat = y.reshape((-1,) + ((self.tof.num_bins,) if self.tof is not None else ()))
        return back_project(flat, self._start, self._end, self.grid, tof=self.tof, device=self.device)

    def __repr__(self):
        return f"LORProjector(num_lors={int(np.prod(self.lor_shape))}, out_shape={self.out_shape}, tof={self.tof is not None})"


class LORMultiply(Multiply):
    """Multiplication by per-LOR factors broadcast over trailing axes (TOF bins).

    Parameters
    ----------
    factors : ndarray
        Per-LOR factors, shape ``lor_shape``.
    shape : tuple
        Full data shape, ``lor_shape`` or ``lor_shape + (num_tof_bins,)``.
    """

    def __init__(self, factors, shape):
        shape = tuple(int(s) for s in shape)
        fshape = tuple(factors.shape)
        if shape[: len(fshape)] != fshape or len(shape) - len(fshape) > 1:
            raise ValueError(f"factors of shape {fshape} do not match data of shape {shape} (LOR axes first)")
        super().__init__(factors[(Ellipsis,) + (None,) * (len(shape) - len(fshape))])
        self.in_shape = self.out_shape = shape


class SystemModel(LinearOperator):
    """``ȳ = m ⊙ P(G x) + a`` as a linear operator plus an additive term.

    Parameters
    ----------
    projector : LinearOperator
        ``P``; ``in_shape`` is the image shape.
    multiplicative : ndarray, optional
        ``m`` with the non-TOF data shape (LOR axes of ``projector.out_shape``);
        ``None`` means 1.
    additive : ndarray or float, optional
        ``a`` (randoms + scatter), broadcastable to ``projector.out_shape``;
        ``None`` means 0.  Not part of the linear operator.
    resolution : LinearOperator or float or sequence of 3 float, optional
        ``G``: an image operator, or a Gaussian FWHM in mm (needs ``grid``).
    grid : ImageGrid, optional
        Needed when ``resolution`` is given as a FWHM.

    Notes
    -----
    :meth:`forward` and :meth:`back` are the linear part ``A = diag(m) P G``
    and its adjoint ``A^T = G^T P^T diag(m)``; :meth:`expected_counts` adds
    ``a``; :meth:`sensitivity` is ``A^T 1 = G^T P^T m``, the OSEM
    normalisation image.
    """

    def __init__(self, projector, multiplicative=None, additive=None, resolution=None, grid=None):
        if not isinstance(projector, LinearOperator):
            raise TypeError(f"projector must be a LinearOperator; got {type(projector).__name__}")
        self.projector = projector
        if resolution is None:
            g = None
        elif isinstance(resolution, LinearOperator):
            g = resolution
        else:
            if grid is None:
                grid = getattr(projector, "grid", None)
            if grid is None:
                raise ValueError("resolution given as a FWHM needs grid= (the projector has none)")
            g = GaussianFilter(grid, resolution)
        self.resolution = g
        out = tuple(projector.out_shape)
        ops = projector if g is None else Composition(projector, g)
        if multiplicative is not None:
            self.multiplicative_op = LORMultiply(multiplicative, out)
            ops = Composition(self.multiplicative_op, ops)
        else:
            self.multiplicative_op = Identity(out)
        self.multiplicative = multiplicative
        self.linear = ops
        self.additive = additive
        if additive is not None and not np.isscalar(additive):
            try:
                np.broadcast_shapes(tuple(additive.shape), out)
            except ValueError:
                raise ValueError(f"additive term of shape {tuple(additive.shape)} does not broadcast to data shape {out}") from None
        self.in_shape, self.out_shape = tuple(projector.in_shape), out

    def _forward(self, x):
        return self.linear.forward(x)

    def _back(self, y):
        return self.linear.back(y)

    def expected_counts(self, x):
        """``ȳ = A x + a`` (same array namespace as ``x``)."""
        y = self.forward(x)
        if self.additive is None:
            return y
        xp = array_module(y)
        return y + (self.additive if np.isscalar(self.additive) else xp.asarray(self.additive))

    def sensitivity(self, dtype=np.float32, xp=np):
        """``A^T 1 = G^T P^T m`` (image), computed in the array namespace ``xp``."""
        return self.back(xp.ones(self.out_shape, dtype=dtype))

    def __repr__(self):
        return f"SystemModel({self.linear!r}, additive={'yes' if self.additive is not None else 'no'})"


def attenuation_factors(mu_map_per_mm, projector):
    """Attenuation factors ``exp(-P μ)`` per LOR.

    Parameters
    ----------
    mu_map_per_mm : ndarray, shape projector.in_shape
        Linear attenuation coefficients at 511 keV (1/mm).
    projector : LinearOperator
        Line-integral projector (TOF projectors are summed over TOF bins,
        which gives the non-TOF line integral).

    Returns
    -------
    ndarray
        Survival probabilities in (0, 1], non-TOF data shape.

    Raises
    ------
    ValueError
        For negative or non-finite μ values.
    """
    mu = mu_map_per_mm
    xp = array_module(mu)
    if not bool(xp.all(xp.isfinite(mu))) or float(mu.min()) < 0:
        raise ValueError("mu_map_per_mm must be finite and non-negative (1/mm)")
    line = projector.forward(mu)
    if getattr(projector, "tof", None) is not None:
        line = line.sum(axis=-1)
    return xp.exp(-line)


def _check_efficiencies(layout, crystal_efficiencies, name="crystal_efficiencies"):
    eff = np.asarray(to_numpy(crystal_efficiencies), dtype=np.float64).reshape(-1)
    n_det = layout.scanner.num_detectors
    if eff.shape != (n_det,):
        raise ValueError(f"{name} must have one value per detector ({n_det}); got shape {eff.shape}")
    if np.any(~np.isfinite(eff)) or np.any(eff < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return eff * layout.scanner.detector_mask()


def _pair_products(layout, values, reduce):
    """``values[d1] * values[d2]`` per sinogram bin, reduced over the ring pairs of each plane."""
    if not isinstance(layout, SinogramLayout):
        raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
    n = layout.scanner.crystals_per_ring
    v = values.reshape(layout.scanner.num_rings, n)
    cp = layout.crystal_pairs()
    out = np.zeros(layout.shape, dtype=np.float64)
    for (r1, r2), plane in zip(layout.ring_pairs, layout.plane_of_ring_pair):
        out[plane] += v[r1][cp[..., 0]] * v[r2][cp[..., 1]]
    if reduce == "mean":
        out /= layout.plane_multiplicity[:, None, None]
    return out


def normalisation_factors(layout, crystal_efficiencies):
    """Crystal-efficiency normalisation: ``ε_i ε_j`` per sinogram bin.

    Parameters
    ----------
    layout : SinogramLayout
    crystal_efficiencies : ndarray, shape (num_detectors,)
        Relative efficiency per detector id (1 = nominal).  Gap positions
        (``crystal_mask == False``) count as 0 whatever their value.

    Returns
    -------
    ndarray of float32, shape layout.shape
        Product of the two crystals' efficiencies; 0 for bins touching a gap.
        For ``span > 1`` the mean over the plane's ring pairs (the projector
        already multiplies by :attr:`~petbind.recon.geometry.SinogramLayout.plane_multiplicity`).
    """
    eff = _check_efficiencies(layout, crystal_efficiencies)
    return _pair_products(layout, eff, "mean").astype(np.float32)


def randoms_from_singles(layout, singles_cps, coincidence_window_ns, duration_s=1.0):
    """Expected randoms per sinogram bin from detector singles rates.

    Parameters
    ----------
    layout : SinogramLayout
    singles_cps : ndarray, shape (num_detectors,)
        Singles rate of each detector (counts/s); gaps are ignored.
    coincidence_window_ns : float
        Coincidence window ``2τ`` is ``coincidence_window_ns`` (the full width).
    duration_s : float
        Acquisition time (s) for constant rates.

    Returns
    -------
    ndarray of float64, shape layout.shape
        ``R_ij = 2τ S_i S_j × duration``, summed over the ring pairs of a plane.

    Notes
    -----
    ``2τ`` is the total coincidence window width (e.g. 4.0 ns): two
    uncorrelated singles form a random coincidence when they arrive within
    ``±τ`` of each other.

    References
    ----------
    Cherry SR, Sorenson JA, Phelps ME. Physics in Nuclear Medicine, 4th ed.,
    Elsevier 2012, ch. 18 (random coincidences).
    """
    s = _check_efficiencies(layout, singles_cps, "singles_cps")
    if not coincidence_window_ns > 0 or not duration_s >= 0:
        raise ValueError(f"coincidence_window_ns must be > 0 and duration_s >= 0; got {coincidence_window_ns}, {duration_s}")
    return _pair_products(layout, s, "sum") * (coincidence_window_ns * 1e-9 * duration_s)
