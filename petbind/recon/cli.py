"""``petbind-recon``: reconstruct a raw PET file into a NIfTI image with a PET-BIDS sidecar.

::

    petbind-recon INPUT --out OUT.nii.gz [--iterations N] [--subsets M] [--span S]
                  [--max-ring-difference D] [--psf-fwhm-mm F] [--frames SPEC]
                  [--device {auto,cpu,gpu}] [--quiet]

``INPUT`` is any of

* a petbind HDF5 listmode or sinogram file (``petbind.recon.rawdata.hdf5``);
* a PETSIRD binary file (read with :class:`petbind.recon.rawdata.petsird_io.PetsirdReader`);
* a STIR Interfile projection-data header (``.hs``);
* a Siemens mMR listmode header (``.l.hdr`` or ``.l.hdr.STIR``).

Listmode is histogrammed frame by frame (``--frames``, default one frame over
the whole acquisition) into a :class:`~petbind.recon.geometry.SinogramLayout`
of ``--span`` and ``--max-ring-difference`` and reconstructed with
:class:`~petbind.recon.osem.SinogramOSEM` (view subsets).  Sinogram inputs are
reconstructed in their own layout; arc-corrected or view-mashed STIR data with
STIR's LOR per bin.

Corrections are applied when the input provides them, and the log and the
JSON sidecar say which could not be: normalisation (crystal efficiencies or a
normalisation sinogram), attenuation (μ-map or attenuation sinogram), randoms
(delayed coincidences), scatter (a scatter sinogram), decay (half-life), dead
time (alive fractions) and calibration (calibration factor; without one the
image is in arbitrary units, counts / s per mm of LOR).

Output: a 3-D NIfTI for one frame, 4-D ``(x, y, z, t)`` for several, in
petbind's scanner frame, which is RAS+ for a head-first supine patient
(looking into the gantry from the bed: ``+x`` left, ``+y`` up, ``+z`` into the
gantry; see ``docs/formats.md``, "petbind-recon output");
the JSON sidecar beside it has the PET-BIDS fields.

Bad input gives one line on stderr naming the file and the field, and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

__all__ = ["main", "build_parser", "open_input", "reconstruct"]

log = logging.getLogger("petbind.recon.cli")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class InputError(ValueError):
    """Bad input: reported as one line and exit status 2."""


@dataclass
class Source:
    """A reconstruction input, whatever its format."""

    path: str
    kind: str  # "listmode", "sinogram" or "lors"
    fmt: str
    scanner: object = None
    tof: object = None
    exam: object = None
    reader: object = None
    corrections: object = None
    layout: object = None
    prompts: Optional[np.ndarray] = None
    delayeds: Optional[np.ndarray] = None
    scatter: Optional[np.ndarray] = None
    normalisation: Optional[np.ndarray] = None
    attenuation: Optional[np.ndarray] = None
    measured: Optional[np.ndarray] = None
    lor_start: Optional[np.ndarray] = None
    lor_end: Optional[np.ndarray] = None
    frame_start_s: float = 0.0
    frame_duration_s: float = float("nan")
    frames: object = None  # sinogram input: petbind.core.frames.Frames of the stored frames
    default_span: int = 1
    manufacturer: str = "n/a"
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def detect_format(path):
    """``"h5"``, ``"petsird"``, ``"mmr"`` or ``"interfile"`` from a file's content.

    Raises
    ------
    InputError
        For a missing file or an unknown format.
    """
    from petbind.recon.rawdata.mmr import is_mmr_listmode_header  # noqa: PLC0415

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_HDF5_SIGNATURE):
        return "h5"
    try:
        from petsird._binary import MAGIC_BYTES  # noqa: PLC0415

        if head.startswith(MAGIC_BYTES):
            return "petsird"
    except ImportError:
        pass
    if head.lstrip().upper().startswith(b"!INTERFILE"):
        return "mmr" if is_mmr_listmode_header(path) else "interfile"
    raise InputError(
        f"{path}: not a petbind HDF5, PETSIRD, STIR Interfile (.hs) or Siemens mMR listmode header (.l.hdr) file "
        f"(first bytes {head[:8]!r})"
    )


def open_input(path):
    """Open any supported input as a :class:`Source`.

    Raises
    ------
    InputError
        Naming the file and the field.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    try:
        if fmt == "h5":
            return _open_h5(path)
        if fmt == "petsird":
            from petbind.recon.rawdata.petsird_io import PetsirdReader  # noqa: PLC0415

            r = PetsirdReader(path)
            return Source(path, "listmode", "PETSIRD", r.scanner, r.tof, r.exam, r, r.corrections)
        if fmt == "mmr":
            from petbind.recon.rawdata.mmr import MMRListmode  # noqa: PLC0415

            r = MMRListmode(path)
            return Source(path, "listmode", "Siemens mMR listmode", r.scanner, None, r.exam, r, None,
                          default_span=11, manufacturer="Siemens")
        return _open_interfile(path)
    except (ValueError, TypeError, OSError) as exc:
        raise InputError(str(exc) if path in str(exc) else f"{path}: {exc}") from None


def _open_h5(path):
    import h5py  # noqa: PLC0415

    from petbind.recon.rawdata.hdf5 import ListmodeReader
    from petbind.recon.rawdata.sinograms import read_sinograms_h5

    with h5py.File(path, "r") as f:
        kind = f.attrs.get("petbind_kind", b"")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind == "listmode":
        r = ListmodeReader(path)
        return Source(path, "listmode", "petbind HDF5 listmode", r.scanner, r.tof, r.exam, r, r.corrections)
    if kind == "sinograms":
        from petbind.core.frames import Frames  # noqa: PLC0415

        s = read_sinograms_h5(path)
        if s.prompts is None:
            raise InputError(f"{path}: field 'sinograms/prompts' is missing; nothing to reconstruct")
        return Source(path, "sinogram", "petbind HDF5 sinograms", s.layout.scanner, s.tof, s.exam, layout=s.layout,
                      prompts=s.prompts, delayeds=s.delayeds, scatter=s.scatter, normalisation=s.normalisation,
                      attenuation=s.attenuation, corrections=getattr(s, "corrections", None),
                      frames=Frames.from_edges(s.frame_start_s, s.frame_end_s, f"{path}: field 'frames'"))
    raise InputError(f"{path}: field 'petbind_kind' is {kind!r}; expected 'listmode' or 'sinograms'")


def _open_interfile(path):
    from petbind.recon.rawdata.interfile import read_interfile_header, read_interfile_sinogram  # noqa: PLC0415

    h = read_interfile_header(path)
    if str(h.get("pet data type", "")).lower() == "image" or str(h.get("number of dimensions", "")) == "3":
        raise InputError(f"{path}: field '!PET data type' says this is an image; petbind-recon needs projection data")
    s = read_interfile_sinogram(path)
    src = Source(path, "sinogram" if s.layout is not None else "lors", "STIR Interfile", s.projdata.scanner(), s.tof,
                 layout=s.layout, prompts=s.data[None], measured=s.measured)  # one frame
    if s.layout is None:
        src.lor_start, src.lor_end = s.lor_endpoints_mm()
    dur = h.get("image duration (sec)[1]")
    start = h.get("image relative start time (sec)[1]")
    try:
        src.frame_duration_s = float(dur) if dur not in (None, "") else float("nan")
        src.frame_start_s = float(start) if start not in (None, "") else 0.0
    except ValueError:
        raise InputError(f"{path}: field 'image duration (sec)[1]' / 'image relative start time (sec)[1]' is not a number") from None
    dur_ok = math.isfinite(src.frame_duration_s) and src.frame_duration_s > 0
    src.frames = _single_frame(src.frame_start_s, src.frame_duration_s if dur_ok else 1.0)
    if not dur_ok:
        src.notes.append("no frame duration in the input: taken as 1 s")
    isotope = str(h.get("radionuclide name[1]", h.get("isotope name", "")) or "")
    half = h.get("radionuclide halflife (sec)[1]", h.get("isotope gamma halflife (sec)"))
    try:
        half_life = float(half) if half not in (None, "") else float("nan")
    except ValueError:
        raise InputError(f"{path}: field 'radionuclide halflife (sec)[1]' is {half!r}; expected a number") from None
    if isotope or math.isfinite(half_life):
        from petbind.recon.rawdata.schema import ExamInfo

        src.exam = ExamInfo(tracer=str(h.get("radiopharmaceutical", "") or ""), isotope=isotope, half_life_s=half_life)
    applied = h.get("applied corrections") or []
    applied = [str(c).strip().lower() for c in (applied if isinstance(applied, list) else [applied])]
    src.notes.append(f"STIR 'applied corrections': {', '.join(a for a in applied if a) or 'none'}")
    return src


# ------------------------------------------------------------------------------------------------
# geometry choices
# ------------------------------------------------------------------------------------------------
def default_grid(scanner, voxel_size_mm=None, fov_mm=None):
    """Image grid centred on the scanner.

    Transaxial voxels of the crystal pitch (``2 pi R / N``), axial voxels of
    the ring spacing (one plane per ring), a transaxial field of view of
    ``fov_mm`` (default ``1.7 R``, the usual patient port).
    """
    from petbind.recon.geometry import ImageGrid  # noqa: PLC0415

    r = scanner.radius_mm
    spacing = float(np.diff(scanner.ring_z_mm).mean()) if scanner.num_rings > 1 else 2 * math.pi * r / scanner.crystals_per_ring
    if voxel_size_mm is None:
        pitch = 2 * math.pi * r / scanner.crystals_per_ring
        vox = np.array([pitch, pitch, spacing])
    else:
        vox = np.resize(np.asarray(voxel_size_mm, dtype=float), 3)
    fov = 1.7 * r if fov_mm is None else float(fov_mm)
    nxy = int(math.ceil(fov / vox[0]))
    nxy += 1 - nxy % 2
    nz = max(1, int(round((np.ptp(scanner.ring_z_mm) + spacing) / vox[2])))
    return ImageGrid((nxy, nxy, nz), vox)


def default_num_radial(scanner, grid):
    """Odd number of radial bins whose LORs cover the grid's transaxial extent."""
    n = scanner.crystals_per_ring
    half = 0.5 * math.hypot(grid.shape[0] * grid.voxel_size_mm[0], grid.shape[1] * grid.voxel_size_mm[1])
    k = math.ceil(n / math.pi * math.asin(min(1.0, half / scanner.radius_mm)))
    return int(min(2 * k + 1, n - 1))


# ------------------------------------------------------------------------------------------------
# reconstruction
# ------------------------------------------------------------------------------------------------
def _frames_for(src, spec):
    from petbind.core.frames import parse_frames

    if spec:
        try:
            return parse_frames(spec)
        except ValueError as exc:
            raise InputError(f"--frames {spec!r}: {exc}") from None
    # one frame over the whole acquisition: find its end
    last = 0.0
    reader = src.reader
    if hasattr(reader, "time_range_ms"):
        last = reader.time_range_ms()[1]
    elif hasattr(reader, "scan"):
        last = float(reader.scan().last_time_ms)
    else:
        for chunk in reader.chunks():
            if len(chunk):
                last = max(last, float(chunk.time_ms[-1]))
    last = 0.0 if not math.isfinite(last) else last
    # events carry whole-ms times: the frame must include the last ms
    return _single_frame(0.0, math.floor(last) / 1000.0 + 0.001)


def _single_frame(start_s, duration_s):
    from petbind.core.frames import Frames

    return Frames([str(round(float(start_s), 6))], [str(round(float(duration_s), 6))])


def reconstruct(src, out, iterations=3, subsets=8, span=None, max_ring_difference=None, psf_fwhm_mm=None,
                frames=None, device="auto", voxel_size_mm=None, fov_mm=None, num_radial=None, progress=True):
    """Reconstruct ``src`` and write ``out`` (NIfTI) with its JSON sidecar.

    Returns
    -------
    dict
        The sidecar.
    """
    from petbind.core.device import to_numpy  # noqa: PLC0415
    from petbind.recon.geometry import SinogramLayout  # noqa: PLC0415
    from petbind.core.decay import decay_constant_per_s, decay_integral
    from petbind.recon.listmode import histogram_listmode
    from petbind.recon.osem import SinogramOSEM, osem  # noqa: PLC0415
    from petbind.recon.projector import SinogramProjector  # noqa: PLC0415
    from petbind.recon.system import LORProjector, SystemModel
    from petbind.recon.corrections import attenuation_factors, normalisation_factors, resample_to_grid

    grid = default_grid(src.scanner, voxel_size_mm, fov_mm)
    applied, missing = {}, {}
    exam = src.exam
    half_life = float(getattr(exam, "half_life_s", float("nan"))) if exam is not None else float("nan")
    scan_start = float(getattr(exam, "scan_start_s", 0.0)) if exam is not None else 0.0
    corr = src.corrections
    cal = float(getattr(corr, "calibration_factor", 1.0)) if corr is not None else 1.0
    kappa = 1.0 / cal
    if cal != 1.0:
        applied["Calibration"] = f"1 / calibration factor ({cal:g})"
        units = "Bq/mL"
    else:
        missing["Calibration"] = "no calibration factor in the input: image in counts / s per mm of LOR"
        units = "arbitrary"

    if src.kind == "listmode":
        span = src.default_span if span is None else int(span)
        mrd = src.scanner.num_rings - 1 if max_ring_difference is None else int(max_ring_difference)
        if src.fmt == "Siemens mMR listmode" and max_ring_difference is None:
            mrd = src.reader.max_ring_difference
        nr = default_num_radial(src.scanner, grid) if num_radial is None else int(num_radial)
        try:
            layout = SinogramLayout(src.scanner, nr, mrd, span)
        except ValueError as exc:
            raise InputError(f"--span / --max-ring-difference: {exc}") from None
        frames_obj = _frames_for(src, frames)
    else:
        layout = src.layout
        if span is not None or max_ring_difference is not None:
            log.warning("%s: --span / --max-ring-difference are ignored for sinogram input (the file's layout is used)", src.path)
        if frames:
            raise InputError(f"--frames {frames!r}: {src.path} holds sinograms binned in fixed frames; re-framing "
                             "needs listmode input")
        frames_obj = src.frames
        for note in src.notes:
            if note.startswith("no frame duration"):
                missing["FrameDuration"] = note

    # multiplicative factors, the same for every frame (per-frame scalars go on the data)
    tof = src.tof
    if src.kind == "lors":
        m = np.ones(src.prompts.shape[1:4], np.float32)
        missing["Normalisation"] = "no normalisation in a STIR Interfile sinogram"
        missing["Attenuation"] = "no attenuation factors in a STIR Interfile sinogram"
    else:
        m = layout.bin_mask().astype(np.float32)
        if src.measured is not None:
            m *= src.measured
        if corr is not None and getattr(corr, "crystal_efficiencies", None) is not None:
            m *= normalisation_factors(layout, corr.crystal_efficiencies)
            applied["Normalisation"] = "crystal-efficiency products from the input"
        elif src.normalisation is not None:
            m *= np.asarray(src.normalisation, np.float32)
            applied["Normalisation"] = "normalisation sinogram from the input"
        else:
            missing["Normalisation"] = "no crystal efficiencies or normalisation sinogram in the input"
        if corr is not None and getattr(corr, "mu_map_per_mm", None) is not None:
            mu = resample_to_grid(corr.mu_map_per_mm, corr.mu_map_affine, grid)
            m *= np.asarray(to_numpy(attenuation_factors(mu, SinogramProjector(layout, grid, device=device))), np.float32)
            applied["Attenuation"] = "measured μ-map from the input, exp(-P μ)"
        elif src.attenuation is not None:
            m *= np.asarray(src.attenuation, np.float32)
            applied["Attenuation"] = "attenuation sinogram from the input"
        else:
            missing["Attenuation"] = "no μ-map or attenuation sinogram in the input"
    m *= np.float32(kappa)

    if src.kind == "lors":
        nv = src.prompts.shape[2]
        sets = [np.arange(k, nv, subsets) for k in range(min(subsets, nv))]
        models = [SystemModel(LORProjector(src.lor_start[:, v], src.lor_end[:, v], grid, tof=tof, device=device),
                              None, None, resolution=psf_fwhm_mm, grid=grid) for v in sets]
        rec = None
    else:
        rec = SinogramOSEM(layout, grid, tof=tof, multiplicative=m, resolution_fwhm_mm=psf_fwhm_mm,
                           num_subsets=min(subsets, layout.num_views), device=device)
        models, sets = rec.models, rec.subsets
    xp = models[0].projector.xp if hasattr(models[0].projector, "xp") else np
    sens = rec.sensitivities() if rec is not None else [mdl.sensitivity(xp=xp) for mdl in models]
    total_sens = float(sum(float(xp.sum(s)) for s in sens))

    images = np.zeros(grid.shape + (len(frames_obj),), np.float32)
    stats = []
    dead_time = None
    if corr is not None and getattr(corr, "alive_fractions", None) is not None:
        edges = np.asarray(corr.alive_block_edges_s, float)
        lo = np.maximum(edges[None, :-1], frames_obj.start_s[:, None])
        hi = np.minimum(edges[None, 1:], frames_obj.end_s[:, None])
        w = np.clip(hi - lo, 0, None)
        alive = (w @ np.asarray(corr.alive_fractions, float)) / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
        dead_time = alive.mean(axis=1) ** 2
        applied["DeadTime"] = "frame mean live fraction squared, from the input's alive blocks"
    else:
        missing["DeadTime"] = "no dead-time information in the input"
    if src.kind == "listmode":
        applied["Randoms"] = "delayed coincidences of each frame (additive term)"
        missing["Scatter"] = "no scatter estimate for listmode input in petbind-recon (use petbind-study)"
    else:
        if src.delayeds is not None:
            applied["Randoms"] = "delayeds sinogram from the input (additive term)"
        else:
            missing["Randoms"] = "no delayeds or randoms in the input"
        if src.scatter is not None:
            applied["Scatter"] = "scatter sinogram from the input (additive term)"
        else:
            missing["Scatter"] = "no scatter sinogram in the input"
    decay = math.isfinite(half_life) and half_life > 0
    if decay:
        applied["Decay"] = f"to injection (half-life {half_life:g} s, scan start {scan_start:g} s after injection)"
    else:
        missing["Decay"] = "no half-life in the input: not decay corrected"
    for name, why in missing.items():
        log.warning("%s: %s correction not applied: %s", src.path, name, why)

    bar = tqdm(total=len(frames_obj), desc="frames", unit="frame", disable=not progress or len(frames_obj) == 1, leave=False)
    for k, (fs, fe) in enumerate(frames_obj):
        if decay:
            d = decay_integral(scan_start + fs, scan_start + fe, decay_constant_per_s(half_life))
        else:
            d = fe - fs
        if dead_time is not None:
            d *= float(dead_time[k])
        if src.kind == "listmode":
            h = histogram_listmode(src.reader, layout, frames=frames_obj.frame(k), tof=tof is not None,
                                   device="gpu" if getattr(models[0].projector, "device", "cpu") == "gpu" else "cpu",
                                   progress=progress)
            prompts = h.prompts[0]
            delayeds = h.delayeds[0].sum(axis=-1) if tof is not None else h.delayeds[0]
            additive = delayeds.astype(np.float32)
            st = {"frame": k, "prompts": int(h.num_prompts[0]), "delayeds": int(h.num_delayeds[0]),
                  "outside_layout": [int(v) for v in h.num_outside_layout[0]]}
        else:
            prompts = np.asarray(src.prompts[k], np.float32)
            additive = None
            if src.delayeds is not None:
                additive = np.asarray(src.delayeds[k], np.float32)
                if tof is not None and additive.ndim == prompts.ndim:
                    additive = additive.sum(axis=-1)
            if src.scatter is not None:
                sc = np.asarray(src.scatter[k], np.float32)
                sc = sc.sum(axis=-1) if tof is not None and sc.ndim == prompts.ndim else sc
                additive = sc if additive is None else additive + sc
            st = {"frame": k, "prompts": float(np.sum(prompts, dtype=np.float64))}
        if additive is not None and tof is not None:
            additive = np.repeat(additive[..., None] / tof.num_bins, tof.num_bins, axis=-1)
        if additive is not None and src.kind != "lors":
            additive = additive * (m > 0).reshape(m.shape + (1,) * (additive.ndim - m.ndim))
        if rec is not None:
            rec.set_additive(None if additive is None else additive / np.float32(d))
        else:  # explicit-LOR models (arc-corrected data): each SystemModel holds its own subset's term
            for model, views in zip(models, sets):
                model.additive = None if additive is None else xp.asarray(additive[:, views] / d, dtype=xp.float32)
        net = float(np.sum(prompts, dtype=np.float64)) - (0.0 if additive is None else float(np.sum(additive, dtype=np.float64)))
        level = max(net, 0.01 * float(np.sum(prompts, dtype=np.float64))) / d / total_sens if total_sens > 0 else 1.0
        x0 = np.full(grid.shape, max(level, 1e-12), np.float32)
        y = prompts / np.float32(d)
        if rec is not None:
            x = rec.reconstruct(y, iterations, x0=x0, progress=progress)
        else:
            data = [xp.asarray(y[:, v], dtype=xp.float32) for v in sets]
            x = osem(data, models, iterations, x0=xp.asarray(x0), sensitivities=sens, progress=progress)
        images[..., k] = np.asarray(to_numpy(x), np.float32)
        st["decay_and_dead_time_factor_s"] = d
        stats.append(st)
        bar.update()
    bar.close()

    sidecar = _sidecar(src, frames_obj, iterations, len(sets), psf_fwhm_mm, units, applied, missing, layout, grid, stats, tof)
    _save(out, images[..., 0] if len(frames_obj) == 1 else images, grid.affine, sidecar)
    return sidecar


def _sidecar(src, frames, iterations, subsets, psf, units, applied, missing, layout, grid, stats, tof):
    exam = src.exam
    side = {
        "Manufacturer": src.manufacturer,
        "ManufacturersModelName": getattr(src.scanner, "name", "n/a"),
        "InputFormat": src.fmt,
        "Sources": [src.path],
        "TracerName": getattr(exam, "tracer", "") or "n/a",
        "TracerRadionuclide": getattr(exam, "isotope", "") or "n/a",
        "InjectedRadioactivity": (exam.injected_activity_bq / 1e6) if exam is not None and math.isfinite(exam.injected_activity_bq) else "n/a",
        "InjectedRadioactivityUnits": "MBq",
        "TimeZero": getattr(exam, "injection_time", "") or "n/a",
        "ScanStart": float(getattr(exam, "scan_start_s", 0.0)) if exam is not None else 0.0,
        "InjectionStart": 0,
        **frames.to_bids(),
        "Units": units,
        "ImageDecayCorrected": "Decay" in applied,
        "ImageDecayCorrectionTime": 0 if "Decay" in applied else "n/a",
        "ReconMethodName": "OSEM",
        "ReconMethodParameterLabels": ["iterations", "subsets"],
        "ReconMethodParameterUnits": ["none", "none"],
        "ReconMethodParameterValues": [int(iterations), int(subsets)],
        "ReconFilterType": "none" if not psf else "Gaussian PSF model in the system matrix",
        "ReconFilterSize": float(psf or 0.0),
        "AttenuationCorrection": applied.get("Attenuation", "none: " + missing.get("Attenuation", "")),
        "ScatterCorrection": applied.get("Scatter", "none: " + missing.get("Scatter", "")),
        "RandomsCorrection": applied.get("Randoms", "none: " + missing.get("Randoms", "")),
        "NormalisationCorrection": applied.get("Normalisation", "none: " + missing.get("Normalisation", "")),
        "DeadTimeCorrection": applied.get("DeadTime", "none: " + missing.get("DeadTime", "")),
        "DecayCorrection": applied.get("Decay", "none: " + missing.get("Decay", "")),
        "CalibrationCorrection": applied.get("Calibration", "none: " + missing.get("Calibration", "")),
        "CorrectionsNotApplied": sorted(missing),
        "ImageOrientation": "petbind scanner frame = RAS+ for a head-first supine patient (diagonal affine, mm)",
        "ImageVoxelSize": [float(v) for v in grid.voxel_size_mm],
        "Notes": list(src.notes),
        "FrameStatistics": stats,
    }
    if layout is not None:
        side["SinogramLayout"] = {"num_radial": layout.num_radial, "max_ring_difference": layout.max_ring_difference,
                                  "span": layout.span, "tof": tof is not None}
    return side


def _save(out, image, affine, sidecar):
    import nibabel as nib  # noqa: PLC0415

    from petbind.core.files import atomic_output

    img = nib.Nifti1Image(np.asarray(image, np.float32), np.asarray(affine, np.float64))
    img.header.set_xyzt_units("mm", "sec")
    json_path = _sidecar_path(out)
    with atomic_output(out) as tmp:
        nib.save(img, tmp)
    with atomic_output(json_path) as tmp:
        with open(tmp, "w") as f:
            json.dump(sidecar, f, indent=2, default=float)
            f.write("\n")


def _sidecar_path(out):
    out = os.fspath(out)
    for ext in (".nii.gz", ".nii"):
        if out.endswith(ext):
            return out[: -len(ext)] + ".json"
    return out + ".json"


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        prog="petbind-recon",
        description="Reconstruct petbind HDF5 (listmode or sinograms), PETSIRD, STIR Interfile (.hs) or Siemens mMR "
                    "listmode (.l.hdr, .l.hdr.STIR) into a NIfTI image with a PET-BIDS JSON sidecar.",
    )
    p.add_argument("input", help="input file (or header)")
    p.add_argument("--out", required=True, help="output NIfTI (.nii.gz or .nii); the JSON sidecar goes beside it")
    p.add_argument("--iterations", type=int, default=3, help="OSEM iterations (default 3)")
    p.add_argument("--subsets", type=int, default=8, help="OSEM subsets (interleaved views, default 8)")
    p.add_argument("--span", type=int, default=None, help="axial compression for listmode (default 1; 11 for the mMR)")
    p.add_argument("--max-ring-difference", type=int, default=None, help="largest ring difference kept (listmode; default all)")
    p.add_argument("--psf-fwhm-mm", type=float, default=None, help="Gaussian resolution model FWHM in mm (default none)")
    p.add_argument("--frames", default=None,
                   help="frames of listmode input, e.g. '6x10s,3x20s,6x30s' (default one frame over the acquisition)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--voxel-size-mm", type=float, nargs="+", default=None,
                   help="voxel size (1 or 3 values, mm; default crystal pitch transaxially, ring spacing axially)")
    p.add_argument("--fov-mm", type=float, default=None, help="transaxial field of view (mm; default 1.7 x ring radius)")
    p.add_argument("--num-radial", type=int, default=None, help="radial bins of the listmode layout (default: cover the image)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name, value, low in (("--iterations", args.iterations, 1), ("--subsets", args.subsets, 1)):
        if value < low:
            print(f"petbind-recon: error: {name} must be >= {low}; got {value}", file=sys.stderr)
            return 2
    out = os.fspath(args.out)
    if not out.endswith((".nii", ".nii.gz")):
        print(f"petbind-recon: error: --out {out}: expected a .nii or .nii.gz file name", file=sys.stderr)
        return 2
    if os.path.exists(out) and not os.path.isfile(out):
        print(f"petbind-recon: error: --out {out}: exists and is not a regular file", file=sys.stderr)
        return 2
    try:
        src = open_input(args.input)
        reconstruct(src, out, args.iterations, args.subsets, args.span, args.max_ring_difference, args.psf_fwhm_mm,
                    args.frames, args.device, args.voxel_size_mm, args.fov_mm, args.num_radial, progress=not args.quiet)
    except (InputError, ValueError, FileNotFoundError) as exc:
        print(f"petbind-recon: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    log.info("wrote %s and %s", out, _sidecar_path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
