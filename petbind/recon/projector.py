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
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.recon.operators import LinearOperator

log = logging.getLogger(__name__)

__all__ = ["forward_project", "back_project", "Projector", "SinogramProjector", "ListmodeProjector"]


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

    def launch(self, kernel, args, count):
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
    return (
        be.array(grid.origin_mm, np.float32),
        be.array(grid.voxel_size_mm, np.float32),
        be.array(np.asarray(grid.shape), np.int32),
    )


def _tof_args(tof):
    if not isinstance(tof, TOFParameters):
        raise TypeError(f"tof must be a TOFParameters or None; got {type(tof).__name__}")
    return (int(tof.num_bins), float(tof.bin_width_mm), float(tof.sigma_mm), float(tof.num_sigmas))


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
        s, e = be.array(s, np.float32), be.array(e, np.float32)
        img = be.array(image, np.float32)
        if tof is None:
            out = be.xp.empty(n, dtype=np.float32)
            be.launch("joseph_forward_lor", (s, e, img, *_grid_args(be, grid), out, n), n)
        else:
            out = be.xp.empty((n, tof.num_bins), dtype=np.float32)
            be.launch("joseph_forward_lor_tof", (s, e, img, *_grid_args(be, grid), *_tof_args(tof), out, n), n)
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
    s, e = be.array(s, np.float32), be.array(e, np.float32)
    vals = be.array(values, np.float32)
    img = be.xp.zeros(grid.shape, dtype=np.float32)
    if tof is None:
        be.launch("joseph_back_lor", (s, e, vals, *_grid_args(be, grid), img, n), n)
    else:
        be.launch("joseph_back_lor_tof", (s, e, vals, *_grid_args(be, grid), *_tof_args(tof), img, n), n)
    return be.to_caller(img, values)


# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------
class Projector(LinearOperator):
    """Base of the projector operators.

    Subclasses hold their detector tables on the chosen device (copied once);
    ``forward``/``back`` accept NumPy or CuPy arrays and return the caller's
    array type, moving data only when the caller's type differs from the
    projector's device.
    """

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
        self._tables = (
            be.array(layout.scanner.crystal_xy_mm, np.float32),
            be.array(layout.plane_z_mm, np.float32),
            be.array(views, np.int32),
            int(layout.scanner.crystals_per_ring),
            int(views.size),
            int(layout.num_radial),
        )
        mult = layout.plane_multiplicity
        self._mult = None if np.all(mult == 1) else be.array(mult.reshape((-1,) + (1,) * (len(self.out_shape) - 1)), np.float32)
        self._grid_args = _grid_args(be, grid)
        self.num_lors = int(np.prod(self.out_shape[:3]))

    def lor_endpoints_mm(self):
        """LOR end points of this projector's bins (NumPy, for checks and plots)."""
        return self.layout.lor_endpoints_mm(self.views)

    def _run_forward(self, img):
        be = self._be
        if self._use_fallback():
            from petbind.recon.kernels.reference import forward_reference

            s, e = self.lor_endpoints_mm()
            out = forward_reference(img, s, e, self.grid, self.tof).astype(np.float32).reshape(self.out_shape)
        else:
            out = be.xp.empty(self.out_shape, dtype=np.float32)
            n = self.num_lors
            if self.tof is None:
                be.launch("joseph_forward_sino", (*self._tables, img, *self._grid_args, out, n), n)
            else:
                args = (*self._tables, img, *self._grid_args, *_tof_args(self.tof), out, n)
                be.launch("joseph_forward_sino_tof", args, n)
        if self._mult is not None:
            out *= self._mult
        return out

    def _run_back(self, sino):
        be = self._be
        if self._mult is not None:
            sino = sino * self._mult
        if self._use_fallback():
            from petbind.recon.kernels.reference import back_reference

            s, e = self.lor_endpoints_mm()
            vals = sino.reshape((self.num_lors,) + (() if self.tof is None else (self.tof.num_bins,)))
            return back_reference(vals, s, e, self.grid, self.tof).astype(np.float32)
        img = be.xp.zeros(self.grid.shape, dtype=np.float32)
        n = self.num_lors
        if self.tof is None:
            be.launch("joseph_back_sino", (*self._tables, sino, *self._grid_args, img, n), n)
        else:
            be.launch("joseph_back_sino_tof", (*self._tables, sino, *self._grid_args, *_tof_args(self.tof), img, n), n)
        return img

    def __repr__(self):
        return (
            f"SinogramProjector(out_shape={self.out_shape}, in_shape={self.in_shape}, "
            f"tof={'yes' if self.tof else 'no'}, device={self.device!r})"
        )


class ListmodeProjector(Projector):
    """Projector for listmode events (one LOR per event).

    Parameters
    ----------
    scanner : Scanner
    grid : ImageGrid
    detector_ids : ndarray of int, shape (num_events, 2)
        Detector ids of both ends (``ring * crystals_per_ring + crystal``).
    tof_bins : ndarray of int, shape (num_events,), optional
        Each event's TOF bin; required when ``tof`` is given.
    tof : TOFParameters, optional
    device : {"auto", "cpu", "gpu"}

    Notes
    -----
    ``out_shape == (num_events,)``: with TOF each event's value is the
    projection into its own TOF bin.
    """

    def __init__(self, scanner, grid, detector_ids, tof_bins=None, tof=None, device="auto"):
        if not isinstance(scanner, Scanner):
            raise TypeError(f"scanner must be a Scanner; got {type(scanner).__name__}")
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
        self.num_events = int(ids.shape[0])
        self.out_shape = (self.num_events,)
        self._xyz = be.array(scanner.detector_positions_mm(), np.float32)
        self._ids = be.array(ids, np.int32)
        if tof is not None:
            tb = np.asarray(to_numpy(tof_bins)).reshape(-1)
            if tb.shape[0] != self.num_events:
                raise ValueError(f"tof_bins must have one entry per event ({self.num_events}); got {tb.shape[0]}")
            if tb.size and (tb.min() < 0 or tb.max() >= tof.num_bins):
                raise ValueError(f"tof_bins must lie in [0, {tof.num_bins}); got range [{tb.min()}, {tb.max()}]")
            self._tof_bins = be.array(tb, np.int32)
        self._grid_args = _grid_args(be, grid)

    def lor_endpoints_mm(self):
        xyz = self.scanner.detector_positions_mm()
        ids = to_numpy(self._ids)
        return xyz[ids[:, 0]], xyz[ids[:, 1]]

    def _run_forward(self, img):
        be, n = self._be, self.num_events
        if self._use_fallback():
            from petbind.recon.kernels.reference import forward_reference

            s, e = self.lor_endpoints_mm()
            tb = None if self.tof is None else to_numpy(self._tof_bins)
            return forward_reference(img, s, e, self.grid, self.tof, tb).astype(np.float32)
        out = be.xp.empty(n, dtype=np.float32)
        if self.tof is None:
            be.launch("joseph_forward_listmode", (self._xyz, self._ids, img, *self._grid_args, out, n), n)
        else:
            args = (self._xyz, self._ids, self._tof_bins, img, *self._grid_args, *_tof_args(self.tof), out, n)
            be.launch("joseph_forward_listmode_tof", args, n)
        return out

    def _run_back(self, values):
        be, n = self._be, self.num_events
        if self._use_fallback():
            from petbind.recon.kernels.reference import back_reference

            s, e = self.lor_endpoints_mm()
            tb = None if self.tof is None else to_numpy(self._tof_bins)
            return back_reference(values, s, e, self.grid, self.tof, tb).astype(np.float32)
        img = be.xp.zeros(self.grid.shape, dtype=np.float32)
        if self.tof is None:
            be.launch("joseph_back_listmode", (self._xyz, self._ids, values, *self._grid_args, img, n), n)
        else:
            args = (self._xyz, self._ids, self._tof_bins, values, *self._grid_args, *_tof_args(self.tof), img, n)
            be.launch("joseph_back_listmode_tof", args, n)
        return img

    def __repr__(self):
        return f"ListmodeProjector(num_events={self.num_events}, in_shape={self.in_shape}, tof={'yes' if self.tof else 'no'}, device={self.device!r})"
