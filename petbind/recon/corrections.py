"""Data corrections: normalisation, attenuation, randoms, scatter, dead time, calibration.

Each correction enters the one system model of :mod:`petbind.recon.system`,
``ȳ = m ⊙ P(G x) + a``, in one place:

============================  =====================================================
correction                    where it goes
============================  =====================================================
normalisation ``ε_i ε_j``     ``m`` (:func:`normalisation_factors`)
attenuation ``exp(-P μ)``     ``m`` (:func:`attenuation_factors`)
calibration κ                 ``m`` (:func:`point_source_kappa`)
decay and frame duration      ``m`` (:func:`petbind.core.decay.decay_integral`)
dead time (live fraction)     ``m`` (:func:`frame_dead_time_factor`)
randoms                       ``a`` (:func:`randoms_from_singles`, :func:`estimate_randoms`)
scatter                       ``a`` (:func:`estimate_scatter`)
============================  =====================================================

The simulator uses the same functions to make data, so a reconstruction with
these factors returns the simulated Bq/mL.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from petbind.core.device import array_module, to_numpy
from petbind.core.frames import parse_frames
from petbind.recon.geometry import SinogramLayout

__all__ = [
    "DEAD_TIME_MODELS",
    "SCATTER_FWHM_MM",
    "TAIL_ATTENUATION_MIN",
    "attenuation_factors",
    "dead_time_factors",
    "estimate_randoms",
    "estimate_scatter",
    "frame_dead_time_factor",
    "frame_singles_rate_cps",
    "normalisation_factors",
    "point_source_kappa",
    "radial_bin_mm",
    "randoms_from_singles",
    "resample_to_grid",
]

DEAD_TIME_MODELS = ("non-paralyzable", "paralyzable")

#: Default Gaussian blur width (FWHM, mm) of the convolution scatter model:
#: about the width of a head, the scale of single-scatter distributions in
#: brain sinograms.  The tails alone do not fix it (see estimate_scatter).
SCATTER_FWHM_MM = 150.0
#: Bins whose attenuation survival exceeds this are scatter tails (outside the object).
TAIL_ATTENUATION_MIN = 0.995


# ------------------------------------------------------------------------------------------------
# multiplicative factors
# ------------------------------------------------------------------------------------------------
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


def point_source_kappa(sensitivity_cps_per_kbq, grid, project_total):
    """Calibration κ: counts per s per (Bq/mL · mm of line integral).

    Parameters
    ----------
    sensitivity_cps_per_kbq : float
        Count rate (cps) of a 1 kBq point source in the centre of the field,
        unattenuated, with unit crystal efficiencies.
    grid : ImageGrid
        Image grid; the point source sits in the voxel nearest the scanner
        centre.
    project_total : callable
        ``project_total(image) -> float``: the sum over every bin of the
        non-TOF line-integral projection of ``image`` (mm · image units).

    Returns
    -------
    float
        ``κ = S · V_voxel[mL] / (1000 · Σ_bins P δ_centre)``: a point source
        of ``A`` Bq is an image value ``A / V`` Bq/mL and must give ``S A /
        1000`` counts per s.

    Raises
    ------
    ValueError
        When no LOR passes through the centre voxel.
    """
    centre = tuple(int(round(c)) for c in (-grid.origin_mm / grid.voxel_size_mm))
    centre = tuple(min(max(c, 0), s - 1) for c, s in zip(centre, grid.shape))
    point = np.zeros(grid.shape, dtype=np.float32)
    point[centre] = 1.0
    total = float(project_total(point))
    if not total > 0:
        raise ValueError("no LOR passes through the centre of the image grid; check the grid and the scanner")
    voxel_ml = float(np.prod(grid.voxel_size_mm)) / 1000.0
    return float(sensitivity_cps_per_kbq) * voxel_ml / (1000.0 * total)


def resample_to_grid(volume, affine, grid, order=1):
    """Resample a 3-D image (a μ-map) given on ``affine`` onto ``grid`` (spline ``order``, 0 outside).

    Parameters
    ----------
    volume : ndarray, shape (x, y, z)
    affine : ndarray, shape (4, 4)
        RAS+ mm affine of ``volume``.
    grid : ImageGrid
    order : int
        Spline order (1: trilinear).

    Returns
    -------
    ndarray of float32, shape grid.shape
    """
    import nibabel as nib
    from nibabel.processing import resample_from_to

    affine = np.asarray(affine, dtype=float)
    if volume.shape == tuple(grid.shape) and np.allclose(affine, grid.affine, atol=1e-4):
        return np.asarray(volume, dtype=np.float32)
    src = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    out = resample_from_to(src, (tuple(grid.shape), grid.affine), order=order, mode="constant", cval=0.0)
    return np.asarray(out.dataobj, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# dead time
# ------------------------------------------------------------------------------------------------
def dead_time_factors(singles_rate_cps, tau_s, model="non-paralyzable"):
    """Per-detector dead-time correction factor (true / measured rate).

    Parameters
    ----------
    singles_rate_cps : array of float
        Measured singles rate ``m`` per detector (counts/s).
    tau_s : float
        Dead time per event (s).
    model : {"non-paralyzable", "paralyzable"}

    Returns
    -------
    ndarray
        ``n / m`` with ``n`` the true rate (1 where ``m == 0``).

    Notes
    -----
    Non-paralyzable: ``m = n / (1 + n τ)`` so ``n / m = 1 / (1 - m τ)``
    (needs ``m τ < 1``).  Paralyzable: ``m = n exp(-n τ)`` so
    ``n = -W0(-m τ) / τ`` with the principal branch of the Lambert W function
    (the low-rate solution; needs ``m τ <= 1/e``).

    References
    ----------
    G. F. Knoll, Radiation Detection and Measurement, 4th ed., Wiley 2010, ch. 4.VII.
    """
    if model not in DEAD_TIME_MODELS:
        raise ValueError(f"model must be one of {DEAD_TIME_MODELS}; got {model!r}")
    if not tau_s >= 0:
        raise ValueError(f"tau_s must be >= 0; got {tau_s}")
    m = np.asarray(singles_rate_cps, dtype=float)
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("singles_rate_cps must be finite and >= 0")
    x = m * float(tau_s)
    if model == "non-paralyzable":
        if np.any(x >= 1):
            raise ValueError(f"non-paralyzable model needs rate * tau < 1; max is {x.max():.3g}")
        return 1.0 / (1.0 - x)
    from scipy.special import lambertw  # noqa: PLC0415 - only the paralyzable model needs it

    if np.any(x > 1 / math.e):
        raise ValueError(f"paralyzable model needs rate * tau <= 1/e; max is {x.max():.3g}")
    out = np.ones_like(x)
    pos = x > 0
    out[pos] = -np.real(lambertw(-x[pos], 0)) / x[pos]
    return out


def frame_singles_rate_cps(corrections, frames):
    """Mean singles rate of every detector in every frame.

    Parameters
    ----------
    corrections : ListmodeCorrections
        With ``singles_block_edges_s`` and ``singles_counts``.
    frames : Frames or str

    Returns
    -------
    ndarray, shape (num_frames, num_detectors), counts/s
        ``Σ_b counts_b |b ∩ f| / |b| / |f|``: each block's counts are spread
        uniformly over the block and the part overlapping the frame is kept.

    Raises
    ------
    ValueError
        When the singles blocks do not cover a frame.
    """
    frames = parse_frames(frames)
    if corrections is None or corrections.singles_counts is None:
        raise ValueError("corrections have no singles (singles_block_edges_s / singles_counts)")
    edges = np.asarray(corrections.singles_block_edges_s, dtype=float)
    counts = np.asarray(corrections.singles_counts, dtype=float)
    if frames.start_s[0] < edges[0] or frames.end_s[-1] > edges[-1]:
        raise ValueError(
            f"singles blocks cover [{edges[0]}, {edges[-1]}] s but the frames span "
            f"[{frames.start_s[0]}, {frames.end_s[-1]}] s"
        )
    lo = np.maximum(edges[None, :-1], frames.start_s[:, None])
    hi = np.minimum(edges[None, 1:], frames.end_s[:, None])
    weight = np.clip(hi - lo, 0, None) / np.diff(edges)[None, :]  # (F, B)
    return weight @ counts / frames.duration_s[:, None]


def frame_dead_time_factor(singles_rate_cps, tau_s, model="non-paralyzable"):
    """Coincidence dead-time factor of each frame from per-detector singles rates.

    Parameters
    ----------
    singles_rate_cps : ndarray, shape (num_frames, num_detectors)
        From :func:`frame_singles_rate_cps`.
    tau_s : float
        Dead time per single event (s).
    model : {"non-paralyzable", "paralyzable"}

    Returns
    -------
    ndarray, shape (num_frames,)
        ``mean_i(f_i)²`` where ``f_i`` is :func:`dead_time_factors` of
        detector ``i``: a coincidence needs both detectors alive, taken as
        independent, so LOR ``(i, j)`` has factor ``f_i f_j``; the square of
        the mean is exactly the mean of ``f_i f_j`` over all ordered detector
        pairs (a frame-global factor; per-LOR factors are ``outer(f, f)``).
    """
    f = dead_time_factors(singles_rate_cps, tau_s, model)
    f = np.atleast_2d(f)
    return f.mean(axis=1) ** 2


# ------------------------------------------------------------------------------------------------
# additive terms estimated from the data: randoms and scatter
# ------------------------------------------------------------------------------------------------
def radial_bin_mm(layout):
    """Mean spacing (mm) of the radial bins (distance of the LOR to the axis, view 0)."""
    start, end = layout.lor_endpoints_mm(np.array([0]))
    s, e = start[0, 0, :, :2], end[0, 0, :, :2]
    d = e - s
    dist = (d[:, 0] * s[:, 1] - d[:, 1] * s[:, 0]) / np.hypot(d[:, 0], d[:, 1])
    return float(np.median(np.abs(np.diff(dist)))) if layout.num_radial > 1 else 1.0


def estimate_randoms(layout, delayeds, singles_rate_cps=None):
    """Expected randoms of one frame (non-TOF sinogram).

    Parameters
    ----------
    layout : SinogramLayout
    delayeds : ndarray, shape layout.shape
        Delayed-window counts of the frame (in the layout).
    singles_rate_cps : ndarray, shape (num_detectors,), optional
        Mean singles rate of each detector in the frame.

    Returns
    -------
    randoms : ndarray of float32, shape layout.shape
    method : str

    Notes
    -----
    With singles: ``r_ij = N_d · R_ij / Σ R`` with ``R = 2τ S_i S_j``
    (:func:`randoms_from_singles`, shape only) and ``N_d`` the
    delayed counts of the frame: the delayed total is unbiased, the singles
    product is noise free.  Without singles: the delayeds themselves.
    """
    n_d = float(np.sum(delayeds, dtype=np.float64))
    if singles_rate_cps is not None and np.any(singles_rate_cps > 0):
        shape = randoms_from_singles(layout, singles_rate_cps, 1.0, 1.0)
        tot = float(shape.sum())
        if tot > 0:
            return (shape * (n_d / tot)).astype(np.float32), "singles shape scaled to the delayed counts"
    return np.asarray(delayeds, dtype=np.float32), "delayeds (no singles in the file)"


def _blur_planes(sino, sigma_views, sigma_radial):
    """Gaussian blur of each plane over (view, radial): periodic in views, zero outside the radial range."""
    out = ndimage.gaussian_filter1d(sino, sigma_views, axis=1, mode="wrap", truncate=3.0)
    return ndimage.gaussian_filter1d(out, sigma_radial, axis=2, mode="constant", truncate=3.0)


def estimate_scatter(layout, prompts, randoms, normalisation, attenuation, fwhm_mm=SCATTER_FWHM_MM):
    """Tail-fitted convolution scatter estimate of one frame (non-TOF).

    Parameters
    ----------
    layout : SinogramLayout
    prompts, randoms : ndarray, shape layout.shape
        Prompt counts and expected randoms.
    normalisation, attenuation : ndarray, shape layout.shape
        ``n`` and ``a`` of the system model.
    fwhm_mm : float
        Width (FWHM, mm) of the Gaussian blur over (view, radial).

    Returns
    -------
    scatter : ndarray of float32, shape layout.shape
    info : dict
        ``fwhm_mm``, ``scale``, ``tail_bins``, ``scatter_fraction`` (of net prompts).

    Notes
    -----
    Shape ``h = n ⊙ blur(max(y - r, 0) / n)``; amplitude
    ``c = Σ_T (y - r) / Σ_T h`` over the tail bins ``T = {a > 0.995, n > 0}``
    (the moment estimate: expected tail counts equal measured ones).  The
    view blur is converted to views at a 100 mm radius (a head).  With no
    tail bins or no net counts the estimate is zero (and says so in
    ``info``).  The width is not fitted: in a head the tails are a thin band
    holding a few per cent of the scatter, and on simulated data the tail
    deviance preferred a 50 mm kernel that doubled the scatter inside the
    head, so a fixed, documented width is the more robust choice.
    """
    valid = normalisation > 0
    net = prompts.astype(np.float64) - randoms
    e = np.where(valid, np.maximum(net, 0.0) / np.where(valid, normalisation, 1.0), 0.0)
    tails = valid & (attenuation > TAIL_ATTENUATION_MIN)
    info = {"method": "tail-fitted Gaussian convolution of normalised net prompts", "tail_bins": int(tails.sum())}
    if not tails.any() or not np.any(e > 0):
        info.update(fwhm_mm=None, scale=0.0, scatter_fraction=0.0)
        return np.zeros(layout.shape, np.float32), info
    bin_mm = radial_bin_mm(layout)
    view_mm = 100.0 * math.pi / layout.num_views
    sig = float(fwhm_mm) / 2.3548
    h = normalisation * _blur_planes(e, sig / view_mm, sig / bin_mm)
    denom = float(h[tails].sum())
    c = max(float(net[tails].sum()) / denom, 0.0) if denom > 0 else 0.0
    scatter = (c * h).astype(np.float32)
    tot_net = float(np.maximum(net, 0).sum())
    info.update(fwhm_mm=float(fwhm_mm), scale=c, scatter_fraction=float(scatter.sum()) / tot_net if tot_net > 0 else 0.0)
    return scatter, info
