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

from petbind.core.device import array_module, to_namespace
from petbind.recon.geometry import ImageGrid, TOFParameters
from petbind.recon.operators import Composition, Identity, LinearOperator, Multiply

__all__ = [
    "GaussianFilter",
    "LORProjector",
    "LORMultiply",
    "SystemModel",
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
        Where NumPy inputs are projected; CuPy inputs always run on the GPU.

    Notes
    -----
    ``out_shape`` is ``lor_start_mm.shape[:-1]`` (plus ``(tof.num_bins,)``).
    Runs :class:`petbind.recon.projector.EndpointProjector` (the kernels of
    :func:`petbind.recon.projector.forward_project` and its exact adjoint),
    one per device used, made on first use, so the end points are uploaded
    once.
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
        self._impl = {}

    def _projector(self, v):
        from petbind.core.device import resolve_device  # noqa: PLC0415
        from petbind.recon.projector import EndpointProjector  # noqa: PLC0415 - keeps this module importable alone

        device = "gpu" if array_module(v) is not np else resolve_device(self.device)
        p = self._impl.get(device)
        if p is None:
            p = self._impl[device] = EndpointProjector(self._start, self._end, self.grid, tof=self.tof, device=device)
        return p

    def _forward(self, x):
        return self._projector(x).forward(x).reshape(self.out_shape)

    def _back(self, y):
        p = self._projector(y)
        return p.back(y.reshape(p.out_shape))

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

    The model computes in the array namespace of its projector (``xp``:
    NumPy, or CuPy for a GPU projector).  Its public methods accept NumPy or
    CuPy and return the input's type; an input of the other type is copied
    once at the call, never inside the model.
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

    @property
    def xp(self):
        """The array namespace the model computes in (its projector's; NumPy when it has none)."""
        xp = getattr(self.projector, "xp", None)
        return xp if xp is not None else np

    def _run(self, fn, v):
        xp = self.xp
        caller = array_module(v)
        out = fn(to_namespace(v, xp) if caller is not xp else v)
        return to_namespace(out, caller) if caller is not xp else out

    def _forward(self, x):
        return self._run(self.linear.forward, x)

    def _back(self, y):
        return self._run(self.linear.back, y)

    def _additive_on(self, xp):
        a = self.additive
        if a is None or np.isscalar(a):
            return a
        if array_module(a) is not xp:
            a = to_namespace(a, xp)
        return a

    def expected_counts(self, x):
        """``ȳ = A x + a``, of the array type of ``x``."""
        if tuple(x.shape) != tuple(self.in_shape):
            raise ValueError(f"{type(self).__name__}.expected_counts expects shape {self.in_shape}; got {tuple(x.shape)}")

        def run(xd):
            y = self.linear.forward(xd)
            a = self._additive_on(array_module(y))
            if a is not None:
                y += a
            return y

        return self._run(run, x)

    def back_ratio(self, x, measured):
        """``A^T (y / (A x + a))`` with 0 where ``A x + a <= 0``: the OSEM
        back-projected ratio, made with one data-sized temporary.

        Parameters
        ----------
        x : ndarray, shape ``in_shape``
            Current image, in the model's namespace (:attr:`xp`).
        measured : ndarray, shape ``out_shape``
            Measured counts ``y``, in the model's namespace (may be a strided view).

        Returns
        -------
        ndarray, shape ``in_shape``, float32, in the model's namespace.

        Notes
        -----
        The projection buffer is scaled by ``m``, shifted by ``a``, divided
        into ``y`` and scaled by ``m`` again in place; besides it only a
        boolean mask of the same shape is allocated (a quarter of its size).
        """
        xp = self.xp
        gx = x if self.resolution is None else self.resolution.forward(x)
        y = self.projector.forward(gx)
        f = None
        if isinstance(self.multiplicative_op, Multiply):
            f = self.multiplicative_op.factors_in(xp)
            y *= f
        a = self._additive_on(xp)
        if a is not None:
            y += a
        keep = y > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            xp.divide(measured, y, out=y)
        xp.logical_not(keep, out=keep)
        xp.copyto(y, 0.0, where=keep)
        del keep
        if f is not None:
            y *= f
        inplace = getattr(self.projector, "back_inplace", None)
        img = inplace(y) if inplace is not None and y.dtype == np.float32 else self.projector.back(y)
        del y
        return img if self.resolution is None else self.resolution.back(img)

    def sensitivity(self, dtype=np.float32, xp=None):
        """``A^T 1 = G^T P^T m`` (image, the OSEM normalisation).

        Parameters
        ----------
        dtype : dtype
        xp : module, optional
            Namespace of the result (default: the model's).

        Notes
        -----
        For a TOF projector that offers ``back_tof_summed`` (the adjoint of
        copying one value into every TOF bin), ``P_tof^T (m ⊗ 1)`` is computed
        from the non-TOF-shaped ``m`` directly: no TOF-sized array of ones is
        made and each sample costs its TOF window, not every bin.
        """
        mx = self.xp
        summed = getattr(self.projector, "back_tof_summed", None)
        if summed is not None and getattr(self.projector, "tof", None) is not None:
            lor_shape = tuple(self.out_shape[:-1])
            m = self.multiplicative
            v = mx.ones(lor_shape, dtype=np.float32) if m is None else to_namespace(m, mx, np.float32)
            img = summed(v)
            if self.resolution is not None:
                img = self.resolution.back(img)
            out = img.astype(dtype, copy=False)
        else:
            out = self.linear.back(mx.ones(self.out_shape, dtype=dtype)).astype(dtype, copy=False)
        return out if xp is None or xp is mx else to_namespace(out, xp)

    def __repr__(self):
        return f"SystemModel({self.linear!r}, additive={'yes' if self.additive is not None else 'no'})"
