"""Simulate PET acquisitions: expected sinograms, noisy sinograms and listmode.

The forward model is :class:`petbind.recon.system.SystemModel`:

``trues   = κ D_k · n ⊙ a ⊙ P(G x_k)``
``scatter = SF/(1-SF) · (per-plane trues total) · shape``,  ``shape ∝ n ⊙ blur(a ⊙ P(G x_k))``
``randoms = 2τ σ² ∫ A(t)² dt · n``  (``R_ij = 2τ S_i S_j`` with singles ``S_i = σ ε_i A(t)``)

* ``x_k``: frame ``k``'s activity image, Bq/mL, decay-corrected to injection
  (PET-BIDS convention).
* ``D_k = ∫ e^{-λ t} dt`` over the frame (s): counts are *not* decay corrected.
* ``κ``: counts per s per (Bq/mL · mm of line integral), calibrated so that
  a point source at the centre of the field, without attenuation and with
  unit efficiencies, gives ``sensitivity_cps_per_kbq``.
* ``n``: crystal-efficiency normalisation ``ε_i ε_j``; ``a``: attenuation
  ``exp(-P μ)``; ``G``: optional Gaussian resolution model.
* ``A(t)``: total activity in the image (Bq); ``σ`` is solved so that randoms
  are ``randoms_fraction`` of all prompts over the whole acquisition (frames
  with more activity get relatively more randoms, as on a real scanner).
* Scatter is a smooth (Gaussian-blurred) version of the attenuated
  emission sinogram, scaled plane by plane so that
  ``scatter / (trues + scatter) = scatter_fraction`` (NEMA definition).

Listmode events are drawn plane-chunk by plane-chunk (bounded memory), then
split into time slices of at most ``max_events_per_chunk`` events and
emitted in time order.  For a :class:`BasisActivity` (activity = sum of fixed
images with per-frame weights, e.g. regions with their TACs) the basis
images are projected once and low-count frames are drawn event by event
(a superposition of one Poisson process per basis image), so the cost
follows the number of events rather than the number of bins; the scatter
of such frames is built per basis image with the same per-plane fraction.  Prompt events (trues and scatter) have times
distributed as ``e^{-λ t}`` within the frame, randoms and delayed events as
``e^{-2λ t}`` (their rate goes with the square of the activity).  Delayed
events (``is_prompt == False``) are an independent Poisson draw of the
randoms, as a delayed-window estimate would be.

Only ``span == 1`` layouts are accepted: every bin is one detector pair.
Sampling runs on the host (NumPy); projections use the GPU when the device
allows (one transfer per plane chunk).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from petbind.core.decay import C11_HALF_LIFE_S, decay_integral
from petbind.recon.corrections import normalisation_factors, point_source_kappa
from petbind.recon.geometry import ImageGrid, SinogramLayout, TOFParameters
from petbind.recon.system import GaussianFilter, LORProjector, SystemModel

__all__ = [
    "BasisActivity",
    "EventChunk",
    "FrameStats",
    "ListmodeSimulator",
    "sample_decay_times",
    "draw_poisson_sparse",
    "random_crystal_efficiencies",
]

log = logging.getLogger(__name__)



class BasisActivity(NamedTuple):
    """Activity as a sum of fixed images with per-frame weights.

    ``x_k = sum_r weights[r, k] * images[r]``.  The simulator projects each
    basis image once and reuses the projections for every frame (and for every
    call with the same ``images`` object), which is much faster than
    projecting each frame when regions are fewer than frames.

    Attributes
    ----------
    images : ndarray, shape (R, x, y, z)
        Basis images (e.g. partial-volume region fractions).
    weights : ndarray, shape (R, F)
        Weight of each image in each frame (Bq/mL, decay-corrected).
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
    trues: int = 0
    scatter: int = 0
    randoms: int = 0
    delayeds: int = 0

    @property
    def prompts(self):
        return self.trues + self.scatter + self.randoms


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


def _seed_sequence(seed):
    return seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)


def draw_poisson_sparse(rng, mean, num_draws=None):
    """Poisson counts of every bin of ``mean``, returned sparse.

    Parameters
    ----------
    rng : numpy.random.Generator
    mean : ndarray
        Expected counts (non-negative).

    Returns
    -------
    index : ndarray of int64
        Flat indices (increasing) of bins with at least one count.
    counts : ndarray of int64
        (With ``num_draws``, a list of ``num_draws`` independent
        ``(index, counts)`` pairs sharing one cumulative sum.)

    Notes
    -----
    When the total is below half the number of bins (low-count frames) the
    draw is ``N ~ Poisson(sum mean)`` followed by ``N`` categorical draws with
    probabilities ``mean / sum mean`` (inverse CDF on the cumulative sum),
    which has exactly the distribution of independent Poisson bins and costs
    ``O(bins + N log bins)`` instead of one Poisson draw per bin.
    """
    flat = np.asarray(mean).ravel()
    draws = []
    total = float(flat.sum(dtype=np.float64))
    cdf = None
    for _ in range(1 if num_draws is None else int(num_draws)):
        if not total > 0:
            draws.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
        elif total < 0.5 * flat.size:
            if cdf is None:
                cdf = np.cumsum(flat, dtype=np.float64)
            n = int(rng.poisson(total))
            u = rng.random(n) * cdf[-1]
            idx = np.minimum(np.searchsorted(cdf, u, side="right"), flat.size - 1)
            uniq, cnt = np.unique(idx, return_counts=True)
            draws.append((uniq.astype(np.int64), cnt.astype(np.int64)))
        else:
            c = rng.poisson(flat)
            nz = np.flatnonzero(c)
            draws.append((nz.astype(np.int64), c[nz].astype(np.int64)))
    return draws[0] if num_draws is None else draws


def random_crystal_efficiencies(scanner, rng=None, spread=0.05):
    """Log-normal crystal efficiencies around 1 (relative spread ``spread``), 0 for gaps."""
    rng = np.random.default_rng(rng)
    eff = np.exp(rng.normal(0.0, spread, scanner.num_detectors) - 0.5 * spread**2)
    return eff * scanner.detector_mask()


def _dense(sparse, shape):
    idx, cnt = sparse
    return np.bincount(idx, cnt, int(np.prod(shape))).astype(np.int64).reshape(shape)


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


class ListmodeSimulator:
    """Simulate sinograms and listmode data of a dynamic PET acquisition.

    Parameters
    ----------
    layout : SinogramLayout
        Span 1 (each bin one detector pair).
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
    resolution_fwhm_mm : float or sequence of 3, optional
        Image-space resolution model ``G`` (FWHM, mm).
    sensitivity_cps_per_kbq : float
        Count rate of a point source at the centre, unattenuated (cps/kBq);
        sets the count level.
    half_life_s : float
        Physical half-life (s) (default ¹¹C).
    scan_start_s : float
        Listmode time 0 in s after injection; frame times are after injection.
    chunk_planes : int
        Sinogram planes projected and drawn at a time (bounds memory).
    max_events_per_chunk : int
        Upper bound on events per yielded :class:`EventChunk`.
    basis_cache_bytes : float
        Memory allowed for cached projections of :class:`BasisActivity` images.
    device : {"auto", "cpu", "gpu"}
    quiet : bool
        Silence progress bars.

    Notes
    -----
    See the module docstring for the model.  Everything is deterministic
    given ``seed`` and the settings (each frame draws from its own
    ``SeedSequence`` child, so frames do not depend on each other's sizes).
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
        resolution_fwhm_mm=None,
        sensitivity_cps_per_kbq=10.0,
        half_life_s=C11_HALF_LIFE_S,
        scan_start_s=0.0,
        chunk_planes=32,
        max_events_per_chunk=1_000_000,
        basis_cache_bytes=512e6,
        device="auto",
        quiet=False,
    ):
        if not isinstance(layout, SinogramLayout):
            raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
        if layout.span != 1:
            raise ValueError(f"the simulator emits detector pairs and needs span=1; got span={layout.span}")
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
        if int(chunk_planes) < 1 or int(max_events_per_chunk) < 1:
            raise ValueError("chunk_planes and max_events_per_chunk must be >= 1")
        self.layout, self.grid, self.tof = layout, grid, tof
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
        self.resolution = None if resolution_fwhm_mm is None else GaussianFilter(grid, resolution_fwhm_mm)
        self.sensitivity_cps_per_kbq = float(sensitivity_cps_per_kbq)
        self.half_life_s = float(half_life_s)
        self.decay_constant_per_s = math.log(2.0) / self.half_life_s
        self.scan_start_s = float(scan_start_s)
        self.chunk_planes = int(chunk_planes)
        self.max_events_per_chunk = int(max_events_per_chunk)
        self.basis_cache_bytes = float(basis_cache_bytes)
        self.device = device
        self.quiet = bool(quiet)
        self.normalisation = normalisation_factors(layout, self.crystal_efficiencies)
        self.chunks = [np.arange(p, min(p + self.chunk_planes, layout.num_planes)) for p in range(0, layout.num_planes, self.chunk_planes)]
        self._attenuation = None
        self._sensitivity = None
        self._kappa = None
        self._basis_images = None
        self._basis_cache = {}
        self._basis_dots = None
        self.frame_stats = []
        self.singles_scale = None

    # -- set-up: attenuation, sensitivity image, calibration ------------------------------------
    def _chunk_projector(self, planes, tof="same"):
        start, end = _plane_lors(self.layout, planes)
        return LORProjector(start, end, self.grid, tof=self.tof if tof == "same" else tof, device=self.device)

    @property
    def attenuation(self):
        """Attenuation factors ``exp(-P μ)``, non-TOF sinogram shape (computed once)."""
        if self._attenuation is None:
            att = np.ones(self.layout.shape, dtype=np.float32)
            if self.mu_map_per_mm is not None:
                for planes in self.chunks:
                    p = self._chunk_projector(planes, tof=None)
                    att[planes] = np.exp(-np.asarray(p.forward(self.mu_map_per_mm), dtype=np.float64))
            self._attenuation = att
        return self._attenuation

    def system_model(self, planes=None):
        """The :class:`~petbind.recon.system.SystemModel` of some planes (all by default), without κ and decay.

        ``m = n ⊙ a`` and ``G`` as configured; no additive term.
        """
        planes = np.arange(self.layout.num_planes) if planes is None else np.asarray(planes)
        m = self.normalisation[planes] * self.attenuation[planes]
        return SystemModel(self._chunk_projector(planes), multiplicative=m, resolution=self.resolution)

    @property
    def sensitivity_image(self):
        """``G^T P^T m`` (non-TOF), used for frame totals."""
        if self._sensitivity is None:
            s = np.zeros(self.grid.shape, dtype=np.float64)
            for planes in self.chunks:
                m = self.normalisation[planes] * self.attenuation[planes]
                model = SystemModel(self._chunk_projector(planes, tof=None), multiplicative=m, resolution=self.resolution)
                s += model.back(np.ones(m.shape, dtype=np.float32))
            self._sensitivity = s
        return self._sensitivity

    @property
    def kappa(self):
        """Counts per s per (Bq/mL × mm of line integral), from ``sensitivity_cps_per_kbq``."""
        if self._kappa is None:
            def project_total(point):
                return sum(float(np.sum(self._chunk_projector(planes, tof=None).forward(point), dtype=np.float64))
                           for planes in self.chunks)

            self._kappa = point_source_kappa(self.sensitivity_cps_per_kbq, self.grid, project_total)
        return self._kappa

    # -- activity handling ----------------------------------------------------------------------
    def _frames(self, activity, frame_start_s, frame_end_s):
        fs = np.atleast_1d(np.asarray(frame_start_s, dtype=float))
        fe = np.atleast_1d(np.asarray(frame_end_s, dtype=float))
        if fs.shape != fe.shape or fs.ndim != 1:
            raise ValueError(f"frame_start_s and frame_end_s must be 1-D of equal length; got {fs.shape}, {fe.shape}")
        if np.any(fe <= fs) or np.any(fs[1:] < fe[:-1]) or fs[0] < self.scan_start_s:
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
            if not np.all(np.isfinite(weights)) or not np.all(np.isfinite(images)):
                raise ValueError("BasisActivity images and weights must be finite")
            return activity, fs, fe
        act = np.asarray(activity, dtype=np.float32)
        if act.ndim == 3:
            act = act[..., None]
        if act.ndim != 4 or act.shape[:3] != self.grid.shape or act.shape[3] != fs.size:
            raise ValueError(f"activity must have shape {self.grid.shape} + ({fs.size},) (Bq/mL per frame); got {np.shape(activity)}")
        if not np.all(np.isfinite(act)) or act.min() < 0:
            raise ValueError("activity must be finite and non-negative (Bq/mL)")
        return act, fs, fe

    def _frame_image(self, act, k):
        if isinstance(act, BasisActivity):
            return np.tensordot(np.asarray(act.weights[:, k], dtype=np.float32), np.asarray(act.images, np.float32), axes=1)
        return act[..., k]

    def _image_totals(self, act):
        """Per frame: ``<s, x_k>`` (for trues totals) and the activity in the image (Bq)."""
        voxel_ml = float(np.prod(self.grid.voxel_size_mm)) / 1000.0
        if isinstance(act, BasisActivity):
            imgs = np.asarray(act.images, dtype=np.float64).reshape(act.images.shape[0], -1)
            sums = imgs.sum(axis=1) * voxel_ml
            cache = self._basis_projections(act)
            if cache is not None:
                # <m, P G f_r> straight from the cached projections: no back projection needed.
                dots = np.zeros(imgs.shape[0])
                for ci, planes in enumerate(self.chunks):
                    m = (self.normalisation[planes] * self.attenuation[planes]).astype(np.float64)
                    proj = cache[ci].sum(axis=-1) if self.tof is not None else cache[ci]
                    dots += np.tensordot(proj.astype(np.float64), m, axes=m.ndim)
            else:
                dots = imgs @ self.sensitivity_image.ravel()
            return act.weights.T @ dots, act.weights.T @ sums
        flat = act.reshape(-1, act.shape[-1]).astype(np.float64)
        return flat.T @ self.sensitivity_image.ravel(), flat.sum(axis=0) * voxel_ml

    def _projection(self, act, k, ci):
        """``P(G x_k)`` for chunk ``ci`` (TOF if configured), float32."""
        planes = self.chunks[ci]
        if isinstance(act, BasisActivity):
            cache = self._basis_projections(act)
            if cache is not None:
                return np.tensordot(np.asarray(act.weights[:, k], dtype=np.float32), cache[ci], axes=1)
        x = self._frame_image(act, k).astype(np.float32)
        if self.resolution is not None:
            x = self.resolution.forward(x)
        return np.asarray(self._chunk_projector(planes).forward(x), dtype=np.float32)

    def _basis_projections(self, act):
        if self._basis_images is not act.images:
            r = act.images.shape[0]
            nbins = self.layout.num_bins * (self.tof.num_bins if self.tof is not None else 1)
            self._basis_images = act.images
            self._basis_cache = {}
            self._basis_ok = r * nbins * 4 <= self.basis_cache_bytes
            if not self._basis_ok:
                log.info("basis projections (%d images) exceed basis_cache_bytes; projecting frame by frame", r)
        if not self._basis_ok:
            return None
        if not self._basis_cache:
            for ci, planes in enumerate(tqdm(self.chunks, desc="projecting basis images", disable=self.quiet, leave=False)):
                p = self._chunk_projector(planes)
                out = []
                for img in act.images:
                    x = np.asarray(img, dtype=np.float32)
                    if self.resolution is not None:
                        x = self.resolution.forward(x)
                    out.append(np.asarray(p.forward(x), dtype=np.float32))
                self._basis_cache[ci] = np.stack(out)
        return self._basis_cache

    # -- expected counts ------------------------------------------------------------------------
    def _calibrate(self, act, fs, fe):
        """Frame totals and the singles scale σ that gives the requested randoms fraction."""
        lam = self.decay_constant_per_s
        dots, activity_bq = self._image_totals(act)
        d1 = decay_integral(fs, fe, lam)
        d2 = decay_integral(fs, fe, 2 * lam)
        trues = self.kappa * d1 * dots
        scatter = trues * self.scatter_fraction / (1 - self.scatter_fraction)
        i2 = activity_bq**2 * d2  # ∫ A(t)² dt per frame (Bq² s)
        window_s = self.coincidence_window_ns * 1e-9
        norm_sum = float(self.normalisation.sum(dtype=np.float64))
        target = self.randoms_fraction / (1 - self.randoms_fraction) * float(np.sum(trues + scatter))
        if target > 0 and np.sum(i2) > 0:
            sigma = math.sqrt(target / (window_s * norm_sum * float(np.sum(i2))))
        else:
            sigma = 0.0
        randoms = window_s * sigma**2 * i2 * norm_sum
        self.singles_scale = sigma
        self._frame_activity_bq = activity_bq
        self._frame_d1 = d1
        return trues, scatter, randoms, i2

    def _scatter_setup(self):
        """Decimation factors and the FFT of the scatter blur on the decimated (view, radial) grid.

        The blur is wide (tens of bins), so it is computed on a grid coarser by
        ``f`` in views and radial bins (block sums, keeping at least 4 coarse
        samples per standard deviation) and interpolated back linearly.
        """
        if getattr(self, "_scatter_cfg", None) is None:
            layout = self.layout
            # Radial bin width from the LOR distances to the axis in view 0.
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
            # Linear interpolation from coarse-sample centres back to fine bins.
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

    def expected_chunk(self, act, k, ci, frame_totals):
        """Expected trues, scatter and randoms of chunk ``ci`` in frame ``k`` (float32 arrays).

        Shapes are ``(planes, views, radial[, tof])``; randoms are spread
        evenly over TOF bins.  Per-plane totals are summed in float64.
        """
        planes = self.chunks[ci]
        kappa_d = np.float32(self.kappa * self._frame_d1[k])
        proj = self._projection(act, k, ci)
        n = self.normalisation[planes]
        a = self.attenuation[planes]
        tof_axis = self.tof is not None
        lor = (lambda f: f[..., None]) if tof_axis else (lambda f: f)
        emission = lor(kappa_d * a) * proj
        trues = lor(n) * emission
        trues_nontof = trues.sum(axis=-1) if tof_axis else trues
        em_nontof = emission.sum(axis=-1) if tof_axis else emission
        shape = n * self._scatter_shape(em_nontof).astype(np.float32)
        sf = self.scatter_fraction / (1 - self.scatter_fraction)
        plane_trues = trues_nontof.sum(axis=(1, 2), dtype=np.float64)
        plane_shape = shape.sum(axis=(1, 2), dtype=np.float64)
        scale = np.where(plane_shape > 0, sf * plane_trues / np.where(plane_shape > 0, plane_shape, 1.0), 0.0)
        scatter = shape * scale.astype(np.float32)[:, None, None]
        if tof_axis:
            # Scatter TOF profile: the trues' profile blurred over two bins, uniform where there are no trues.
            prof = ndimage.gaussian_filter1d(trues, 2.0, axis=-1, mode="constant")
            tot = prof.sum(axis=-1, keepdims=True)
            prof = np.where(tot > 0, prof / np.where(tot > 0, tot, 1.0), np.float32(1.0 / self.tof.num_bins))
            scatter = scatter[..., None] * prof
        window_s = self.coincidence_window_ns * 1e-9
        randoms = np.float32(window_s * self.singles_scale**2 * frame_totals[3][k]) * n
        if tof_axis:
            randoms = np.repeat(randoms[..., None] / np.float32(self.tof.num_bins), self.tof.num_bins, axis=-1)
        return trues, scatter, randoms

    # -- public entry points --------------------------------------------------------------------
    def singles_counts(self, frame_start_s, frame_end_s):
        """Singles counted per detector in each frame of the last simulation.

        Returns
        -------
        ndarray, shape (num_frames, num_detectors)
            ``σ ε_i A_k D_k`` (expected counts; the recon can estimate randoms from them).
        """
        if self.singles_scale is None:
            raise ValueError("run simulate_listmode or simulate_sinograms first")
        eff = self.crystal_efficiencies * self.layout.scanner.detector_mask()
        return self.singles_scale * (self._frame_activity_bq * self._frame_d1)[:, None] * eff[None, :]

    def simulate_sinograms(self, activity, frame_start_s, frame_end_s, seed=None):
        """Expected and Poisson-noisy sinograms of every frame (small problems).

        Parameters
        ----------
        activity : ndarray (x, y, z[, t]) or BasisActivity
            Decay-corrected activity (Bq/mL) per frame.
        frame_start_s, frame_end_s : array of float
            Frame times (s after injection).
        seed : int or SeedSequence, optional

        Returns
        -------
        dict of str to ndarray, each with a leading frame axis
            ``trues``, ``scatter``, ``randoms`` (expected), ``prompts``,
            ``delayeds`` (noisy, int64), and ``trues_counts``,
            ``scatter_counts``, ``randoms_counts`` (the drawn components of
            ``prompts``).
        """
        act, fs, fe = self._frames(activity, frame_start_s, frame_end_s)
        totals = self._calibrate(act, fs, fe)
        seeds = _seed_sequence(seed).spawn(fs.size)
        shape = self.layout.shape + ((self.tof.num_bins,) if self.tof is not None else ())
        out = {name: np.zeros((fs.size,) + shape, dtype=np.float64) for name in ("trues", "scatter", "randoms")}
        for name in ("prompts", "delayeds", "trues_counts", "scatter_counts", "randoms_counts"):
            out[name] = np.zeros((fs.size,) + shape, dtype=np.int64)
        for k in tqdm(range(fs.size), desc="simulating frames", disable=self.quiet):
            rng = np.random.default_rng(seeds[k])
            for ci, planes in enumerate(self.chunks):
                t, s, r = self.expected_chunk(act, k, ci, totals)
                out["trues"][k, planes], out["scatter"][k, planes], out["randoms"][k, planes] = t, s, r
                ct, cs = (_dense(draw_poisson_sparse(rng, m), m.shape) for m in (t, s))
                cr, cd = (_dense(d, r.shape) for d in draw_poisson_sparse(rng, r, num_draws=2))
                out["trues_counts"][k, planes], out["scatter_counts"][k, planes], out["randoms_counts"][k, planes] = ct, cs, cr
                out["prompts"][k, planes] = ct + cs + cr
                out["delayeds"][k, planes] = cd
        return out

    # -- drawing counts ---------------------------------------------------------------------------
    def _frame_counts(self, act, fs, fe, totals, seeds, counts_out):
        """Yield ``(k, rng, stats, sparse)`` per frame: the drawn counts of each event type, sparse.

        ``sparse[key]`` is a list of ``(flat bin index, count)`` pairs, keys
        ``prompt_decay`` (trues and scatter), ``prompt_randoms`` and ``delayed``.
        Low-count frames of a :class:`BasisActivity` with cached projections
        are drawn in batches, event by event from each basis image's
        distribution (cost proportional to the events, not to the bins);
        other frames bin by bin, chunk by chunk.
        """
        ntof = self.tof.num_bins if self.tof is not None else 1
        nbins = self.layout.num_bins * ntof
        expected = totals[0] + totals[1] + 2 * totals[2]
        fast = isinstance(act, BasisActivity) and self._basis_projections(act) is not None
        k = 0
        while k < fs.size:
            if fast and expected[k] < 0.5 * nbins:
                batch = [k]
                budget = max(20 * self.max_events_per_chunk, expected[k])
                used = expected[k]
                while batch[-1] + 1 < fs.size and expected[batch[-1] + 1] < 0.5 * nbins and used + expected[batch[-1] + 1] <= budget:
                    batch.append(batch[-1] + 1)
                    used += expected[batch[-1]]
                yield from self._basis_batch_counts(act, batch, fs, fe, totals, seeds, counts_out)
                k = batch[-1] + 1
            else:
                rng = np.random.default_rng(seeds[k])
                stats = FrameStats(float(fs[k]), float(fe[k]), float(totals[0][k]), float(totals[1][k]), float(totals[2][k]))
                sparse = self._dense_frame_counts(act, k, rng, totals, counts_out, stats)
                yield k, rng, stats, sparse
                k += 1

    def _chunk_offset(self, ci):
        ntof = self.tof.num_bins if self.tof is not None else 1
        return int(self.chunks[ci][0]) * self.layout.num_views * self.layout.num_radial * ntof

    def _dense_frame_counts(self, act, k, rng, totals, counts_out, stats):
        sparse = {"prompt_decay": [], "prompt_randoms": [], "delayed": []}
        for ci, planes in enumerate(self.chunks):
            t, s, r = self.expected_chunk(act, k, ci, totals)
            ct, cs = draw_poisson_sparse(rng, t), draw_poisson_sparse(rng, s)
            cr, cd = draw_poisson_sparse(rng, r, num_draws=2)
            self._collect(sparse, stats, counts_out, k, ci, t.shape, ct, cs, cr, cd)
        return sparse

    def _collect(self, sparse, stats, counts_out, k, ci, shape, ct, cs, cr, cd):
        stats.trues += int(ct[1].sum())
        stats.scatter += int(cs[1].sum())
        stats.randoms += int(cr[1].sum())
        stats.delayeds += int(cd[1].sum())
        offset = self._chunk_offset(ci)
        # Trues and scatter share the e^{-lambda t} time density: merge them.
        idx_ts = np.concatenate([ct[0], cs[0]])
        cnt_ts = np.concatenate([ct[1], cs[1]])
        for key, (idx, cnt) in (("prompt_decay", (idx_ts, cnt_ts)), ("prompt_randoms", cr), ("delayed", cd)):
            sparse[key].append((idx + offset, cnt))
        if counts_out is not None:
            size = int(np.prod(shape))
            planes = self.chunks[ci]
            dense_p = np.bincount(idx_ts, cnt_ts, size) + np.bincount(cr[0], cr[1], size)
            counts_out["prompts"][k, planes] = dense_p.reshape(shape).astype(np.int64)
            counts_out["delayeds"][k, planes] = _dense(cd, shape)

    def _basis_unit_chunk(self, ci):
        """Trues and scatter of chunk ``ci`` per unit basis weight and unit ``κ D`` (float32, leading basis axis).

        Scatter is built per basis image with the same recipe as
        :meth:`expected_chunk` (per-plane fraction), so that summed with the
        frame weights every plane keeps ``scatter / (trues + scatter) = SF``.
        """
        planes = self.chunks[ci]
        proj = self._basis_cache[ci]
        nb = proj.shape[0]
        n = self.normalisation[planes]
        a = self.attenuation[planes]
        tof_axis = self.tof is not None
        lor = (lambda f: f[..., None]) if tof_axis else (lambda f: f)
        emission = lor(a)[None] * proj
        trues = lor(n)[None] * emission
        trues_nontof = trues.sum(axis=-1) if tof_axis else trues
        em_nontof = emission.sum(axis=-1) if tof_axis else emission
        shp = em_nontof.shape
        shape = n[None] * self._scatter_shape(em_nontof.reshape((-1,) + shp[2:])).reshape(shp).astype(np.float32)
        sf = self.scatter_fraction / (1 - self.scatter_fraction)
        plane_trues = trues_nontof.sum(axis=(2, 3), dtype=np.float64)
        plane_shape = shape.sum(axis=(2, 3), dtype=np.float64)
        scale = np.where(plane_shape > 0, sf * plane_trues / np.where(plane_shape > 0, plane_shape, 1.0), 0.0)
        scatter = shape * scale.astype(np.float32)[:, :, None, None]
        if tof_axis:
            prof = ndimage.gaussian_filter1d(trues, 2.0, axis=-1, mode="constant")
            tot = prof.sum(axis=-1, keepdims=True)
            prof = np.where(tot > 0, prof / np.where(tot > 0, tot, 1.0), np.float32(1.0 / self.tof.num_bins))
            scatter = scatter[..., None] * prof
        return trues.reshape(nb, -1), scatter.reshape(nb, -1)

    def _basis_batch_counts(self, act, batch, fs, fe, totals, seeds, counts_out):
        """Draw a batch of low-count frames of a basis activity, event by event.

        Poisson process superposition: frame ``k``'s trues are the union of
        independent Poisson processes, one per basis image ``r``, with means
        ``w_rk κ D_k T_r``; each draws ``N_rk ~ Poisson(w_rk κ D_k sum T_r)``
        events whose bins are i.i.d. categorical with probabilities
        ``T_r / sum T_r`` (one inverse-CDF draw serves all frames of the
        batch).  Scatter likewise; randoms and delayeds follow ``n``.
        """
        kk = np.asarray(batch)
        rngs = {k: np.random.default_rng(seeds[k]) for k in batch}
        first = seeds[batch[0]]
        pool_rng = np.random.default_rng(np.random.SeedSequence(first.entropy, spawn_key=tuple(first.spawn_key) + (1 << 30,)))
        stats = {k: FrameStats(float(fs[k]), float(fe[k]), float(totals[0][k]), float(totals[1][k]), float(totals[2][k])) for k in batch}
        sparse = {k: {"prompt_decay": [], "prompt_randoms": [], "delayed": []} for k in batch}
        weights = np.asarray(act.weights, dtype=np.float64)[:, kk] * (self.kappa * self._frame_d1[kk])[None, :]
        ntof = self.tof.num_bins if self.tof is not None else 1
        window_s = self.coincidence_window_ns * 1e-9
        rand_scale = window_s * self.singles_scale**2 * totals[3][kk]

        def pooled(unit, counts_per_frame):
            """Bin indices of ``sum(counts)`` i.i.d. draws from ``unit``, split by frame."""
            m = int(counts_per_frame.sum())
            if m == 0:
                return [np.zeros(0, np.int64)] * len(batch)
            cdf = np.cumsum(unit, dtype=np.float64)
            idx = np.minimum(np.searchsorted(cdf, pool_rng.random(m) * cdf[-1], side="right"), unit.size - 1)
            return np.split(idx, np.cumsum(counts_per_frame)[:-1])

        def sparse_of(idx):
            u, c = np.unique(idx, return_counts=True)
            return u.astype(np.int64), c.astype(np.int64)

        for ci, planes in enumerate(self.chunks):
            trues, scatter = self._basis_unit_chunk(ci)
            shape = (len(planes), self.layout.num_views, self.layout.num_radial) + ((ntof,) if self.tof is not None else ())
            events = {k: {"t": [], "s": []} for k in batch}
            for name, unit in (("t", trues), ("s", scatter)):
                tot = unit.sum(axis=1, dtype=np.float64)
                for r in range(unit.shape[0]):
                    if tot[r] <= 0:
                        continue
                    counts = np.array([rngs[k].poisson(max(weights[r, j], 0.0) * tot[r]) for j, k in enumerate(batch)])
                    for k, idx in zip(batch, pooled(unit[r], counts)):
                        events[k][name].append(idx)
            n = self.normalisation[planes].ravel()
            nsum = float(n.sum(dtype=np.float64))
            rand_counts = [np.array([rngs[k].poisson(rand_scale[j] * nsum) for j, k in enumerate(batch)]) for _ in range(2)]
            rand_idx = []
            for counts in rand_counts:
                lors = pooled(n, counts)
                if self.tof is not None:
                    # Randoms are uniform over TOF bins.
                    lors = [lo * ntof + pool_rng.integers(0, ntof, lo.size) for lo in lors]
                rand_idx.append(lors)
            for j, k in enumerate(batch):
                ct = sparse_of(np.concatenate(events[k]["t"] or [np.zeros(0, np.int64)]))
                cs = sparse_of(np.concatenate(events[k]["s"] or [np.zeros(0, np.int64)]))
                cr = sparse_of(rand_idx[0][j])
                cd = sparse_of(rand_idx[1][j])
                self._collect(sparse[k], stats[k], counts_out, k, ci, shape, ct, cs, cr, cd)
        for k in batch:
            yield k, rngs[k], stats[k], sparse[k]

    def write_sinograms(self, path, result, frame_index, frame_start_s, frame_end_s, exam=None):
        """Write one frame of :meth:`simulate_sinograms` to a petbind sinogram file.

        Parameters
        ----------
        path : str or Path
        result : dict
            Output of :meth:`simulate_sinograms`.
        frame_index : int
        frame_start_s, frame_end_s : float
            The frame's times (s after injection); stored relative to the scan start.
        exam : petbind.recon.rawdata.schema.ExamInfo, optional

        Notes
        -----
        Stores ``prompts`` and ``delayeds`` (counts), the crystal-efficiency
        ``normalisation``, the ``attenuation`` factors and the expected
        ``scatter`` (what a scatter estimate should recover).
        """
        from petbind.recon.rawdata.sinograms import write_sinograms_h5

        k = int(frame_index)
        write_sinograms_h5(
            path, self.layout, prompts=result["prompts"][k], delayeds=result["delayeds"][k],
            normalisation=self.normalisation, attenuation=self.attenuation,
            scatter=result["scatter"][k].astype(np.float32), tof=self.tof, exam=exam,
            frame_start_s=float(frame_start_s) - self.scan_start_s, frame_duration_s=float(frame_end_s) - float(frame_start_s),
        )

    def simulate_listmode(self, activity, frame_start_s, frame_end_s, seed=None, counts_out=None):
        """Generate listmode events in time order, chunk by chunk.

        Parameters
        ----------
        activity : ndarray (x, y, z[, t]) or BasisActivity
            Decay-corrected activity (Bq/mL) per frame.
        frame_start_s, frame_end_s : array of float
            Frame times (s after injection).
        seed : int or SeedSequence, optional
        counts_out : dict, optional
            When given, receives ``prompts`` and ``delayeds`` count sinograms
            (int64, leading frame axis) of the drawn events, for checks on
            small problems (memory: two full sinograms per frame).

        Yields
        ------
        EventChunk
            At most ``max_events_per_chunk`` events each, time-ordered across chunks.

        Notes
        -----
        :attr:`frame_stats` holds one :class:`FrameStats` per frame once the
        frame has been emitted.
        """
        act, fs, fe = self._frames(activity, frame_start_s, frame_end_s)
        totals = self._calibrate(act, fs, fe)
        self.frame_stats = []
        seeds = _seed_sequence(seed).spawn(fs.size)
        ntof = self.tof.num_bins if self.tof is not None else 1
        if counts_out is not None:
            shape = (fs.size,) + self.layout.shape + ((ntof,) if self.tof is not None else ())
            counts_out["prompts"] = np.zeros(shape, dtype=np.int64)
            counts_out["delayeds"] = np.zeros(shape, dtype=np.int64)
        # Bin -> detector ids: ring pair per plane and crystal pair per (view, radial).
        pair_of_plane = np.empty((self.layout.num_planes, 2), dtype=np.int64)
        pair_of_plane[self.layout.plane_of_ring_pair] = self.layout.ring_pairs
        cpairs = self.layout.crystal_pairs().reshape(-1, 2)
        ncr = self.layout.scanner.crystals_per_ring
        lam = self.decay_constant_per_s
        bar = tqdm(total=fs.size, desc="simulating listmode", disable=self.quiet)
        for k, rng, stats, sparse in self._frame_counts(act, fs, fe, totals, seeds, counts_out):
            bar.update(1)
            sparse = {key: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for key, v in sparse.items()}
            total_events = sum(int(c.sum()) for _, c in sparse.values())
            num_slices = max(1, math.ceil(total_events / self.max_events_per_chunk))
            edges = np.linspace(fs[k], fe[k], num_slices + 1)
            rates = {"prompt_decay": lam, "prompt_randoms": 2 * lam, "delayed": 2 * lam}
            remaining = {key: c.copy() for key, (_, c) in sparse.items()}
            for si in range(num_slices):
                parts = []
                for key, (idx, _) in sparse.items():
                    mu = rates[key]
                    w_slice = decay_integral(edges[si], edges[si + 1], mu)
                    w_rest = decay_integral(edges[si], fe[k], mu)
                    q = 1.0 if si == num_slices - 1 else min(1.0, float(w_slice / w_rest))
                    take = rng.binomial(remaining[key], q) if q < 1.0 else remaining[key].copy()
                    remaining[key] -= take
                    bins = np.repeat(idx, take)
                    times = sample_decay_times(rng, bins.size, edges[si], edges[si + 1], mu)
                    parts.append((bins, times, np.full(bins.size, key != "delayed")))
                bins = np.concatenate([p[0] for p in parts])
                times = np.concatenate([p[1] for p in parts])
                prompt = np.concatenate([p[2] for p in parts])
                order = np.argsort(times, kind="stable")
                bins, times, prompt = bins[order], times[order], prompt[order]
                lor = bins // ntof
                tof_bin = (bins % ntof).astype(np.int16) if self.tof is not None else None
                plane = lor // (self.layout.num_views * self.layout.num_radial)
                vr = lor % (self.layout.num_views * self.layout.num_radial)
                rings = pair_of_plane[plane]
                cp = cpairs[vr]
                ids = np.stack([rings[:, 0] * ncr + cp[:, 0], rings[:, 1] * ncr + cp[:, 1]], axis=1).astype(np.int32)
                time_ms = (times - self.scan_start_s) * 1000.0
                for j in range(0, max(bins.size, 1), self.max_events_per_chunk):
                    sl = slice(j, j + self.max_events_per_chunk)
                    if bins.size == 0:
                        break
                    yield EventChunk(k, ids[sl], None if tof_bin is None else tof_bin[sl], time_ms[sl], prompt[sl])
            self.frame_stats.append(stats)
            log.info(
                "frame %d (%g-%g s): trues %d, scatter %d, randoms %d, delayeds %d",
                k, fs[k], fe[k], stats.trues, stats.scatter, stats.randoms, stats.delayeds,
            )
        bar.close()
