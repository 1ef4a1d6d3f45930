"""Reconstruction of one session: raw data -> corrections -> OSEM -> 4-D NIfTI (Bq/mL).

Model per frame ``k`` (the one system model of :mod:`petbind.recon.system`)::

    E[y_k] = κ D_k · n ⊙ a ⊙ P(G x_k) + r_k + s_k

* ``x_k``: activity (Bq/mL), decay-corrected to injection;
* ``D_k = ∫ e^{-λ t} dt`` over the frame (s after injection), times the
  frame's mean live fraction when the file has dead-time blocks;
* ``κ``: counts/s per (Bq/mL · mm), ``1 / corrections/calibration_factor``
  or, with ``--sensitivity-cps-per-kbq``, :func:`~petbind.recon.corrections.point_source_kappa`;
* ``n``, ``a``: normalisation from the crystal efficiencies, attenuation
  ``exp(-P μ)`` from the stored μ-map (resampled onto the atlas grid);
* ``r_k``, ``s_k``: randoms (singles shape scaled to the delayed counts)
  and tail-fitted scatter (:mod:`petbind.recon.corrections`);
* ``G``: the resolution model, by default the scanner's PSF where its preset
  knows one (``--psf-fwhm-mm`` overrides, ``0`` switches it off).

One :class:`~petbind.recon.osem.SinogramOSEM` serves every frame (``m = κ n a``);
frame ``k`` is reconstructed from ``y_k / D_k`` with the additive term
``(r_k + s_k) / D_k`` (the OSEM iterates of ``m = κ D_k n a`` exactly: the
update ratio and ``A^T`` scale together), from the uniform image whose
projection reproduces the frame's net counts.

Reconstructed frames are cached under ``pet/.frames/`` by key, so an
interrupted run restarts at the first missing frame.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
from tqdm.auto import tqdm

from petbind.core.decay import decay_constant_per_s, decay_integral
from petbind.core.device import to_numpy
from petbind.core.files import atomic_output
from petbind.pipeline.discover import load_probseg, open_raw, read_session_frames
from petbind.pipeline.options import StudyInputError
from petbind.recon.corrections import (
    attenuation_factors,
    estimate_randoms,
    estimate_scatter,
    frame_singles_rate_cps,
    normalisation_factors,
    point_source_kappa,
    radial_bin_mm,
    resample_to_grid,
)

__all__ = ["grid_of", "layout_for", "check_field_of_view", "calibration_kappa",
           "psf_for", "reconstruct_session", "effective_resolution"]

log = logging.getLogger(__name__)


def grid_of(atlas):
    """The :class:`~petbind.recon.geometry.ImageGrid` of an atlas (its affine must be diagonal)."""
    from petbind.recon.geometry import ImageGrid

    try:
        return ImageGrid.from_affine(atlas.labels.shape, atlas.affine)
    except ValueError as exc:
        raise StudyInputError(f"{atlas.path}: affine: {exc}") from None


def _event_layout_range(reader, max_events=2_000_000):
    """Radial offsets and ring differences of (up to ``max_events``) recorded events."""
    from petbind.recon.geometry import SinogramLayout

    scanner = reader.scanner
    n = scanner.crystals_per_ring
    wide = SinogramLayout(scanner, n - 1)
    s_lo, s_hi, rd = 0, 0, 0
    seen = 0
    for chunk in reader.chunks():
        ids = np.asarray(chunk.detector_ids, dtype=np.int64)
        bins = wide.bin_indices(ids)
        ok = bins >= 0
        if ok.any():
            s = bins[ok] % wide.num_radial - wide.num_radial // 2
            s_lo, s_hi = min(s_lo, int(s.min())), max(s_hi, int(s.max()))
            rd = max(rd, int(np.abs(ids[ok, 0] // n - ids[ok, 1] // n).max()))
        seen += len(chunk)
        if seen >= max_events:
            break
    return s_lo, s_hi, rd


def layout_for(reader, options):
    """The sinogram layout for listmode input: the options, else the range of the recorded events."""
    from petbind.recon.geometry import SinogramLayout

    scanner = reader.scanner
    if options.num_radial is not None and options.max_ring_difference is not None:
        return SinogramLayout(scanner, options.num_radial, options.max_ring_difference)
    s_lo, s_hi, rd = _event_layout_range(reader)
    num_radial = options.num_radial
    if num_radial is None:
        # smallest layout whose offsets s = radial - num_radial // 2 cover [s_lo, s_hi]
        num_radial = 1
        while not (num_radial // 2 >= -s_lo and num_radial - 1 - num_radial // 2 >= s_hi):
            num_radial += 1
        num_radial = min(num_radial, scanner.crystals_per_ring - 1)
    mrd = rd if options.max_ring_difference is None else options.max_ring_difference
    layout = SinogramLayout(scanner, num_radial, mrd)
    log.info("%s: layout from the recorded events: %d radial bins, max ring difference %d", reader.path, num_radial, mrd)
    return layout


def check_field_of_view(atlas, grid, layout, path, regions=None):
    """Refuse atlas regions that the sinogram layout does not see.

    The voxel centres of ``regions`` (all labelled voxels when None) must lie
    inside the transaxial field (radius of the outermost radial bin) and
    inside the axial extent of the rings.  Other labelled voxels outside the
    field are only logged.

    Raises
    ------
    StudyInputError
    """
    scanner = layout.scanner
    r_fov = (layout.num_radial // 2) * radial_bin_mm(layout)
    pitch = float(np.diff(scanner.ring_z_mm).mean()) if scanner.num_rings > 1 else 0.0
    z_lo, z_hi = scanner.ring_z_mm.min() - 0.5 * pitch, scanner.ring_z_mm.max() + 0.5 * pitch
    idx = np.argwhere(atlas.labels > 0)
    xyz = grid.origin_mm[None, :] + idx * grid.voxel_size_mm[None, :]
    r = np.hypot(xyz[:, 0], xyz[:, 1])
    outside = (r > r_fov) | (xyz[:, 2] < z_lo - 1e-6) | (xyz[:, 2] > z_hi + 1e-6)
    used = np.ones(len(idx), bool) if regions is None else np.isin(atlas.labels[tuple(idx.T)], [atlas.index_of(n) for n in regions])
    bad = outside & used
    if (outside & ~used).any():
        log.info("%s: %d voxels of unused regions lie outside the field of view", atlas.path, int((outside & ~used).sum()))
    if bad.any():
        names = sorted({atlas.names[int(v)] for v in atlas.labels[tuple(idx[bad].T)]})
        raise StudyInputError(
            f"{atlas.path}: {int(bad.sum())} voxels of regions {names} lie outside the field of view of {path} "
            f"(transaxial radius {r_fov:.1f} mm, axial {z_lo:.1f}..{z_hi:.1f} mm); "
            "use a layout with more radial bins (--num-radial) or an atlas inside the scanner"
        )


def calibration_kappa(layout, grid, corrections, sensitivity_cps_per_kbq=None, device="auto", path="listmode"):
    """κ: counts per s per (Bq/mL · mm of line integral).

    Parameters
    ----------
    layout : SinogramLayout
    grid : ImageGrid
    corrections : ListmodeCorrections
    sensitivity_cps_per_kbq : float, optional
        When given, κ is computed as :attr:`petbind.sim.acquisition.ListmodeSimulator.kappa`
        documents it: a point source in the centre voxel, unattenuated with unit
        efficiencies, gives ``S`` cps/kBq, so
        ``κ = S · V_voxel[mL] / (1000 Σ_bins P δ_centre)``.
        Otherwise ``κ = 1 / corrections.calibration_factor``.
    device : str
    path : str
        For messages.

    Returns
    -------
    kappa : float
    source : str
        How κ was obtained (for the JSON sidecar).
    """
    if sensitivity_cps_per_kbq is not None:
        from petbind.core.device import to_numpy
        from petbind.recon.projector import SinogramProjector

        proj = SinogramProjector(layout, grid, device=device)
        try:
            kappa = point_source_kappa(sensitivity_cps_per_kbq, grid,
                                       lambda img: np.sum(to_numpy(proj.forward(img)), dtype=np.float64))
        except ValueError:
            raise StudyInputError(f"{path}: no LOR of the layout passes through the centre of the atlas grid") from None
        return kappa, f"point-source sensitivity {sensitivity_cps_per_kbq:g} cps/kBq (--sensitivity-cps-per-kbq)"
    cal = float(corrections.calibration_factor)
    if cal == 1.0:
        log.warning(
            "%s: corrections/calibration_factor is 1.0 (the unset default); images are scaled by it as stored. "
            "Pass --sensitivity-cps-per-kbq for simulated data written without a calibration.", path,
        )
    return 1.0 / cal, f"1 / corrections/calibration_factor ({cal:g})"


def psf_for(scanner, options):
    """The resolution model of OSEM (FWHM, mm, or None).

    ``--psf-fwhm-mm`` when given (``0``: none).  Otherwise the scanner
    preset's PSF when the images are used as they are (``--pvc none``), and
    no resolution model when partial-volume correction follows: the error
    budget (``benchmarks/fidelity.py``) shows GTM recovering regional BP_ND
    within a few per cent after OSEM without a resolution model (its images
    are the object blurred by a near-Gaussian kernel), but over-correcting
    by 2-30 % after a PSF-modelled OSEM at practical iteration counts, whose
    partial convergence and edge overshoot no Gaussian describes.
    """
    if options.psf_fwhm_mm is not None:
        return float(options.psf_fwhm_mm) or None
    if options.pvc != "none":
        return None
    return getattr(scanner, "resolution_fwhm_mm", None)


class _ListmodeFrames:
    """Frame counts histogrammed from a listmode file."""

    def __init__(self, reader, layout, tof, device):
        self.reader, self.layout, self.tof, self.device = reader, layout, tof, device

    def counts(self, frames, k):
        from petbind.recon.listmode import histogram_listmode

        h = histogram_listmode(self.reader, self.layout, frames=frames.frame(k),
                               tof=self.tof if self.tof is not None else False,
                               device=self.device, progress=False)
        delayeds = h.delayeds[0].sum(axis=-1) if self.tof is not None else h.delayeds[0]
        return h.prompts[0], delayeds, int(h.num_prompts[0]), int(h.num_delayeds[0]), \
            [int(v) for v in h.num_outside_layout[0]]

    def prompt_events(self, frames, k):
        """Detector ids (n, 2) and TOF bins (n,) or None of the frame's prompts inside the layout."""
        start_ms, end_ms = frames.frame(k).start_ms[0], frames.frame(k).end_ms[0]
        ids, tofs = [], []
        for chunk in self.reader.chunks(start_ms, end_ms):
            keep = np.asarray(chunk.is_prompt, bool)
            ids.append(np.asarray(chunk.detector_ids)[keep])
            if self.tof is not None:
                tofs.append(np.asarray(chunk.tof_bin)[keep])
        ids = np.concatenate(ids) if ids else np.zeros((0, 2), np.int64)
        bins = self.layout.bin_indices(ids)
        inside = bins >= 0
        tof = np.concatenate(tofs)[inside] if self.tof is not None and tofs else None
        return ids[inside], tof, bins[inside]


class _SinogramFrames:
    """Frame counts read from a multi-frame sinogram file (frames as stored)."""

    def __init__(self, data, tof):
        self.data, self.tof = data, tof

    def counts(self, frames, k):
        prompts = np.asarray(self.data.prompts(k), dtype=np.float32)
        delayeds = self.data.delayeds(k)
        if self.data.tof is not None and self.tof is None:
            prompts = prompts.sum(axis=-1)
        delayeds = np.asarray(delayeds, dtype=np.float32)
        if delayeds.ndim > len(self.data.layout.shape):  # randoms are estimated without TOF
            delayeds = delayeds.sum(axis=-1)
        return prompts, delayeds, int(round(float(prompts.sum()))), int(round(float(delayeds.sum()))), [0, 0]


#: ``--listmode-osem auto`` reconstructs a frame from its events below this many prompts per sinogram
#: bin: listmode OSEM costs per event, sinogram OSEM per bin, and benchmarks/listmode_crossover.py
#: finds the two equal at 0.1-0.3 events per bin on 2 CPU cores (demo layout, 4 x 24).
LISTMODE_EVENTS_PER_BIN = 0.1


def _use_listmode_osem(options, kind, layout, num_prompts, num_bins):
    """Listmode OSEM for a frame: asked for, or ``auto`` and few prompts per sinogram bin (span 1 only)."""
    if kind != "listmode" or options.listmode_osem == "never":
        return False
    if layout.span != 1:  # an event is one crystal pair; a span > 1 bin averages several
        return False
    return options.listmode_osem == "always" or num_prompts < LISTMODE_EVENTS_PER_BIN * num_bins


def _listmode_frame(source, frames, k, rec, m0, additive, d, psf, subsets, options, x0):
    """One frame by listmode OSEM on its prompt events, with the same system model as the sinogram path.

    Each event carries its bin's ``m = κ D n a`` and the expected background
    of its bin (spread evenly over TOF bins, as in the sinogram path), so the
    likelihood is the sinogram one; the sensitivity is the sinogram model's
    ``A^T 1`` (all LORs the scanner could record, non-TOF).
    """
    from petbind.recon.osem import ListmodeOSEM

    ids, tof_bins, bins = source.prompt_events(frames, k)
    if ids.shape[0] == 0:
        return np.zeros(x0.shape, np.float32)
    xp = rec.xp
    sens = sum(s for s in rec.sensitivities()) * np.float32(d)
    m_events = m0.reshape(-1)[bins] * np.float32(d)
    nt = additive.reshape(len(m0.reshape(-1)), -1)
    a_events = nt[bins].sum(axis=1) / nt.shape[1] if source.tof is not None else nt[bins, 0]
    lm = ListmodeOSEM(source.layout.scanner, rec.grid, ids, xp.asarray(sens), tof_bins=tof_bins, tof=source.tof,
                      multiplicative=m_events.astype(np.float32), additive=a_events.astype(np.float32),
                      resolution_fwhm_mm=psf, num_subsets=min(subsets, ids.shape[0]), device=options.device)
    return lm.reconstruct(options.iterations, x0=xp.asarray(x0), progress=False)


def _live_fraction(corr, frames, path):
    """Frame mean of the per-detector live fraction, squared (a coincidence needs both ends alive)."""
    live = np.ones(len(frames))
    if corr.alive_fractions is not None:
        edges = np.asarray(corr.alive_block_edges_s, float)
        lo = np.maximum(edges[None, :-1], frames.start_s[:, None])
        hi = np.minimum(edges[None, 1:], frames.end_s[:, None])
        w = np.clip(hi - lo, 0, None)
        if np.any(w.sum(axis=1) < frames.duration_s * (1 - 1e-9)):
            raise StudyInputError(f"{path}: field 'corrections/alive_block_edges_s' does not cover every frame")
        alive = (w @ np.asarray(corr.alive_fractions, float)) / w.sum(axis=1, keepdims=True)
        live = alive.mean(axis=1) ** 2
    return live


def reconstruct_session(session, out_path, options, atlas, regions=None, progress=True, provenance=None,
                        key=None, measure_resolution=False):
    """Reconstruct every frame of a session into a 4-D NIfTI (Bq/mL) with its PET-BIDS JSON.

    Parameters
    ----------
    session : petbind.pipeline.discover.Session
    out_path : Path
        ``..._pet.nii.gz``; the JSON sidecar goes next to it.
    options : PipelineOptions
    atlas : petbind.quant.io.Atlas
        The session's atlas (its grid is the reconstruction grid).
    regions : list of str, optional
        Regions that must lie inside the field of view (default all labelled).
    progress : bool
    provenance : dict, optional
        Recorded in the sidecar (``PipelineProvenance``).
    key : str, optional
        Stage key; cached frames are reused only under the same key.
    measure_resolution : bool
        Also measure the effective resolution of these settings
        (:func:`effective_resolution`) and record it in the sidecar
        (``EffectiveResolutionFWHM_mm``) for partial-volume correction.

    Returns
    -------
    dict
        The JSON sidecar written.

    Raises
    ------
    StudyInputError
        Missing corrections, μ-map, efficiencies, half-life, or a grid the
        scanner does not cover.
    """
    from petbind.quant.io import save_nifti
    from petbind.recon.osem import SinogramOSEM
    from petbind.recon.projector import SinogramProjector

    frames, in_sidecar = read_session_frames(session, options.frames)
    grid = grid_of(atlas)
    raw = open_raw(session)
    path = str(session.raw)
    corr = raw.corrections
    half_life = float(raw.exam.half_life_s)
    if not (math.isfinite(half_life) and half_life > 0):
        raise StudyInputError(f"{path}: field 'exam/half_life_s' is missing or not positive; needed for decay correction")
    scan_start = float(raw.exam.scan_start_s)
    tof = raw.tof if options.tof else None
    device = options.device
    if session.kind == "listmode":
        layout = layout_for(raw, options)
        source = _ListmodeFrames(raw, layout, tof, device)
    else:
        layout = raw.layout
        frames = raw.frames()
        source = _SinogramFrames(raw, tof)
    check_field_of_view(atlas, grid, layout, path, regions)
    psf = psf_for(layout.scanner, options)
    mu = resample_to_grid(np.asarray(corr.mu_map_per_mm, dtype=np.float32), corr.mu_map_affine, grid)
    attenuation = np.asarray(to_numpy(attenuation_factors(mu, SinogramProjector(layout, grid, device=device))),
                             dtype=np.float32)
    norm = normalisation_factors(layout, corr.crystal_efficiencies)
    kappa, kappa_source = calibration_kappa(layout, grid, corr, options.sensitivity_cps_per_kbq, device, path)
    singles = None
    if corr.singles_counts is not None:
        try:
            singles = frame_singles_rate_cps(corr, frames)
        except ValueError as exc:
            raise StudyInputError(f"{path}: field 'corrections/singles_counts': {exc}") from None
    live = _live_fraction(corr, frames, path)

    m0 = (kappa * norm * attenuation).astype(np.float32)
    subsets = int(options.subsets)
    if subsets > layout.num_views:
        log.warning("%s: %d subsets asked for, the layout has %d views: using %d subsets", path, subsets,
                    layout.num_views, layout.num_views)
        subsets = layout.num_views
    rec = SinogramOSEM(layout, grid, tof=tof, multiplicative=m0, resolution_fwhm_mm=psf,
                       num_subsets=subsets, device=device)
    xp = rec.xp
    cache = out_path.parent / ".frames"
    cache.mkdir(parents=True, exist_ok=True)
    key = key or "nokey"
    images = np.zeros(tuple(grid.shape) + (len(frames),), dtype=np.float32)
    # sum of A·1 over all bins = <1, A^T 1> = total sensitivity
    fwd_ones = float(sum(float(xp.sum(s, dtype=xp.float64)) for s in rec.sensitivities()))
    stats = []
    bar = tqdm(total=len(frames), desc=f"{session.stem} frames", unit="frame", disable=not progress, leave=False)
    for k, (fs, fe) in enumerate(frames):
        cpath = cache / f"frame-{k:04d}_{key}.npz"
        if cpath.exists():
            try:
                with np.load(cpath) as z:
                    images[..., k] = z["image"]
                    stats.append(json.loads(str(z["stats"])))
                bar.update()
                continue
            except (OSError, ValueError, KeyError, EOFError):
                log.warning("%s: damaged cached frame, reconstructing it again", cpath)
        d = decay_integral(scan_start + fs, scan_start + fe, decay_constant_per_s(half_life)) * live[k]
        prompts, delayeds, n_prompts, n_delayeds, outside = source.counts(frames, k)
        prompts_nt = prompts.sum(axis=-1) if tof is not None else prompts
        randoms, r_method = estimate_randoms(layout, delayeds, None if singles is None else singles[k])
        scatter, s_info = estimate_scatter(layout, prompts_nt, randoms, norm, attenuation, options.scatter_fwhm_mm)
        additive = randoms + scatter
        if tof is not None:
            # randoms and scatter spread evenly over TOF bins
            additive = np.repeat(additive[..., None] / tof.num_bins, tof.num_bins, axis=-1)
        net = float(np.sum(prompts, dtype=np.float64) - np.sum(additive, dtype=np.float64)) / d
        # Uniform start at the level that reproduces the net counts: from a flat 1 Bq/mL start the
        # multiplicative updates grow the image by only ~y/a per subset while A x << a, and a few
        # iterations would stop far below the activity of high-count frames.
        level = max(net, 0.01 * float(np.sum(prompts, dtype=np.float64)) / d) / fwd_ones if fwd_ones > 0 else 1.0
        x0 = np.full(grid.shape, level, np.float32)
        if _use_listmode_osem(options, session.kind, layout, n_prompts, prompts.size):
            x = _listmode_frame(source, frames, k, rec, m0, additive, d, psf, subsets, options, x0)
            method = "listmode OSEM"
        else:
            x = rec.reconstruct(prompts / np.float32(d), options.iterations, x0=x0, progress=False,
                                additive=additive / np.float32(d))
            method = "sinogram OSEM"
        images[..., k] = np.asarray(to_numpy(x), dtype=np.float32)
        st = {
            "frame": k, "prompts": n_prompts, "delayeds": n_delayeds, "outside_layout": outside, "method": method,
            "decay_integral_s": d, "randoms": r_method, "scatter_fwhm_mm": s_info["fwhm_mm"],
            "scatter_fraction": s_info["scatter_fraction"], "tail_bins": s_info["tail_bins"],
        }
        stats.append(st)
        if sum(outside):
            log.warning("%s frame %d: %d prompts / %d delayeds outside the layout (not reconstructed)",
                        path, k, *outside)
        with atomic_output(cpath) as tmp:
            np.savez(tmp, image=images[..., k], stats=json.dumps(st))
        bar.update()
    bar.close()

    sidecar = {
        "Manufacturer": in_sidecar.get("Manufacturer", "n/a"),
        "ManufacturersModelName": layout.scanner.name,
        "TracerName": in_sidecar.get("TracerName", raw.exam.tracer),
        "TracerRadionuclide": in_sidecar.get("TracerRadionuclide", raw.exam.isotope),
        "InjectedRadioactivity": in_sidecar.get("InjectedRadioactivity", raw.exam.injected_activity_bq / 1e6),
        "InjectedRadioactivityUnits": "MBq",
        "TimeZero": in_sidecar.get("TimeZero", "n/a"),
        "ScanStart": scan_start,
        "InjectionStart": 0,
        **frames.to_bids(),
        "Units": "Bq/mL",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "ReconMethodName": "OSEM",
        "ReconMethodParameterLabels": ["iterations", "subsets"],
        "ReconMethodParameterUnits": ["none", "none"],
        "ReconMethodParameterValues": [int(options.iterations), subsets],
        "ReconFilterType": "none" if not psf else "Gaussian PSF model in the system matrix",
        "ReconFilterSize": float(np.max(psf)) if psf else 0.0,
        "ResolutionModelFWHM_mm": psf,
        "AttenuationCorrection": "measured mu-map from the raw file, exp(-P mu) in the system model",
        "ScatterCorrection": "tail-fitted Gaussian convolution model, additive term",
        "RandomsCorrection": stats[0]["randoms"] if stats else "n/a",
        "NormalisationCorrection": "crystal-efficiency products from the raw file",
        "DecayCorrection": "decay integral over each frame in the system model, to injection",
        "DeadTimeCorrection": ("frame live fraction from alive blocks" if corr.alive_fractions is not None
                               else "none (no dead-time blocks)"),
        "CalibrationFactorSource": kappa_source,
        "CalibrationKappa": kappa,
        "SinogramLayout": {"num_radial": layout.num_radial, "max_ring_difference": layout.max_ring_difference,
                           "span": layout.span, "tof": tof is not None},
        "FrameStatistics": stats,
        "Sources": [str(session.raw), str(session.sidecar), str(session.atlas)],
        "PipelineProvenance": provenance or {},
    }
    if measure_resolution:
        res = effective_resolution(layout, grid, psf, options.iterations, subsets, atlas,
                                   load_probseg(session, atlas), tof, device)
        sidecar["EffectiveResolutionFWHM_mm"] = res["fwhm_mm"]
        sidecar["EffectiveResolution"] = res
    save_nifti(out_path, images, grid.affine, sidecar)
    shutil.rmtree(cache, ignore_errors=True)
    return sidecar


def effective_resolution(layout, grid, psf, iterations, subsets, atlas, fractions=None, tof=None, device="auto"):
    """Measured effective resolution (FWHM, mm) of the reconstruction with these settings.

    Noise-free data of an object shaped like this atlas (tissue fractions
    when given, random region values) are made with the scanner's resolution
    (a scanner whose preset knows none is taken as having none beyond the
    voxels) and reconstructed with the study's OSEM settings; ``fwhm_mm`` is
    the Gaussian that best maps the object onto its reconstruction
    (:func:`petbind.recon.resolution.matched_resolution`).  Point sources
    (:func:`petbind.recon.resolution.measure_resolution`) converge more
    slowly under OSEM than regions and overstate the blur regional means see
    (``benchmarks/fidelity.py`` shows both), so they are not used here.

    Returns
    -------
    dict
    """
    from petbind.recon.resolution import matched_resolution

    true = getattr(layout.scanner, "resolution_fwhm_mm", None)
    memo = (layout.scanner.name, layout.shape, layout.scanner.num_detectors, tuple(grid.shape),
            tuple(grid.voxel_size_mm), tuple(grid.origin_mm), _hashable(psf), _hashable(true),
            int(iterations), int(subsets), tof is not None,
            hash(atlas.labels.tobytes()), fractions is not None)
    if memo in _RESOLUTION_MEMO:
        return dict(_RESOLUTION_MEMO[memo])
    rng = np.random.default_rng(20261201)  # fixed: the same atlas and settings give the same answer
    values = {n: float(rng.uniform(1.0, 3.0)) for n in atlas.region_names}
    if fractions is not None:
        obj = sum(values[n] * fractions[n] for n in atlas.region_names)
    else:
        obj = np.zeros(atlas.labels.shape)
        for n in atlas.region_names:
            obj[atlas.labels == atlas.index_of(n)] = values[n]
    matched = matched_resolution(layout, grid, true, np.asarray(obj, np.float32), psf_fwhm_mm=psf,
                                 num_iterations=iterations, num_subsets=subsets, tof=tof,
                                 mask=atlas.labels > 0, device=device)
    res = {"fwhm_mm": matched["fwhm_mm"], "method": "Gaussian matched to an atlas-shaped object",
           "relative_rms": matched["relative_rms"], "scanner_fwhm_mm": true}
    _RESOLUTION_MEMO[memo] = dict(res)
    return res


#: Effective resolutions measured in this process (the same settings give the same answer).
_RESOLUTION_MEMO = {}


def _hashable(v):
    return None if v is None else tuple(np.atleast_1d(np.asarray(v, float)).tolist())
