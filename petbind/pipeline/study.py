"""One-command study pipeline: listmode -> OSEM -> TACs -> BP_ND -> group statistics.

Usage (from the repository root)::

    PYTHONPATH=. python petbind-study STUDY_DIR --out DERIV_DIR [--model srtm]
        [--reference cerebellum] [--iterations 3] [--subsets 8] [--psf-fwhm-mm F]
        [--device auto|cpu|gpu] [--frames 6x10s,...] [--maps] [--quiet] [--force]

Input (the layout written by :func:`petbind.sim.study.simulate_study`)::

    STUDY_DIR/participants.tsv
    STUDY_DIR/sub-XX/anat/sub-XX_atlas.nii.gz + sub-XX_atlas.tsv   (reconstruction grid)
    STUDY_DIR/sub-XX/ses-YY/pet/sub-XX_ses-YY_pet-listmode.h5     (+ corrections)
    STUDY_DIR/sub-XX/ses-YY/pet/sub-XX_ses-YY_pet.json            (FrameTimesStart, FrameDuration)

Output::

    DERIV_DIR/dataset_description.json, participants.tsv (copied)
    DERIV_DIR/sub-XX/ses-YY/pet/sub-XX_ses-YY_rec-osem_pet.nii.gz + .json   4-D, Bq/mL
    DERIV_DIR/sub-XX/ses-YY/pet/sub-XX_ses-YY_tacs.tsv + .json               regional TACs
    DERIV_DIR/sub-XX/ses-YY/pet/sub-XX_ses-YY_desc-<model>_bpnd.tsv + .json  regional fit
    DERIV_DIR/sub-XX/ses-YY/pet/sub-XX_ses-YY_desc-<model>_{bpnd,r1,...}.nii.gz   (--maps)
    DERIV_DIR/group/subject_changes.tsv, within_group.tsv, group_by_time.tsv, region_changes.png

Reconstruction model per frame ``k`` (the model of :mod:`petbind.recon.system`)::

    E[y_k] = κ D_k · n ⊙ a ⊙ P(G x_k) + r_k + s_k

* ``x_k``: activity (Bq/mL), decay-corrected to injection;
* ``D_k = ∫ e^{-λ t} dt`` over the frame (s after injection), times the
  frame's mean live-time factor when the file has dead-time blocks;
* ``κ``: counts/s per (Bq/mL · mm), from the file's
  ``corrections/calibration_factor`` (``κ = 1 / calibration_factor``) or,
  with ``--sensitivity-cps-per-kbq S``, computed as the simulator documents
  it (a point source in the centre voxel of the grid, no attenuation, unit
  efficiencies, gives ``S`` cps/kBq);
* ``n``: normalisation ``ε_i ε_j`` from the stored crystal efficiencies;
* ``a``: attenuation ``exp(-P μ)`` from the stored μ-map, resampled
  (trilinear) onto the atlas grid when it is on another grid;
* ``r_k``: randoms.  The delayed-window sinogram is an unbiased but very
  noisy estimate (at these count levels most bins hold 0 or 1 counts).  When
  the file has singles, the randoms *shape* is taken from them
  (``R_ij ∝ S_i S_j``, noise free; Casey & Hoffman 1986) and its *total* from
  the delayed counts of the frame, so neither the coincidence window nor the
  constant-rate assumption of ``2τ S_i S_j`` is needed.  Without singles the
  delayeds are used bin by bin.
* ``s_k``: scatter, a tail-fitted convolution model: the normalised net
  prompts ``(y - r)/n`` of each plane are blurred with a wide Gaussian over
  (view, radial) (views periodic) and multiplied by ``n``; the amplitude is
  fitted (least squares) to the *tails*, bins whose LOR misses the
  attenuating object (``a > 0.995``) and so can only hold scatter (and
  randoms, already subtracted).  The blur width is a setting
  (``--scatter-fwhm-mm``, default 150 mm).  This is a simple data-driven model in the spirit of convolution
  subtraction (Bailey & Meikle 1994) with SSS-style tail scaling; it needs no
  emission image and is computed once per frame.

OSEM (:class:`petbind.recon.osem.SinogramOSEM`, view subsets) is built once per
session with ``m = κ n a``; frame ``k`` is reconstructed from ``y_k / D_k``
with additive term ``(r_k + s_k) / D_k``, starting from the uniform image
whose projection reproduces the frame's net counts.  This gives exactly the OSEM
iterates of the model ``m = κ D_k n a`` (the update ratio
``y / (A x + b)`` and ``A^T`` scale together), while the sensitivity images
are computed once per session instead of once per frame.

Resume: a session whose fit result exists is skipped (log record
``skip sub-XX ses-YY``) unless ``--force``; each reconstructed frame is cached
under ``DERIV_DIR/sub-XX/ses-YY/pet/.frames/`` (keyed by the reconstruction
settings) so an interrupted run restarts at the first missing frame; the
cache is removed once the session's 4-D image is written.  Every file is
written to a temporary name and renamed.

Bad input (missing sidecar, atlas, μ-map, efficiencies, unknown model...)
prints one line ``study.py: error: FILE: field ...`` and exits with 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from petbind.core.decay import decay_constant_per_s, decay_integral
from petbind.core.files import atomic_output
from petbind.recon.corrections import (  # noqa: E402
    SCATTER_FWHM_MM,
    estimate_randoms,
    estimate_scatter,
    point_source_kappa,
    radial_bin_mm,
)

log = logging.getLogger("petbind.study")

MODEL_CHOICES = ("srtm", "bfsrtm", "srtm2", "mrtm", "mrtm2", "logan")
DEVICE_CHOICES = ("auto", "cpu", "gpu")
#: Atlas regions not fitted by default: outside the brain, or fluid without receptors.
DEFAULT_EXCLUDED_REGIONS = ("scalp", "skull", "csf", "ventricles")
#: Bump when the reconstruction changes (cached frames and finished 4-D images are reused only with the same key).
CACHE_VERSION = 2

__all__ = [
    "PipelineOptions",
    "StudyInputError",
    "Session",
    "find_sessions",
    "read_session_frames",
    "calibration_kappa",
    "reconstruct_session",
    "run_pipeline",
    "build_parser",
    "main",
]


class StudyInputError(ValueError):
    """Bad input (reported as one line, exit code 2)."""


@dataclass
class PipelineOptions:
    """Settings of :func:`run_pipeline` (the CLI options).

    Parameters
    ----------
    model : str
        Kinetic model, one of ``MODEL_CHOICES``.
    reference : str
        Reference region name in the atlas.
    iterations, subsets : int
        OSEM iterations and view subsets.
    psf_fwhm_mm : float or None
        Image-space resolution model in OSEM (FWHM, mm); None: no PSF.
    device : {"auto", "cpu", "gpu"}
    frames : str or None
        Frame definition overriding the sidecars (``"6x10s,3x20s"``).
    maps : bool
        Also write voxelwise parametric maps (and voxelwise group maps).
    quiet, force : bool
    sensitivity_cps_per_kbq : float or None
        Compute κ from this point-source sensitivity instead of reading the
        file's calibration factor.
    num_radial, max_ring_difference : int or None
        Sinogram layout; None: the range of the recorded events.
    weights : {"none", "duration", "counts"}
        Frame weights of the regional fits.
    exclude_regions : tuple of str
        Atlas regions neither fitted nor compared (besides the reference).
    baseline_session, post_session : str
    n_permutations : int
        Random relabelings of the group x time permutation test.
    tof : bool
        Keep TOF bins of TOF files (False sums them).
    scatter_fwhm_mm : float
        Blur width of the scatter model (mm).
    """

    model: str = "srtm"
    reference: str = "cerebellum"
    iterations: int = 3
    subsets: int = 8
    psf_fwhm_mm: float | None = None
    device: str = "auto"
    frames: str | None = None
    maps: bool = False
    quiet: bool = False
    force: bool = False
    sensitivity_cps_per_kbq: float | None = None
    num_radial: int | None = None
    max_ring_difference: int | None = None
    weights: str = "duration"
    exclude_regions: tuple = DEFAULT_EXCLUDED_REGIONS
    baseline_session: str = "baseline"
    post_session: str = "postdose"
    n_permutations: int = 10000
    tof: bool = True
    scatter_fwhm_mm: float = SCATTER_FWHM_MM

    def validate(self):
        if self.model not in MODEL_CHOICES:
            raise StudyInputError(f"--model {self.model!r} is unknown; choose one of {list(MODEL_CHOICES)}")
        if self.device not in DEVICE_CHOICES:
            raise StudyInputError(f"--device {self.device!r} is unknown; choose one of {list(DEVICE_CHOICES)}")
        if int(self.iterations) < 1 or int(self.subsets) < 1:
            raise StudyInputError(f"--iterations and --subsets must be >= 1; got {self.iterations}, {self.subsets}")
        if self.psf_fwhm_mm is not None and not (math.isfinite(self.psf_fwhm_mm) and self.psf_fwhm_mm >= 0):
            raise StudyInputError(f"--psf-fwhm-mm must be a finite number >= 0; got {self.psf_fwhm_mm}")
        if self.sensitivity_cps_per_kbq is not None and not (
            math.isfinite(self.sensitivity_cps_per_kbq) and self.sensitivity_cps_per_kbq > 0
        ):
            raise StudyInputError(f"--sensitivity-cps-per-kbq must be positive; got {self.sensitivity_cps_per_kbq}")
        if not (math.isfinite(self.scatter_fwhm_mm) and self.scatter_fwhm_mm > 0):
            raise StudyInputError(f"--scatter-fwhm-mm must be positive; got {self.scatter_fwhm_mm}")
        if self.weights not in ("none", "duration", "counts"):
            raise StudyInputError(f"--weights {self.weights!r} is unknown; choose none, duration or counts")

    def recon_key(self):
        """Settings that change the reconstructed images (cache key)."""
        d = {k: getattr(self, k) for k in ("iterations", "subsets", "psf_fwhm_mm", "frames", "sensitivity_cps_per_kbq",
                                           "num_radial", "max_ring_difference", "tof", "scatter_fwhm_mm")}
        d["cache_version"] = CACHE_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Session:
    """One PET session of the study."""

    subject: str
    session: str
    listmode: Path
    sidecar: Path
    atlas: Path
    atlas_tsv: Path

    @property
    def stem(self):
        return f"{self.subject}_{self.session}"

    def out_dir(self, deriv_dir):
        return Path(deriv_dir) / self.subject / self.session / "pet"


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _atomic_save_npy(path, array):
    with atomic_output(path) as tmp:
        np.save(tmp, array)


def _copy_atomic(src, dst):
    from petbind.core.files import atomic_output

    with atomic_output(dst, make_parents=True) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def find_sessions(study_dir):
    """All ``sub-*/ses-*/pet/*_pet-listmode.h5`` of a study, sorted.

    Returns
    -------
    list of Session

    Raises
    ------
    StudyInputError
        When the folder holds no listmode file.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StudyInputError(f"{study_dir}: study folder not found")
    out = []
    for lm in sorted(study_dir.glob("sub-*/ses-*/pet/*_pet-listmode.h5")):
        subject, session = lm.parents[2].name, lm.parents[1].name
        sidecar = lm.with_name(lm.name[: -len("_pet-listmode.h5")] + "_pet.json")
        anat = study_dir / subject / "anat"
        out.append(Session(subject, session, lm, sidecar, anat / f"{subject}_atlas.nii.gz", anat / f"{subject}_atlas.tsv"))
    if not out:
        raise StudyInputError(f"{study_dir}: no sub-*/ses-*/pet/*_pet-listmode.h5 files found")
    return out


def read_session_frames(session, frames_definition=None):
    """Frames of a session: ``--frames`` if given, else the sidecar's FrameTimesStart/FrameDuration.

    Returns
    -------
    frames : petbind.recon.listmode.Frames
    sidecar : dict
        The input sidecar (empty when ``frames_definition`` is given and there is none).

    Raises
    ------
    StudyInputError
        Missing or unreadable sidecar, missing or malformed timing fields.
    """
    from petbind.core.frames import Frames

    sidecar = {}
    if session.sidecar.exists():
        try:
            sidecar = json.loads(session.sidecar.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StudyInputError(f"{session.sidecar}: not readable as JSON ({exc})") from None
        if not isinstance(sidecar, dict):
            raise StudyInputError(f"{session.sidecar}: expected a JSON object")
    elif frames_definition is None:
        raise StudyInputError(
            f"{session.sidecar}: sidecar missing; it must give FrameTimesStart and FrameDuration (s) for "
            f"{session.listmode.name} (or pass --frames)"
        )
    if frames_definition is not None:
        try:
            return Frames.from_string(frames_definition), sidecar
        except ValueError as exc:
            raise StudyInputError(f"--frames: {exc}") from None
    for key in ("FrameTimesStart", "FrameDuration"):
        if key not in sidecar:
            raise StudyInputError(f"{session.sidecar}: field '{key}' is missing (list of frame times in s)")
        v = sidecar[key]
        if not isinstance(v, list) or not v or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in v):
            raise StudyInputError(f"{session.sidecar}: field '{key}' must be a non-empty list of numbers (s); got {v!r}")
    if len(sidecar["FrameTimesStart"]) != len(sidecar["FrameDuration"]):
        raise StudyInputError(
            f"{session.sidecar}: fields 'FrameTimesStart' and 'FrameDuration' differ in length "
            f"({len(sidecar['FrameTimesStart'])} vs {len(sidecar['FrameDuration'])})"
        )
    try:
        return Frames.from_bids(sidecar["FrameTimesStart"], sidecar["FrameDuration"]), sidecar
    except ValueError as exc:
        raise StudyInputError(f"{session.sidecar}: fields 'FrameTimesStart'/'FrameDuration': {exc}") from None


def _load_atlas(session):
    from petbind.quant.io import load_atlas

    for p in (session.atlas, session.atlas_tsv):
        if not p.exists():
            raise StudyInputError(f"{p}: atlas file missing (needed as reconstruction grid and for TACs of {session.stem})")
    try:
        return load_atlas(session.atlas, session.atlas_tsv)
    except (ValueError, FileNotFoundError) as exc:
        raise StudyInputError(str(exc)) from None


def _grid_of(atlas):
    from petbind.recon.geometry import ImageGrid

    try:
        return ImageGrid.from_affine(atlas.labels.shape, atlas.affine)
    except ValueError as exc:
        raise StudyInputError(f"{atlas.path}: affine: {exc}") from None


def resample_to_grid(volume, affine, grid, order=1):
    """Resample a 3-D image given on ``affine`` onto ``grid`` (linear interpolation, 0 outside).

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
    from scipy import ndimage

    affine = np.asarray(affine, dtype=float)
    if volume.shape == tuple(grid.shape) and np.allclose(affine, grid.affine, atol=1e-4):
        return np.asarray(volume, dtype=np.float32)
    # target voxel index -> source voxel index
    m = np.linalg.inv(affine) @ grid.affine
    out = ndimage.affine_transform(np.asarray(volume, dtype=np.float64), m[:3, :3], offset=m[:3, 3],
                                   output_shape=tuple(grid.shape), order=order, mode="constant", cval=0.0)
    return out.astype(np.float32)


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


def _layout_for(reader, options):
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


# ------------------------------------------------------------------------------------------------
# physics: calibration, decay, randoms, scatter
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# reconstruction of one session
# ------------------------------------------------------------------------------------------------
def reconstruct_session(session, out_path, options, atlas=None, regions=None, progress=True):
    """Reconstruct every frame of a session into a 4-D NIfTI (Bq/mL) with PET-BIDS JSON.

    Parameters
    ----------
    session : Session
    out_path : Path
        ``..._pet.nii.gz``; the JSON sidecar goes next to it.
    options : PipelineOptions
    atlas : petbind.quant.io.Atlas, optional
        Loaded atlas (the reconstruction grid).
    regions : list of str, optional
        Regions that must lie inside the field of view (default all labelled).
    progress : bool

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
    from petbind.core.device import to_numpy
    from petbind.quant.io import save_nifti
    from petbind.recon.corrections import (
        attenuation_factors,
        frame_singles_rate_cps,
        normalisation_factors,
    )
    from petbind.recon.listmode import histogram_listmode
    from petbind.recon.osem import SinogramOSEM
    from petbind.recon.projector import SinogramProjector
    from petbind.recon.rawdata.hdf5 import ListmodeReader

    frames, in_sidecar = read_session_frames(session, options.frames)
    atlas = _load_atlas(session) if atlas is None else atlas
    grid = _grid_of(atlas)
    try:
        reader = ListmodeReader(session.listmode)
    except (ValueError, FileNotFoundError) as exc:
        raise StudyInputError(str(exc)) from None
    path = str(session.listmode)
    corr = reader.corrections
    if corr is None:
        raise StudyInputError(f"{path}: field 'corrections' is missing (needs crystal_efficiencies and mu_map_per_mm)")
    if corr.mu_map_per_mm is None:
        raise StudyInputError(f"{path}: field 'corrections/mu_map_per_mm' is missing; attenuation correction needs a μ-map")
    if corr.crystal_efficiencies is None:
        raise StudyInputError(f"{path}: field 'corrections/crystal_efficiencies' is missing; normalisation needs them")
    half_life = float(reader.exam.half_life_s)
    if not (math.isfinite(half_life) and half_life > 0):
        raise StudyInputError(f"{path}: field 'exam/half_life_s' is missing or not positive; needed for decay correction")
    scan_start = float(reader.exam.scan_start_s)
    tof = reader.tof if options.tof else None

    layout = _layout_for(reader, options)
    check_field_of_view(atlas, grid, layout, path, regions)
    device = options.device
    mu = resample_to_grid(np.asarray(corr.mu_map_per_mm, dtype=np.float32), corr.mu_map_affine, grid)
    attenuation = np.asarray(to_numpy(attenuation_factors(mu, SinogramProjector(layout, grid, device=device))), dtype=np.float32)
    norm = normalisation_factors(layout, corr.crystal_efficiencies)
    kappa, kappa_source = calibration_kappa(layout, grid, corr, options.sensitivity_cps_per_kbq, device, path)
    singles = None
    if corr.singles_counts is not None:
        try:
            singles = frame_singles_rate_cps(corr, frames)
        except ValueError as exc:
            raise StudyInputError(f"{path}: field 'corrections/singles_counts': {exc}") from None
    live = np.ones(len(frames))
    if corr.alive_fractions is not None:
        # frame mean of the per-detector live fraction, squared: a coincidence needs both ends alive
        edges = np.asarray(corr.alive_block_edges_s, float)
        lo = np.maximum(edges[None, :-1], frames.start_s[:, None])
        hi = np.minimum(edges[None, 1:], frames.end_s[:, None])
        w = np.clip(hi - lo, 0, None)
        if np.any(w.sum(axis=1) < frames.duration_s * (1 - 1e-9)):
            raise StudyInputError(f"{path}: field 'corrections/alive_block_edges_s' does not cover every frame")
        alive = (w @ np.asarray(corr.alive_fractions, float)) / w.sum(axis=1, keepdims=True)
        live = alive.mean(axis=1) ** 2

    m0 = (kappa * norm * attenuation).astype(np.float32)
    rec = SinogramOSEM(layout, grid, tof=tof, multiplicative=m0, additive=None, resolution_fwhm_mm=options.psf_fwhm_mm,
                       num_subsets=options.subsets, device=device)
    xp = rec.xp
    cache = out_path.parent / ".frames"
    cache.mkdir(parents=True, exist_ok=True)
    key = options.recon_key()
    images = np.zeros(tuple(grid.shape) + (len(frames),), dtype=np.float32)
    fwd_ones = None
    stats = []
    bar = tqdm(total=len(frames), desc=f"{session.stem} frames", unit="frame", disable=not progress, leave=False)
    for k, (fs, fe) in enumerate(frames):
        cpath = cache / f"frame-{k:04d}_{key}.npz"
        if cpath.exists():
            with np.load(cpath) as z:
                images[..., k] = z["image"]
                stats.append(json.loads(str(z["stats"])))
            bar.update()
            continue
        d = decay_integral(scan_start + fs, scan_start + fe, decay_constant_per_s(half_life)) * live[k]
        h = histogram_listmode(reader, layout, frames=frames.frame(k), tof=tof if tof is not None else False,
                               device="gpu" if device == "gpu" else "cpu", progress=False)
        prompts = h.prompts[0]
        delayeds = h.delayeds[0].sum(axis=-1) if tof is not None else h.delayeds[0]
        prompts_nt = prompts.sum(axis=-1) if tof is not None else prompts
        randoms, r_method = estimate_randoms(layout, delayeds, None if singles is None else singles[k])
        scatter, s_info = estimate_scatter(layout, prompts_nt, randoms, norm, attenuation, options.scatter_fwhm_mm)
        additive = randoms + scatter
        if tof is not None:
            # randoms and scatter spread evenly over TOF bins
            additive = np.repeat(additive[..., None] / tof.num_bins, tof.num_bins, axis=-1)
        rec.set_additive(additive / np.float32(d))
        if fwd_ones is None:
            # sum of A·1 over all bins = <1, A^T 1> = total sensitivity
            fwd_ones = float(sum(float(xp.sum(s, dtype=xp.float64)) for s in rec.sensitivities()))
        net = float(np.sum(prompts, dtype=np.float64) - np.sum(additive, dtype=np.float64)) / d
        # Uniform start at the level that reproduces the net counts: from a flat 1 Bq/mL start the
        # multiplicative updates grow the image by only ~y/a per subset while A x << a, and a few
        # iterations would stop far below the activity of high-count frames.
        level = max(net, 0.01 * float(np.sum(prompts, dtype=np.float64)) / d) / fwd_ones if fwd_ones > 0 else 1.0
        x = rec.reconstruct(prompts / np.float32(d), options.iterations, x0=np.full(grid.shape, level, np.float32),
                            progress=False)
        images[..., k] = np.asarray(to_numpy(x), dtype=np.float32)
        st = {
            "frame": k, "prompts": int(h.num_prompts[0]), "delayeds": int(h.num_delayeds[0]),
            "outside_layout": [int(v) for v in h.num_outside_layout[0]],
            "decay_integral_s": d, "randoms": r_method, "scatter_fwhm_mm": s_info["fwhm_mm"],
            "scatter_fraction": s_info["scatter_fraction"], "tail_bins": s_info["tail_bins"],
        }
        stats.append(st)
        if sum(st["outside_layout"]):
            log.warning("%s frame %d: %d prompts / %d delayeds outside the layout (not reconstructed)",
                        path, k, *st["outside_layout"])
        with atomic_output(cpath) as tmp:
            np.savez(tmp, image=images[..., k], stats=json.dumps(st))
        bar.update()
    bar.close()

    sidecar = {
        "Manufacturer": in_sidecar.get("Manufacturer", "n/a"),
        "ManufacturersModelName": reader.scanner.name,
        "TracerName": in_sidecar.get("TracerName", reader.exam.tracer),
        "TracerRadionuclide": in_sidecar.get("TracerRadionuclide", reader.exam.isotope),
        "InjectedRadioactivity": in_sidecar.get("InjectedRadioactivity", reader.exam.injected_activity_bq / 1e6),
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
        "ReconMethodParameterValues": [int(options.iterations), int(options.subsets)],
        "ReconFilterType": "none" if not options.psf_fwhm_mm else "Gaussian PSF model in the system matrix",
        "ReconFilterSize": float(options.psf_fwhm_mm or 0.0),
        "AttenuationCorrection": "measured mu-map from the listmode file, exp(-P mu) in the system model",
        "ScatterCorrection": "tail-fitted Gaussian convolution model (petbind-study), additive term",
        "RandomsCorrection": stats[0]["randoms"] if stats else "n/a",
        "NormalisationCorrection": "crystal-efficiency products from the listmode file",
        "DecayCorrection": "decay integral over each frame in the system model, to injection",
        "DeadTimeCorrection": "frame live fraction from alive blocks" if corr.alive_fractions is not None else "none (no dead-time blocks)",
        "CalibrationFactorSource": kappa_source,
        "CalibrationKappa": kappa,
        "SinogramLayout": {"num_radial": layout.num_radial, "max_ring_difference": layout.max_ring_difference,
                           "span": layout.span, "tof": tof is not None},
        "FrameStatistics": stats,
        "Sources": [str(session.listmode), str(session.sidecar), str(session.atlas)],
        "ReconKey": key,
    }
    save_nifti(out_path, images, grid.affine, sidecar)
    shutil.rmtree(cache, ignore_errors=True)
    return sidecar


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------
def _quant(argv):
    """Run one ``petbind-quant`` subcommand in-process (same writers, same file formats)."""
    from petbind.quant import cli

    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def process_session(session, deriv_dir, options, progress=True):
    """Reconstruction, TACs, regional fit (and maps) of one session; returns the fit result path."""
    out = session.out_dir(deriv_dir)
    out.mkdir(parents=True, exist_ok=True)
    pet = out / f"{session.stem}_rec-osem_pet.nii.gz"
    pet_json = out / f"{session.stem}_rec-osem_pet.json"
    tacs = out / f"{session.stem}_tacs.tsv"
    fit = out / f"{session.stem}_desc-{options.model}_bpnd.tsv"
    atlas = _load_atlas(session)
    if options.reference not in atlas.region_names:
        raise StudyInputError(f"{session.atlas_tsv}: reference region '{options.reference}' not in the atlas; "
                              f"available: {atlas.region_names}")
    present = set(int(v) for v in np.unique(atlas.labels))
    empty = [n for n in atlas.region_names if atlas.index_of(n) not in present]
    if options.reference in empty:
        raise StudyInputError(f"{session.atlas}: reference region '{options.reference}' has no voxels on the atlas grid")
    if empty:
        log.warning("%s: regions %s have no voxels on this grid; they get no TAC and no fit", session.atlas, empty)
    regions = [n for n in atlas.region_names if n not in options.exclude_regions and n not in empty]
    targets = [n for n in regions if n != options.reference]
    t0 = time.time()
    recon_done = False
    if pet.exists() and pet_json.exists() and not options.force:
        try:
            recon_done = json.loads(pet_json.read_text()).get("ReconKey") == options.recon_key()
        except (OSError, json.JSONDecodeError):
            recon_done = False
    if not recon_done:
        reconstruct_session(session, pet, options, atlas=atlas, regions=regions, progress=progress)
        for stale in (tacs, fit):
            if stale.exists():
                stale.unlink()
        log.info("%s: reconstructed in %.1f s -> %s", session.stem, time.time() - t0, pet)
    q = ["--quiet"]
    if not tacs.exists() or options.force:
        _quant(["tacs", str(pet), "--json", str(pet_json), "--atlas", str(session.atlas), "--labels",
                str(session.atlas_tsv), "--regions", *regions, "--out", str(tacs), *q])
    _quant(["fit", str(tacs), "--reference", options.reference, "--model", options.model, "--weights",
            options.weights, "--regions", *targets, "--out", str(fit), *q])
    if options.maps:
        _quant(["map", str(pet), "--json", str(pet_json), "--atlas", str(session.atlas), "--labels",
                str(session.atlas_tsv), "--reference", options.reference, "--model", options.model,
                "--weights", options.weights, "--mask-regions", *targets,
                "--device", "gpu" if options.device == "gpu" else "cpu",
                "--out-prefix", str(out / f"{session.stem}_desc-{options.model}"), *q])
    return fit


def run_pipeline(study_dir, deriv_dir, options=None):
    """Run the whole study: every session, then the group comparison.

    Parameters
    ----------
    study_dir : str or Path
        Raw study (layout in the module docstring).
    deriv_dir : str or Path
        Derivatives folder (created).
    options : PipelineOptions, optional

    Returns
    -------
    dict
        ``sessions``: list of (subject, session, status) with status
        ``"done"`` or ``"skipped"``; ``group``: dict name -> path from
        :func:`petbind.quant.compare.run_study` (empty without participants.tsv).
    """
    from petbind.core.files import write_json
    from petbind.quant.compare import run_study

    options = PipelineOptions() if options is None else options
    options.validate()
    study_dir, deriv_dir = Path(study_dir), Path(deriv_dir)
    sessions = find_sessions(study_dir)
    for s in sessions:  # check the cheap things up front, before hours of reconstruction
        read_session_frames(s, options.frames)
        for p in (s.atlas, s.atlas_tsv):
            if not p.exists():
                raise StudyInputError(f"{p}: atlas file missing (needed as reconstruction grid and for TACs of {s.stem})")
    deriv_dir.mkdir(parents=True, exist_ok=True)
    write_json(deriv_dir / "dataset_description.json", {
        "Name": "petbind study pipeline derivatives", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "petbind petbind-study", "Settings": asdict(options)}],
        "SourceDatasets": [{"URL": str(study_dir.resolve())}],
    })
    result = {"sessions": [], "group": {}}
    progress = not options.quiet
    for s in tqdm(sessions, desc="sessions", unit="session", disable=not progress):
        fit = s.out_dir(deriv_dir) / f"{s.stem}_desc-{options.model}_bpnd.tsv"
        bp_map = s.out_dir(deriv_dir) / f"{s.stem}_desc-{options.model}_bpnd.nii.gz"
        if fit.exists() and (bp_map.exists() or not options.maps) and not options.force:
            log.info("skip %s %s: %s exists (use --force to redo)", s.subject, s.session, fit)
            result["sessions"].append((s.subject, s.session, "skipped"))
            continue
        process_session(s, deriv_dir, options, progress=progress)
        result["sessions"].append((s.subject, s.session, "done"))
    participants = study_dir / "participants.tsv"
    if participants.exists():
        _copy_atomic(participants, deriv_dir / "participants.tsv")
        result["group"] = run_study(deriv_dir, deriv_dir / "group", baseline_session=options.baseline_session,
                                    post_session=options.post_session, n_permutations=options.n_permutations,
                                    voxelwise=options.maps, progress=progress,
                                    result_pattern=f"*_desc-{options.model}_bpnd.tsv")
    else:
        log.warning("%s: no participants.tsv; group comparison skipped", study_dir)
    return result


def build_parser():
    """The ``petbind-study`` argument parser."""
    p = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n\n")[0],
                                epilog="Model, corrections and resume rules: see the module docstring.")
    p.add_argument("study_dir", help="raw study folder (sub-*/ses-*/pet/*_pet-listmode.h5, anat atlas)")
    p.add_argument("--out", required=True, help="derivatives folder")
    p.add_argument("--model", default="srtm", choices=MODEL_CHOICES, help="kinetic model (default srtm)")
    p.add_argument("--reference", default="cerebellum", help="reference region (default cerebellum)")
    p.add_argument("--iterations", type=int, default=3, help="OSEM iterations (default 3)")
    p.add_argument("--subsets", type=int, default=8, help="OSEM view subsets (default 8)")
    p.add_argument("--psf-fwhm-mm", type=float, default=None, help="resolution model FWHM (mm); default none")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="projector device (default auto)")
    p.add_argument("--frames", default=None, help="frame definition overriding the sidecars, e.g. '6x10s,3x20s,8x5m'")
    p.add_argument("--maps", action="store_true", help="also voxelwise parametric maps and voxelwise group maps")
    p.add_argument("--weights", default="duration", choices=("none", "duration", "counts"),
                   help="frame weights of the fits (default duration)")
    p.add_argument("--exclude-regions", nargs="*", default=list(DEFAULT_EXCLUDED_REGIONS),
                   help="atlas regions not fitted (default: scalp skull csf ventricles)")
    p.add_argument("--sensitivity-cps-per-kbq", type=float, default=None,
                   help="compute the calibration κ from this point-source sensitivity instead of the file's "
                        "calibration_factor (simulated studies)")
    p.add_argument("--num-radial", type=int, default=None, help="radial bins (default: range of the events)")
    p.add_argument("--max-ring-difference", type=int, default=None, help="default: range of the events")
    p.add_argument("--scatter-fwhm-mm", type=float, default=SCATTER_FWHM_MM,
                   help=f"blur width of the tail-fitted scatter model (mm, default {SCATTER_FWHM_MM:g})")
    p.add_argument("--no-tof", action="store_true", help="sum TOF bins of TOF files")
    p.add_argument("--baseline-session", default="baseline")
    p.add_argument("--post-session", default="postdose")
    p.add_argument("--n-permutations", type=int, default=10000, help="group x time permutations (default 10000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--force", action="store_true", help="redo sessions whose outputs exist")
    return p


def options_from_args(args):
    """:class:`PipelineOptions` from parsed arguments."""
    return PipelineOptions(
        model=args.model, reference=args.reference, iterations=args.iterations, subsets=args.subsets,
        psf_fwhm_mm=args.psf_fwhm_mm, device=args.device, frames=args.frames, maps=args.maps, quiet=args.quiet,
        force=args.force, sensitivity_cps_per_kbq=args.sensitivity_cps_per_kbq, num_radial=args.num_radial,
        max_ring_difference=args.max_ring_difference, weights=args.weights,
        exclude_regions=tuple(args.exclude_regions), baseline_session=args.baseline_session,
        post_session=args.post_session, n_permutations=args.n_permutations, tof=not args.no_tof,
        scatter_fwhm_mm=args.scatter_fwhm_mm,
    )


def setup_logging(quiet):
    """Log to stderr: INFO normally, WARNING with ``--quiet``."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    level = logging.WARNING if quiet else logging.INFO
    for name in ("petbind",):
        logging.getLogger(name).setLevel(level)


def main(argv=None):
    """Run the pipeline; return 0, or 2 for bad input (one line on stderr)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    try:
        result = run_pipeline(args.study_dir, args.out, options_from_args(args))
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        msg = " ".join(str(exc).split())
        print(f"study.py: error: {msg}", file=sys.stderr)
        return 2
    if not args.quiet:
        n_done = sum(1 for r in result["sessions"] if r[2] == "done")
        print(f"{n_done} session(s) processed, {len(result['sessions']) - n_done} skipped; group results in "
              f"{Path(args.out) / 'group'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
