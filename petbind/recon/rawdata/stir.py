"""STIR's scanners and projection-data conventions, mapped onto petbind's geometry.

Everything petbind needs to exchange data with STIR (https://github.com/UCL/STIR)
lives here, so that the Interfile reader/writer and the Siemens mMR listmode
reader share one set of rules.  The facts below were read from STIR's
documentation and headers and checked against STIR's own output (the test
pack files in ``../shared/data/stir``); no STIR code is used.

Coordinates
-----------
STIR works in a gantry frame: ``x`` horizontal (to the right when looking from
the bed into the gantry), ``y`` vertical pointing *down*, ``z`` along the axis
from the gantry towards the bed, ``z = 0`` at ring 0.  For a head-first supine
patient that is (left, posterior, inferior).  petbind's scanner frame is RAS+
for the same patient (``recon/geometry.py``), so::

    x_petbind = -x_STIR,   y_petbind = -y_STIR,   z_petbind = -(z_STIR - z_centre)

where ``z_centre`` is the scanner's axial centre.  This is a point reflection
through the scanner centre; it maps LORs to LORs and keeps every distance.

Detectors and rings
-------------------
STIR places detector ``d`` of a ring at the azimuth ``psi = 2 pi d / N + view
offset`` (``N`` detectors per ring), i.e. at ``x_S = R sin(psi)``, ``y_S = -R
cos(psi)``; detector 0 sits at the top of the gantry.  In petbind's frame that is
the angle ``psi + pi / 2``.  petbind numbers the same crystal

    ``c = (d + N // 4) mod N``   (on the mMR: ``c = d + 126``)

so that a cylindrical petbind scanner keeps crystal 0 at angle 0 (plus the view
offset), and STIR ring ``r`` is petbind ring ``R - 1 - r`` (the z flip).
:func:`petbind_scanner` builds that scanner; crystal ``c`` is at
``R (cos a_c, sin a_c)`` with ``a_c = 2 pi (c - N // 4) / N + pi / 2 + view offset``.

Sinogram bins (non-arc-corrected, no view mashing)
--------------------------------------------------
For view ``v`` and tangential position ``t`` (``t = index - num_tangential // 2``,
so an even number of positions runs from ``-n/2`` to ``n/2 - 1``) STIR's
detectors are ``d1 = (v + floor(t / 2)) mod N`` and
``d2 = (v - floor((t + 1) / 2) + N / 2) mod N``; the LOR runs from ``(d1, ring1)``
to ``(d2, ring2)`` and the ring difference is ``ring2 - ring1``.  STIR's view 0
therefore holds vertical LORs, adjacent odd tangential bins interleave one
crystal the other way round from petbind (:class:`~petbind.recon.geometry.SinogramLayout`),
and once the crystal and ring renumbering above is applied the tangential sign
and the segment sign flip for half of the views.  :meth:`StirProjData.petbind_bins`
does the whole remap through detector pairs, so no special case is written out.

Segments and axial positions
----------------------------
The per-segment header lists (``minimum/maximum ring difference per segment``,
``matrix size`` of the axial coordinate) are in *storage order*; segment
numbers come from sorting the segments by mean ring difference (segment 0 holds
ring difference 0).  Inside a segment, axial position ``a`` holds the ring
pairs with ``ring1 + ring2 = S``, ``S = k a - k (n_a - 1) / 2 + (R - 1)`` where
``k = 2`` for a segment of one ring difference and ``k = 1`` otherwise (span).

Sinogram z and images
---------------------
STIR's LOR ``z`` is measured from the scanner's axial centre.  An image voxel
``(i, j, k)`` (array index from 0) lies at ``x_S = x0 + i dx``, ``y_S = y0 + j
dy`` where ``(x0, y0)`` is ``first pixel offset (mm) [1], [2]`` or, when absent,
``-(n_x // 2) dx`` and ``-(n_y // 2) dy`` (the axis passes through a voxel
centre); and at ``z_S = (k - (n_z - 1) / 2) dz + first pixel offset [3]``
measured from the scanner's axial centre: the middle plane of an image lies at
the centre of the scanner, shifted by the header's ``z`` offset.

Time of flight
--------------
A TOF sinogram has a fifth axis (``matrix axis label [5] := timing positions``,
outermost in the file).  Timing position ``k`` runs from ``-(n // 2)``; its
centre lies ``k w`` from the LOR midpoint (``w`` the mashed bin width, ``+w/2``
for an even ``n``) *towards the bin's first detector* ``(d1, ring1)``.
petbind's TOF bins are centred ``(k - (n-1)/2) w`` towards the LOR end point;
:meth:`StirProjData.petbind_bins` returns which bins are stored the other way
round.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from petbind.recon.geometry import Scanner, SinogramLayout, TOFParameters, ring_positions

__all__ = [
    "StirScannerInfo",
    "STIR_SCANNERS",
    "find_stir_scanner",
    "petbind_scanner",
    "scanner_from_stir_name",
    "StirSegment",
    "StirProjData",
    "stir_image_affine",
    "stir_image_offsets",
]


@dataclass(frozen=True)
class StirScannerInfo:
    """Parameters of one of STIR's built-in scanners (``Scanner.cxx``).

    Lengths in mm.  ``gap_detectors`` lists STIR detector numbers modulo
    ``gap_period`` that hold no crystal (the mMR's virtual crystal between
    blocks; never hit in real mMR listmode, see ``test_no_event_on_a_gap_crystal``).
    """

    name: str
    aliases: tuple
    num_rings: int
    max_num_non_arccorrected_bins: int
    default_num_arccorrected_bins: int
    num_detectors_per_ring: int
    inner_ring_radius_mm: float
    average_depth_of_interaction_mm: float
    ring_spacing_mm: float
    default_bin_size_mm: float
    intrinsic_tilt_deg: float = 0.0
    gap_period: int = 0
    gap_detectors: tuple = ()

    @property
    def effective_radius_mm(self):
        """Radius of the LOR end points, ``inner radius + depth of interaction`` (mm)."""
        return self.inner_ring_radius_mm + self.average_depth_of_interaction_mm


#: STIR's built-in scanners that petbind knows by name (facts from STIR 6's Scanner.cxx).
STIR_SCANNERS = (
    StirScannerInfo("ECAT 931", ("ECAT 931",), 8, 192, 192, 512, 510.0, 7.0, 13.5, 3.129),
    StirScannerInfo("ECAT 951", ("ECAT 951",), 16, 192, 192, 512, 510.0, 7.0, 6.75, 3.12932),
    StirScannerInfo("ECAT 953", ("ECAT 953",), 16, 160, 160, 384, 382.5, 7.0, 6.75, 3.12932, -15.0),
    StirScannerInfo("ECAT 921", ("ECAT 921", "ECAT EXACT", "EXACT"), 24, 192, 192, 384, 412.5, 7.0, 6.75, 3.375, -15.0),
    StirScannerInfo("ECAT 925", ("ECAT 925", "ECAT ART"), 24, 192, 192, 384, 412.5, 7.0, 6.75, 3.375, -15.0),
    StirScannerInfo("ECAT 961", ("ECAT 961", "ECAT HR"), 24, 336, 336, 784, 412.0, 7.0, 6.25, 1.65, -13.0),
    StirScannerInfo("ECAT 962", ("ECAT 962", "ECAT HR+"), 32, 288, 288, 576, 412.0, 7.0, 4.85, 2.25),
    StirScannerInfo("ECAT 966", ("ECAT EXACT 3D", "EXACT 3D", "ECAT HR++", "ECAT 966"), 48, 288, 288, 576, 412.0, 7.0, 4.85, 2.25),
    StirScannerInfo("PRT-1", ("PRT-1", "RPT"), 16, 128, 128, 384, 373.0, 7.0, 6.75, 3.1088),
    StirScannerInfo("HRRT", ("HRRT",), 104, 288, 576, 576, 234.765, 7.0, 2.4375, 1.21875),
    StirScannerInfo(
        "Siemens mMR", ("Siemens mMR", "mMR", "2008", "Biograph mMR"), 64, 344, 344, 504, 328.0, 7.0, 4.0625, 2.08626,
        gap_period=9, gap_detectors=(0,),
    ),
)


def _norm_name(name):
    return re.sub(r"[\s_]+", " ", str(name).strip()).lower()


def find_stir_scanner(name):
    """The :class:`StirScannerInfo` whose name or alias matches ``name`` (case and spaces ignored), or ``None``."""
    key = _norm_name(name)
    for info in STIR_SCANNERS:
        if key in {_norm_name(a) for a in info.aliases + (info.name,)}:
            return info
    return None


def petbind_scanner(num_detectors, num_rings, radius_mm, ring_spacing_mm, view_offset_deg=0.0, gap_period=0,
                    gap_detectors=(), name="stir"):
    """A petbind :class:`~petbind.recon.geometry.Scanner` with STIR's cylindrical geometry.

    Parameters
    ----------
    num_detectors : int
        Detectors per ring ``N`` (even).
    num_rings : int
    radius_mm : float
        Radius of the LOR end points (STIR's effective ring radius: inner
        radius + average depth of interaction).
    ring_spacing_mm : float
    view_offset_deg : float
        STIR's ``View offset (degrees)`` (the azimuth of detector 0).
    gap_period, gap_detectors
        STIR detectors ``d`` with ``d % gap_period in gap_detectors`` are gaps
        (``crystal_mask`` False).
    name : str

    Returns
    -------
    Scanner
        Crystal ``c`` is STIR detector ``(c - N // 4) mod N``; rings are
        centred on ``z = 0`` and STIR ring ``r`` is ring ``num_rings - 1 - r``.
    """
    n = int(num_detectors)
    if n < 4 or n % 2:
        raise ValueError(f"number of detectors per ring must be even and >= 4; got {num_detectors}")
    c = np.arange(n)
    angle = 2 * np.pi * (c - n // 4) / n + np.pi / 2 + math.radians(float(view_offset_deg))
    xy = float(radius_mm) * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    mask = np.ones(n, dtype=bool)
    if gap_period:
        d = (c - n // 4) % n
        mask = ~np.isin(d % int(gap_period), np.asarray(gap_detectors, dtype=int))
    return Scanner(xy, ring_positions(num_rings, ring_spacing_mm), mask, name=name)


def scanner_from_stir_name(name):
    """petbind scanner for one of STIR's built-in scanners, from its name alone.

    The view offset is 0, as STIR uses for a header without ``View offset
    (degrees)`` (the built-in intrinsic tilt is not applied by STIR's Interfile
    reader either).

    Raises
    ------
    ValueError
        For a name STIR does not know (listing the known ones).
    """
    info = find_stir_scanner(name)
    if info is None:
        known = ", ".join(i.name for i in STIR_SCANNERS)
        raise ValueError(f"unknown STIR scanner {name!r}; petbind knows {known}")
    return petbind_scanner(info.num_detectors_per_ring, info.num_rings, info.effective_radius_mm, info.ring_spacing_mm,
                           0.0, info.gap_period, info.gap_detectors, name=info.name)


# ------------------------------------------------------------------------------------------------
# projection data
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StirSegment:
    """One STIR segment: its number, ring-difference range and number of axial positions."""

    number: int
    min_ring_difference: int
    max_ring_difference: int
    num_axial: int


@dataclass
class StirProjData:
    """The facts of a STIR projection-data header, and their petbind equivalents.

    Parameters
    ----------
    num_detectors, num_rings : int
    radius_mm : float
        Effective ring radius (mm).
    ring_spacing_mm : float
    view_offset_deg : float
    segments : list of StirSegment
        In storage order.
    num_views, num_tangential : int
    arc_corrected : bool
    bin_size_mm : float
        Tangential sampling of arc-corrected data (mm).
    tof : TOFParameters or None
        With ``num_bins`` timing positions (petbind convention of the bin centres).
    gap_period, gap_detectors
        As in :func:`petbind_scanner`.
    name : str
    """

    num_detectors: int
    num_rings: int
    radius_mm: float
    ring_spacing_mm: float
    view_offset_deg: float
    segments: list
    num_views: int
    num_tangential: int
    arc_corrected: bool = False
    bin_size_mm: float = 0.0
    tof: Optional[TOFParameters] = None
    gap_period: int = 0
    gap_detectors: tuple = ()
    name: str = "stir"

    def __post_init__(self):
        nums = sorted(s.number for s in self.segments)
        if nums != list(range(nums[0], nums[-1] + 1)) or 0 not in nums:
            raise ValueError(f"STIR segments must be consecutive numbers including 0; got {nums}")

    # -- basic facts -----------------------------------------------------------------------------
    @property
    def view_mashing(self):
        """Uncompressed views per stored view (``N / 2 / num_views``)."""
        return (self.num_detectors // 2) / self.num_views

    @property
    def num_tof_bins(self):
        return 1 if self.tof is None else self.tof.num_bins

    def scanner(self):
        """The petbind :class:`Scanner` with this geometry (see the module docstring)."""
        return petbind_scanner(self.num_detectors, self.num_rings, self.radius_mm, self.ring_spacing_mm,
                               self.view_offset_deg, self.gap_period, self.gap_detectors, name=self.name)

    def tangential_positions(self):
        """STIR's tangential position numbers, ``-(n // 2) .. n - 1 - n // 2``."""
        return np.arange(self.num_tangential) - self.num_tangential // 2

    def ring_pairs(self, segment):
        """STIR ring pairs of each axial position of a segment.

        Returns
        -------
        list of ndarray, shape (k, 2)
            ``(ring1, ring2)`` STIR ring numbers per axial position.

        Raises
        ------
        ValueError
            When an axial position holds no ring pair (the header's number of
            axial positions does not fit the scanner).
        """
        seg = segment
        single = seg.min_ring_difference == seg.max_ring_difference
        k = 2 if single else 1
        out = []
        r = self.num_rings
        for a in range(seg.num_axial):
            s2 = k * a - k * (seg.num_axial - 1) / 2 + (r - 1)
            if abs(s2 - round(s2)) > 1e-6:
                raise ValueError(
                    f"segment {seg.number}: {seg.num_axial} axial positions do not fall between physical rings "
                    f"of a {r}-ring scanner"
                )
            s = int(round(s2))
            rd = np.arange(seg.min_ring_difference, seg.max_ring_difference + 1)
            rd = rd[(rd + s) % 2 == 0]
            r1, r2 = (s - rd) // 2, (s + rd) // 2
            ok = (r1 >= 0) & (r2 >= 0) & (r1 < r) & (r2 < r)
            if not ok.any():
                raise ValueError(
                    f"segment {seg.number} (ring differences {seg.min_ring_difference}..{seg.max_ring_difference}) "
                    f"axial position {a} holds no ring pair of a {r}-ring scanner; the number of axial positions "
                    f"({seg.num_axial}) is wrong"
                )
            out.append(np.stack([r1[ok], r2[ok]], axis=1))
        return out

    def detector_pairs(self):
        """STIR detectors ``(d1, d2)`` of every (view, tangential) bin, shape ``(num_views, num_tangential, 2)``.

        Only for data without view mashing.
        """
        n = self.num_detectors
        v = np.arange(self.num_views)[:, None]
        t = self.tangential_positions()[None, :]
        d1 = (v + np.floor_divide(t, 2)) % n
        d2 = (v - np.floor_divide(t + 1, 2) + n // 2) % n
        return np.stack(np.broadcast_arrays(d1, d2), axis=-1)

    def to_petbind_crystal(self, d):
        return (np.asarray(d) + self.num_detectors // 4) % self.num_detectors

    def to_petbind_ring(self, r):
        return self.num_rings - 1 - np.asarray(r)

    # -- remap onto a petbind layout -------------------------------------------------------------
    def default_layout(self):
        """The petbind :class:`SinogramLayout` that holds every bin of these data.

        Same span and maximum ring difference; ``num_radial`` is the number of
        tangential positions, plus one when that is even (petbind's radial
        offsets are symmetric, STIR's run from ``-n/2`` to ``n/2 - 1``, and the
        remap flips their sign for half of the views).

        Raises
        ------
        ValueError
            For data a crystal-pair layout cannot hold (arc-corrected, view
            mashed) or segments that are not petbind's uniform span.
        """
        self.check_crystal_pairs()
        span, mrd = self.span_and_max_ring_difference()
        nr = self.num_tangential + (1 - self.num_tangential % 2)
        return SinogramLayout(self.scanner(), min(nr, self.num_detectors - 1), mrd, span)

    def check_crystal_pairs(self, where="STIR data"):
        """Refuse data whose bins are not single crystal pairs."""
        if self.arc_corrected:
            raise ValueError(
                f"{where}: field 'applied corrections' says arc correction; arc-corrected bins are not crystal pairs "
                "(read them with their own LOR geometry: InterfileSinogram.lor_endpoints_mm)"
            )
        if self.view_mashing != 1:
            raise ValueError(
                f"{where}: field 'matrix size' (view) is {self.num_views} for {self.num_detectors} detectors per ring "
                f"(view mashing {self.view_mashing:g}); a mashed bin sums several crystal pairs, which a petbind "
                f"layout cannot represent; un-mash the data in STIR or read them as arc-corrected LORs"
            )

    def span_and_max_ring_difference(self, where="STIR data"):
        """petbind ``(span, max_ring_difference)`` of these segments, or ValueError."""
        by_num = {s.number: s for s in self.segments}
        zero = by_num[0]
        span = zero.max_ring_difference - zero.min_ring_difference + 1
        mrd = max(max(abs(s.min_ring_difference), abs(s.max_ring_difference)) for s in self.segments)
        for s in self.segments:
            lo = s.number * span - span // 2
            hi = s.number * span + span // 2
            if span % 2 == 0 or zero.min_ring_difference != -(span // 2) or s.min_ring_difference != max(lo, -mrd) \
                    or s.max_ring_difference != min(hi, mrd):
                got = [(x.number, x.min_ring_difference, x.max_ring_difference) for x in sorted(self.segments, key=lambda x: x.number)]
                raise ValueError(
                    f"{where}: fields 'minimum/maximum ring difference per segment' {got} are not a uniform odd span "
                    "symmetric about ring difference 0 (the only axial compression petbind's SinogramLayout models)"
                )
        return span, mrd

    def petbind_bins(self, layout, segment_index):
        """petbind flat bin of every STIR bin of one segment.

        Parameters
        ----------
        layout : SinogramLayout
            On :meth:`scanner` (or an equal scanner), e.g. :meth:`default_layout`.
        segment_index : int
            Index into :attr:`segments` (storage order).

        Returns
        -------
        bins : ndarray of int64, shape ``(num_axial, num_views, num_tangential)``
            ``(plane * num_views + view) * num_radial + radial`` of petbind, or
            ``-1`` where the layout has no such bin (radial range, gap crystal,
            ring difference).
        swapped : ndarray of bool, same shape
            ``True`` where petbind stores the LOR from STIR's second detector
            to its first (TOF bins then run the other way).

        Raises
        ------
        ValueError
            When the ring pairs STIR groups into one bin fall into different
            petbind planes (segments that do not match the layout's span).
        """
        self.check_crystal_pairs()
        seg = self.segments[segment_index]
        nv, nr = layout.num_views, layout.num_radial
        dp = self.detector_pairs().reshape(-1, 2)
        c = self.to_petbind_crystal(dp)
        # bins on ring 0 give view/radial/orientation; the plane comes from the rings below
        vr, sw = layout.bin_indices(c.astype(np.int64), return_swapped=True)
        vr = np.where(vr >= 0, vr % (nv * nr), -1)
        plane_lut = np.full((self.num_rings, self.num_rings), -1, dtype=np.int64)
        plane_lut[layout.ring_pairs[:, 0], layout.ring_pairs[:, 1]] = layout.plane_of_ring_pair
        planes = np.empty((seg.num_axial, 2), dtype=np.int64)
        for a, pairs in enumerate(self.ring_pairs(seg)):
            p = self.to_petbind_ring(pairs)
            fwd, rev = plane_lut[p[:, 0], p[:, 1]], plane_lut[p[:, 1], p[:, 0]]
            if fwd.min() != fwd.max() or rev.min() != rev.max():
                raise ValueError(
                    f"segment {seg.number} axial position {a}: STIR groups ring pairs {pairs.tolist()} that fall into "
                    f"different planes of {layout}; the segments do not match the layout's span"
                )
            planes[a] = fwd[0], rev[0]
        plane = np.where(sw[None, :], planes[:, 1:2], planes[:, 0:1])
        bins = np.where((vr[None, :] >= 0) & (plane >= 0), plane * (nv * nr) + vr[None, :], -1)
        shape = (seg.num_axial, self.num_views, self.num_tangential)
        return bins.reshape(shape), np.broadcast_to(sw.reshape(1, self.num_views, self.num_tangential), shape)

    # -- LOR geometry (any STIR cylindrical data, arc-corrected or not) ---------------------------
    def lor_endpoints_mm(self, segment_index):
        """LOR end points of every bin of a segment in petbind coordinates (mm).

        Uses STIR's sinogram coordinates: azimuth ``phi = v pi / num_views +
        view offset`` (plus half the mashed views' spread, ``pi / (N/2) (m - 1) / 2``
        for view mashing ``m``), signed distance ``s = t * bin_size`` (arc-corrected) or
        ``R sin(t pi / N)`` (not arc-corrected), axial midpoint ``m`` from the
        centre, ``tan(theta) = mean ring difference * ring spacing / (2 sqrt(R^2 - s^2))``;
        the end points lie on the cylinder of radius ``R`` at azimuths
        ``phi + beta`` and ``phi - beta + pi`` (``beta = asin(s / R)``).  For
        mashed or span-compressed bins this is STIR's single representative
        LOR of the bin.

        Returns
        -------
        start, end : ndarray, shape ``(num_axial, num_views, num_tangential, 3)``
        """
        seg = self.segments[segment_index]
        r = self.radius_mm
        t = self.tangential_positions().astype(float)
        if self.arc_corrected:
            s = t * self.bin_size_mm
        else:
            s = r * np.sin(t * np.pi / self.num_detectors)
        if np.any(np.abs(s) >= r):
            raise ValueError(f"tangential positions reach |s| = {np.abs(s).max():.1f} mm >= the ring radius {r:.1f} mm")
        phi = np.arange(self.num_views) * np.pi / self.num_views + math.radians(self.view_offset_deg)
        mash = self.view_mashing
        if mash != 1 and float(mash).is_integer():
            # STIR centres a mashed view on the uncompressed views it sums
            phi = phi + np.pi / (self.num_detectors / 2) * (mash - 1) / 2
        single = seg.min_ring_difference == seg.max_ring_difference
        step = self.ring_spacing_mm / (1 if single else 2)
        m = (np.arange(seg.num_axial) - (seg.num_axial - 1) / 2) * step
        delta = 0.5 * (seg.min_ring_difference + seg.max_ring_difference)
        beta = np.arcsin(s / r)
        half = np.sqrt(r * r - s * s)
        tan_theta = delta * self.ring_spacing_mm / (2 * half)
        psi1 = phi[:, None] + beta[None, :]
        psi2 = phi[:, None] - beta[None, :] + np.pi
        shape = (seg.num_axial, self.num_views, self.num_tangential, 3)
        start, end = np.empty(shape), np.empty(shape)
        # STIR (x, y) = (R sin psi, -R cos psi); petbind is the point reflection
        start[..., 0] = -r * np.sin(psi1)[None]
        start[..., 1] = r * np.cos(psi1)[None]
        end[..., 0] = -r * np.sin(psi2)[None]
        end[..., 1] = r * np.cos(psi2)[None]
        zs1 = m[:, None, None] - (half * tan_theta)[None, None, :]
        zs2 = m[:, None, None] + (half * tan_theta)[None, None, :]
        start[..., 2] = -np.broadcast_to(zs1, shape[:3])
        end[..., 2] = -np.broadcast_to(zs2, shape[:3])
        return start, end


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def stir_image_affine(shape, voxel_size_mm, first_pixel_offset_mm=(None, None, None)):
    """petbind affine of a STIR image array flipped on all three axes.

    Parameters
    ----------
    shape : tuple of 3 int
        ``(n_x, n_y, n_z)``.
    voxel_size_mm : sequence of 3 float
    first_pixel_offset_mm : sequence of 3 (float or None)
        STIR's ``first pixel offset (mm) [1..3]``; ``None`` where absent.

    Returns
    -------
    ndarray, shape (4, 4)
        Diagonal RAS+ affine of ``stir_array[::-1, ::-1, ::-1]`` (see the
        module docstring for STIR's voxel positions).
    """
    n = np.asarray(shape, dtype=float)
    v = np.asarray(voxel_size_mm, dtype=float)
    off = list(first_pixel_offset_mm)
    x0 = -(int(n[0]) // 2) * v[0] if off[0] is None else float(off[0])
    y0 = -(int(n[1]) // 2) * v[1] if off[1] is None else float(off[1])
    z_shift = 0.0 if off[2] is None else float(off[2])
    aff = np.eye(4)
    aff[:3, :3] = np.diag(v)
    # flipped array: petbind voxel i is STIR voxel n-1-i, at minus STIR's coordinate
    aff[0, 3] = -(x0 + (n[0] - 1) * v[0])
    aff[1, 3] = -(y0 + (n[1] - 1) * v[1])
    aff[2, 3] = -(n[2] - 1) / 2 * v[2] - z_shift
    return aff


def stir_image_offsets(shape, affine):
    """STIR ``first pixel offset (mm) [1..3]`` that place a petbind image where it is.

    Inverse of :func:`stir_image_affine` for the array flipped on all three
    axes.  STIR's ray-tracing projector needs the ``x``/``y`` offsets equal to
    ``-(n // 2) * voxel size`` (an image centred on the scanner axis with a
    voxel centre on it); other values are written faithfully but STIR may
    refuse to project them.
    """
    n = np.asarray(shape, dtype=float)
    v = np.diag(np.asarray(affine, dtype=float))[:3]
    o = np.asarray(affine, dtype=float)[:3, 3]
    x0 = -o[0] - (n[0] - 1) * v[0]
    y0 = -o[1] - (n[1] - 1) * v[1]
    z_shift = -o[2] - (n[2] - 1) / 2 * v[2]
    return float(x0), float(y0), float(z_shift)
