"""Simulate PET acquisitions in the sinogram domain; listmode only when asked.

The forward model is the one of :mod:`petbind.recon.system`,
``ȳ = m ⊙ P(G x) + a``, with the factors of :mod:`petbind.recon.corrections`:

``trues_k   = κ D_k · n ⊙ a ⊙ μ_p P(G x_k)``
``scatter_k = Σ_r w_rk κ D_k S_r``,  ``S_r ∝ n ⊙ blur(a ⊙ μ_p P(G f_r))`` scaled plane by plane to ``SF/(1-SF) · trues``
``randoms_k = 2τ σ² ∫_k A(t)² dt · μ_p n``  (``R_ij = 2τ S_i S_j``, singles ``S_i = σ ε_i A(t)``)

* ``x_k = Σ_r w_rk f_r``: frame ``k``'s activity, Bq/mL decay-corrected to
  injection, a sum of fixed basis images ``f_r`` (e.g. region fractions) with
  per-frame weights (:class:`BasisActivity`); an explicit 4-D image is the
  special case of one basis image per frame.
* ``D_k = ∫ e^{-λ t} dt`` over the frame (s after injection): counts are not
  decay corrected.
* ``κ``: counts/s per (Bq/mL · mm of line integral) from
  ``sensitivity_cps_per_kbq`` (:func:`~petbind.recon.corrections.point_source_kappa`).
* ``n``: crystal-efficiency normalisation (:func:`~petbind.recon.corrections.normalisation_factors`),
  ``a``: attenuation ``exp(-P μ)``, ``μ_p``: ring pairs per plane
  (:attr:`~petbind.recon.geometry.SinogramLayout.plane_multiplicity`; 1 for
  span 1), ``G``: the scanner's resolution (Gaussian, FWHM
  ``Scanner.resolution_fwhm_mm`` by default).
* ``A(t)``: total activity in the image (Bq); ``σ`` is solved so that randoms
  are ``randoms_fraction`` of all prompts over the acquisition.
* Scatter of each basis image is a wide Gaussian blur of its attenuated
  emission sinogram, scaled plane by plane so that
  ``scatter / (trues + scatter) = scatter_fraction`` (NEMA definition); being
  linear in the weights, every frame's scatter is a weighted sum of the
  basis scatters.

Cost.  Each basis image is blurred and projected once per geometry (the
projections are cached and reused by every later acquisition with the same
images, e.g. every session of a study); a frame's expected sinograms are
then a matrix product of the frame weights with the cached projections, and
counts are drawn bin by bin (``prompts ~ Poisson(trues + scatter +
randoms)``, ``delayeds ~ Poisson(randoms)``, NumPy's sampler: about 40 ns
per bin).  The cost is one pass over the bins per frame whatever the count
level.

Listmode is made only when asked for, by expanding the binned counts
(:meth:`Acquisition.events`): each bin's prompts are split between trues +
scatter and randoms (binomially, with the expected proportions), every count
becomes an event with a time drawn within the frame from the decay density
(``e^{-λ t}`` for trues and scatter, ``e^{-2λ t}`` for randoms and delayeds,
whose rate goes with the square of the activity), detector ids from the bin
(for span > 1 a ring pair of the plane drawn with probability proportional
to its efficiency product ``ε_i ε_j``) and the TOF bin from the TOF
sinogram.  Histogramming the events gives back the sinograms exactly.

Everything is deterministic given the seed: frame ``k`` and plane block
``b`` draw from their own :class:`numpy.random.SeedSequence` child, so
results do not depend on the order of the work (they do depend on
``chunk_planes``).  Sampling runs on the host (NumPy); projections use the
GPU when the device allows.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from petbind.core.decay import C11_HALF_LIFE_S, decay_integral
from petbind.recon.corrections import normalisation_factors, point_source_kappa
from petbind.recon.geometry import ImageGrid, SinogramLayout, TOFParameters
from petbind.recon.system import GaussianFilter, LORProjector

__all__ = [
    "Acquisition",
    "AcquisitionSimulator",
    "BasisActivity",
    "EventChunk",
    "FrameStats",
    "ListmodeSimulator",
    "random_crystal_efficiencies",
    "sample_decay_times",
]

log = logging.getLogger(__name__)

#: Sinogram bins per projection block (memory of the cached projections and of one block of frames).
_BLOCK_BINS = 1 << 18


class BasisActivity(NamedTuple):
    """Activity as a sum of fixed images with per-frame weights.

    ``x_k = sum_r weights[r, k] * images[r]``.  The simulator projects each
    basis image once and reuses the projections for every frame, and for
    every acquisition with the same ``images`` object.

    Attributes
    ----------
    images : ndarray, shape (R, x, y, z)
        Basis images (e.g. partial-volume region fractions), non-negative.
    weights : ndarray, shape (R, F)
        Weight of each image in each frame (Bq/mL, decay-corrected), non-negative.
    """

    images: np.ndarray
    weights: np.ndarray


@dataclass
class EventChunk:
    """A time-ordered block of listmode events.

    Attributes
    ----------
    frame_index : int
    detector_ids : ndarray of int32, shape (n, 2)
    tof_bin : ndarray of int16, shape (n,), or None
    time_ms : ndarray of float64, shape (n,)
        Time after scan start (ms), non-decreasing across all chunks.
    is_prompt : ndarray of bool, shape (n,)
    """

    frame_index: int
    detector_ids: np.ndarray
    tof_bin: Optional[np.ndarray]
    time_ms: np.ndarray
    is_prompt: np.ndarray

    def __len__(self):
        return int(self.time_ms.shape[0])


@dataclass
class FrameStats:
    """Expected and drawn totals of one frame (counts)."""

    frame_start_s: float
    frame_end_s: float
    expected_trues: float
    expected_scatter: float
    expected_randoms: float
    prompts: float = 0
    delayeds: float = 0


def sample_decay_times(rng, n, start_s, end_s, decay_constant_per_s):
    """Draw ``n`` times from the density ``∝ e^{-λ t}`` on ``[start_s, end_s)``.

    Inverse-CDF sampling: ``t = start - log(1 - u (1 - e^{-λ Δ})) / λ``.
    """
    u = rng.random(n)
    lam = float(decay_constant_per_s)
    d = end_s - start_s
    if lam == 0:
        return start_s + u * d
    t = start_s - np.log1p(u * np.expm1(-lam * d)) / lam
    # Rounding can land exactly on end_s; keep the half-open interval.
    return np.minimum(t, np.nextafter(end_s, start_s))


def random_crystal_efficiencies(scanner, rng=None, spread=0.05):
    """Log-normal crystal efficiencies around 1 (relative spread ``spread``), 0 for gaps."""
    rng = np.random.default_rng(rng)
    eff = np.exp(rng.normal(0.0, spread, scanner.num_detectors) - 0.5 * spread**2)
    return eff * scanner.detector_mask()


def _child(seed_seq, *key):
    """The SeedSequence with ``spawn_key + key``: a stateless child (unlike ``spawn``)."""
    return np.random.SeedSequence(seed_seq.entropy, spawn_key=tuple(seed_seq.spawn_key) + tuple(int(k) for k in key))


def _plane_lors(layout, planes):
    """LOR end points (mm) of the given planes: arrays ``(len(planes), views, radial, 3)``."""
    cp = layout.crystal_pairs()
    xy = layout.scanner.crystal_xy_mm
    shape = (len(planes),) + cp.shape[:2]
    start = np.empty(shape + (3,), dtype=np.float32)
    end = np.empty(shape + (3,), dtype=np.float32)
    start[..., :2] = xy[cp[..., 0]][None]
    end[..., :2] = xy[cp[..., 1]][None]
    start[..., 2] = layout.plane_z_mm[planes, 0, None, None]
    end[..., 2] = layout.plane_z_mm[planes, 1, None, None]
    return start, end


class AcquisitionSimulator:
    """Simulate dynamic PET acquisitions of one scanner, layout and object.

    Parameters
    ----------
    layout : SinogramLayout
        Any span: for ``span > 1`` a plane is one mean LOR weighted by its
        number of ring pairs, as in the reconstruction's projector.
    grid : ImageGrid
        Grid of the activity and μ images.
    mu_map_per_mm : ndarray, shape grid.shape, optional
        Attenuation map (1/mm); ``None`` for no attenuation.
    crystal_efficiencies : ndarray, shape (num_detectors,), optional
        Relative detector efficiencies (default 1; gaps are 0 anyway).
    tof : TOFParameters, optional
    scatter_fraction : float
        ``S / (T + S)`` in [0, 1).
    randoms_fraction : float
        ``R / (T + S + R)`` over the whole acquisition, in [0, 1).
    coincidence_window_ns : float
        Full coincidence window ``2τ`` (ns).
    scatter_fwhm_mm : float
        FWHM (mm) of the Gaussian that smooths the attenuated emission
        sinogram into the scatter shape.
    resolution_fwhm_mm : "scanner", float, sequence of 3 float or None
        Image-space resolution ``G`` (FWHM, mm).  ``"scanner"`` (default):
        ``layout.scanner.resolution_fwhm_mm`` (no blur when the scanner does
        not know it); ``None`` or 0: no blur.
    sensitivity_cps_per_kbq : float
        Count rate of a point source at the centre, unattenuated, with unit
        efficiencies (cps/kBq); sets the count level.
    half_life_s : float
        Physical half-life (s) (default ¹¹C).
    scan_start_s : float
        Scan start (listmode time 0 and sinogram frame time 0) in s after
        injection; frame times given to :meth:`acquire` are after injection.
    chunk_planes : int, optional
        Sinogram planes projected and drawn at a time; default about
        260 000 bins per block.
    cache_bytes : float
        Memory allowed for the cached basis projections; above it, they are
        recomputed for every acquisition (and once more to calibrate).
    max_events_per_chunk : int
        Upper bound on events per :class:`EventChunk` of a listmode expansion.
    device : {"auto", "cpu", "gpu"}
        Where projections run.
    quiet : bool
        Silence progress bars.

    Examples
    --------
    >>> from petbind.recon.geometry import Scanner
    >>> layout = SinogramLayout(Scanner.cylindrical(60.0, 32, 2, 4.0), 15)
    >>> grid = ImageGrid((10, 10, 2), 4.0)
    >>> sim = AcquisitionSimulator(layout, grid, device="cpu", quiet=True)
    >>> acq = sim.acquire(np.full(grid.shape, 1000.0), [0.0], [60.0], seed=1)
    >>> sino = acq.sinograms()
    >>> sino["prompts"].shape == (1,) + layout.shape
    True
    """

    def __init__(
        self,
        layout,
        grid,
        mu_map_per_mm=None,
        crystal_efficiencies=None,
        tof=None,
        scatter_fraction=0.3,
        randoms_fraction=0.2,
        coincidence_window_ns=4.0,
        scatter_fwhm_mm=150.0,
        resolution_fwhm_mm="scanner",
        sensitivity_cps_per_kbq=10.0,
        half_life_s=C11_HALF_LIFE_S,
        scan_start_s=0.0,
        chunk_planes=None,
        cache_bytes=1e9,
        max_events_per_chunk=1_000_000,
        device="auto",
        quiet=False,
    ):
        if not isinstance(layout, SinogramLayout):
            raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
        if not isinstance(grid, ImageGrid):
            raise TypeError(f"grid must be an ImageGrid; got {type(grid).__name__}")
        if tof is not None and not isinstance(tof, TOFParameters):
            raise TypeError(f"tof must be TOFParameters or None; got {type(tof).__name__}")
        for name, v in (("scatter_fraction", scatter_fraction), ("randoms_fraction", randoms_fraction)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {v}")
        for name, v in (
            ("coincidence_window_ns", coincidence_window_ns),
            ("sensitivity_cps_per_kbq", sensitivity_cps_per_kbq),
            ("half_life_s", half_life_s),
            ("scatter_fwhm_mm", scatter_fwhm_mm),
        ):
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive; got {v}")
        if int(max_events_per_chunk) < 1:
            raise ValueError(f"max_events_per_chunk must be >= 1; got {max_events_per_chunk}")
        if not np.isfinite(scan_start_s):
            raise ValueError(f"scan_start_s must be finite; got {scan_start_s}")
        self.layout, self.grid, self.tof = layout, grid, tof
        self.num_tof_bins = tof.num_bins if tof is not None else 1
        if mu_map_per_mm is not None:
            mu_map_per_mm = np.asarray(mu_map_per_mm, dtype=np.float32)
            if mu_map_per_mm.shape != grid.shape:
                raise ValueError(f"mu_map_per_mm has shape {mu_map_per_mm.shape}; expected grid shape {grid.shape}")
            if not np.all(np.isfinite(mu_map_per_mm)) or mu_map_per_mm.min() < 0:
                raise ValueError("mu_map_per_mm must be finite and non-negative (1/mm)")
        self.mu_map_per_mm = mu_map_per_mm
        n_det = layout.scanner.num_detectors
        if crystal_efficiencies is None:
            crystal_efficiencies = np.ones(n_det)
        self.crystal_efficiencies = np.asarray(crystal_efficiencies, dtype=np.float64).reshape(-1)
        self.scatter_fraction = float(scatter_fraction)
        self.randoms_fraction = float(randoms_fraction)
        self.coincidence_window_ns = float(coincidence_window_ns)
        self.scatter_fwhm_mm = float(scatter_fwhm_mm)
        if isinstance(resolution_fwhm_mm, str):
            if resolution_fwhm_mm != "scanner":
                raise ValueError(f"resolution_fwhm_mm must be 'scanner', a FWHM in mm or None; got {resolution_fwhm_mm!r}")
            resolution_fwhm_mm = layout.scanner.resolution_fwhm_mm
        if resolution_fwhm_mm is not None and np.all(np.asarray(resolution_fwhm_mm, dtype=float) == 0):
            resolution_fwhm_mm = None
        self.resolution = None if resolution_fwhm_mm is None else GaussianFilter(grid, resolution_fwhm_mm)
        self.resolution_fwhm_mm = None if self.resolution is None else self.resolution.fwhm_mm.copy()
        self.sensitivity_cps_per_kbq = float(sensitivity_cps_per_kbq)
        self.half_life_s = float(half_life_s)
        self.decay_constant_per_s = math.log(2.0) / self.half_life_s
        self.scan_start_s = float(scan_start_s)
        per_plane = layout.num_views * layout.num_radial * self.num_tof_bins
        if chunk_planes is None:
            # about _BLOCK_BINS bins per block, blocks of equal size
            nblocks = math.ceil(layout.num_planes / max(1, _BLOCK_BINS // per_plane))
            cp = math.ceil(layout.num_planes / nblocks)
        else:
            cp = int(chunk_planes)
        if cp < 1:
            raise ValueError(f"chunk_planes must be >= 1; got {chunk_planes}")
        self.chunk_planes = cp
        self.cache_bytes = float(cache_bytes)
        self.max_events_per_chunk = int(max_events_per_chunk)
        self.device = device
        self.quiet = bool(quiet)
        self.normalisation = normalisation_factors(layout, self.crystal_efficiencies)
        self.chunks = [np.arange(p, min(p + cp, layout.num_planes)) for p in range(0, layout.num_planes, cp)]
        self._attenuation = None
        self._kappa = None
        self._basis_key = None
        self._basis = None

    # -- set-up: attenuation, calibration ---------------------------------------------------------
    def _chunk_projector(self, planes, tof="same"):
        start, end = _plane_lors(self.layout, planes)
        return LORProjector(start, end, self.grid, tof=self.tof if tof == "same" else tof, device=self.device)

    @property
    def attenuation(self):
        """Attenuation factors ``exp(-P μ)``, non-TOF sinogram shape, float32 (computed once)."""
        if self._attenuation is None:
            att = np.ones(self.layout.shape, dtype=np.float32)
            if self.mu_map_per_mm is not None:
                for planes in self.chunks:
                    p = self._chunk_projector(planes, tof=None)
                    att[planes] = np.exp(-np.asarray(p.forward(self.mu_map_per_mm), dtype=np.float64))
            self._attenuation = att
        return self._attenuation

    @property
    def kappa(self):
        """Counts per s per (Bq/mL × mm of line integral), from ``sensitivity_cps_per_kbq``."""
        if self._kappa is None:
            mult = self.layout.plane_multiplicity

            def project_total(point):
                total = 0.0
                for planes in self.chunks:
                    proj = np.asarray(self._chunk_projector(planes, tof=None).forward(point), dtype=np.float64)
                    total += float(np.tensordot(mult[planes], proj.sum(axis=(1, 2)), axes=1))
                return total

            self._kappa = point_source_kappa(self.sensitivity_cps_per_kbq, self.grid, project_total)
        return self._kappa

    @property
    def randoms_shape(self):
        """``μ_p n``: randoms per bin up to a per-frame factor (non-TOF shape, float32)."""
        return (self.normalisation * self.layout.plane_multiplicity[:, None, None]).astype(np.float32)

    # -- scatter shape ----------------------------------------------------------------------------
    def _scatter_setup(self):
        """Decimation factors and the FFT of the scatter blur on the decimated (view, radial) grid.

        The blur is wide (tens of bins), so it is computed on a grid coarser by
        ``f`` in views and radial bins (block sums, keeping at least 4 coarse
        samples per standard deviation) and interpolated back linearly.
        """
        if getattr(self, "_scatter_cfg", None) is None:
            layout = self.layout
            start, end = _plane_lors(layout, np.array([0]))
            d = end[0, 0, :, :2] - start[0, 0, :, :2]
            dist = (d[:, 0] * start[0, 0, :, 1] - d[:, 1] * start[0, 0, :, 0]) / np.hypot(d[:, 0], d[:, 1])
            bin_mm = float(np.median(np.abs(np.diff(dist)))) if layout.num_radial > 1 else 1.0
            sigma_mm = self.scatter_fwhm_mm / 2.3548
            # Views: arc length at a 100 mm radius (a head) per view step of pi / num_views.
            sig_v = max(sigma_mm / (100.0 * math.pi / layout.num_views), 1e-3)
            sig_r = max(sigma_mm / bin_mm, 1e-3)
            nv, nr = layout.num_views, layout.num_radial
            # Decimation: a divisor of num_views (keeps the view axis periodic).
            fv = max([f for f in range(1, nv + 1) if nv % f == 0 and f <= max(1.0, sig_v / 4)])
            fr = max(1, int(sig_r // 4))
            cv, cr = nv // fv, -(-nr // fr)
            sv, sr = sig_v / fv, sig_r / fr
            half = min(int(math.ceil(3 * sr)), 4 * cr)
            cr_pad = cr + 2 * half
            jv = np.arange(cv)
            dv = np.minimum(jv, cv - jv)
            kv = np.exp(-0.5 * (dv / sv) ** 2)
            jr = np.arange(cr_pad)
            dr = np.minimum(jr, cr_pad - jr)
            kr = np.where(dr <= half, np.exp(-0.5 * (dr / sr) ** 2), 0.0)
            kernel = kv[:, None] * kr[None, :]
            pos_v = (np.arange(nv) + 0.5) / fv - 0.5
            v0 = np.floor(pos_v).astype(int)
            wv = pos_v - v0
            pos_r = np.clip((np.arange(nr) + 0.5) / fr - 0.5, 0, cr - 1)
            r0 = np.minimum(np.floor(pos_r).astype(int), max(cr - 2, 0))
            wr = pos_r - r0
            self._scatter_cfg = dict(
                fv=fv, fr=fr, cv=cv, cr=cr, cr_pad=cr_pad, kfft=np.fft.rfft2(kernel / kernel.sum()),
                v0=v0 % cv, v1=(v0 + 1) % cv, wv=wv, r0=r0, r1=np.minimum(r0 + 1, cr - 1), wr=wr,
            )
        return self._scatter_cfg

    def _scatter_shape(self, emission):
        """Smooth scatter shape: Gaussian blur over (view, radial) of each plane.

        Periodic in the view angle, zero outside the radial range; computed on
        a decimated grid (see :meth:`_scatter_setup`).
        """
        c = self._scatter_setup()
        p, nv, nr = emission.shape
        e = np.zeros((p, c["cv"] * c["fv"], c["cr"] * c["fr"]))
        e[:, :nv, :nr] = emission
        small = e.reshape(p, c["cv"], c["fv"], c["cr"], c["fr"]).sum(axis=(2, 4))
        f = np.fft.rfft2(small, s=(c["cv"], c["cr_pad"]), axes=(1, 2))
        sm = np.fft.irfft2(f * c["kfft"][None], s=(c["cv"], c["cr_pad"]), axes=(1, 2))[..., : c["cr"]]
        wv = c["wv"][None, :, None]
        sm = (1 - wv) * sm[:, c["v0"], :] + wv * sm[:, c["v1"], :]
        wr = c["wr"][None, None, :]
        sm = (1 - wr) * sm[:, :, c["r0"]] + wr * sm[:, :, c["r1"]]
        return np.maximum(sm, 0.0)

    # -- basis projections --------------------------------------------------------------------------
    def _unit_chunk(self, blurred, ci):
        """Trues + scatter and scatter of chunk ``ci`` per unit weight and unit ``κ D``.

        Returns ``(prompt_unit, scatter_unit)``, float32 arrays ``(R, bins of the chunk)``
        (TOF bins last within each LOR).
        """
        planes = self.chunks[ci]
        p = self._chunk_projector(planes)
        mult = self.layout.plane_multiplicity[planes]
        tof_axis = self.tof is not None
        lor = (lambda f: f[..., None]) if tof_axis else (lambda f: f)
        n = self.normalisation[planes]
        a = self.attenuation[planes]
        sf = self.scatter_fraction / (1 - self.scatter_fraction)
        units, scatters = [], []
        for img in blurred:
            proj = np.asarray(p.forward(img), dtype=np.float32)
            emission = lor(a * mult[:, None, None]) * proj
            trues = lor(n) * emission
            trues_nt = trues.sum(axis=-1) if tof_axis else trues
            em_nt = emission.sum(axis=-1) if tof_axis else emission
            shape = n * self._scatter_shape(em_nt).astype(np.float32)
            plane_t = trues_nt.sum(axis=(1, 2), dtype=np.float64)
            plane_s = shape.sum(axis=(1, 2), dtype=np.float64)
            scale = np.where(plane_s > 0, sf * plane_t / np.where(plane_s > 0, plane_s, 1.0), 0.0)
            scatter = shape * scale.astype(np.float32)[:, None, None]
            if tof_axis:
                # Scatter TOF profile: the trues' profile blurred over two bins, uniform where there are no trues.
                prof = ndimage.gaussian_filter1d(trues, 2.0, axis=-1, mode="constant")
                tot = prof.sum(axis=-1, keepdims=True)
                prof = np.where(tot > 0, prof / np.where(tot > 0, tot, 1.0), np.float32(1.0 / self.num_tof_bins))
                scatter = scatter[..., None] * prof
            units.append((trues + scatter).reshape(-1))
            scatters.append(scatter.reshape(-1).astype(np.float32))
        return np.stack(units).astype(np.float32), np.stack(scatters)

    def _prepare_basis(self, images):
        """Blur the basis images, project them (cached when they fit) and sum them up.

        Returns a dict with ``sums`` (trues and scatter totals per basis image
        per unit weight and unit ``κ D``), ``max_unit`` (per basis, the largest
        bin value) and ``cache`` (chunk index -> unit arrays, or None).
        """
        key = (id(images), images.shape, float(images.reshape(-1)[:: max(1, images.size // 1000)].sum()))
        if self._basis_key == key and self._basis is not None:
            return self._basis
        r = images.shape[0]
        blurred = [np.asarray(img, dtype=np.float32) for img in images]
        if self.resolution is not None:
            blurred = [np.asarray(self.resolution.forward(img), dtype=np.float32) for img in blurred]
        nbins = self.layout.num_bins * self.num_tof_bins
        cacheable = 2 * r * nbins * 4 <= self.cache_bytes
        if not cacheable:
            log.info("basis projections (%d images x %d bins) exceed cache_bytes=%g; they are recomputed per acquisition",
                     r, nbins, self.cache_bytes)
        info = {"blurred": blurred, "trues": np.zeros(r), "scatter": np.zeros(r), "max_unit": np.zeros(r),
                "cache": {} if cacheable else None}
        for ci in tqdm(range(len(self.chunks)), desc="projecting basis images", disable=self.quiet, leave=False):
            unit, scat = self._unit_chunk(blurred, ci)
            s = scat.sum(axis=1, dtype=np.float64)
            info["scatter"] += s
            info["trues"] += unit.sum(axis=1, dtype=np.float64) - s
            info["max_unit"] = np.maximum(info["max_unit"], unit.max(axis=1))
            if cacheable:
                info["cache"][ci] = (unit, scat)
        self._basis_key, self._basis = key, info
        return info

    def _units(self, ci):
        info = self._basis
        if info["cache"] is not None:
            return info["cache"][ci]
        return self._unit_chunk(info["blurred"], ci)

    # -- public entry points ------------------------------------------------------------------------
    def _frames(self, activity, frame_start_s, frame_end_s):
        fs = np.atleast_1d(np.asarray(frame_start_s, dtype=float))
        fe = np.atleast_1d(np.asarray(frame_end_s, dtype=float))
        if fs.shape != fe.shape or fs.ndim != 1 or fs.size == 0:
            raise ValueError(f"frame_start_s and frame_end_s must be 1-D of equal length; got {fs.shape}, {fe.shape}")
        if (not np.all(np.isfinite(fs)) or not np.all(np.isfinite(fe)) or np.any(fe <= fs) or np.any(fs[1:] < fe[:-1])
                or fs[0] < self.scan_start_s):
            raise ValueError(
                "frames must be increasing, non-overlapping, of positive duration and start at or after "
                f"scan_start_s={self.scan_start_s}; got starts {fs.tolist()} ends {fe.tolist()}"
            )
        if isinstance(activity, BasisActivity):
            images = np.asarray(activity.images)
            weights = np.asarray(activity.weights, dtype=float)
            if images.ndim != 4 or images.shape[1:] != self.grid.shape:
                raise ValueError(f"BasisActivity.images must have shape (R,) + {self.grid.shape}; got {images.shape}")
            if weights.shape != (images.shape[0], fs.size):
                raise ValueError(f"BasisActivity.weights must have shape ({images.shape[0]}, {fs.size}); got {weights.shape}")
            if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(images))):
                raise ValueError("BasisActivity images and weights must be finite")
            if weights.min() < 0 or images.min() < 0:
                raise ValueError("BasisActivity images and weights must be non-negative (Bq/mL)")
            return BasisActivity(images, weights), fs, fe
        act = np.asarray(activity, dtype=np.float32)
        if act.ndim == 3:
            act = act[..., None]
        if act.ndim != 4 or act.shape[:3] != self.grid.shape or act.shape[3] != fs.size:
            raise ValueError(f"activity must have shape {self.grid.shape} + ({fs.size},) (Bq/mL per frame); got {np.shape(activity)}")
        if not np.all(np.isfinite(act)) or act.min() < 0:
            raise ValueError("activity must be finite and non-negative (Bq/mL)")
        # An explicit 4-D image: one basis image per frame.
        return BasisActivity(np.ascontiguousarray(np.moveaxis(act, -1, 0)), np.eye(fs.size)), fs, fe

    def acquire(self, activity, frame_start_s, frame_end_s, seed=None, noise=True):
        """Set up one acquisition (one session): calibration, frame totals, random streams.

        Parameters
        ----------
        activity : BasisActivity or ndarray (x, y, z[, t])
            Decay-corrected activity (Bq/mL) per frame.
        frame_start_s, frame_end_s : array of float
            Frame times (s after injection), increasing, non-overlapping.
        seed : int or SeedSequence, optional
        noise : bool
            ``False`` gives the expected counts instead of Poisson draws
            (floats; for error budgets).

        Returns
        -------
        Acquisition
            Its :meth:`~Acquisition.blocks` draw the counts block by block.
        """
        act, fs, fe = self._frames(activity, frame_start_s, frame_end_s)
        info = self._prepare_basis(act.images)
        return Acquisition(self, act, fs, fe, info, seed, noise)

    def simulate_sinograms(self, activity, frame_start_s, frame_end_s, seed=None):
        """Expected and noisy sinograms of every frame, in memory (small problems).

        Returns
        -------
        dict of str to ndarray, each ``(F,) + layout.shape`` (+ TOF axis)
            ``trues``, ``scatter``, ``randoms`` (expected, float64),
            ``prompts`` and ``delayeds`` (counts, int32).
        """
        acq = self.acquire(activity, frame_start_s, frame_end_s, seed=seed)
        return {**acq.expected(), **acq.sinograms()}


#: Old name of :class:`AcquisitionSimulator`.
ListmodeSimulator = AcquisitionSimulator


class Acquisition:
    """One simulated acquisition: frame totals, counts drawn block by block, listmode on demand.

    Made by :meth:`AcquisitionSimulator.acquire`.

    Attributes
    ----------
    frame_start_s, frame_end_s : ndarray
        Frame times (s after injection).
    frame_stats : list of FrameStats
        Expected totals per frame (drawn totals filled in by :meth:`blocks`).
    singles_scale : float
        ``σ`` of the singles model (counts per s per Bq per unit efficiency).
    noise : bool
    """

    def __init__(self, sim, act, fs, fe, info, seed, noise):
        self.sim, self.act, self.frame_start_s, self.frame_end_s = sim, act, fs, fe
        self.noise = bool(noise)
        self._seed = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        lam = sim.decay_constant_per_s
        self.num_frames = fs.size
        d1 = decay_integral(fs, fe, lam)
        d2 = decay_integral(fs, fe, 2 * lam)
        w = np.asarray(act.weights, dtype=np.float64)
        # Frame weights of the unit projections: w_rk κ D_k.
        self.weights = w * (sim.kappa * d1)[None, :]
        trues = self.weights.T @ info["trues"]
        scatter = self.weights.T @ info["scatter"]
        voxel_ml = float(np.prod(sim.grid.voxel_size_mm)) / 1000.0
        sums = np.asarray(act.images, dtype=np.float64).reshape(act.images.shape[0], -1).sum(axis=1) * voxel_ml
        self.activity_bq = w.T @ sums  # decay-corrected activity in the image per frame (Bq)
        i2 = self.activity_bq**2 * d2  # ∫ A(t)² dt per frame (Bq² s)
        window_s = sim.coincidence_window_ns * 1e-9
        shape_sum = float(sim.randoms_shape.sum(dtype=np.float64))
        target = sim.randoms_fraction / (1 - sim.randoms_fraction) * float(np.sum(trues + scatter))
        sigma = math.sqrt(target / (window_s * shape_sum * float(np.sum(i2)))) if target > 0 and np.sum(i2) > 0 else 0.0
        self.singles_scale = sigma
        #: randoms of frame k = randoms_scale[k] * randoms_shape (per TOF bin: divided by the TOF bins)
        self.randoms_scale = window_s * sigma**2 * i2
        randoms = self.randoms_scale * shape_sum
        self._d1 = d1
        self._max_unit = info["max_unit"]
        self.frame_stats = [FrameStats(float(a), float(b), float(t), float(s), float(r))
                            for a, b, t, s, r in zip(fs, fe, trues, scatter, randoms)]

    # -- expected counts -----------------------------------------------------------------------------
    def _shape(self, planes):
        return (len(planes), self.sim.layout.num_views, self.sim.layout.num_radial) + (
            (self.sim.num_tof_bins,) if self.sim.tof is not None else ())

    def _randoms_unit(self, planes):
        r = self.sim.randoms_shape[planes]
        if self.sim.tof is not None:
            r = np.repeat(r[..., None] / np.float32(self.sim.num_tof_bins), self.sim.num_tof_bins, axis=-1)
        return r.reshape(-1)

    def _expected_block(self, ci, frames=None, scatter=True):
        """``(trues + scatter, scatter or None, randoms)`` of block ``ci``: float32 ``(len(frames), bins)``."""
        frames = np.arange(self.num_frames) if frames is None else np.atleast_1d(frames)
        unit, scat = self.sim._units(ci)
        w = self.weights[:, frames].T.astype(np.float32)
        ts = w @ unit
        s = w @ scat if scatter else None
        r = self.randoms_scale[frames, None].astype(np.float32) * self._randoms_unit(self.sim.chunks[ci])[None]
        return ts, s, r

    def expected(self):
        """Expected ``trues``, ``scatter`` and ``randoms`` of every frame (float64, small problems)."""
        shape = (self.num_frames,) + self._shape(np.arange(self.sim.layout.num_planes))
        out = {k: np.zeros(shape) for k in ("trues", "scatter", "randoms")}
        for ci, planes in enumerate(self.sim.chunks):
            ts, s, r = self._expected_block(ci)
            blk = (self.num_frames,) + self._shape(planes)
            out["trues"][:, planes] = (ts - s).reshape(blk)
            out["scatter"][:, planes] = s.reshape(blk)
            out["randoms"][:, planes] = r.reshape(blk)
        return out

    def max_count_bound(self):
        """An upper bound on any bin's count (to choose a storage dtype).

        ``Σ_r max_k(w_rk κ D_k) max_b(unit_rb) + max_k(randoms_k) max_b(randoms shape)``, plus
        ten standard deviations.
        """
        ybar = float(self.weights.max(axis=1) @ self._max_unit)
        ybar += float(self.randoms_scale.max() * self.sim.randoms_shape.max())
        return ybar + 10.0 * math.sqrt(ybar) + 20.0

    # -- drawing ------------------------------------------------------------------------------------
    def blocks(self, progress=None):
        """Draw the sinograms block of planes by block of planes.

        Yields
        ------
        planes : ndarray of int
            Contiguous plane indices of the block.
        prompts, delayeds : ndarray, shape (F, len(planes), views, radial[, tof])
            Counts (int32), or the expected counts (float32) when ``noise`` is False.

        Notes
        -----
        Frame ``k`` of block ``b`` draws from its own random stream (child
        ``(k, b)`` of the seed), so any subset of blocks gives the same
        counts; ``frame_stats[k].prompts`` and ``.delayeds`` are the totals
        once every block has been drawn.
        """
        quiet = self.sim.quiet if progress is None else not progress
        for st in self.frame_stats:
            st.prompts = st.delayeds = 0
        workers = min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            for ci in tqdm(range(len(self.sim.chunks)), desc="drawing counts", disable=quiet, leave=False):
                planes = self.sim.chunks[ci]
                ts, _, r = self._expected_block(ci, scatter=False)
                blk = (self.num_frames,) + self._shape(planes)
                if not self.noise:
                    prompts, delayeds = (ts + r).reshape(blk), r.reshape(blk)
                else:
                    prompts = np.empty(ts.shape, np.int32)  # 2^31 counts in a bin is far beyond any scanner
                    delayeds = np.empty(ts.shape, np.int32)

                    def draw(k, ci=ci, ts=ts, r=r, prompts=prompts, delayeds=delayeds):
                        # NumPy's samplers release the GIL: frames are drawn in parallel threads.
                        rng = np.random.default_rng(_child(self._seed, k, ci))
                        prompts[k] = rng.poisson(ts[k] + r[k])
                        delayeds[k] = rng.poisson(r[k])

                    list(pool.map(draw, range(self.num_frames)))
                    prompts, delayeds = prompts.reshape(blk), delayeds.reshape(blk)
                for k, st in enumerate(self.frame_stats):
                    st.prompts += prompts[k].sum()
                    st.delayeds += delayeds[k].sum()
                yield planes, prompts, delayeds

    def sinograms(self):
        """All frames' ``prompts`` and ``delayeds`` in memory (small problems)."""
        shape = (self.num_frames,) + self._shape(np.arange(self.sim.layout.num_planes))
        dtype = np.int32 if self.noise else np.float32
        out = {"prompts": np.zeros(shape, dtype), "delayeds": np.zeros(shape, dtype)}
        for planes, p, d in self.blocks():
            out["prompts"][:, planes] = p
            out["delayeds"][:, planes] = d
        return out

    def singles_counts(self):
        """Expected singles per detector in each frame: ``σ ε_i A_k D_k``, shape ``(F, num_detectors)``."""
        eff = self.sim.crystal_efficiencies * self.sim.layout.scanner.detector_mask()
        return self.singles_scale * (self.activity_bq * self._d1)[:, None] * eff[None, :]

    def write_h5(self, path, exam=None, corrections=None, dtype=None):
        """Draw every block and write a petbind multi-frame sinogram file.

        Parameters
        ----------
        path : str or Path
        exam : ExamInfo, optional
        corrections : ListmodeCorrections, optional
        dtype : numpy dtype, optional
            Storage type of the counts; default uint16 when
            :meth:`max_count_bound` allows it, else uint32 (float32 without noise).

        Notes
        -----
        Frame times are stored relative to the scan start.
        """
        from petbind.recon.rawdata.sinograms import SinogramWriter  # noqa: PLC0415 - files only here

        if dtype is None:
            dtype = np.float32 if not self.noise else (np.uint16 if self.max_count_bound() < 65535 else np.uint32)
        t0 = self.sim.scan_start_s
        with SinogramWriter(path, self.sim.layout, self.frame_start_s - t0, self.frame_end_s - t0, tof=self.sim.tof,
                            exam=exam, corrections=corrections, sinograms={"prompts": dtype, "delayeds": dtype},
                            chunk_planes=self.sim.chunk_planes) as w:
            for planes, p, d in self.blocks():
                sl = slice(int(planes[0]), int(planes[-1]) + 1)
                w.write("prompts", p, planes=sl)
                w.write("delayeds", d, planes=sl)

    # -- listmode -----------------------------------------------------------------------------------
    def _bin_tables(self):
        """Per plane: its ring pairs (padded with -1) for drawing detector pairs from bins."""
        layout = self.sim.layout
        order = np.argsort(layout.plane_of_ring_pair, kind="stable")
        pairs = layout.ring_pairs[order]
        plane = layout.plane_of_ring_pair[order]
        counts = np.bincount(plane, minlength=layout.num_planes)
        m = int(counts.max())
        table = np.full((layout.num_planes, m, 2), -1, dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(plane.size) - first[plane]
        table[plane, slot] = pairs
        return table

    def events(self, counts, seed=None):
        """Expand binned counts into listmode events, frame by frame, in time order.

        Parameters
        ----------
        counts : callable
            ``counts(k) -> (prompts, delayeds)``: integer sinograms of frame
            ``k`` (shape ``layout.shape`` + TOF axis), e.g. drawn by
            :meth:`blocks` and read back from the file it wrote.
        seed : int or SeedSequence, optional
            Stream of the expansion (times, ring pairs, the trues / randoms
            split); default a child of the acquisition's seed.

        Yields
        ------
        EventChunk
            At most ``max_events_per_chunk`` events each, time-ordered across
            chunks and frames.  Histogramming them gives back ``counts``.
        """
        sim = self.sim
        layout = sim.layout
        root = _child(self._seed, 1 << 30) if seed is None else (
            seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed))
        ntof = sim.num_tof_bins
        nvr = layout.num_views * layout.num_radial
        cpairs = layout.crystal_pairs().reshape(-1, 2)
        ncr = layout.scanner.crystals_per_ring
        eff = sim.crystal_efficiencies * layout.scanner.detector_mask()
        ring_table = self._bin_tables()
        lam = sim.decay_constant_per_s
        rates = {"prompt_decay": lam, "prompt_randoms": 2 * lam, "delayed": 2 * lam}
        for k in tqdm(range(self.num_frames), desc="expanding listmode", disable=sim.quiet, leave=False):
            rng = np.random.default_rng(_child(root, k))
            prompts, delayeds = counts(k)
            prompts = np.asarray(prompts).reshape(-1)
            delayeds = np.asarray(delayeds).reshape(-1)
            want = layout.num_bins * ntof
            if prompts.size != want or delayeds.size != want:
                raise ValueError(f"counts of frame {k} have {prompts.size} and {delayeds.size} bins; expected {want}")
            if np.asarray(prompts).dtype.kind not in "iu" or np.asarray(delayeds).dtype.kind not in "iu":
                raise TypeError("listmode expansion needs integer counts (an acquisition with noise=True)")
            ip = np.flatnonzero(prompts)
            # Split each bin's prompts between trues + scatter (e^{-λt}) and randoms (e^{-2λt}).
            ts = np.empty(0, np.float32)
            r = np.empty(0, np.float32)
            if ip.size:
                ts_parts, r_parts = [], []
                for ci in range(len(sim.chunks)):
                    t_b, _, r_b = self._expected_block(ci, k, scatter=False)
                    ts_parts.append(t_b[0])
                    r_parts.append(r_b[0])
                ts = np.concatenate(ts_parts)[ip].astype(np.float64)
                r = np.concatenate(r_parts)[ip].astype(np.float64)
            tot = ts + r
            p_true = np.where(tot > 0, ts / np.where(tot > 0, tot, 1.0), 1.0)
            n_true = rng.binomial(prompts[ip], p_true)
            idl = np.flatnonzero(delayeds)
            sparse = {
                "prompt_decay": (ip, n_true),
                "prompt_randoms": (ip, prompts[ip] - n_true),
                "delayed": (idl, delayeds[idl].astype(np.int64)),
            }
            total_events = int(prompts.sum() + delayeds.sum())
            num_slices = max(1, math.ceil(total_events / sim.max_events_per_chunk))
            fs_k, fe_k = self.frame_start_s[k], self.frame_end_s[k]
            edges = np.linspace(fs_k, fe_k, num_slices + 1)
            remaining = {key: c.copy() for key, (_, c) in sparse.items()}
            for si in range(num_slices):
                parts = []
                for key, (idx, _) in sparse.items():
                    mu = rates[key]
                    # Binomial thinning: events of this time slice, then times within it.
                    if si == num_slices - 1:
                        take = remaining[key].copy()
                    else:
                        q = min(1.0, float(decay_integral(edges[si], edges[si + 1], mu) / decay_integral(edges[si], fe_k, mu)))
                        take = rng.binomial(remaining[key], q)
                    remaining[key] -= take
                    bins = np.repeat(idx, take)
                    times = sample_decay_times(rng, bins.size, edges[si], edges[si + 1], mu)
                    parts.append((bins, times, np.full(bins.size, key != "delayed")))
                bins = np.concatenate([p[0] for p in parts])
                if bins.size == 0:
                    continue
                times = np.concatenate([p[1] for p in parts])
                prompt = np.concatenate([p[2] for p in parts])
                order = np.argsort(times, kind="stable")
                bins, times, prompt = bins[order], times[order], prompt[order]
                lor = bins // ntof
                tof_bin = (bins % ntof).astype(np.int16) if sim.tof is not None else None
                plane = lor // nvr
                cp = cpairs[lor % nvr]
                cand = ring_table[plane]  # (n, M, 2) ring pairs of each event's plane
                if cand.shape[1] == 1:
                    rings = cand[:, 0]
                else:
                    ok = cand[..., 0] >= 0
                    c0 = np.where(ok, cand[..., 0], 0)
                    c1 = np.where(ok, cand[..., 1], 0)
                    wgt = np.where(ok, eff[c0 * ncr + cp[:, None, 0]] * eff[c1 * ncr + cp[:, None, 1]], 0.0)
                    cum = np.cumsum(wgt, axis=1)
                    u = rng.random(bins.size) * cum[:, -1]
                    j = np.minimum((cum <= u[:, None]).sum(axis=1), cand.shape[1] - 1)
                    rings = cand[np.arange(bins.size), j]
                ids = np.stack([rings[:, 0] * ncr + cp[:, 0], rings[:, 1] * ncr + cp[:, 1]], axis=1).astype(np.int32)
                time_ms = (times - sim.scan_start_s) * 1000.0
                for j0 in range(0, bins.size, sim.max_events_per_chunk):
                    sl = slice(j0, j0 + sim.max_events_per_chunk)
                    yield EventChunk(k, ids[sl], None if tof_bin is None else tof_bin[sl], time_ms[sl], prompt[sl])

    def write_listmode_h5(self, path, counts, exam=None, corrections=None):
        """Expand ``counts`` (see :meth:`events`) into a petbind HDF5 listmode file.

        Returns
        -------
        int
            Number of events written.
        """
        from petbind.recon.rawdata.hdf5 import ListmodeWriter  # noqa: PLC0415 - files only here

        n = 0
        with ListmodeWriter(path, self.sim.layout.scanner, tof=self.sim.tof, exam=exam, corrections=corrections) as w:
            for c in self.events(counts):
                w.append(c.detector_ids, c.tof_bin, c.time_ms, c.is_prompt)
                n += len(c)
        return n
