"""Scanner, image grid, sinogram layout and time-of-flight description.

Conventions (stated once, used everywhere in ``recon``)
------------------------------------------------------
* Lengths are millimetres, times of flight picoseconds (converted to mm with
  ``c / 2``).
* The scanner axis is ``z``.  Scanner coordinates are taken to coincide with
  NIfTI RAS+ world coordinates (patient head-first supine, no table offset):
  looking into the gantry from the bed, ``+x`` left, ``+y`` up, ``+z`` into the
  gantry.  STIR's gantry frame is this one reflected through the scanner
  centre (``petbind.recon.rawdata.stir``).
* Image arrays are indexed ``(x, y, z)`` and stored C-contiguous, so ``z`` is
  the fastest-varying index in memory: ``flat = (i * ny + j) * nz + k``.
* ``origin_mm`` is the centre of voxel ``(0, 0, 0)``; voxel ``(i, j, k)`` has
  its centre at ``origin_mm + (i, j, k) * voxel_size_mm``.
* Detector ids: ``ring * crystals_per_ring + crystal``; crystal ``0`` is the
  first crystal of module ``0`` and crystals are numbered counter-clockwise
  seen from ``+z``.
* Sinograms are indexed ``(plane, view, radial)`` (``radial`` fastest); TOF
  sinograms add a trailing ``tof`` axis.  Planes are ordered by segment
  (ring difference) ``0, +1, -1, +2, -2, ...`` and, inside a segment, by
  increasing axial position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DetectorArray",
    "ImageGrid",
    "SCANNER_PRESETS",
    "Scanner",
    "SinogramLayout",
    "TOFParameters",
    "SPEED_OF_LIGHT_MM_PER_PS",
]

#: Speed of light in mm/ps.
SPEED_OF_LIGHT_MM_PER_PS = 0.299792458


def _as_triplet(value, name, dtype=float):
    arr = np.asarray(value, dtype=dtype).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3:
        raise ValueError(f"{name} must be a scalar or have 3 entries (x, y, z); got {value!r}")
    return arr


class ImageGrid:
    """Regular voxel grid in scanner coordinates.

    Parameters
    ----------
    shape : tuple of 3 int
        Number of voxels along ``(x, y, z)``.
    voxel_size_mm : float or sequence of 3 float
        Voxel edge lengths in mm.
    origin_mm : sequence of 3 float, optional
        Centre of voxel ``(0, 0, 0)`` in mm.  ``None`` centres the grid on the
        scanner centre (the grid's geometric centre is at ``(0, 0, 0)`` mm).

    Examples
    --------
    >>> grid = ImageGrid((4, 4, 2), 2.0)
    >>> grid.origin_mm.tolist()
    [-3.0, -3.0, -1.0]
    """

    def __init__(self, shape, voxel_size_mm, origin_mm=None):
        shape = tuple(int(s) for s in np.asarray(shape).reshape(-1))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"ImageGrid shape must be 3 positive integers (x, y, z); got {shape}")
        self.shape = shape
        self.voxel_size_mm = _as_triplet(voxel_size_mm, "voxel_size_mm")
        if np.any(self.voxel_size_mm <= 0):
            raise ValueError(f"voxel_size_mm must be positive; got {self.voxel_size_mm.tolist()}")
        if origin_mm is None:
            origin_mm = -0.5 * (np.asarray(shape) - 1) * self.voxel_size_mm
        self.origin_mm = _as_triplet(origin_mm, "origin_mm")

    @classmethod
    def from_affine(cls, shape, affine):
        """Build a grid from a diagonal NIfTI affine (no rotation or shear)."""
        affine = np.asarray(affine, dtype=float)
        off = affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))
        if np.any(np.abs(off) > 1e-6 * np.abs(affine[:3, :3]).max()) or np.any(np.diag(affine)[:3] <= 0):
            raise ValueError(
                "ImageGrid.from_affine needs a diagonal affine with positive voxel sizes "
                "(RAS+, no rotation); resample the image first"
            )
        return cls(shape[:3], np.diag(affine)[:3], affine[:3, 3])

    @property
    def affine(self):
        """NIfTI RAS+ affine (4×4, float64) mapping voxel indices to mm."""
        aff = np.eye(4)
        aff[:3, :3] = np.diag(self.voxel_size_mm)
        aff[:3, 3] = self.origin_mm
        return aff

    @property
    def num_voxels(self):
        return int(np.prod(self.shape))

    def axis_centres_mm(self):
        """Voxel-centre coordinates along each axis.

        Returns
        -------
        tuple of 3 ndarray
            ``(x_mm, y_mm, z_mm)``, each of length ``shape[axis]``.
        """
        return tuple(self.origin_mm[a] + np.arange(self.shape[a]) * self.voxel_size_mm[a] for a in range(3))

    def voxel_centres_mm(self):
        """All voxel centres, shape ``shape + (3,)`` in mm."""
        x, y, z = np.meshgrid(*self.axis_centres_mm(), indexing="ij")
        return np.stack([x, y, z], axis=-1)

    def extent_mm(self):
        """Lower and upper bounds of the image box (voxel edges), in mm."""
        lo = self.origin_mm - 0.5 * self.voxel_size_mm
        hi = lo + np.asarray(self.shape) * self.voxel_size_mm
        return lo, hi

    def __eq__(self, other):
        return (
            isinstance(other, ImageGrid)
            and self.shape == other.shape
            and np.allclose(self.voxel_size_mm, other.voxel_size_mm)
            and np.allclose(self.origin_mm, other.origin_mm)
        )

    def __repr__(self):
        vs = ", ".join(f"{v:g}" for v in self.voxel_size_mm)
        og = ", ".join(f"{v:g}" for v in self.origin_mm)
        return f"ImageGrid(shape={self.shape}, voxel_size_mm=({vs}), origin_mm=({og}))"


class Scanner:
    """Ring scanner: crystal centre positions in mm.

    Parameters
    ----------
    crystal_xy_mm : ndarray, shape (crystals_per_ring, 2)
        Transaxial crystal centre positions (mm), the same in every ring.
    ring_z_mm : ndarray, shape (num_rings,)
        Axial ring centres (mm).
    crystal_mask : ndarray of bool, shape (crystals_per_ring,), optional
        ``False`` marks gap positions (virtual crystals that never detect).
    name : str
        Free-text name.
    resolution_fwhm_mm : float, optional
        Spatial resolution of the scanner as an isotropic Gaussian (FWHM, mm,
        transaxial at the centre of the field): what an image-space
        resolution model ``G`` should use.  ``None`` when unknown.

    Notes
    -----
    Use the constructors :meth:`cylindrical`, :meth:`polygon` or the presets
    (:meth:`preset`: :meth:`demo`, :meth:`demo_small`, :meth:`mmr`,
    :meth:`hrrt`); the presets know their resolution.
    """

    def __init__(self, crystal_xy_mm, ring_z_mm, crystal_mask=None, name="scanner", resolution_fwhm_mm=None):
        xy = np.ascontiguousarray(crystal_xy_mm, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"crystal_xy_mm must have shape (crystals_per_ring, 2); got {xy.shape}")
        if xy.shape[0] < 4 or xy.shape[0] % 2:
            raise ValueError(f"crystals_per_ring must be even and >= 4; got {xy.shape[0]}")
        z = np.ascontiguousarray(ring_z_mm, dtype=np.float64).reshape(-1)
        if z.size < 1:
            raise ValueError("a scanner needs at least one ring")
        if crystal_mask is None:
            crystal_mask = np.ones(xy.shape[0], dtype=bool)
        crystal_mask = np.asarray(crystal_mask, dtype=bool).reshape(-1)
        if crystal_mask.shape[0] != xy.shape[0]:
            raise ValueError("crystal_mask must have one entry per crystal of a ring")
        if resolution_fwhm_mm is not None:
            resolution_fwhm_mm = float(resolution_fwhm_mm)
            if not (math.isfinite(resolution_fwhm_mm) and resolution_fwhm_mm > 0):
                raise ValueError(f"resolution_fwhm_mm must be a positive number (mm) or None; got {resolution_fwhm_mm}")
        self.crystal_xy_mm = xy
        self.ring_z_mm = z
        self.crystal_mask = crystal_mask
        self.name = str(name)
        self.resolution_fwhm_mm = resolution_fwhm_mm

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def cylindrical(cls, radius_mm, crystals_per_ring, num_rings, ring_spacing_mm, name="cylindrical",
                    resolution_fwhm_mm=None):
        """Crystals evenly spaced on a circle.

        Parameters
        ----------
        radius_mm : float
            Radius of the crystal centres (mm).
        crystals_per_ring : int
            Number of crystals per ring (even).
        num_rings : int
            Number of rings.
        ring_spacing_mm : float
            Axial distance between ring centres (mm).
        name : str
        resolution_fwhm_mm : float, optional
            See the class parameters.
        """
        phi = 2 * np.pi * np.arange(int(crystals_per_ring)) / int(crystals_per_ring)
        xy = float(radius_mm) * np.stack([np.cos(phi), np.sin(phi)], axis=1)
        return cls(xy, ring_positions(num_rings, ring_spacing_mm), name=name, resolution_fwhm_mm=resolution_fwhm_mm)

    @classmethod
    def polygon(
        cls,
        num_modules,
        crystals_per_module,
        crystal_pitch_mm,
        radius_mm,
        num_rings,
        ring_spacing_mm,
        gap_crystals_per_module=0,
        name="polygon",
        resolution_fwhm_mm=None,
    ):
        """Flat detector modules on a regular polygon (block scanners, HRRT octagon).

        Parameters
        ----------
        num_modules : int
            Number of flat modules (polygon sides).
        crystals_per_module : int
            Real crystals per module along the transaxial direction.
        crystal_pitch_mm : float
            Centre-to-centre distance of crystals along a module face (mm).
        radius_mm : float
            Distance from the scanner axis to the centre of each module face (mm).
        num_rings, ring_spacing_mm
            Axial sampling as in :meth:`cylindrical`.
        gap_crystals_per_module : int
            Virtual crystal positions appended after each module's real ones to
            model inter-block gaps (Siemens convention: one per block).  They get
            ``crystal_mask == False``.
        name : str
        resolution_fwhm_mm : float, optional
            See the class parameters.
        """
        n_pos = int(crystals_per_module) + int(gap_crystals_per_module)
        offsets = (np.arange(n_pos) - (n_pos - 1) / 2.0) * float(crystal_pitch_mm)
        xy, mask = [], []
        for m in range(int(num_modules)):
            phi = 2 * np.pi * m / int(num_modules)
            centre = float(radius_mm) * np.array([np.cos(phi), np.sin(phi)])
            tangent = np.array([-np.sin(phi), np.cos(phi)])
            xy.append(centre[None, :] + offsets[:, None] * tangent[None, :])
            mask.append(np.arange(n_pos) < int(crystals_per_module))
        return cls(np.concatenate(xy), ring_positions(num_rings, ring_spacing_mm), np.concatenate(mask), name=name,
                   resolution_fwhm_mm=resolution_fwhm_mm)

    @classmethod
    def mmr(cls):
        """Siemens Biograph mMR-like scanner.

        56 blocks of 8 crystals plus one gap position each (504 positions per
        ring), 64 rings 4.0625 mm apart, block faces at 328 mm from the axis.
        Resolution 4.3 mm FWHM (transaxial, 1 cm from the centre; Delso et
        al., J Nucl Med 2011;52:1914-1922).
        """
        pitch = 2 * 328.0 * math.tan(math.pi / 56) / 9
        return cls.polygon(56, 8, pitch, 328.0, 64, 4.0625, gap_crystals_per_module=1, name="mmr",
                           resolution_fwhm_mm=4.3)

    @classmethod
    def hrrt(cls):
        """Siemens HRRT-like brain scanner: an octagon of 8 flat heads.

        Each head has 9 × 13 blocks of 8 × 8 crystals (2.4375 mm pitch), so
        72 crystals per head transaxially (576 per ring) and 104 rings; head
        faces at 234.5 mm from the axis.  The HRRT's two-layer depth of
        interaction is not modelled.  Resolution 2.5 mm FWHM near the centre
        (de Jong et al., Phys Med Biol 2007;52:1505-1526).
        """
        return cls.polygon(8, 72, 2.4375, 234.5, 104, 2.4375, name="hrrt", resolution_fwhm_mm=2.5)

    @classmethod
    def demo(cls):
        """Small brain scanner used by the demo and tests (fast on a CPU).

        Radius 160 mm, 192 crystals per ring, 24 rings 5 mm apart (120 mm axial
        field of view).  Resolution 3.5 mm FWHM: the usual estimate
        ``1.25 sqrt((d/2)² + (0.0022 D)² + r²)`` (Moses, Nucl Instrum Methods
        A 2011;648:S236-S240) with crystal pitch ``d = 5.2`` mm, ring
        diameter ``D = 320`` mm and a ¹¹C positron range ``r = 0.5`` mm.
        """
        return cls.cylindrical(160.0, 192, 24, 5.0, name="demo", resolution_fwhm_mm=3.5)

    @classmethod
    def demo_small(cls):
        """Smaller, coarser brain scanner: the default of the study simulator.

        Radius 160 mm, 96 crystals per ring, 14 rings 10 mm apart (140 mm
        axial field of view): about 0.3 million sinogram bins with
        ``max_ring_difference=6``, so a whole simulated study reconstructs in
        minutes on two CPU cores.  Resolution 6.5 mm FWHM from the estimate
        of :meth:`demo` with a 10.5 mm crystal pitch.
        """
        return cls.cylindrical(160.0, 96, 14, 10.0, name="demo-small", resolution_fwhm_mm=6.5)

    @classmethod
    def preset(cls, name):
        """A preset scanner by name: one of :data:`SCANNER_PRESETS`.

        Raises
        ------
        ValueError
            For an unknown name (listing the known ones).
        """
        try:
            factory = getattr(cls, SCANNER_PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown scanner {name!r}; choose one of {', '.join(SCANNER_PRESETS)}") from None
        return factory()

    # -- properties -----------------------------------------------------------------------------
    @property
    def crystals_per_ring(self):
        return int(self.crystal_xy_mm.shape[0])

    @property
    def num_rings(self):
        return int(self.ring_z_mm.shape[0])

    @property
    def num_detectors(self):
        return self.crystals_per_ring * self.num_rings

    @property
    def radius_mm(self):
        """Mean transaxial distance of crystal centres from the axis (mm)."""
        return float(np.hypot(self.crystal_xy_mm[:, 0], self.crystal_xy_mm[:, 1]).mean())

    def detector_positions_mm(self):
        """Centres of all detectors, shape ``(num_detectors, 3)`` in mm, ordered by id."""
        xy = np.tile(self.crystal_xy_mm, (self.num_rings, 1))
        z = np.repeat(self.ring_z_mm, self.crystals_per_ring)
        return np.concatenate([xy, z[:, None]], axis=1)

    def detector_mask(self):
        """``True`` for real detectors, ``False`` for gaps; shape ``(num_detectors,)``."""
        return np.tile(self.crystal_mask, self.num_rings)

    def __eq__(self, other):
        return (
            isinstance(other, Scanner)
            and self.crystal_xy_mm.shape == other.crystal_xy_mm.shape
            and self.ring_z_mm.shape == other.ring_z_mm.shape
            and np.allclose(self.crystal_xy_mm, other.crystal_xy_mm)
            and np.allclose(self.ring_z_mm, other.ring_z_mm)
            and np.array_equal(self.crystal_mask, other.crystal_mask)
        )

    def __repr__(self):
        gaps = int((~self.crystal_mask).sum())
        res = "" if self.resolution_fwhm_mm is None else f", resolution_fwhm_mm={self.resolution_fwhm_mm:g}"
        return (
            f"Scanner(name={self.name!r}, crystals_per_ring={self.crystals_per_ring}"
            f"{f' ({gaps} gaps)' if gaps else ''}, num_rings={self.num_rings}, "
            f"radius_mm={self.radius_mm:.1f}, axial_fov_mm={np.ptp(self.ring_z_mm):.1f}{res})"
        )


class DetectorArray:
    """Detectors at arbitrary positions: any geometry, not only rings.

    Listmode projection needs only the detector centres, so this is enough
    for :class:`~petbind.recon.projector.ListmodeProjector` and listmode OSEM
    on geometries that are not a ring (several module types, partial rings,
    flat panels, depth-of-interaction layers).  Sinograms need a
    :class:`Scanner`.

    Parameters
    ----------
    positions_mm : ndarray, shape (num_detectors, 3)
        Detector centres (mm), indexed by detector id.
    mask : ndarray of bool, shape (num_detectors,), optional
        ``False`` for detectors that never detect.
    name : str

    Examples
    --------
    >>> import numpy as np
    >>> det = DetectorArray(np.array([[-50.0, 0, 0], [50.0, 0, 0], [0, 50.0, 0]]), name="three")
    >>> det.num_detectors
    3
    """

    def __init__(self, positions_mm, mask=None, name="detectors"):
        pos = np.ascontiguousarray(positions_mm, dtype=np.float64)
        if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] < 2:
            raise ValueError(f"positions_mm must have shape (num_detectors >= 2, 3); got {pos.shape}")
        if not np.all(np.isfinite(pos)):
            raise ValueError("positions_mm must be finite")
        if mask is None:
            mask = np.ones(pos.shape[0], dtype=bool)
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.shape[0] != pos.shape[0]:
            raise ValueError(f"mask must have one entry per detector ({pos.shape[0]}); got {mask.shape[0]}")
        self.positions_mm = pos
        self.mask = mask
        self.name = str(name)

    @property
    def num_detectors(self):
        return int(self.positions_mm.shape[0])

    def detector_positions_mm(self):
        """Centres of all detectors, shape ``(num_detectors, 3)`` in mm, ordered by id."""
        return self.positions_mm

    def detector_mask(self):
        """``True`` for detectors that detect; shape ``(num_detectors,)``."""
        return self.mask

    def __eq__(self, other):
        return (
            isinstance(other, DetectorArray)
            and self.positions_mm.shape == other.positions_mm.shape
            and np.allclose(self.positions_mm, other.positions_mm)
            and np.array_equal(self.mask, other.mask)
        )

    def __repr__(self):
        lo, hi = self.positions_mm.min(axis=0), self.positions_mm.max(axis=0)
        box = ", ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(lo, hi))
        return f"DetectorArray(name={self.name!r}, num_detectors={self.num_detectors}, extent_mm=({box}))"


#: Preset scanners by name (:meth:`Scanner.preset`) -> constructor.
SCANNER_PRESETS = {"demo-small": "demo_small", "demo": "demo", "mmr": "mmr", "hrrt": "hrrt"}


def ring_positions(num_rings, ring_spacing_mm):
    """Axial centres (mm) of ``num_rings`` rings ``ring_spacing_mm`` apart, centred on z = 0."""
    n = int(num_rings)
    if n < 1:
        raise ValueError(f"num_rings must be >= 1; got {num_rings}")
    return (np.arange(n) - (n - 1) / 2.0) * float(ring_spacing_mm)


class SinogramLayout:
    """Which detector pairs form each sinogram bin.

    Parameters
    ----------
    scanner : Scanner
    num_radial : int
        Number of radial (tangential) bins per view, at most
        ``crystals_per_ring - 1``.
    max_ring_difference : int, optional
        Largest ``|ring2 - ring1|`` kept; ``None`` keeps all.
    span : int
        Axial compression (odd).  ``1`` keeps every ring pair as its own
        plane; ``span > 1`` groups ring pairs with the same ring sum whose ring
        differences fall in the same segment ``round(diff / span)`` (the
        Siemens Michelogram convention).  A grouped plane is modelled by one LOR
        through the mean axial positions of its ring pairs, weighted by the
        number of pairs (:attr:`plane_multiplicity`).

    Notes
    -----
    Axis order is ``(plane, view, radial)``.  ``num_views = crystals_per_ring // 2``.
    For view ``v`` and radial offset ``s = radial - num_radial // 2`` the crystals
    are ``c1 = (v - floor(s / 2)) mod N`` and ``c2 = (v + N / 2 + ceil(s / 2)) mod N``
    (``N = crystals_per_ring``): LORs of one view are (nearly) parallel and
    adjacent radial bins interleave the two neighbouring angles, as on
    clinical scanners.  The LOR runs from ``(c1, ring1)`` to ``(c2, ring2)``.
    """

    axis_names = ("plane", "view", "radial")

    def __init__(self, scanner, num_radial, max_ring_difference=None, span=1):
        if not isinstance(scanner, Scanner):
            raise TypeError(f"scanner must be a Scanner; got {type(scanner).__name__}")
        n = scanner.crystals_per_ring
        num_radial = int(num_radial)
        if not 1 <= num_radial <= n - 1:
            raise ValueError(f"num_radial must be in [1, {n - 1}] for {n} crystals per ring; got {num_radial}")
        span = int(span)
        if span < 1 or span % 2 == 0:
            raise ValueError(f"span must be an odd positive integer; got {span}")
        nr = scanner.num_rings
        if max_ring_difference is None:
            max_ring_difference = nr - 1
        max_ring_difference = int(max_ring_difference)
        if not 0 <= max_ring_difference <= nr - 1:
            raise ValueError(f"max_ring_difference must be in [0, {nr - 1}]; got {max_ring_difference}")
        self.scanner = scanner
        self.num_radial = num_radial
        self.num_views = n // 2
        self.max_ring_difference = max_ring_difference
        self.span = span
        self._build_planes()

    def _build_planes(self):
        nr = self.scanner.num_rings
        r1, r2 = np.meshgrid(np.arange(nr), np.arange(nr), indexing="ij")
        r1, r2 = r1.ravel(), r2.ravel()
        keep = np.abs(r2 - r1) <= self.max_ring_difference
        r1, r2 = r1[keep], r2[keep]
        diff = r2 - r1
        segment = np.floor(diff / self.span + 0.5).astype(int)
        # Segment order 0, +1, -1, +2, -2, ...
        seg_rank = np.where(segment > 0, 2 * segment - 1, -2 * segment)
        ring_sum = r1 + r2
        order = np.lexsort((diff, ring_sum, seg_rank))
        r1, r2, seg_rank, ring_sum, segment = r1[order], r2[order], seg_rank[order], ring_sum[order], segment[order]
        key = seg_rank * (2 * nr) + ring_sum
        uniq, plane_of_pair = np.unique(key, return_inverse=True)
        num_planes = uniq.size
        z = self.scanner.ring_z_mm
        counts = np.bincount(plane_of_pair, minlength=num_planes)
        self.plane_multiplicity = counts.astype(np.float32)
        self.plane_z_mm = np.stack(
            [
                np.bincount(plane_of_pair, z[r1], num_planes) / counts,
                np.bincount(plane_of_pair, z[r2], num_planes) / counts,
            ],
            axis=1,
        )
        self.plane_segment = np.zeros(num_planes, dtype=int)
        self.plane_segment[plane_of_pair] = segment
        #: ring pairs (ring1, ring2) and the plane each belongs to
        self.ring_pairs = np.stack([r1, r2], axis=1)
        self.plane_of_ring_pair = plane_of_pair

    @property
    def num_planes(self):
        return int(self.plane_z_mm.shape[0])

    @property
    def shape(self):
        return (self.num_planes, self.num_views, self.num_radial)

    @property
    def num_bins(self):
        return int(np.prod(self.shape))

    def crystal_pairs(self, views=None):
        """Crystal indices within a ring for every (view, radial) bin.

        Parameters
        ----------
        views : array of int, optional
            Subset of views (default all).

        Returns
        -------
        ndarray of int, shape (len(views), num_radial, 2)
        """
        n = self.scanner.crystals_per_ring
        v = np.arange(self.num_views) if views is None else np.asarray(views, dtype=int)
        s = np.arange(self.num_radial) - self.num_radial // 2
        c1 = (v[:, None] - np.floor_divide(s, 2)[None, :]) % n
        c2 = (v[:, None] + n // 2 - np.floor_divide(-s, 2)[None, :]) % n
        return np.stack([c1, c2], axis=-1)

    def detector_pairs(self, views=None):
        """Detector ids of both LOR ends for every bin.

        For ``span > 1`` the first ring pair of each plane is reported.

        Returns
        -------
        ndarray of int64, shape (num_planes, len(views), num_radial, 2)
        """
        cp = self.crystal_pairs(views)
        first = np.searchsorted(self.plane_of_ring_pair, np.arange(self.num_planes))
        rings = self.ring_pairs[first]
        n = self.scanner.crystals_per_ring
        d1 = rings[:, 0, None, None] * n + cp[None, :, :, 0]
        d2 = rings[:, 1, None, None] * n + cp[None, :, :, 1]
        return np.stack([d1, d2], axis=-1).astype(np.int64)

    def lor_endpoints_mm(self, views=None):
        """LOR start and end points of every bin.

        Returns
        -------
        start, end : ndarray, shape ``(num_planes, len(views), num_radial, 3)``, mm
        """
        cp = self.crystal_pairs(views)
        xy = self.scanner.crystal_xy_mm
        p = self.num_planes
        shape = (p,) + cp.shape[:2]
        start = np.empty(shape + (3,))
        end = np.empty(shape + (3,))
        start[..., :2] = xy[cp[..., 0]][None]
        end[..., :2] = xy[cp[..., 1]][None]
        start[..., 2] = self.plane_z_mm[:, 0, None, None]
        end[..., 2] = self.plane_z_mm[:, 1, None, None]
        return start, end

    def bin_mask(self, views=None):
        """``False`` for bins that touch a gap crystal; shape like :attr:`shape`."""
        cp = self.crystal_pairs(views)
        m = self.scanner.crystal_mask
        ok = m[cp[..., 0]] & m[cp[..., 1]]
        return np.broadcast_to(ok[None], (self.num_planes,) + ok.shape).copy()

    def view_subsets(self, num_subsets):
        """Interleaved view subsets for OSEM.

        Returns
        -------
        list of ndarray of int
            Subset ``k`` holds views ``k, k + num_subsets, ...``.
        """
        num_subsets = int(num_subsets)
        if not 1 <= num_subsets <= self.num_views:
            raise ValueError(f"num_subsets must be in [1, {self.num_views}]; got {num_subsets}")
        return [np.arange(k, self.num_views, num_subsets) for k in range(num_subsets)]

    def __repr__(self):
        return (
            f"SinogramLayout(shape={self.shape} {self.axis_names}, span={self.span}, "
            f"max_ring_difference={self.max_ring_difference}, scanner={self.scanner.name!r})"
        )

    def bin_indices(self, detector_ids, return_swapped=False):
        """Flat sinogram bin of each detector pair (inverse of :meth:`detector_pairs`).

        Parameters
        ----------
        detector_ids : array of int, shape (n, 2)
            Detector ids of both LOR ends (NumPy or CuPy; the result lives on
            the same device).
        return_swapped : bool
            Also return whether each pair is stored in the opposite orientation
            to the bin's ``(c1, c2)``.

        Returns
        -------
        bins : array of int64, shape (n,)
            ``(plane * num_views + view) * num_radial + radial``, or ``-1`` for
            pairs outside the layout: radial offset out of range, ring
            difference above ``max_ring_difference``, a gap crystal, or both
            ends on the same crystal.
        swapped : array of bool, shape (n,)
            Only with ``return_swapped``.  ``True`` where ``detector_ids[:, 0]``
            is the bin's second crystal: a TOF bin ``k`` of such an event
            belongs to TOF bin ``num_tof_bins - 1 - k`` of the sinogram.

        Notes
        -----
        From the forward map (see the class Notes), ``c2 - c1 = N/2 + s``
        (mod ``N``), which fixes ``s`` up to the orientation, and
        ``view = (c1 + floor(s / 2)) mod N``.  Of the two orientations exactly
        one gives ``view < N / 2``; that one is used.

        Raises
        ------
        ValueError
            For ids outside ``[0, num_detectors)`` or a wrong shape.
        """
        from petbind.core.device import array_module  # noqa: PLC0415 - geometry stays free of device imports at load

        xp = array_module(detector_ids)
        ids = xp.asarray(detector_ids)
        if ids.ndim != 2 or ids.shape[1] != 2:
            raise ValueError(f"detector_ids must have shape (n, 2); got {tuple(ids.shape)}")
        ids = ids.astype(xp.int64)
        n_det = self.scanner.num_detectors
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_det):
            raise ValueError(f"detector_ids must lie in [0, {n_det}); got [{int(ids.min())}, {int(ids.max())}]")
        lut = self._device_tables(xp)
        n = self.scanner.crystals_per_ring
        half = n // 2
        ring_a, crys_a = ids[:, 0] // n, ids[:, 0] % n
        ring_b, crys_b = ids[:, 1] // n, ids[:, 1] % n
        # orientation (c1, c2) = (a, b); s in [-N/2, N/2)
        s = (crys_b - crys_a - half) % n
        s = xp.where(s >= half, s - n, s)
        view = (crys_a + xp.floor_divide(s, 2)) % n
        swapped = view >= half
        # the other orientation: s -> -s, view -> view - N/2
        s = xp.where(swapped, -s, s)
        view = xp.where(swapped, view - half, view)
        ring1 = xp.where(swapped, ring_b, ring_a)
        ring2 = xp.where(swapped, ring_a, ring_b)
        radial = s + self.num_radial // 2
        ok = (radial >= 0) & (radial < self.num_radial) & (crys_a != crys_b)
        ok &= lut["mask"][crys_a] & lut["mask"][crys_b]
        plane = lut["plane"][ring1, ring2]
        ok &= plane >= 0
        bins = (plane * self.num_views + view) * self.num_radial + radial
        bins = xp.where(ok, bins, -1)
        return (bins, swapped) if return_swapped else bins

    def _device_tables(self, xp):
        """Plane look-up ``(ring1, ring2) -> plane`` (-1 outside) and crystal mask, cached per array module."""
        cache = self.__dict__.setdefault("_table_cache", {})
        key = xp.__name__
        if key not in cache:
            nr = self.scanner.num_rings
            plane = np.full((nr, nr), -1, dtype=np.int64)
            plane[self.ring_pairs[:, 0], self.ring_pairs[:, 1]] = self.plane_of_ring_pair
            cache[key] = {"plane": xp.asarray(plane), "mask": xp.asarray(self.scanner.crystal_mask)}
        return cache[key]


@dataclass(frozen=True)
class TOFParameters:
    """Time-of-flight binning and resolution.

    Parameters
    ----------
    num_bins : int
        Number of TOF bins (odd numbers centre a bin on the LOR midpoint).
    bin_width_mm : float
        Width of a TOF bin along the LOR (mm).
    fwhm_ps : float
        Coincidence timing resolution, FWHM in ps.
    num_sigmas : float
        The Gaussian TOF kernel is truncated at this many standard deviations
        and renormalised over the bins it covers, so that summing all TOF bins
        gives exactly the non-TOF projection.

    Notes
    -----
    A time difference ``Δt`` moves the annihilation point by ``c Δt / 2``
    along the LOR, so ``fwhm_mm = fwhm_ps * c / 2``.  Bin ``k`` is centred at
    ``(k - (num_bins - 1) / 2) * bin_width_mm`` from the LOR midpoint, positive
    towards the LOR end point.
    """

    num_bins: int
    bin_width_mm: float
    fwhm_ps: float
    num_sigmas: float = field(default=3.0)

    def __post_init__(self):
        if int(self.num_bins) < 1:
            raise ValueError(f"TOF num_bins must be >= 1; got {self.num_bins}")
        if not self.bin_width_mm > 0 or not self.fwhm_ps > 0 or not self.num_sigmas > 0:
            raise ValueError(
                "TOF bin_width_mm, fwhm_ps and num_sigmas must be positive; "
                f"got {self.bin_width_mm}, {self.fwhm_ps}, {self.num_sigmas}"
            )

    @classmethod
    def from_bin_width_ps(cls, num_bins, bin_width_ps, fwhm_ps, num_sigmas=3.0):
        """Build from a bin width given as a time difference (ps)."""
        return cls(int(num_bins), bin_width_ps * SPEED_OF_LIGHT_MM_PER_PS / 2, float(fwhm_ps), num_sigmas)

    @property
    def fwhm_mm(self):
        return self.fwhm_ps * SPEED_OF_LIGHT_MM_PER_PS / 2

    @property
    def sigma_mm(self):
        return self.fwhm_mm / (2 * math.sqrt(2 * math.log(2)))

    def bin_centres_mm(self):
        """Offsets of the TOF bin centres from the LOR midpoint (mm)."""
        return (np.arange(self.num_bins) - (self.num_bins - 1) / 2) * self.bin_width_mm
