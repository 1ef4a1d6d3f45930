"""Simulate a baseline / post-dose [11C]AZ10419369 study: N subjects × 2 PET sessions.

Each subject belongs to the ``drug`` or the ``placebo`` group (alternately).
True regional BP_ND varies between subjects (log-normal,
``between_subject_cv``) and between sessions (``test_retest_cv``); in the
drug group the post-dose session has BP_ND multiplied by ``1 + drug_effect``
per region.  Regional TACs come from
:func:`petbind.sim.kinetics.simulate_regional_tacs`; they fill the digital
brain phantom (partial-volume fractions on the simulation grid, one basis
image per region) and every session is acquired with
:class:`petbind.sim.acquisition.AcquisitionSimulator` (one simulator, and one
set of basis projections, for the whole study).

The default drug effect follows the seed study, Tiger et al. 2020 (see
:data:`DEFAULT_DRUG_EFFECT`); the default variability and count level follow
the test-retest study of the same tracer, Nord et al. 2014 (see
:class:`StudyConfig`).

Output (BIDS-like)::

    out/
      dataset_description.json
      participants.tsv                     participant_id, group, age
      ground_truth.tsv                     subject, session, group, region, bp_nd, r1
      sub-01/
        sub-01_sessions.tsv                session_id, hours_after_baseline, injected_activity_mbq
        anat/sub-01_atlas.nii.gz           majority labels on the simulation grid
        anat/sub-01_atlas.tsv              index, name
        anat/sub-01_atlas_probseg.nii.gz   4-D tissue fractions, one volume per labelled region (index order)
        ses-baseline/pet/sub-01_ses-baseline_pet-sinograms.h5   multi-frame prompts + delayeds, corrections
        ses-baseline/pet/sub-01_ses-baseline_pet.json           PET-BIDS sidecar (frame times)
        ses-baseline/pet/sub-01_ses-baseline_pet-listmode.h5    (write_listmode)
        ses-baseline/pet/sub-01_ses-baseline_pet-listmode.petsird (write_petsird)
        ses-baseline/pet/sub-01_ses-baseline_pet.nii.gz         (write_images: the true 4-D image)
        ses-postdose/...

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from petbind.core.decay import C11_HALF_LIFE_S, decay_constant_per_s, decay_integral
from petbind.core.files import atomic_output, write_json, write_table_tsv
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.sim.acquisition import AcquisitionSimulator, BasisActivity, random_crystal_efficiencies
from petbind.sim.kinetics import (
    AZ10419369_REFERENCE,
    AZ10419369_REGIONS,
    DEFAULT_FRAME_DURATIONS_S,
    FengInput,
    RegionKinetics,
    frame_times_s,
    simulate_regional_tacs,
)
from petbind.sim.phantom import BrainPhantom, load_brain_phantom, resample_phantom

__all__ = [
    "DEFAULT_DRUG_EFFECT",
    "SCANNER_SETUPS",
    "SESSIONS",
    "ScannerSetup",
    "SessionTruth",
    "StudyConfig",
    "session_file",
    "simulate_study",
    "study_truth",
]

log = logging.getLogger(__name__)

SESSIONS = ("baseline", "postdose")

#: Default true fractional change of BP_ND in the drug group's post-dose session.
#:
#: Tiger et al. 2020 (Transl Psychiatry 10:159; 30 SSRI-resistant patients
#: with major depression, ketamine 0.5 mg/kg or placebo, [11C]AZ10419369 PET
#: before and 24-72 h after) report one significant within-group change: an
#: *increase* of 5-HT1B binding by 16.7 % (p = 0.036) in the hippocampus after
#: ketamine; binding did not change significantly in ketamine compared with
#: placebo (no significant group x time interaction), and the ventral
#: striatum, where ketamine raised 5-HT1B binding in non-human primates
#: (Yamanaka et al. 2014, Transl Psychiatry 4:e342) and whose baseline
#: binding predicted the clinical response, did not change significantly.
#: The default therefore changes the hippocampus only; other patterns are
#: given with ``drug_effect`` (``petbind-simulate --effect REGION=FRACTION``).
DEFAULT_DRUG_EFFECT = {"hippocampus": 0.167}

#: Regions simulated but not reported in ground_truth.tsv (outside the brain).
_NON_BRAIN = ("scalp", "skull")


@dataclass(frozen=True)
class ScannerSetup:
    """Default sinogram layout and simulation grid of a preset scanner.

    Attributes
    ----------
    num_radial, max_ring_difference, span : int
        The :class:`~petbind.recon.geometry.SinogramLayout` (``None``: all ring differences).
    voxel_size_mm : float
        Simulation (and atlas) grid voxel (mm).
    head_offset_mm : tuple of 3 float
        Shift of the phantom in the scanner (mm), to centre the brain axially.
    """

    num_radial: int
    max_ring_difference: Optional[int]
    span: int
    voxel_size_mm: float
    head_offset_mm: tuple


#: Per preset scanner (:data:`petbind.recon.geometry.SCANNER_PRESETS`): the
#: default layout and grid.  ``demo-small`` (the default) keeps a whole study
#: small enough to reconstruct in minutes on two CPU cores (0.27 million bins
#: per frame); ``mmr`` and ``hrrt`` use their clinical layouts (span 11 and 3;
#: tens of millions of bins per frame: GPU territory).
SCANNER_SETUPS = {
    "demo-small": ScannerSetup(40, 6, 1, 6.0, (0.0, 0.0, -10.0)),
    "demo": ScannerSetup(80, None, 1, 4.0, (0.0, 0.0, -8.0)),
    "mmr": ScannerSetup(344, 60, 11, 2.08626, (0.0, 0.0, 0.0)),
    "hrrt": ScannerSetup(256, 67, 3, 2.0, (0.0, 0.0, 0.0)),
}


@dataclass
class StudyConfig:
    """Settings of :func:`simulate_study`.

    Parameters
    ----------
    num_subjects : int
        Subjects, alternately assigned to ``drug`` and ``placebo``.
    drug_effect : dict of str to float
        Fractional BP_ND change per region in the drug group's post-dose
        session (``> -1``); default :data:`DEFAULT_DRUG_EFFECT`.
    between_subject_cv : float
        SD of log BP_ND between subjects: 0.15, within the 10-20 % spread
        usual for receptor BP_ND in healthy volunteers; with the within-subject
        SD below it gives an intraclass correlation of about 0.9, the "highly
        reproducible" regime Nord et al. 2014 describe for the cortex.
    test_retest_cv : float
        SD of log BP_ND between a subject's sessions: the true biological
        variation (measurement noise comes on top).  Nord et al. 2014 (Eur J
        Nucl Med Mol Imaging 41:301-307; 8 men, two [11C]AZ10419369 HRRT scans
        on one day, SRTM) measured an absolute variability ``|Δ| / mean`` of
        5-7 % in cortical regions, 7-14 % in subcortical regions and 20 % in
        the raphe.  For two independent normal draws ``E|Δ| / mean ≈ 1.13 SD``,
        so 5-7 % is a total within-subject SD of 4.4-6.2 %.  The default
        acquisition reconstructed by petbind-study (OSEM 3 x 8, no PSF, no
        PVC; 8 noise realisations of one truth) gave a measurement CV of
        1.1-2.4 % in the cortex and 3.4-4 % in hippocampus, thalamus, caudate
        and putamen; 0.045 on top of that makes 4.6-5.1 % (absolute
        variability 5.2-5.8 %) in the cortex and 5.6-6 % (6.3-6.8 %) in those
        subcortical regions.
    r1_cv : float
        SD of log R1 between subjects.
    postdose_hours : tuple of 2 float
        Range of the post-dose session's delay after baseline (h); 24-72 h as
        in Tiger et al. 2020.
    injected_activity_mbq : tuple of 2 float
        Range of injected activity (MBq); the plasma input scales with it
        (the default :class:`~petbind.sim.kinetics.FengInput` is for 400 MBq).
    frame_durations_s : sequence of float
        Frame durations (s), contiguous from the injection.
    model : {"srtm", "2tcm"}
        Kinetic model generating the target TACs (see
        :func:`~petbind.sim.kinetics.simulate_regional_tacs`).
    regions : dict of str to RegionKinetics
        Population R1 and BP_ND.
    scanner : str or Scanner
        A preset name (:data:`SCANNER_SETUPS`: ``"demo-small"`` by default,
        ``"demo"``, ``"mmr"``, ``"hrrt"``) or a :class:`Scanner`.
    num_radial, max_ring_difference, span : int or None
        Sinogram layout; ``None``: the preset's (for a scanner without a
        preset ``num_radial`` is required, ``max_ring_difference`` defaults to
        all and ``span`` to 1).
    voxel_size_mm : float or None
        Simulation grid voxel (mm); the grid covers a head transaxially
        (160 x 200 mm) and the scanner's field axially.  ``None``: the preset's.
    head_offset_mm : sequence of 3 float or None
        Shift of the phantom in the scanner (mm); ``None``: the preset's (0 without one).
    tof : TOFParameters or None
    sensitivity_cps_per_kbq : float
        Count level: cps per kBq of a centred point source (unattenuated).
        10 cps/kBq, a clinical brain scanner: with 350-450 MBq it gives about
        10^8 prompts per 90-min session in ``demo-small`` and cortical BP_ND
        noise in the range measured by Nord et al. (see ``test_retest_cv``).
    scatter_fraction, randoms_fraction : float
        Of the trues + scatter, and of all prompts over the session.
    crystal_efficiency_spread : float
        Relative SD of the crystal efficiencies.
    resolution_fwhm_mm : "scanner", float or None
        Resolution applied in image space before projection (FWHM, mm):
        ``"scanner"`` (default) uses ``Scanner.resolution_fwhm_mm`` of the
        preset (no blur for a scanner that does not know it); 0 or ``None``:
        no blur.
    poisson_noise : bool
        ``False`` stores the expected counts (float32) instead of Poisson
        draws (error budgets); no listmode then.
    write_listmode : bool
        Also expand each session into listmode (``*_pet-listmode.h5``).
    write_petsird : bool
        Also write each session's listmode as PETSIRD
        (``*_pet-listmode.petsird``; converted from the HDF5 listmode, which is
        kept only with ``write_listmode``).
    write_images : {None, "true", "noisy"}
        Also write the 4-D activity image (``_pet.nii.gz``): noise free, or
        with Gaussian image-space noise of relative SD ``image_noise`` at
        10 kBq/mL in a 300 s frame without decay, scaled as counting noise.
    image_noise : float
    seed : int
    quiet : bool
    device : {"auto", "cpu", "gpu"}
    """

    num_subjects: int = 4
    drug_effect: dict = field(default_factory=lambda: dict(DEFAULT_DRUG_EFFECT))
    between_subject_cv: float = 0.15
    test_retest_cv: float = 0.045
    r1_cv: float = 0.05
    postdose_hours: tuple = (24.0, 72.0)
    injected_activity_mbq: tuple = (350.0, 450.0)
    frame_durations_s: tuple = DEFAULT_FRAME_DURATIONS_S
    model: str = "srtm"
    regions: dict = field(default_factory=lambda: dict(AZ10419369_REGIONS))
    scanner: Union[str, Scanner] = "demo-small"
    num_radial: Optional[int] = None
    max_ring_difference: Optional[int] = None
    span: Optional[int] = None
    voxel_size_mm: Optional[float] = None
    head_offset_mm: Optional[tuple] = None
    tof: Optional[TOFParameters] = None
    sensitivity_cps_per_kbq: float = 10.0
    scatter_fraction: float = 0.35
    randoms_fraction: float = 0.25
    crystal_efficiency_spread: float = 0.05
    resolution_fwhm_mm: Union[str, float, None] = "scanner"
    poisson_noise: bool = True
    write_listmode: bool = False
    write_petsird: bool = False
    write_images: Optional[str] = None
    image_noise: float = 0.1
    seed: int = 0
    quiet: bool = False
    device: str = "auto"

    def resolved(self):
        """A copy with the scanner built and the preset's layout and grid filled in (validated).

        Raises
        ------
        ValueError
            Naming the field, for any invalid setting.
        """
        cfg = replace(self)
        setup = None
        if cfg.scanner is None:
            cfg.scanner = "demo-small"
        if isinstance(cfg.scanner, str):
            name = cfg.scanner
            if name not in SCANNER_SETUPS:
                raise ValueError(f"StudyConfig.scanner {name!r} is unknown; choose one of {', '.join(SCANNER_SETUPS)}")
            cfg.scanner = Scanner.preset(name)
            setup = SCANNER_SETUPS[name]
        elif isinstance(cfg.scanner, Scanner):
            setup = SCANNER_SETUPS.get(cfg.scanner.name) if cfg.scanner == _preset_or_none(cfg.scanner.name) else None
        else:
            raise TypeError(f"StudyConfig.scanner must be a preset name or a Scanner; got {type(cfg.scanner).__name__}")
        if cfg.span is None and setup is None:
            cfg.span = 1
        for name in ("num_radial", "span", "voxel_size_mm"):
            if getattr(cfg, name) is None:
                if setup is None:
                    raise ValueError(f"StudyConfig.{name} must be given for scanner {cfg.scanner.name!r} (no preset)")
                setattr(cfg, name, getattr(setup, name))
        if cfg.max_ring_difference is None and setup is not None:
            cfg.max_ring_difference = setup.max_ring_difference
        if cfg.head_offset_mm is None:
            cfg.head_offset_mm = setup.head_offset_mm if setup is not None else (0.0, 0.0, 0.0)
        cfg.validate()
        return cfg

    def validate(self):
        """Check the settings (the scanner must already be a :class:`Scanner`; see :meth:`resolved`)."""
        if not isinstance(self.num_subjects, (int, np.integer)) or int(self.num_subjects) < 1:
            raise ValueError(f"StudyConfig.num_subjects must be an integer >= 1; got {self.num_subjects}")
        for name in ("between_subject_cv", "test_retest_cv", "r1_cv", "image_noise"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"StudyConfig.{name} must be >= 0; got {v}")
        for name in ("sensitivity_cps_per_kbq", "voxel_size_mm"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float, np.number)) and np.isfinite(v) and v > 0):
                raise ValueError(f"StudyConfig.{name} must be a positive number; got {v}")
        for name in ("scatter_fraction", "randoms_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"StudyConfig.{name} must be in [0, 1); got {v}")
        lo, hi = self.postdose_hours
        if not 0 < lo <= hi:
            raise ValueError(f"StudyConfig.postdose_hours must be (low, high) with 0 < low <= high; got {self.postdose_hours}")
        lo, hi = self.injected_activity_mbq
        if not 0 < lo <= hi:
            raise ValueError(f"StudyConfig.injected_activity_mbq must be (low, high), 0 < low <= high; got {self.injected_activity_mbq}")
        d = np.asarray(self.frame_durations_s, dtype=float).reshape(-1)
        if d.size == 0 or not np.all(np.isfinite(d)) or np.any(d <= 0):
            raise ValueError(f"StudyConfig.frame_durations_s must be positive durations (s); got {list(self.frame_durations_s)}")
        if self.write_images not in (None, "true", "noisy"):
            raise ValueError(f"StudyConfig.write_images must be None, 'true' or 'noisy'; got {self.write_images!r}")
        if self.model not in ("srtm", "2tcm"):
            raise ValueError(f"StudyConfig.model must be 'srtm' or '2tcm'; got {self.model!r}")
        if isinstance(self.resolution_fwhm_mm, str):
            if self.resolution_fwhm_mm != "scanner":
                raise ValueError(f"StudyConfig.resolution_fwhm_mm must be 'scanner', a FWHM (mm) or None; got {self.resolution_fwhm_mm!r}")
        elif self.resolution_fwhm_mm is not None and not (np.isfinite(self.resolution_fwhm_mm) and self.resolution_fwhm_mm >= 0):
            raise ValueError(f"StudyConfig.resolution_fwhm_mm must be >= 0 (mm); got {self.resolution_fwhm_mm}")
        binding = ", ".join(sorted(n for n, r in self.regions.items() if r.bp_nd > 0))
        unknown = sorted(set(self.drug_effect) - set(self.regions))
        if unknown:
            raise ValueError(f"StudyConfig.drug_effect names unknown regions {unknown}; choose among {binding}")
        zero = sorted(n for n in self.drug_effect if self.regions[n].bp_nd == 0)
        if zero:
            raise ValueError(f"StudyConfig.drug_effect names regions without specific binding (BP_ND = 0): {zero}; "
                             f"choose among {binding}")
        for name, eff in self.drug_effect.items():
            if not (np.isfinite(eff) and eff > -1):
                raise ValueError(f"StudyConfig.drug_effect[{name!r}] must be a fraction > -1; got {eff}")
        if not self.poisson_noise and (self.write_listmode or self.write_petsird):
            raise ValueError("StudyConfig.write_listmode/write_petsird need poisson_noise=True (listmode holds counted events)")
        if not isinstance(self.scanner, Scanner):
            raise TypeError("StudyConfig.scanner must be resolved to a Scanner first (use StudyConfig.resolved())")
        try:
            SinogramLayout(self.scanner, self.num_radial, self.max_ring_difference, self.span)
        except ValueError as exc:
            raise ValueError(f"StudyConfig layout (num_radial, max_ring_difference, span): {exc}") from None


def _preset_or_none(name):
    try:
        return Scanner.preset(name)
    except ValueError:
        return None


@dataclass
class SessionTruth:
    """True parameters of one session."""

    subject: str
    session: str
    group: str
    hours_after_baseline: float
    injected_activity_bq: float
    regions: dict  # name -> RegionKinetics


def session_file(out_dir, subject, session, suffix):
    """Path of a session's file: ``out/sub-XX/ses-YY/pet/sub-XX_ses-YY_<suffix>``.

    ``suffix`` is e.g. ``"pet-sinograms.h5"``, ``"pet-listmode.h5"``, ``"pet.json"``.
    """
    ses = session if session.startswith("ses-") else f"ses-{session}"
    return Path(out_dir) / subject / ses / "pet" / f"{subject}_{ses}_{suffix}"


def _atomic_save_nifti(img, path):
    with atomic_output(path) as tmp:
        nib.save(img, tmp)


def _table(path, rows, columns):
    write_table_tsv(path, columns, [[r[c] for c in columns] for r in rows])


def _lognormal(rng, cv):
    """Multiplicative factor with median 1 and log-SD ``cv``."""
    return float(math.exp(rng.normal(0.0, cv))) if cv > 0 else 1.0


def study_truth(config):
    """Draw every subject's and session's true parameters.

    Returns
    -------
    participants : list of dict
        ``participant_id``, ``group``, ``age``.
    sessions : list of SessionTruth
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 1]))
    participants, sessions = [], []
    for i in range(int(config.num_subjects)):
        sub = f"sub-{i + 1:02d}"
        group = "drug" if i % 2 == 0 else "placebo"
        participants.append({"participant_id": sub, "group": group, "age": int(rng.integers(20, 51))})
        subject_regions = {}
        for name, rk in config.regions.items():
            bp = rk.bp_nd * _lognormal(rng, config.between_subject_cv) if rk.bp_nd != 0 else 0.0
            r1 = rk.r1 * _lognormal(rng, config.r1_cv) if rk.r1 != 1.0 or rk.bp_nd != 0 else rk.r1
            subject_regions[name] = (r1, bp)
        hours = float(rng.uniform(*config.postdose_hours))
        for ses in SESSIONS:
            regions = {}
            for name, (r1, bp) in subject_regions.items():
                b = bp * _lognormal(rng, config.test_retest_cv) if bp != 0 else 0.0
                if ses == "postdose" and group == "drug":
                    b *= 1.0 + config.drug_effect.get(name, 0.0)
                regions[name] = RegionKinetics(r1, b, config.regions[name].k2_per_min)
            inj = float(rng.uniform(*config.injected_activity_mbq)) * 1e6
            sessions.append(SessionTruth(sub, ses, group, 0.0 if ses == "baseline" else hours, inj, regions))
    return participants, sessions


def _study_grid(config):
    scanner = config.scanner
    v = float(config.voxel_size_mm)
    # Transaxially: a head (160 x 200 mm); axially: the scanner's field.
    pitch = float(np.diff(scanner.ring_z_mm).mean()) if scanner.num_rings > 1 else v
    axial = float(np.ptp(scanner.ring_z_mm)) + pitch
    shape = (int(math.ceil(160 / v)), int(math.ceil(200 / v)), max(1, int(math.ceil(axial / v))))
    return ImageGrid(shape, v)


def _pet_json(config, truth, fs, fe, scan_date, files, fwhm_mm):
    d = {
        "Manufacturer": "petbind simulation",
        "ManufacturersModelName": config.scanner.name,
        "TracerName": "AZ10419369",
        "TracerRadionuclide": "C11",
        "TracerRadLex": "",
        "TracerMolecularWeight": 420.5,
        "TracerMolecularWeightUnits": "g/mol",
        "InjectedRadioactivity": truth.injected_activity_bq / 1e6,
        "InjectedRadioactivityUnits": "MBq",
        "InjectedMass": "n/a",
        "InjectedMassUnits": "n/a",
        "SpecificRadioactivity": "n/a",
        "SpecificRadioactivityUnits": "n/a",
        "ModeOfAdministration": "bolus",
        "TimeZero": scan_date.strftime("%H:%M:%S"),
        "ScanStart": 0,
        "InjectionStart": 0,
        "FrameTimesStart": [float(v) for v in fs],
        "FrameDuration": [float(b - a) for a, b in zip(fs, fe)],
        "AcquisitionMode": "list mode" if config.write_listmode else "sinogram",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "Units": "Bq/mL",
        "BodyPart": "Brain",
        "PharmaceuticalName": "study drug" if truth.group == "drug" else "placebo",
        "SimulationSeed": int(config.seed),
        "SimulatedResolutionFWHM": "none" if fwhm_mm is None else [float(v) for v in fwhm_mm],
        "SimulatedSensitivityCpsPerKBq": float(config.sensitivity_cps_per_kbq),
        "RawDataFiles": files,
    }
    if config.write_images is not None:
        lam = decay_constant_per_s(C11_HALF_LIFE_S)
        d["DecayCorrectionFactor"] = [float((b - a) / decay_integral(a, b, lam)) for a, b in zip(fs, fe)]
        d["ReconMethodName"] = "none (true activity)" if config.write_images == "true" else "none (true activity + Gaussian noise)"
        d["ReconMethodParameterLabels"] = ["none"]
        d["ReconMethodParameterUnits"] = ["none"]
        d["ReconMethodParameterValues"] = [0]
        d["ReconFilterType"] = "none"
        d["ReconFilterSize"] = 0
        d["AttenuationCorrection"] = "none (true activity)"
    return d


def simulate_study(out_dir, config=None, phantom=None):
    """Simulate the whole study and write it to ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; existing files with the same names are replaced).
    config : StudyConfig, optional
    phantom : BrainPhantom, optional
        Default :func:`~petbind.sim.phantom.load_brain_phantom`.

    Returns
    -------
    list of SessionTruth
        The true parameters that were simulated (also in ``ground_truth.tsv``).

    Raises
    ------
    ValueError
        For invalid settings, before anything is written.

    Notes
    -----
    The raw data a pipeline reads are, per session,
    ``sub-XX/ses-YY/pet/sub-XX_ses-YY_pet-sinograms.h5``
    (:class:`petbind.recon.rawdata.sinograms.SinogramReader`): prompts and
    delayeds of every frame (frame times relative to the scan start, which is
    the injection), with ``/exam`` (tracer, half-life, injected activity),
    ``/corrections`` (crystal efficiencies, recorded singles per frame, μ-map
    and its affine, ``calibration_factor = 1 / κ``) and ``/scanner``
    (including ``resolution_fwhm_mm`` when the scanner knows it).  The atlas
    (``anat/``) is the reconstruction grid.
    """
    config = (StudyConfig() if config is None else config).resolved()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    ph = load_brain_phantom() if phantom is None else phantom
    grid = _study_grid(config)
    shifted = BrainPhantom(ph.labels, ph.label_table, ph.mu_map_per_mm, ph.affine.copy())
    shifted.affine[:3, 3] += np.asarray(config.head_offset_mm, dtype=float)
    on_grid = resample_phantom(grid, shifted)
    missing = sorted(set(config.regions) - set(on_grid.label_table.values()))
    if missing:
        raise ValueError(f"StudyConfig.regions names regions that are not in the phantom: {missing}")
    scanner = config.scanner
    layout = SinogramLayout(scanner, config.num_radial, config.max_ring_difference, config.span)
    participants, sessions = study_truth(config)
    fs, fe = frame_times_s(config.frame_durations_s)
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)

    active = list(config.regions)
    basis = np.stack([on_grid.fractions[on_grid.index_of(n)] for n in active]).astype(np.float32)
    eff = random_crystal_efficiencies(scanner, np.random.default_rng(np.random.SeedSequence([int(config.seed), 2])),
                                      config.crystal_efficiency_spread)
    sim = AcquisitionSimulator(
        layout, grid, on_grid.mu_map_per_mm, crystal_efficiencies=eff, tof=config.tof,
        scatter_fraction=config.scatter_fraction, randoms_fraction=config.randoms_fraction,
        resolution_fwhm_mm=config.resolution_fwhm_mm, sensitivity_cps_per_kbq=config.sensitivity_cps_per_kbq,
        device=config.device, quiet=config.quiet,
    )
    if sim.resolution is None:
        log.warning("simulating without a resolution model (scanner %r knows no resolution_fwhm_mm, or it was switched off)",
                    scanner.name)
    base_date = _dt.datetime(2026, 1, 5, 9, 0, 0)

    write_json(out / "dataset_description.json", {
        "Name": "petbind simulated [11C]AZ10419369 study (baseline and post-dose)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "petbind.sim.study", "Description": "simulated data, see ground_truth.tsv"}],
    })
    _table(out / "participants.tsv", participants, ["participant_id", "group", "age"])
    truth_rows = []
    by_subject = {}
    for s in sessions:
        by_subject.setdefault(s.subject, []).append(s)
        for name, rk in s.regions.items():
            if name in _NON_BRAIN:
                continue
            truth_rows.append({"subject": s.subject, "session": f"ses-{s.session}", "group": s.group, "region": name,
                               "bp_nd": float(rk.bp_nd), "r1": float(rk.r1)})
    _table(out / "ground_truth.tsv", truth_rows, ["subject", "session", "group", "region", "bp_nd", "r1"])
    atlas_rows = [{"index": i, "name": n} for i, n in on_grid.label_table.items()]

    from petbind.recon.rawdata.schema import ExamInfo, ListmodeCorrections  # noqa: PLC0415

    seeds = np.random.SeedSequence([int(config.seed), 3]).spawn(len(sessions))
    lam = decay_constant_per_s(C11_HALF_LIFE_S)
    for si, truth in enumerate(tqdm(sessions, desc="simulating sessions", disable=config.quiet)):
        t0 = time.time()
        sub_dir = out / truth.subject
        anat = sub_dir / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        if truth.session == SESSIONS[0]:
            img = nib.Nifti1Image(on_grid.labels.astype(np.uint8), grid.affine)
            img.header.set_xyzt_units("mm", "sec")
            _atomic_save_nifti(img, anat / f"{truth.subject}_atlas.nii.gz")
            _table(anat / f"{truth.subject}_atlas.tsv", atlas_rows, ["index", "name"])
            # tissue fractions of every labelled region (a probabilistic segmentation, as from MRI):
            # the activity is sum_l fraction_l * activity_l, so a PVC that models mixed voxels can be exact
            labelled = sorted(i for i in on_grid.label_table if i > 0)
            probseg = nib.Nifti1Image(np.moveaxis(on_grid.fractions[labelled], 0, -1).astype(np.float32), grid.affine)
            probseg.header.set_xyzt_units("mm")
            _atomic_save_nifti(probseg, anat / f"{truth.subject}_atlas_probseg.nii.gz")
            rows = [{"session_id": f"ses-{t.session}", "hours_after_baseline": t.hours_after_baseline,
                     "injected_activity_mbq": t.injected_activity_bq / 1e6} for t in by_subject[truth.subject]]
            _table(sub_dir / f"{truth.subject}_sessions.tsv", rows,
                   ["session_id", "hours_after_baseline", "injected_activity_mbq"])
        sino_path = session_file(out, truth.subject, truth.session, "pet-sinograms.h5")
        pet = sino_path.parent
        pet.mkdir(parents=True, exist_ok=True)
        stem = f"{truth.subject}_ses-{truth.session}"
        plasma = FengInput().scaled(truth.injected_activity_bq / 400e6)
        tacs = simulate_regional_tacs(truth.regions, fs, fe, model=config.model, plasma=plasma, reference=AZ10419369_REFERENCE)
        weights = np.stack([tacs.tacs[n] for n in active])
        scan_date = base_date + _dt.timedelta(hours=truth.hours_after_baseline)
        files = [sino_path.name] + ([f"{stem}_pet-listmode.h5"] if config.write_listmode else []) + (
            [f"{stem}_pet-listmode.petsird"] if config.write_petsird else [])
        write_json(pet / f"{stem}_pet.json", _pet_json(config, truth, fs, fe, scan_date, files, sim.resolution_fwhm_mm))
        if config.write_images is not None:
            rng_img = np.random.default_rng(np.random.SeedSequence([int(config.seed), 5, si]))
            frames = np.moveaxis(np.tensordot(weights.T, basis, axes=1), 0, -1).astype(np.float32)  # (x, y, z, F)
            if config.write_images == "noisy":
                t_mid = 0.5 * (fs + fe)
                scale = 1e4 * 300.0 / ((fe - fs) * np.exp(-lam * t_mid))
                sd = config.image_noise * np.sqrt(np.maximum(frames, 0.0) * scale)
                frames = (frames + sd * rng_img.standard_normal(frames.shape)).astype(np.float32)
            img = nib.Nifti1Image(frames, grid.affine)
            img.header.set_xyzt_units("mm", "sec")
            _atomic_save_nifti(img, pet / f"{stem}_pet.nii.gz")

        exam = ExamInfo(
            tracer="[11C]AZ10419369", isotope="C11", half_life_s=C11_HALF_LIFE_S,
            injection_time=scan_date.isoformat(), injected_activity_bq=truth.injected_activity_bq,
            scan_start_s=0.0, subject_id=truth.subject, description=f"simulated, ses-{truth.session}",
        )
        acq = sim.acquire(BasisActivity(basis, weights), fs, fe, seed=seeds[si], noise=config.poisson_noise)
        # Singles as a scanner records them: counts (a Poisson draw around the expected singles) per frame.
        singles_rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 4, si]))
        edges = np.concatenate([fs, fe[-1:]]) - sim.scan_start_s
        corrections = ListmodeCorrections(
            crystal_efficiencies=eff,
            singles_block_edges_s=edges,
            singles_counts=singles_rng.poisson(acq.singles_counts()).astype(np.float64),
            mu_map_per_mm=on_grid.mu_map_per_mm,
            mu_map_affine=grid.affine,
            # 1/κ: Bq/mL per unit of an image reconstructed with m = n ⊙ a as counts per
            # second per mm of line integral (before decay correction).
            calibration_factor=1.0 / sim.kappa,
        )
        acq.write_h5(sino_path, exam=exam, corrections=corrections)
        if config.write_listmode or config.write_petsird:
            _write_listmode(acq, sino_path, pet / f"{stem}_pet-listmode.h5", exam, corrections, config)
        st = acq.frame_stats
        log.info("%s: %.4g prompts (expected %.4g trues, %.4g scatter, %.4g randoms), %.4g delayeds; %.1f s",
                 stem, sum(s.prompts for s in st), sum(s.expected_trues for s in st), sum(s.expected_scatter for s in st),
                 sum(s.expected_randoms for s in st), sum(s.delayeds for s in st), time.time() - t0)
    log.info("simulated %d sessions in %.1f s", len(sessions), time.time() - t_start)
    return sessions


def _write_listmode(acq, sino_path, lm_path, exam, corrections, config):
    """Expand the session's counts, read back from its sinogram file, into listmode (and PETSIRD).

    PETSIRD is converted from the HDF5 listmode; without ``write_listmode``
    that HDF5 file is a hidden temporary, removed afterwards.
    """
    from petbind.recon.rawdata.sinograms import SinogramReader  # noqa: PLC0415

    reader = SinogramReader(sino_path)

    def counts(k):
        return reader.prompts(k).astype(np.int64), reader.delayeds(k).astype(np.int64)

    src = lm_path if config.write_listmode else lm_path.with_name(f".{lm_path.name}.petsird-source.h5")
    try:
        acq.write_listmode_h5(src, counts, exam=exam, corrections=corrections)
        if config.write_petsird:
            from petbind.recon.rawdata.convert import convert  # noqa: PLC0415 - PETSIRD only when asked for

            convert(src, lm_path.with_suffix(".petsird"), to="petsird", quiet=True)
    finally:
        if not config.write_listmode:
            src.unlink(missing_ok=True)
