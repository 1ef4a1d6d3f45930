"""Run a study: check every input, process the sessions (serially or on Dask), then the group stage.

Sessions are independent tasks.  ``workers=N`` starts a local
``dask.distributed`` cluster of N single-threaded worker processes;
``scheduler=ADDRESS`` joins an existing cluster (how users reach Slurm/PBS
through dask-jobqueue, or several GPUs through dask-cuda).  The results do
not depend on how the run is spread: every session's computation is the same
deterministic function of its inputs and settings.

A session that fails is reported with its file and the reason; the other
sessions finish, the group stage is skipped, and the run ends with a
non-zero status listing the failures.

Every derived file records its stage key (:mod:`petbind.pipeline.options`);
a rerun redoes exactly the stages whose key changed or whose output is
missing or unreadable.  A lock on the derivatives folder refuses a second
run on the same folder.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from petbind.core.files import atomic_output, read_json, sidecar_path_for, write_json
from petbind.pipeline.discover import load_atlas, load_probseg, validate_study
from petbind.pipeline.options import PipelineOptions, StudyInputError, provenance, stage_key
from petbind.pipeline.quantify import session_regions, write_fit, write_maps, write_tacs
from petbind.pipeline.reconstruct import reconstruct_session

__all__ = ["SessionOutcome", "StudyResult", "process_session", "run_pipeline", "study_lock"]

log = logging.getLogger(__name__)


@dataclass
class SessionOutcome:
    """What happened to one session."""

    subject: str
    session: str
    status: str  # "done", "reused" or "failed"
    stages: dict = field(default_factory=dict)  # stage -> "done" | "reused"
    error: str | None = None
    file: str | None = None
    seconds: float = 0.0


@dataclass
class StudyResult:
    """The outcome of :func:`run_pipeline`."""

    sessions: list
    group: dict
    failures: list
    report: Path | None = None


class SessionFailure(RuntimeError):
    """A session could not be processed (carries the file that caused it)."""


@contextmanager
def study_lock(deriv_dir):
    """Hold an exclusive lock on a derivatives folder; refuse when another run holds it."""
    path = Path(deriv_dir) / ".petbind.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StudyInputError(f"{deriv_dir}: another petbind-study run is using this folder "
                                      f"(lock {path.name}); wait for it or choose another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _stored_key(path):
    """The stage key recorded in a file's JSON sidecar (None when missing or unreadable)."""
    side = sidecar_path_for(path)
    if not Path(path).exists() or not side.exists():
        return None
    try:
        return read_json(side).get("PipelineProvenance", {}).get("Key")
    except (OSError, ValueError):
        return None


def _load_pet(pet_path):
    from petbind.quant.io import load_pet

    return load_pet(pet_path, sidecar_path_for(pet_path))


def process_session(session, deriv_dir, options, progress=True):
    """Reconstruction, TACs, regional fit (and maps) of one session, redoing only stale stages.

    Parameters
    ----------
    session : petbind.pipeline.discover.Session
    deriv_dir : Path
    options : PipelineOptions
    progress : bool

    Returns
    -------
    SessionOutcome
    """
    t0 = time.time()
    out = session.out_dir(deriv_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = session.stem
    pet_path = out / f"{stem}_rec-osem_pet.nii.gz"
    tacs_path = out / f"{stem}_desc-{options.pvc}pvc_tacs.tsv"
    fit_path = out / f"{stem}_desc-{options.model}_bpnd.tsv"
    atlas = load_atlas(session)
    regions, targets = session_regions(atlas, options)
    stages = {}

    inputs = [session.raw, session.sidecar, session.atlas, session.atlas_tsv]
    if session.probseg is not None:
        inputs.append(session.probseg)
    recon_key, rec = stage_key("recon", options.stage_settings("recon"), [p for p in inputs if p.exists()])
    pet = None
    if not options.force and _stored_key(pet_path) == recon_key:
        try:
            pet = _load_pet(pet_path)
            stages["recon"] = "reused"
        except (ValueError, OSError, EOFError) as exc:
            log.warning("%s: unreadable (%s); reconstructing again", pet_path, " ".join(str(exc).split())[:200])
    if pet is None:
        reconstruct_session(session, pet_path, options, atlas, regions=regions, progress=progress,
                            provenance=provenance(recon_key, rec), key=recon_key,
                            measure_resolution=options.pvc != "none" and options.pvc_fwhm_mm is None)
        pet = _load_pet(pet_path)
        stages["recon"] = "done"

    atlas_files = [p for p in (session.atlas, session.atlas_tsv, session.probseg) if p is not None]
    tacs_key, rec = stage_key("tacs", options.stage_settings("tacs"), atlas_files, recon_key)
    table = None
    if not options.force and stages["recon"] == "reused" and _stored_key(tacs_path) == tacs_key:
        try:
            from petbind.quant.io import read_tacs_tsv

            table = read_tacs_tsv(tacs_path)
            stages["tacs"] = "reused"
        except (ValueError, OSError):
            table = None
    if table is None:
        table = write_tacs(pet, atlas, regions, tacs_path, options, provenance(tacs_key, rec), progress=False,
                           fractions=load_probseg(session, atlas))
        stages["tacs"] = "done"

    fit_key, rec = stage_key("fit", options.stage_settings("fit"), (), tacs_key)
    if options.force or stages["tacs"] == "done" or _stored_key(fit_path) != fit_key:
        write_fit(table, read_json(sidecar_path_for(tacs_path)), targets, fit_path, options,
                  provenance(fit_key, rec), tacs_path)
        stages["fit"] = "done"
    else:
        stages["fit"] = "reused"

    if options.maps:
        prefix = out / f"{stem}_desc-{options.model}"
        map_path = Path(f"{prefix}_bpnd.nii.gz")
        maps_key, rec = stage_key("maps", options.stage_settings("maps"), [session.atlas, session.atlas_tsv],
                                  recon_key)
        if options.force or stages["recon"] == "done" or _stored_key(map_path) != maps_key:
            write_maps(pet, atlas, targets, prefix, options, provenance(maps_key, rec), progress=False)
            stages["maps"] = "done"
        else:
            stages["maps"] = "reused"
    status = "reused" if all(v == "reused" for v in stages.values()) else "done"
    if status == "reused":
        log.info("reuse %s %s: every stage is current (use --force to redo)", session.subject, session.session)
    return SessionOutcome(session.subject, session.session, status, stages, seconds=time.time() - t0)


def _process_safely(session, deriv_dir, options, progress):
    """:func:`process_session` that reports a failure instead of raising (for Dask and serial runs alike)."""
    try:
        return process_session(session, deriv_dir, options, progress)
    except Exception as exc:  # noqa: BLE001 - one session's failure must not stop the others
        msg = " ".join(str(exc).split()) or exc.__class__.__name__
        log.debug("%s failed:\n%s", session.stem, traceback.format_exc())
        return SessionOutcome(session.subject, session.session, "failed", error=msg, file=str(session.raw))


def _run_sessions(sessions, deriv_dir, options, progress):
    if options.workers is None and options.scheduler is None:
        return [_process_safely(s, deriv_dir, options, progress)
                for s in tqdm(sessions, desc="sessions", unit="session", disable=not progress)]
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if options.workers is not None:
        # one thread per worker: the projector kernels are OpenMP-parallel themselves
        cluster = LocalCluster(n_workers=int(options.workers), threads_per_worker=1, processes=True,
                               dashboard_address=None)
    try:
        with Client(cluster if cluster is not None else options.scheduler) as client:
            futures = [client.submit(_process_safely, s, deriv_dir, options, False, pure=False) for s in sessions]
            outcomes = {}
            bar = tqdm(total=len(futures), desc="sessions", unit="session", disable=not progress)
            for fut in as_completed(futures):
                o = fut.result()
                outcomes[(o.subject, o.session)] = o
                bar.update()
            bar.close()
    finally:
        if cluster is not None:
            cluster.close()
    return [outcomes[(s.subject, s.session)] for s in sessions]


def _group_stage(plan, deriv_dir, options, outcomes, progress):
    from petbind.quant.compare import run_study

    group_dir = Path(deriv_dir) / "group"
    fits = sorted(Path(deriv_dir).glob(f"sub-*/ses-*/pet/*_desc-{options.model}_bpnd.tsv"))
    key, rec = stage_key("group", options.stage_settings("group"), [plan.participants, *fits])
    marker = group_dir / "provenance.json"
    if not options.force and marker.exists():
        try:
            if read_json(marker).get("Key") == key:
                log.info("group stage unchanged (key %s)", key)
                return {"reused": marker}
        except (OSError, ValueError):
            pass
    with atomic_output(Path(deriv_dir) / "participants.tsv") as tmp:
        tmp.write_bytes(Path(plan.participants).read_bytes())
    kwargs = dict(baseline_session=options.baseline_session, post_session=options.post_session,
                  n_permutations=options.n_permutations, voxelwise=options.maps, progress=progress,
                  result_pattern=f"*_desc-{options.model}_bpnd.tsv")
    try:
        out = run_study(deriv_dir, group_dir, groups=tuple(options.groups), **kwargs)
    except TypeError:  # quant without declared groups (checked up front in discover anyway)
        out = run_study(deriv_dir, group_dir, **kwargs)
    write_json(marker, provenance(key, rec))
    return out


def run_pipeline(study_dir, deriv_dir, options=None):
    """Run the whole study: check inputs, every session, the group comparison and the report.

    Parameters
    ----------
    study_dir : str or Path
        Raw study (see :mod:`petbind.pipeline.discover`).
    deriv_dir : str or Path
        Derivatives folder (created).
    options : PipelineOptions, optional

    Returns
    -------
    StudyResult

    Raises
    ------
    StudyInputError
        Bad input found before any reconstruction (nothing is written then).
    """
    options = PipelineOptions() if options is None else options
    options.validate()
    study_dir, deriv_dir = Path(study_dir), Path(deriv_dir)
    if deriv_dir.exists() and not deriv_dir.is_dir():
        raise StudyInputError(f"{deriv_dir}: --out exists and is not a folder")
    if deriv_dir.resolve() == study_dir.resolve():
        raise StudyInputError(f"{deriv_dir}: --out must not be the raw study folder")
    plan = validate_study(study_dir, options)
    progress = not options.quiet
    deriv_dir.mkdir(parents=True, exist_ok=True)
    with study_lock(deriv_dir):
        write_json(deriv_dir / "dataset_description.json", {
            "Name": "petbind study pipeline derivatives", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "petbind-study", "Settings": options.to_dict()}],
            "SourceDatasets": [{"URL": str(study_dir.resolve())}],
        })
        outcomes = _run_sessions(plan.sessions, deriv_dir, options, progress)
        failures = [o for o in outcomes if o.status == "failed"]
        for o in failures:
            log.error("%s %s failed: %s (%s)", o.subject, o.session, o.error, o.file)
        group = {}
        if failures:
            log.error("group stage skipped: %d session(s) failed", len(failures))
        elif plan.participants is not None:
            group = _group_stage(plan, deriv_dir, options, outcomes, progress)
        report = None
        try:
            from petbind.pipeline.report import write_report

            report = write_report(study_dir, deriv_dir, options, outcomes, plan)
        except Exception as exc:  # noqa: BLE001 - a report problem must not hide the results
            log.error("report.html not written: %s", " ".join(str(exc).split()))
            log.debug("report failure:\n%s", traceback.format_exc())
    return StudyResult(outcomes, group, failures, report)
