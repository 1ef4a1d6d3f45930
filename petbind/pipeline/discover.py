"""Find and check a study's inputs before any reconstruction starts.

Layout of a raw study (BIDS-like; written by ``petbind-simulate``)::

    STUDY/participants.tsv                       participant_id, group
    STUDY/sub-XX/anat/sub-XX_atlas.nii.gz + .tsv reconstruction grid and regions
    STUDY/sub-XX/ses-YY/pet/sub-XX_ses-YY[_acq-A][_rec-R][_run-N]_pet-listmode.h5
                                                 or ..._pet-sinograms.h5 (multi-frame sinograms)
    STUDY/sub-XX/ses-YY/pet/sub-XX_ses-YY[...]_pet.json  FrameTimesStart, FrameDuration (s)

:func:`validate_study` opens every raw file, sidecar and atlas and checks
that every declared subject has every session, so a corrupt last file or a
missing session is reported before hours of reconstruction, not after.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petbind.core.decay import half_life_s
from petbind.core.files import read_json, read_table_tsv
from petbind.core.frames import Frames, check_scan_length
from petbind.pipeline.options import StudyInputError

__all__ = ["Session", "StudyPlan", "find_sessions", "read_participants", "read_session_frames", "load_atlas",
           "validate_study", "load_probseg", "RAW_SUFFIXES"]

log = logging.getLogger(__name__)

#: Raw data files a session may hold, by suffix, and their kind.
RAW_SUFFIXES = {"_pet-listmode.h5": "listmode", "_pet-sinograms.h5": "sinograms"}

_ENTITY = re.compile(r"_(acq|rec|run)-([A-Za-z0-9]+)")



@dataclass(frozen=True)
class Session:
    """One PET session of the study.

    Attributes
    ----------
    subject, session : str
        ``sub-XX`` and ``ses-YY``.
    raw : Path
        The raw data file (listmode or sinograms).
    kind : {"listmode", "sinograms"}
    sidecar : Path
        PET-BIDS JSON beside the raw file.
    atlas, atlas_tsv : Path
        Label image (the reconstruction grid) and label table.
    probseg : Path or None
        Optional 4-D tissue-fraction image beside the atlas
        (``sub-XX_atlas_probseg.nii.gz``, one volume per region of the label
        table, by increasing label index): partial-volume correction then models voxels that mix tissues.
    """

    subject: str
    session: str
    raw: Path
    kind: str
    sidecar: Path
    atlas: Path
    atlas_tsv: Path
    probseg: Path | None = None

    @property
    def stem(self):
        return f"{self.subject}_{self.session}"

    def out_dir(self, deriv_dir):
        return Path(deriv_dir) / self.subject / self.session / "pet"


@dataclass
class StudyPlan:
    """A checked study: its sessions and who is in which group."""

    study_dir: Path
    sessions: list
    groups: dict  # subject -> group
    participants: Path | None
    has_ground_truth: bool


def _entities(name):
    return dict(_ENTITY.findall(name))


def _raw_files(pet_dir):
    out = []
    for p in sorted(pet_dir.iterdir()):
        for suffix, kind in RAW_SUFFIXES.items():
            if p.name.endswith(suffix) and not p.name.startswith("."):
                out.append((p, kind, p.name[: -len(suffix)]))
    return out


def _choose_raw(pet_dir, subject, session, acq=None, run=None):
    """The one raw file of a session, honouring the BIDS entities ``acq``/``run``."""
    files = _raw_files(pet_dir)
    if acq is not None or run is not None:
        files = [f for f in files if (acq is None or _entities(f[0].name).get("acq") == acq)
                 and (run is None or _entities(f[0].name).get("run") == run)]
    # the same acquisition as listmode and as sinograms: the sinograms are already binned
    by_stem = {}
    for p, kind, stem in files:
        by_stem.setdefault(stem, []).append((p, kind))
    if not by_stem:
        return None
    if len(by_stem) > 1:
        names = sorted(p.name for p, _, _ in files)
        raise StudyInputError(
            f"{pet_dir}: {len(by_stem)} acquisitions in one session ({', '.join(names)}); "
            "choose one with --acq LABEL and/or --run N (BIDS entities)"
        )
    (stem, cands), = by_stem.items()
    cands.sort(key=lambda c: c[1] != "sinograms")
    if len(cands) > 1:
        log.info("%s: both %s; using %s", pet_dir, ", ".join(c[0].name for c in cands), cands[0][0].name)
    return stem, cands[0]


def find_sessions(study_dir, acq=None, run=None):
    """All sessions of a study with raw data, sorted by subject and session.

    Parameters
    ----------
    study_dir : str or Path
    acq, run : str, optional
        BIDS entities selecting one acquisition where a session holds several.

    Returns
    -------
    list of Session

    Raises
    ------
    StudyInputError
        When the folder is missing, holds no raw data, or a session holds
        several acquisitions that ``acq``/``run`` do not tell apart.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StudyInputError(f"{study_dir}: study folder not found")
    out = []
    for pet_dir in sorted(study_dir.glob("sub-*/ses-*/pet")):
        subject, session = pet_dir.parents[1].name, pet_dir.parent.name
        chosen = _choose_raw(pet_dir, subject, session, acq, run)
        if chosen is None:
            continue
        stem, (raw, kind) = chosen
        anat = study_dir / subject / "anat"
        probseg = anat / f"{subject}_atlas_probseg.nii.gz"
        out.append(Session(subject, session, raw, kind, pet_dir / f"{stem}_pet.json",
                           anat / f"{subject}_atlas.nii.gz", anat / f"{subject}_atlas.tsv",
                           probseg if probseg.exists() else None))
    if not out:
        raise StudyInputError(
            f"{study_dir}: no raw PET data found (expected sub-*/ses-*/pet/*{' or *'.join(RAW_SUFFIXES)})")
    return out


def read_participants(path, declared_groups, subjects, group_column="group"):
    """Group of every subject, checked against the declared groups.

    Parameters
    ----------
    path : Path
        ``participants.tsv``.
    declared_groups : sequence of str
        The groups the study has (``--groups``); exact spelling.
    subjects : sequence of str
        Subjects with data (``sub-XX``).

    Returns
    -------
    dict
        ``subject -> group``.

    Raises
    ------
    StudyInputError
        A subject with data but no row, a group that is not declared (a typo
        such as ``drugg`` or ``Drug`` would otherwise make a third group), a
        declared group without subjects, or a repeated subject.
    """
    try:
        _, rows = read_table_tsv(path, required=("participant_id", group_column))
    except (ValueError, FileNotFoundError) as exc:
        raise StudyInputError(str(exc)) from None
    groups = {}
    for i, r in enumerate(rows, start=2):
        pid = r["participant_id"]
        if pid in groups:
            raise StudyInputError(f"{path}: field 'participant_id' line {i}: {pid} appears twice")
        if r[group_column] not in declared_groups:
            raise StudyInputError(
                f"{path}: field '{group_column}' line {i}: {pid} is in group {r[group_column]!r}, which is not one "
                f"of the declared groups {list(declared_groups)} (set them with --groups)"
            )
        groups[pid] = r[group_column]
    missing = sorted(set(subjects) - set(groups))
    if missing:
        raise StudyInputError(f"{path}: field 'participant_id': subjects {missing} have data but no row")
    present = {groups[s] for s in subjects}
    empty = [g for g in declared_groups if g not in present]
    if empty:
        raise StudyInputError(f"{path}: field '{group_column}': declared group(s) {empty} have no subject with data")
    return {s: groups[s] for s in subjects}


def read_session_frames(session, frames_definition=None):
    """Frames of a session: ``--frames`` if given, else the sidecar's FrameTimesStart/FrameDuration.

    Returns
    -------
    frames : petbind.core.frames.Frames
    sidecar : dict
        The input sidecar (empty when ``frames_definition`` is given and there is none).

    Raises
    ------
    StudyInputError
        Missing or unreadable sidecar, missing or malformed timing fields.
    """
    sidecar = {}
    if session.sidecar.exists():
        try:
            sidecar = read_json(session.sidecar)
        except (OSError, ValueError) as exc:
            raise StudyInputError(str(exc)) from None
    elif frames_definition is None:
        raise StudyInputError(
            f"{session.sidecar}: sidecar missing; it must give FrameTimesStart and FrameDuration (s) for "
            f"{session.raw.name} (or pass --frames)"
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


def load_atlas(session):
    """The session's atlas (label image + table), refused with one line when unreadable."""
    from petbind.quant.io import load_atlas as _load

    for p in (session.atlas, session.atlas_tsv):
        if not p.exists():
            raise StudyInputError(f"{p}: atlas file missing (needed as reconstruction grid and for TACs of {session.stem})")
    try:
        return _load(session.atlas, session.atlas_tsv)
    except (ValueError, OSError, EOFError) as exc:
        raise StudyInputError(f"{session.atlas}: {exc}" if str(session.atlas) not in str(exc) else str(exc)) from None


def load_probseg(session, atlas):
    """Tissue fractions per region (name -> 3-D array) from the session's probseg file, or None.

    Raises
    ------
    StudyInputError
        A file that does not match the atlas grid and table, or fractions
        outside [0, 1] or summing to more than 1 in a voxel.
    """
    if session.probseg is None:
        return None
    import nibabel as nib

    path = session.probseg
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError) as exc:
        raise StudyInputError(f"{path}: not a readable NIfTI image ({' '.join(str(exc).split())})") from None
    names = atlas.region_names
    if data.ndim != 4 or data.shape[:3] != atlas.labels.shape or data.shape[3] != len(names):
        raise StudyInputError(f"{path}: shape {data.shape}; expected {atlas.labels.shape + (len(names),)} "
                              f"(one volume per region of {session.atlas_tsv.name}, by increasing label index)")
    if not np.allclose(img.affine, atlas.affine, atol=1e-3):
        raise StudyInputError(f"{path}: affine differs from the atlas {session.atlas.name}")
    if not np.all(np.isfinite(data)) or data.min() < -1e-6 or data.max() > 1 + 1e-4:
        raise StudyInputError(f"{path}: tissue fractions must be finite and within [0, 1]")
    if float(data.sum(axis=3).max()) > 1 + 1e-3:
        raise StudyInputError(f"{path}: the fractions of a voxel sum to more than 1")
    return {n: np.clip(data[..., k], 0.0, 1.0) for k, n in enumerate(names)}


def open_raw(session):
    """Open a session's raw file (header and corrections; events stay on disk)."""
    try:
        if session.kind == "listmode":
            from petbind.recon.rawdata.hdf5 import ListmodeReader

            return ListmodeReader(session.raw)
        from petbind.recon.rawdata.sinograms import SinogramReader

        return SinogramReader(session.raw)
    except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
        msg = " ".join(str(exc).split())
        raise StudyInputError(msg if str(session.raw) in msg else f"{session.raw}: {msg}") from None


def _check_raw(session, frames, options):
    raw = open_raw(session)
    exam = raw.exam
    hl = float(getattr(exam, "half_life_s", float("nan")))
    if not (np.isfinite(hl) and hl > 0):
        try:
            hl = half_life_s(exam.isotope, f"{session.raw}: field 'exam/isotope'")
        except ValueError as exc:
            raise StudyInputError(f"{exc}; and field 'exam/half_life_s' is missing") from None
    try:
        check_scan_length(frames.end_s[-1], hl, f"{session.sidecar} (FrameTimesStart/FrameDuration)",
                          getattr(exam, "isotope", ""))
    except ValueError as exc:
        raise StudyInputError(str(exc)) from None
    if session.kind == "sinograms" and options.frames is not None:
        raise StudyInputError(f"--frames: {session.raw} holds sinograms binned in fixed frames; they cannot be "
                              "re-framed (leave --frames out)")
    if session.kind == "listmode":
        if raw.num_events == 0:
            raise StudyInputError(f"{session.raw}: field 'listmode': the file holds no events")
        first, last = raw.time_range_ms()
        scan_end_s = last / 1000.0
        if frames.start_s[0] > scan_end_s:
            raise StudyInputError(
                f"{session.sidecar}: the first frame starts at {frames.start_s[0]:g} s, after the last event of "
                f"{session.raw.name} ({scan_end_s:g} s)")
    corr = raw.corrections
    if corr is None or corr.mu_map_per_mm is None:
        raise StudyInputError(f"{session.raw}: field 'corrections/mu_map_per_mm' is missing; attenuation correction "
                              "needs a μ-map")
    if corr.crystal_efficiencies is None:
        raise StudyInputError(f"{session.raw}: field 'corrections/crystal_efficiencies' is missing; normalisation "
                              "needs them")
    return raw


def validate_study(study_dir, options):
    """Open and check every input of a study before any reconstruction.

    Parameters
    ----------
    study_dir : str or Path
    options : PipelineOptions

    Returns
    -------
    StudyPlan

    Raises
    ------
    StudyInputError
        The first problem found, naming the file and the field.
    """
    study_dir = Path(study_dir)
    sessions = find_sessions(study_dir, options.acq, options.run)
    subjects = sorted({s.subject for s in sessions})
    participants = study_dir / "participants.tsv"
    groups = {}
    if participants.exists():
        groups = read_participants(participants, options.groups, subjects)
        # a subject folder without any session data is a subject that was silently left out
        folders = sorted(p.name for p in study_dir.glob("sub-*") if p.is_dir())
        empty = sorted(set(folders) - set(subjects))
        if empty:
            raise StudyInputError(f"{study_dir}: subject folder(s) {empty} hold no raw PET data")
    else:
        log.warning("%s: no participants.tsv; sessions are reconstructed and fitted, the group stage is skipped",
                    study_dir)
    wanted = (options.baseline_session, options.post_session)
    have = {}
    for s in sessions:
        have.setdefault(s.subject, set()).add(s.session.removeprefix("ses-"))
    for subject in subjects:
        missing = [w for w in wanted if w not in have[subject]]
        if missing and participants.exists():
            raise StudyInputError(
                f"{study_dir / subject}: session(s) {['ses-' + m for m in missing]} missing; every subject needs "
                f"ses-{options.baseline_session} and ses-{options.post_session}")
    atlases = {}
    for s in sessions:
        frames, _ = read_session_frames(s, options.frames)
        raw = _check_raw(s, frames, options)
        if s.kind == "sinograms":
            stored = raw.frames()
            if options.frames is None and (len(stored) != len(frames) or not np.allclose(stored.start_s, frames.start_s)
                                           or not np.allclose(stored.end_s, frames.end_s)):
                raise StudyInputError(f"{s.sidecar}: fields 'FrameTimesStart'/'FrameDuration' disagree with the "
                                      f"frames stored in {s.raw.name}")
        if s.subject not in atlases:
            atlas = load_atlas(s)
            names = set(atlas.region_names)
            if options.reference not in names:
                raise StudyInputError(f"{s.atlas_tsv}: reference region '{options.reference}' is not in the atlas; "
                                      f"available: {sorted(names)}")
            unknown = sorted(set(options.regions or ()) - names)
            if unknown:
                raise StudyInputError(f"{s.atlas_tsv}: --regions {unknown} are not in the atlas")
            if not np.any(atlas.labels == atlas.index_of(options.reference)):
                raise StudyInputError(f"{s.atlas}: reference region '{options.reference}' has no voxels")
            load_probseg(s, atlas)
            atlases[s.subject] = atlas
    return StudyPlan(study_dir, sessions, groups, participants if participants.exists() else None,
                     (study_dir / "ground_truth.tsv").exists())
