"""Joseph forward and back projectors on the CPU and the GPU.

The low-level functions :func:`forward_project` and :func:`back_project` take
explicit LOR end points.  :class:`SinogramProjector` and
:class:`ListmodeProjector` are linear operators whose kernels compute the LOR
end points from detector tables, so no N×6 array is ever stored.

Where the work runs: on the GPU when an input is a CuPy array or when
``device`` resolves to ``"gpu"`` (see :mod:`petbind.core.device`); otherwise on the
CPU with the compiled kernels (or, without a C++ compiler, a slow NumPy
fallback).  Results have the array type of the input: NumPy in, NumPy out;
CuPy in, CuPy out.

Examples
--------
>>> import numpy as np
>>> from petbind.recon.geometry import ImageGrid
>>> grid = ImageGrid((8, 8, 4), 2.0)
>>> img = np.ones(grid.shape, np.float32)
>>> start, end = np.array([[-50.0, 0.5, 0.5]]), np.array([[50.0, 0.5, 0.5]])
>>> float(forward_project(img, start, end, grid, device="cpu")[0])  # 8 voxels x 2 mm
16.0
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from petbind.recon import kernels
from petbind.core.device import array_module, get_cupy, resolve_device, to_namespace, to_numpy
from petbind.recon.geometry import DetectorArray, ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.operators import LinearOperator

log = logging.getLogger(__name__)

__all__ = ["forward_project", "back_project", "Projector", "EndpointProjector", "SinogramProjector", "ListmodeProjector"]


# --------------------------------------------------------------------------------------------
# Backend plumbing
# --------------------------------------------------------------------------------------------
class _Backend:
    """Holds where a computation runs and converts arrays for it."""

    def __init__(self, device):
        self.device = device
        self.xp = get_cupy() if device == "gpu" else np

    @classmethod
    def for_inputs(cls, device, *arrays):
        if array_module(*arrays) is not np:
            return cls("gpu")
        return cls(resolve_device(device))

    def array(self, a, dtype):
        """Contiguous array of ``dtype`` on this backend (no copy when already so)."""
        if self.xp is np:
            a = to_numpy(a)
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def to_caller(self, result, like):
        """Return ``result`` in the array type of ``like``."""
        caller = array_module(like)
        return result if caller is self.xp else to_namespace(result, caller)

    def cpu_compiled(self):
        return self.device == "cpu" and kernels.cpu_library("joseph") is not None

    def launch(self, kernel, count, **arguments):
        """Run ``kernel`` over ``count`` threads with its arguments named as in ``joseph.cu``."""
        args = kernels.bind(kernel, **arguments)
        if self.device == "gpu":
            kernels.launch_gpu(kernel, args, count)
        else:
            kernels.launch_cpu(kernel, args, count)


_fallback_warned = False


def _warn_fallback():
    global _fallback_warned
    if not _fallback_warned:
        warnings.warn(
            "no C++ compiler: using the slow NumPy projector; install g++ or clang++ for the fast CPU kernels",
            RuntimeWarning,
            stacklevel=3,
        )
        _fallback_warned = True


def _grid_args(be, grid):
    if not isinstance(grid, ImageGrid):
        raise TypeError(f"grid must be an ImageGrid; got {type(grid).__name__}")
    return dict(
        image_origin=be.array(grid.origin_mm, np.float32),
        voxel_size=be.array(grid.voxel_size_mm, np.float32),
        image_shape=be.array(np.asarray(grid.shape), np.int32),
    )


def _tof_args(tof):
    if tof is None:
        return {}
    if not isinstance(tof, TOFParameters):
        raise TypeError(f"tof must be a TOFParameters or None; got {type(tof).__name__}")
    return dict(num_tof_bins=int(tof.num_bins), tof_bin_width=float(tof.bin_width_mm), tof_sigma=float(tof.sigma_mm),
                tof_num_sigmas=float(tof.num_sigmas))


def _check_image(image, grid, what="image"):
    if tuple(image.shape) != tuple(grid.shape):
        raise ValueError(f"{what} has shape {tuple(image.shape)} but the grid is {grid.shape}; expected (x, y, z)")


def _lor_arrays(lor_start_mm, lor_end_mm):
    s, e = lor_start_mm, lor_end_mm
    if s.shape != e.shape or s.shape[-1:] != (3,):
        raise ValueError(
            f"lor_start_mm and lor_end_mm must both have shape (..., 3); got {tuple(s.shape)} and {tuple(e.shape)}"
        )
    return s.reshape(-1, 3), e.reshape(-1, 3), tuple(s.shape[:-1])


# --------------------------------------------------------------------------------------------
# Low-level functions
# --------------------------------------------------------------------------------------------
def forward_project(image, lor_start_mm, lor_end_mm, grid, tof=None, device="auto"):
    """Joseph line integrals of an image along LORs.

    Parameters
    ----------
    image : ndarray, shape ``grid.shape``
        Activity (any unit, e.g. Bq/mL); NumPy or CuPy.
    lor_start_mm, lor_end_mm : ndarray, shape (..., 3)
        LOR end points in mm.
    grid : ImageGrid
    tof : TOFParameters, optional
        With TOF the result gets a trailing axis of ``tof.num_bins`` bins.
    device : {"auto", "cpu", "gpu"}
        Used when all inputs are NumPy arrays; CuPy inputs always run on the GPU.

    Returns
    -------
    ndarray, shape (...) or (..., num_bins), float32
        Line integrals in image units × mm, of the input's array type.
    """
    be = _Backend.for_inputs(device, image, lor_start_mm, lor_end_mm)
    _check_image(image, grid)
    s, e, lead = _lor_arrays(lor_start_mm, lor_end_mm)
    n = s.shape[0]
    if be.device == "cpu" and not be.cpu_compiled():
        _warn_fallback()
        from petbind.recon.kernels.reference import forward_reference

        out = forward_reference(image, s, e, grid, tof).astype(np.float32)
    else:
        out = be.xp.empty((n,) + (() if tof is None else (tof.num_bins,)), dtype=np.float32)
        be.launch("joseph_forward_lor" + ("" if tof is None else "_tof"), n, lor_start=be.array(s, np.float32),
                  lor_end=be.array(e, np.float32), image=be.array(image, np.float32), **_grid_args(be, grid),
                  **_tof_args(tof), projection=out, num_lors=n)
    out = out.reshape(lead + (() if tof is None else (tof.num_bins,)))
    return be.to_caller(out, image)


def back_project(values, lor_start_mm, lor_end_mm, grid, tof=None, device="auto"):
    """Joseph back-projection: the exact adjoint of :func:`forward_project`.

    Parameters
    ----------
    values : ndarray, shape (...) or (..., num_bins)
        One value per LOR (per TOF bin with ``tof``).
    lor_start_mm, lor_end_mm : ndarray, shape (..., 3)
        LOR end points in mm.
    grid : ImageGrid
    tof : TOFParameters, optional
    device : {"auto", "cpu", "gpu"}

    Returns
    -------
    ndarray, shape ``grid.shape``, float32
        Back-projected image (value units × mm), of the input's array type.
    """
    be = _Backend.for_inputs(device, values, lor_start_mm, lor_end_mm)
    s, e, lead = _lor_arrays(lor_start_mm, lor_end_mm)
    n = s.shape[0]
    expected = lead + (() if tof is None else (tof.num_bins,))
    if tuple(values.shape) != expected:
        raise ValueError(f"values must have shape {expected} for these LORs; got {tuple(values.shape)}")
    if be.device == "cpu" and not be.cpu_compiled():
        _warn_fallback()
        from petbind.recon.kernels.reference import back_reference

        vals = np.asarray(values).reshape((n,) + (() if tof is None else (tof.num_bins,)))
        return back_reference(vals, s, e, grid, tof).astype(np.float32)
    img = be.xp.zeros(grid.shape, dtype=np.float32)
    be.launch("joseph_back_lor" + ("" if tof is None else "_tof"), n, lor_start=be.array(s, np.float32),
              lor_end=be.array(e, np.float32), projection=be.array(values, np.float32), **_grid_args(be, grid),
              **_tof_args(tof), image=img, num_lors=n)
    return be.to_caller(img, values)


# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------
class Projector(LinearOperator):
    """Base of the projector operators.

    Subclasses hold everything their kernels need on the chosen device,
    copied once at construction: detector tables, LOR end points, the image
    grid and the TOF parameters (``self._geometry``); a call uploads nothing
    but its input when that is on the host.  ``forward``/``back`` accept NumPy
    or CuPy arrays and return the caller's array type.

    Subclasses set ``_kernel`` (``"joseph_{}_sino"`` style, ``{}`` being
    ``forward`` or ``back``), ``_geometry`` (the kernel's geometry arguments by
    name), ``num_lors`` (threads per launch) and ``out_shape``.
    """

    _kernel = ""

    def __init__(self, grid, tof=None, device="auto"):
        if not isinstance(grid, ImageGrid):
            raise TypeError(f"grid must be an ImageGrid; got {type(grid).__name__}")
        if tof is not None and not isinstance(tof, TOFParameters):
            raise TypeError(f"tof must be a TOFParameters or None; got {type(tof).__name__}")
        self.grid = grid
        self.tof = tof
        self.device = resolve_device(device)
        self._be = _Backend(self.device)
        self.in_shape = tuple(grid.shape)
        self._grid_args = _grid_args(self._be, grid)
        self._tof_args = _tof_args(tof)

    @property
    def xp(self):
        """The array namespace this projector computes with (numpy or cupy)."""
        return self._be.xp

    def _use_fallback(self):
        if self.device == "cpu" and not self._be.cpu_compiled():
            _warn_fallback()
            return True
        return False

    def _forward(self, x):
        be = self._be
        out = self._run_forward(be.array(x, np.float32))
        return be.to_caller(out, x)

    def _back(self, y):
        be = self._be
        out = self._run_back(be.array(y, np.float32))
        return be.to_caller(out, y)

    def back_inplace(self, y):
        """:meth:`back` that may overwrite ``y`` (scale it in place) instead of
        copying it: for callers whose ``y`` is a temporary of their own, such
        as OSEM's ratio.  ``y`` must be a C-contiguous float32 array of
        :attr:`xp`; the result is in :attr:`xp`."""
        if tuple(y.shape) != tuple(self.out_shape):
            raise ValueError(f"{type(self).__name__}.back_inplace expects shape {self.out_shape}; got {tuple(y.shape)}")
        if array_module(y) is not self.xp or y.dtype != np.float32 or not y.flags.c_contiguous:
            raise TypeError(f"back_inplace needs a C-contiguous float32 array of {self.xp.__name__}")
        return self._run_back(y, overwrite=True)

    def _launch(self, direction, suffix="", **arguments):
        name = self._kernel.format(direction) + ("" if self.tof is None or suffix is None else "_tof") + (suffix or "")
        count = kernels.kernel_signatures("joseph")[name].count.name
        self._be.launch(name, self.num_lors, **self._geometry, **self._grid_args, **self._tof_args,
                        **arguments, **{count: self.num_lors})

    def _lor_shape(self):
        return tuple(self.out_shape[:-1]) if self.tof is not None else tuple(self.out_shape)

    def _reference_forward(self, img):
        from petbind.recon.kernels.reference import forward_reference

        s, e = self.lor_endpoints_mm()
        tb = self._reference_tof_bins()
        return forward_reference(to_numpy(img), s, e, self.grid, self.tof, *tb).astype(np.float32).reshape(self.out_shape)

    def _reference_back(self, values):
        from petbind.recon.kernels.reference import back_reference

        s, e = self.lor_endpoints_mm()
        tb = self._reference_tof_bins()
        shape = (s.shape[0],) + (() if self.tof is None or tb else (self.tof.num_bins,))
        return back_reference(to_numpy(values).reshape(shape), s, e, self.grid, self.tof, *tb).astype(np.float32)

    def _reference_tof_bins(self):
        return ()

    def _run_forward(self, img):
        if self._use_fallback():
            return self._reference_forward(img)
        out = self.xp.empty(self.out_shape, dtype=np.float32)
        self._launch("forward", image=img, projection=out)
        return out

    def _run_back(self, values, overwrite=False):
        if self._use_fallback():
            return self._reference_back(values)
        img = self.xp.zeros(self.grid.shape, dtype=np.float32)
        self._launch("back", projection=values, image=img)
        return img


class EndpointProjector(Projector):
    """Projector for explicit LORs (end points in mm), kept on the device.

    Parameters
    ----------
    lor_start_mm, lor_end_mm : ndarray, shape (..., 3)
        LOR end points (mm), NumPy or CuPy.
    grid : ImageGrid
    tof : TOFParameters, optional
    device : {"auto", "cpu", "gpu"}

    Notes
    -----
    ``out_shape`` is ``lor_start_mm.shape[:-1]`` (plus ``(tof.num_bins,)``).
    The same kernels as :func:`forward_project`/:func:`back_project`, with
    the end points uploaded once instead of on every call.
    """

    _kernel = "joseph_{}_lor"

    def __init__(self, lor_start_mm, lor_end_mm, grid, tof=None, device="auto"):
        super().__init__(grid, tof, device)
        s, e, lead = _lor_arrays(lor_start_mm, lor_end_mm)
        be = self._be
        self.lor_shape = lead
        self.num_lors = int(s.shape[0])
        self.out_shape = lead + (() if tof is None else (tof.num_bins,))
        self._geometry = dict(lor_start=be.array(s, np.float32), lor_end=be.array(e, np.float32))

    def lor_endpoints_mm(self):
        """LOR end points (NumPy, for checks and the fallback)."""
        return to_numpy(self._geometry["lor_start"]), to_numpy(self._geometry["lor_end"])

    def __repr__(self):
        return (f"EndpointProjector(num_lors={self.num_lors}, out_shape={self.out_shape}, "
                f"tof={'yes' if self.tof else 'no'}, device={self.device!r})")


class SinogramProjector(Projector):
    """Projector for a :class:`~petbind.recon.geometry.SinogramLayout`.

    Parameters
    ----------
    layout : SinogramLayout
    grid : ImageGrid
    tof : TOFParameters, optional
    views : array of int, optional
        Subset of views (OSEM); default all.  ``out_shape`` is then
        ``(num_planes, len(views), num_radial[, num_tof_bins])``.
    device : {"auto", "cpu", "gpu"}

    Notes
    -----
    For ``span > 1`` each plane's projection is multiplied by the number of
    ring pairs it groups (:attr:`SinogramLayout.plane_multiplicity`).
    """

    _kernel = "joseph_{}_sino"

    def __init__(self, layout, grid, tof=None, views=None, device="auto"):
        if not isinstance(layout, SinogramLayout):
            raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
        super().__init__(grid, tof, device)
        views = np.arange(layout.num_views) if views is None else np.asarray(views, dtype=np.int64).reshape(-1)
        if views.size == 0 or views.min() < 0 or views.max() >= layout.num_views:
            raise ValueError(f"views must be non-empty indices in [0, {layout.num_views}); got {views}")
        self.layout = layout
        self.views = views
        self.out_shape = (layout.num_planes, views.size, layout.num_radial) + (() if tof is None else (tof.num_bins,))
        be = self._be
        self._geometry = dict(
            crystal_xy=be.array(layout.scanner.crystal_xy_mm, np.float32),
            plane_z=be.array(layout.plane_z_mm, np.float32),
            views=be.array(views, np.int32),
            crystals_per_ring=int(layout.scanner.crystals_per_ring),
            num_subset_views=int(views.size),
            num_radial=int(layout.num_radial),
        )
        mult = layout.plane_multiplicity
        self._mult_lor = None if np.all(mult == 1) else be.array(mult.reshape(-1, 1, 1), np.float32)
        self._mult = None if self._mult_lor is None else self._mult_lor.reshape((-1,) + (1,) * (len(self.out_shape) - 1))
        self.num_lors = int(np.prod(self.out_shape[:3]))

    def lor_endpoints_mm(self):
        """LOR end points of this projector's bins (NumPy, for checks and plots)."""
        s, e = self.layout.lor_endpoints_mm(self.views)
        return s.reshape(-1, 3), e.reshape(-1, 3)

    def _run_forward(self, img):
        out = super()._run_forward(img)
        if self._mult is not None:
            out *= self._mult
        return out

    def _run_back(self, sino, overwrite=False):
        if self._mult is not None:
            if overwrite:
                sino *= self._mult
            else:
                sino = sino * self._mult
        return super()._run_back(sino)

    def back_tof_summed(self, values):
        """Adjoint of summing the TOF bins: ``P_tof^T (v ⊗ 1)``.

        Parameters
        ----------
        values : ndarray, shape ``out_shape[:3]`` (the non-TOF sinogram)
            One value per LOR, given to every TOF bin (NumPy or CuPy).

        Returns
        -------
        ndarray, shape ``grid.shape``
            Equal to ``back(values[..., None] * ones(num_tof_bins))`` at about
            the cost of a non-TOF back-projection: the TOF weights of a sample
            sum to 1 over the bins its truncated kernel overlaps.  With
            ``values = m`` this is the TOF sensitivity.  For a non-TOF
            projector it is :meth:`back`.
        """
        if tuple(values.shape) != self._lor_shape():
            raise ValueError(f"values must have the non-TOF shape {self._lor_shape()}; got {tuple(values.shape)}")
        if self.tof is None:
            return self.back(values)
        be = self._be
        v = be.array(values, np.float32)
        if self._use_fallback():
            full = self.xp.broadcast_to(v[..., None], self.out_shape)
            return be.to_caller(self._run_back(self.xp.ascontiguousarray(full)), values)
        if self._mult_lor is not None:
            v = v * self._mult_lor
        img = self.xp.zeros(self.grid.shape, dtype=np.float32)
        self._launch("back", suffix="_summed", lor_values=v, image=img)
        return be.to_caller(img, values)

    def __repr__(self):
        return (
            f"SinogramProjector(out_shape={self.out_shape}, in_shape={self.in_shape}, "
            f"tof={'yes' if self.tof else 'no'}, device={self.device!r})"
        )


class ListmodeProjector(Projector):
    """Projector for listmode events (one LOR per event).

    Parameters
    ----------
    scanner : Scanner or DetectorArray
        A ring scanner, or detectors at any positions.
    grid : ImageGrid
    detector_ids : ndarray of int, shape (num_events, 2)
        Detector ids of both ends (``ring * crystals_per_ring + crystal`` for
        a :class:`Scanner`, the row of ``positions_mm`` for a
        :class:`DetectorArray`).
    tof_bins : ndarray of int, shape (num_events,), optional
        Each event's TOF bin; required when ``tof`` is given.
    tof : TOFParameters, optional
    device : {"auto", "cpu", "gpu"}

    Notes
    -----
    ``out_shape == (num_events,)``: with TOF each event's value is the
    projection into its own TOF bin.
    """

    _kernel = "joseph_{}_listmode"

    def __init__(self, scanner, grid, detector_ids, tof_bins=None, tof=None, device="auto"):
        if not isinstance(scanner, (Scanner, DetectorArray)):
            raise TypeError(f"scanner must be a Scanner or DetectorArray; got {type(scanner).__name__}")
        super().__init__(grid, tof, device)
        ids = np.asarray(to_numpy(detector_ids))
        if ids.ndim != 2 or ids.shape[1] != 2:
            raise ValueError(f"detector_ids must have shape (num_events, 2); got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= scanner.num_detectors):
            raise ValueError(
                f"detector_ids must lie in [0, {scanner.num_detectors}) for {scanner!r}; "
                f"got range [{ids.min()}, {ids.max()}]"
            )
        if (tof is None) != (tof_bins is None):
            raise ValueError("give both tof and tof_bins, or neither")
        be = self._be
        self.scanner = scanner
        self.num_events = self.num_lors = int(ids.shape[0])
        self.out_shape = (self.num_events,)
        self._geometry = dict(detector_xyz=be.array(scanner.detector_positions_mm(), np.float32),
                              detector_ids=be.array(ids, np.int32))
        if tof is not None:
            tb = np.asarray(to_numpy(tof_bins)).reshape(-1)
            if tb.shape[0] != self.num_events:
                raise ValueError(f"tof_bins must have one entry per event ({self.num_events}); got {tb.shape[0]}")
            if tb.size and (tb.min() < 0 or tb.max() >= tof.num_bins):
                raise ValueError(f"tof_bins must lie in [0, {tof.num_bins}); got range [{tb.min()}, {tb.max()}]")
            self._geometry["tof_bin"] = be.array(tb, np.int32)

    def lor_endpoints_mm(self):
        xyz = self.scanner.detector_positions_mm()
        ids = to_numpy(self._geometry["detector_ids"])
        return xyz[ids[:, 0]], xyz[ids[:, 1]]

    def _reference_tof_bins(self):
        return () if self.tof is None else (to_numpy(self._geometry["tof_bin"]),)

    def _run_forward(self, img):
        if self.num_events == 0:
            return self.xp.zeros(0, dtype=np.float32)
        return super()._run_forward(img)

    def __repr__(self):
        return f"ListmodeProjector(num_events={self.num_events}, in_shape={self.in_shape}, tof={'yes' if self.tof else 'no'}, device={self.device!r})"
