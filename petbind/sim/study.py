"""Simulate a drug-occupancy study: N subjects × (baseline, post-dose) PET sessions.

Each subject belongs to a ``drug`` or ``placebo`` group.  True regional
BP_ND values vary between subjects (log-normal, ``between_subject_cv``) and
between sessions (test-retest, ``test_retest_cv``); in the drug group the
post-dose session has BP_ND changed by ``drug_effect`` (fraction per region,
default -20 % in 5-HT1B-rich regions).  Regional TACs come from
:func:`petbind.sim.kinetics.simulate_regional_tacs` and fill the digital brain
phantom (partial-volume fractions on the simulation grid); the acquisition
is simulated with :class:`petbind.sim.acquisition.ListmodeSimulator`.

Output (BIDS-like)::

    out/
      dataset_description.json
      participants.tsv                     participant_id, group, age
      ground_truth.tsv                     subject, session, group, region, bp_nd, r1
      sub-01/
        sub-01_sessions.tsv                session_id, hours_after_baseline, injected_activity_mbq
        anat/sub-01_atlas.nii.gz           labels on the simulation grid
        anat/sub-01_atlas.tsv              index, name
        ses-baseline/pet/sub-01_ses-baseline_pet-listmode.h5
        ses-baseline/pet/sub-01_ses-baseline_pet.json
        ses-baseline/pet/sub-01_ses-baseline_pet.nii.gz   (optional true 4-D image)
        ses-postdose/...

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from petbind.core.decay import C11_HALF_LIFE_S, decay_constant_per_s, decay_integral
from petbind.core.files import atomic_output, write_json, write_table_tsv
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters
from petbind.sim.acquisition import (
    BasisActivity,
    ListmodeSimulator,
    random_crystal_efficiencies,
)
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

__all__ = ["StudyConfig", "SessionTruth", "simulate_study", "DEFAULT_DRUG_EFFECT", "SESSIONS"]

log = logging.getLogger(__name__)

SESSIONS = ("baseline", "postdose")

#: Default true fractional change of BP_ND in the drug group's post-dose
#: session: -20 % in the regions richest in 5-HT1B receptors.
DEFAULT_DRUG_EFFECT = {
    "pallidum": -0.20,
    "occipital_cortex": -0.20,
    "ventral_striatum": -0.20,
    "frontal_cortex": -0.20,
    "temporal_cortex": -0.20,
    "parietal_cortex": -0.20,
    "caudate": -0.20,
    "putamen": -0.20,
}

_NON_BRAIN = ("scalp", "skull")


@dataclass
class StudyConfig:
    """Settings of :func:`simulate_study` (defaults: a CI/demo-sized study).

    Parameters
    ----------
    num_subjects : int
        Subjects, alternately assigned to ``drug`` and ``placebo``.
    drug_effect : dict of str to float
        Fractional BP_ND change per region in the drug group's post-dose session.
    between_subject_cv, test_retest_cv, r1_cv : float
        Log-normal spreads (SD of log) of BP_ND between subjects, of BP_ND
        between sessions, and of R1 between subjects.
    postdose_hours : tuple of 2 float
        Range of the post-dose session's delay after baseline (h).
    injected_activity_mbq : tuple of 2 float
        Range of injected activity (MBq); the plasma input scales with it
        (the default :class:`~petbind.sim.kinetics.FengInput` is for 400 MBq).
    frame_durations_s : sequence of float
    model : {"srtm", "2tcm"}
        Kinetic model generating target TACs (see
        :func:`~petbind.sim.kinetics.simulate_regional_tacs`).
    regions : dict of str to RegionKinetics
        Population R1 and BP_ND.
    scanner : Scanner
    num_radial : int
    max_ring_difference : int or None
    voxel_size_mm : float
        Simulation grid voxel (mm); the grid covers the scanner's field.
    head_offset_mm : sequence of 3 float
        Shift of the phantom in the scanner (mm) (centres the brain axially).
    tof : TOFParameters or None
    sensitivity_cps_per_kbq : float
        Count level (cps/kBq of a centred point source); low by default to
        keep files small (real brain scanners: 10-70).
    scatter_fraction, randoms_fraction : float
    crystal_efficiency_spread : float
    resolution_fwhm_mm : float or None
        Scanner resolution applied in image space before projection.
    write_listmode : bool
    write_petsird : bool
        Also write each session's listmode as PETSIRD
        (``*_pet-listmode.petsird``, converted from the HDF5 file with
        :func:`petbind.recon.rawdata.convert.convert`).
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
    between_subject_cv: float = 0.10
    test_retest_cv: float = 0.05
    r1_cv: float = 0.05
    postdose_hours: tuple = (24.0, 72.0)
    injected_activity_mbq: tuple = (350.0, 450.0)
    frame_durations_s: tuple = DEFAULT_FRAME_DURATIONS_S
    model: str = "srtm"
    regions: dict = field(default_factory=lambda: dict(AZ10419369_REGIONS))
    scanner: Optional[Scanner] = None
    num_radial: int = 80
    max_ring_difference: Optional[int] = None
    voxel_size_mm: float = 4.0
    head_offset_mm: tuple = (0.0, 0.0, -8.0)
    tof: Optional[TOFParameters] = None
    sensitivity_cps_per_kbq: float = 0.05
    scatter_fraction: float = 0.35
    randoms_fraction: float = 0.25
    crystal_efficiency_spread: float = 0.05
    resolution_fwhm_mm: Optional[float] = None
    write_listmode: bool = True
    write_petsird: bool = False
    write_images: Optional[str] = None
    image_noise: float = 0.1
    seed: int = 0
    quiet: bool = False
    device: str = "auto"

    def validate(self):
        if int(self.num_subjects) < 1:
            raise ValueError(f"StudyConfig.num_subjects must be >= 1; got {self.num_subjects}")
        for name in ("between_subject_cv", "test_retest_cv", "r1_cv", "image_noise"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"StudyConfig.{name} must be >= 0; got {v}")
        lo, hi = self.postdose_hours
        if not 0 < lo <= hi:
            raise ValueError(f"StudyConfig.postdose_hours must be (low, high) with 0 < low <= high; got {self.postdose_hours}")
        lo, hi = self.injected_activity_mbq
        if not 0 < lo <= hi:
            raise ValueError(f"StudyConfig.injected_activity_mbq must be (low, high), 0 < low <= high; got {self.injected_activity_mbq}")
        if self.write_images not in (None, "true", "noisy"):
            raise ValueError(f"StudyConfig.write_images must be None, 'true' or 'noisy'; got {self.write_images!r}")
        if self.model not in ("srtm", "2tcm"):
            raise ValueError(f"StudyConfig.model must be 'srtm' or '2tcm'; got {self.model!r}")
        unknown = sorted(set(self.drug_effect) - set(self.regions))
        if unknown:
            raise ValueError(f"StudyConfig.drug_effect names regions without kinetics: {unknown}; known: {sorted(self.regions)}")
        for name, eff in self.drug_effect.items():
            if not eff > -1:
                raise ValueError(f"StudyConfig.drug_effect[{name!r}] must be > -1 (a fraction); got {eff}")


@dataclass
class SessionTruth:
    """True parameters of one session."""

    subject: str
    session: str
    group: str
    hours_after_baseline: float
    injected_activity_bq: float
    regions: dict  # name -> RegionKinetics


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
    # Transaxially: a head (200 mm); axially: the scanner's field.
    axial = float(np.ptp(scanner.ring_z_mm)) + float(np.diff(scanner.ring_z_mm).mean() if scanner.num_rings > 1 else v)
    shape = (int(math.ceil(160 / v)), int(math.ceil(200 / v)), max(1, int(math.ceil(axial / v))))
    return ImageGrid(shape, v)


def _pet_json(config, truth, fs, fe, scan_date, images=False):
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
        "AcquisitionMode": "list mode",
        "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 0,
        "Units": "Bq/mL",
        "BodyPart": "Brain",
        "PharmaceuticalName": "study drug" if truth.group == "drug" else "placebo",
        "SimulationSeed": int(config.seed),
    }
    if images:
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
    """
    config = StudyConfig() if config is None else config
    if config.scanner is None:
        config = replace(config, scanner=Scanner.demo())
    config.validate()
    from petbind.recon.rawdata.schema import ExamInfo, ListmodeCorrections
    from petbind.recon.rawdata.hdf5 import ListmodeWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ph = load_brain_phantom() if phantom is None else phantom
    shifted = BrainPhantom(ph.labels, ph.label_table, ph.mu_map_per_mm, ph.affine.copy())
    shifted.affine[:3, 3] += np.asarray(config.head_offset_mm, dtype=float)
    grid = _study_grid(config)
    on_grid = resample_phantom(grid, shifted)
    missing = sorted(set(config.regions) - set(on_grid.label_table.values()))
    if missing:
        raise ValueError(f"StudyConfig.regions names regions that are not in the phantom: {missing}")
    active = [n for n in config.regions]
    basis = np.stack([on_grid.fractions[on_grid.index_of(n)] for n in active]).astype(np.float32)
    participants, sessions = study_truth(config)
    fs, fe = frame_times_s(config.frame_durations_s)
    scanner = config.scanner
    layout = SinogramLayout(scanner, config.num_radial, max_ring_difference=config.max_ring_difference)
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 2]))
    eff = random_crystal_efficiencies(scanner, rng, config.crystal_efficiency_spread)
    sim = ListmodeSimulator(
        layout, grid, on_grid.mu_map_per_mm, crystal_efficiencies=eff, tof=config.tof,
        scatter_fraction=config.scatter_fraction, randoms_fraction=config.randoms_fraction,
        resolution_fwhm_mm=config.resolution_fwhm_mm, sensitivity_cps_per_kbq=config.sensitivity_cps_per_kbq,
        device=config.device, quiet=config.quiet,
    )
    base_date = _dt.datetime(2026, 1, 5, 9, 0, 0)

    write_json(out / "dataset_description.json", {
        "Name": "petbind simulated [11C]AZ10419369 occupancy study",
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

    seeds = np.random.SeedSequence([int(config.seed), 3]).spawn(len(sessions))
    lam = decay_constant_per_s(C11_HALF_LIFE_S)
    for si, truth in enumerate(tqdm(sessions, desc="simulating sessions", disable=config.quiet)):
        sub_dir = out / truth.subject
        anat = sub_dir / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        if truth.session == SESSIONS[0]:
            img = nib.Nifti1Image(on_grid.labels.astype(np.uint8), grid.affine)
            img.header.set_xyzt_units("mm", "sec")
            _atomic_save_nifti(img, anat / f"{truth.subject}_atlas.nii.gz")
            _table(anat / f"{truth.subject}_atlas.tsv", atlas_rows, ["index", "name"])
            rows = [{"session_id": f"ses-{t.session}", "hours_after_baseline": t.hours_after_baseline,
                     "injected_activity_mbq": t.injected_activity_bq / 1e6} for t in by_subject[truth.subject]]
            _table(sub_dir / f"{truth.subject}_sessions.tsv", rows,
                   ["session_id", "hours_after_baseline", "injected_activity_mbq"])
        pet = sub_dir / f"ses-{truth.session}" / "pet"
        pet.mkdir(parents=True, exist_ok=True)
        stem = f"{truth.subject}_ses-{truth.session}"
        plasma = FengInput().scaled(truth.injected_activity_bq / 400e6)
        tacs = simulate_regional_tacs(truth.regions, fs, fe, model=config.model, plasma=plasma, reference=AZ10419369_REFERENCE)
        weights = np.stack([tacs.tacs[n] for n in active])
        scan_date = base_date + _dt.timedelta(hours=truth.hours_after_baseline)
        rng_ses = np.random.default_rng(seeds[si])
        with_images = config.write_images is not None
        write_json(pet / f"{stem}_pet.json", _pet_json(config, truth, fs, fe, scan_date, with_images))
        if with_images:
            frames = np.tensordot(weights.T, basis, axes=1)  # (F, x, y, z)
            frames = np.moveaxis(frames, 0, -1).astype(np.float32)
            if config.write_images == "noisy":
                t_mid = 0.5 * (fs + fe)
                scale = 1e4 * 300.0 / ((fe - fs) * np.exp(-lam * t_mid))
                sd = config.image_noise * np.sqrt(np.maximum(frames, 0.0) * scale)
                frames = (frames + sd * rng_ses.standard_normal(frames.shape)).astype(np.float32)
            img = nib.Nifti1Image(frames, grid.affine)
            img.header.set_xyzt_units("mm", "sec")
            _atomic_save_nifti(img, pet / f"{stem}_pet.nii.gz")
        if config.write_listmode:
            exam = ExamInfo(
                tracer="[11C]AZ10419369", isotope="C11", half_life_s=C11_HALF_LIFE_S,
                injection_time=scan_date.isoformat(), injected_activity_bq=truth.injected_activity_bq,
                scan_start_s=0.0, subject_id=truth.subject, description=f"simulated, ses-{truth.session}",
            )
            events = sim.simulate_listmode(BasisActivity(basis, weights), fs, fe, seed=seeds[si])
            singles_rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), 4, si]))
            _write_listmode(pet / f"{stem}_pet-listmode.h5", sim, events, exam, fs, fe, eff, on_grid, grid, config,
                            ListmodeWriter, ListmodeCorrections, singles_rng)
            if config.write_petsird:
                from petbind.recon.rawdata.convert import convert  # noqa: PLC0415 - PETSIRD only when asked for

                convert(pet / f"{stem}_pet-listmode.h5", pet / f"{stem}_pet-listmode.petsird", to="petsird",
                        quiet=True)
    return sessions


def _write_listmode(path, sim, events, exam, fs, fe, eff, on_grid, grid, config, writer_cls, corrections_cls,
                    singles_rng):
    """Stream the simulator's events into a listmode file; singles are added after the last event.

    The singles are recorded counts, as a scanner stores them: a Poisson draw
    (``singles_rng``) around the simulator's expected singles per frame.

    The writer takes corrections at creation, but the singles are only known
    once the simulator has calibrated (first event), so the events are first
    peeked at, then the file is opened.
    """
    first = next(events, None)
    singles = singles_rng.poisson(sim.singles_counts(fs, fe)).astype(np.float64)
    corrections = corrections_cls(
        crystal_efficiencies=eff,
        singles_block_edges_s=np.concatenate([fs, fe[-1:]]),
        singles_counts=singles,
        mu_map_per_mm=on_grid.mu_map_per_mm,
        mu_map_affine=grid.affine,
        # 1/κ: Bq/mL per unit of an image reconstructed with m = n ⊙ a as counts per
        # second per mm of line integral (before decay correction).
        calibration_factor=1.0 / sim.kappa,
    )
    with writer_cls(path, sim.layout.scanner, tof=config.tof, exam=exam, corrections=corrections) as w:
        chunk = first
        while chunk is not None:
            w.append(chunk.detector_ids, chunk.tof_bin, chunk.time_ms, chunk.is_prompt)
            chunk = next(events, None)
    stats = sim.frame_stats
    log.info(
        "%s: %d prompts (%d trues, %d scatter, %d randoms), %d delayeds",
        path.name, sum(s.prompts for s in stats), sum(s.trues for s in stats), sum(s.scatter for s in stats),
        sum(s.randoms for s in stats), sum(s.delayeds for s in stats),
    )
