"""PETSIRD listmode files through the official ``petsird`` package (binary encoding).

Mapping between PETSIRD and petbind
-----------------------------------
Geometry
    PETSIRD describes detecting elements as boxes replicated inside modules
    that are themselves replicated.  On reading, the centre of every
    detecting element (module transform ∘ element transform applied to the box
    centre) is computed; elements are grouped into rings by ``z`` and into
    crystals by transaxial angle, counter-clockwise from the element of
    detection bin 0 (so crystal 0 is the first crystal of module 0).  This
    needs a ring-like geometry: one module type, the same transaxial
    positions in every ring, no depth-of-interaction layers.  Anything else is
    refused with a ``ValueError``.

    On writing, module ``r`` is ring ``r`` (a translation to ``ring_z_mm[r]``)
    and element ``c`` is crystal ``c`` (a box rotated to face the axis and
    moved to ``crystal_xy_mm[c]``), so the PETSIRD detection bin equals the
    petbind detector id.  Gap crystals (``crystal_mask == False``) are written
    as elements with detection efficiency 0 and recognised as gaps on reading.
Events
    PETSIRD stores events in time blocks without a time per event.  Events
    are written into blocks of ``time_block_ms`` (integer ms) and read back
    with ``time_ms`` = the block start, so times are quantised to the block
    length.  PETSIRD requires ``detection_bin_1 >= detection_bin_2``; pairs
    are swapped on writing and, for TOF, the bin flipped ``k -> K - 1 - k``
    (PETSIRD's TOF coordinate is ``(t1 - t2) c / 2``, positive towards the
    second detector, which is petbind's convention), so the stored LOR is the
    same line with the same annihilation position.
TOF
    ``tofBinEdges`` (mm) <-> ``TOFParameters`` (equal bins centred on 0;
    ``fwhm_ps = tofResolution_mm * 2 / c``).  A single TOF bin means non-TOF;
    ``num_sigmas`` is not in PETSIRD (read as 3).  Values are float32 there.
Energy
    Multiple energy bins are merged (the detector id ignores energy); the
    window ``[edges[0], edges[-1]]`` becomes ``ExamInfo.energy_window_kev``.
Corrections
    ``detectionBinEfficiencies`` <-> ``crystal_efficiencies`` (``None`` when
    all real crystals are 1), ``calibrationFactor`` <-> ``calibration_factor``,
    singles histograms (level ``all``; level ``module`` is spread evenly over
    the detectors of each singles unit) <-> ``singles_counts``, dead-time
    blocks (singles alive-time fractions) <-> ``alive_fractions``.  PETSIRD
    has no attenuation map: a μ-map is not written (a warning is logged).
    Module-pair efficiencies are not representable in petbind and are
    reported in a warning when present.
Exam
    tracer / isotope -> radiopharmaceutical / radionuclide code meanings,
    injection time and activity -> the first radiopharmaceutical, scan start
    -> ``startOfAcquisition``, subject id -> patient id.  PETSIRD has no
    half-life: it is taken from a table of common PET isotopes.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from typing import Iterator

import numpy as np

from petbind.core.decay import HALF_LIFE_S

from petbind.recon.geometry import SPEED_OF_LIGHT_MM_PER_PS, Scanner, TOFParameters
from petbind.recon.rawdata.schema import ExamInfo, ListmodeChunk, ListmodeCorrections, validate_events
from petbind.core.files import atomic_output

__all__ = ["PetsirdReader", "write_petsird", "scanner_to_petsird", "petsird_to_scanner", "ISOTOPE_HALF_LIFE_S"]

log = logging.getLogger(__name__)

#: Half-lives (s) by radionuclide name (one table, in petbind.core.decay).
ISOTOPE_HALF_LIFE_S = HALF_LIFE_S


def _petsird():
    import petsird  # noqa: PLC0415 - only needed for PETSIRD files

    return petsird


def _iso_to_datetime(text, where):
    try:
        dt = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{where}: field 'injection_time' {text!r} is not ISO 8601") from None
    if dt.tzinfo is not None:
        dt = dt.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return dt


def _datetime64_to_iso(value):
    value = np.datetime64(value, "ns")
    unit = "s" if value.astype(np.int64) % 1_000_000_000 == 0 else "ns"
    return str(np.datetime_as_string(value, unit=unit))


# ------------------------------------------------------------------------------------------------
# header
# ------------------------------------------------------------------------------------------------
def scanner_to_petsird(scanner, tof=None, exam=None, corrections=None, crystal_size_mm=None):
    """Build a PETSIRD ``Header`` describing a petbind scanner and exam.

    Parameters
    ----------
    scanner : Scanner
    tof : TOFParameters or None
    exam : ExamInfo, optional
    corrections : ListmodeCorrections, optional
    crystal_size_mm : tuple of 3 float, optional
        Crystal box (depth along the radius, width, axial length) in mm.
        Default: 20 mm deep, the mean neighbour distance wide, the ring
        spacing long.

    Returns
    -------
    petsird.Header
    """
    petsird = _petsird()
    n, nr = scanner.crystals_per_ring, scanner.num_rings
    exam = exam or ExamInfo()
    if crystal_size_mm is None:
        xy = scanner.crystal_xy_mm
        width = float(np.median(np.hypot(*(np.roll(xy, -1, 0) - xy).T)))
        length = float(np.median(np.diff(scanner.ring_z_mm))) if nr > 1 else width
        crystal_size_mm = (20.0, width, length)
    d, w, h = (float(v) for v in crystal_size_mm)
    corners = [
        petsird.Coordinate(c=np.array([sx * d / 2, sy * w / 2, sz * h / 2], dtype=np.float32))
        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)
    ]
    crystal = petsird.BoxSolidVolume(shape=petsird.BoxShape(corners=corners), material_id=0)
    elements = petsird.ReplicatedBoxSolidVolume(object=crystal)
    for x, y in scanner.crystal_xy_mm:
        phi = math.atan2(y, x)
        c, s = math.cos(phi), math.sin(phi)
        elements.transforms.append(
            petsird.RigidTransformation(matrix=np.array([[c, -s, 0, x], [s, c, 0, y], [0, 0, 1, 0]], dtype=np.float32))
        )
    module = petsird.DetectorModule(detecting_elements=elements)
    rep_module = petsird.ReplicatedDetectorModule(object=module)
    for z in scanner.ring_z_mm:
        rep_module.transforms.append(
            petsird.RigidTransformation(matrix=np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z]], dtype=np.float32))
        )
    info = petsird.ScannerInformation(
        model_name=scanner.name, scanner_geometry=petsird.ScannerGeometry(replicated_modules=[rep_module])
    )
    info.collimator_type = "NONE"
    if tof is not None:
        if tof.num_bins < 2:
            raise ValueError("PETSIRD reads a single TOF bin as non-TOF; write non-TOF data with tof=None")
        edges = (np.arange(tof.num_bins + 1) - tof.num_bins / 2.0) * tof.bin_width_mm
        resolution = tof.fwhm_mm
    else:
        # one TOF bin = the coincidence window; the longest LOR fits inside
        half = float(2 * np.hypot(*scanner.crystal_xy_mm.T).max() + np.ptp(scanner.ring_z_mm) + 1.0)
        edges = np.array([-half, half])
        resolution = 0.0
    info.tof_bin_edges = [[petsird.BinEdges(edges=edges.astype(np.float32))]]
    info.tof_resolution = [[float(resolution)]]
    window = np.asarray(exam.energy_window_kev, dtype=np.float32)
    info.event_energy_bin_edges = [petsird.BinEdges(edges=window)]
    info.energy_resolution_at_511 = [0.0]
    info.prompt_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    info.delayed_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    eff = np.ones(n * nr) if corrections is None or corrections.crystal_efficiencies is None else np.asarray(corrections.crystal_efficiencies, float)
    eff = np.where(scanner.detector_mask(), eff, 0.0)
    info.detection_efficiencies = petsird.DetectionEfficiencies(
        method_description="petbind: crystal efficiencies; 0 marks gap positions",
        calibration_factor=float(corrections.calibration_factor) if corrections is not None else 1.0,
        detection_bin_efficiencies=[eff.astype(np.float32).tolist()],
    )
    if corrections is not None and corrections.singles_counts is not None:
        info.singles_histogram_level = petsird.SinglesHistogramLevelType.ALL
        info.singles_histogram_energy_bin_edges = [petsird.BinEdges(edges=window)]
    if corrections is not None and corrections.mu_map_per_mm is not None:
        log.warning("PETSIRD has no attenuation map: the mu-map is not written")

    pet_exam = petsird.ExamInformation(modality="PT")
    pet_exam.patient.patient_id = exam.subject_id
    radio = petsird.DICOMRadiopharmaceuticalInformation()
    radio.radiopharmaceutical_code_sequence.code_meaning = exam.tracer
    radio.radionuclide_code_sequence.code_meaning = exam.isotope
    if not math.isnan(exam.injected_activity_bq):
        radio.radionuclide_total_dose = float(exam.injected_activity_bq)
    if exam.injection_time:
        inj = _iso_to_datetime(exam.injection_time, "ExamInfo")
        radio.radiopharmaceutical_start_date_time = petsird.DateTime(np.datetime64(inj, "ns"))
        start = np.datetime64(inj, "ns") + np.timedelta64(int(round(exam.scan_start_s * 1e9)), "ns")
        pet_exam.start_of_acquisition = petsird.DateTime(start)
        pet_exam.start_of_study = petsird.DateTime(start)
    table = ISOTOPE_HALF_LIFE_S.get(exam.isotope)
    if not math.isnan(exam.half_life_s) and (table is None or abs(table - exam.half_life_s) > 1e-9 * table):
        log.warning(
            "PETSIRD has no half-life field: %s is read back with half-life %s s instead of %s s",
            exam.isotope or "(no isotope)", table, exam.half_life_s,
        )
    pet_exam.radiopharmaceuticals = [radio]
    if exam.description:
        log.warning("PETSIRD has no free-text exam description: %r is not written", exam.description)
    if tof is not None and tof.num_sigmas != 3.0:
        log.warning("PETSIRD has no TOF kernel truncation: num_sigmas=%s is read back as 3", tof.num_sigmas)
    return petsird.Header(scanner=info, exam=pet_exam)


def _cluster(values, tol):
    """Group sorted-by-value floats whose neighbours differ by <= tol; return group index per value and centres."""
    order = np.argsort(values, kind="stable")
    sv = values[order]
    new = np.concatenate([[True], np.diff(sv) > tol])
    gid_sorted = np.cumsum(new) - 1
    gid = np.empty_like(gid_sorted)
    gid[order] = gid_sorted
    centres = np.bincount(gid, values) / np.bincount(gid)
    return gid, centres


def petsird_to_scanner(header, where="PETSIRD"):
    """Map a PETSIRD header with a ring-like geometry to a petbind scanner.

    Returns
    -------
    scanner : Scanner
    bin_to_detector : ndarray of int64, shape (num_detection_bins,)
        petbind detector id of every PETSIRD detection bin.
    tof : TOFParameters or None
    extras : dict
        ``energy_window_kev``, ``crystal_efficiencies`` (or None),
        ``calibration_factor``, ``num_energy_bins``.

    Raises
    ------
    ValueError
        When the geometry is not ring-like (the message says why).
    """
    petsird = _petsird()
    from petsird.helpers import expand_detection_bins, get_num_detection_bins  # noqa: PLC0415

    info = header.scanner
    geom = info.scanner_geometry
    if geom.number_of_module_types() != 1:
        raise ValueError(
            f"{where}: field 'scanner_geometry.replicated_modules' has {geom.number_of_module_types()} module types; "
            "petbind maps only single-module-type ring scanners"
        )
    rep = geom.replicated_modules[0]
    elements = rep.object.detecting_elements
    n_mod, n_el = len(rep.transforms), len(elements.transforms)
    n_en = info.event_energy_bin_edges[0].number_of_bins() if info.event_energy_bin_edges else 1
    if n_mod == 0 or n_el == 0:
        raise ValueError(f"{where}: field 'scanner_geometry' has no detecting elements")

    def mat44(t):
        m = np.eye(4)
        m[:3, :] = np.asarray(t.matrix, dtype=np.float64)
        return m

    box = np.array([c.c for c in elements.object.shape.corners], dtype=np.float64).mean(axis=0)
    el = np.stack([mat44(t) for t in elements.transforms])  # (E, 4, 4)
    mo = np.stack([mat44(t) for t in rep.transforms])  # (M, 4, 4)
    centre = np.einsum("mij,ejk,k->mei", mo, el, np.append(box, 1.0))[..., :3].reshape(-1, 3)  # index module*E + element

    scale = float(np.abs(centre).max()) or 1.0
    tol = 1e-4 * scale
    ring_of, ring_z = _cluster(centre[:, 2], tol)
    nr = ring_z.size
    counts = np.bincount(ring_of, minlength=nr)
    if np.any(counts != counts[0]):
        raise ValueError(f"{where}: field 'scanner_geometry' is not ring-like: rings hold {sorted(set(counts.tolist()))} elements")
    n = int(counts[0])
    phi = np.arctan2(centre[:, 1], centre[:, 0])
    phi0 = phi[0]
    rel = np.mod(phi - phi0 + 1e-9, 2 * np.pi)
    crystal_of = np.empty(centre.shape[0], dtype=np.int64)
    crystal_xy = None
    for r in range(nr):
        idx = np.flatnonzero(ring_of == r)
        idx = idx[np.argsort(rel[idx], kind="stable")]
        if np.any(np.diff(rel[idx]) < 1e-7):
            raise ValueError(
                f"{where}: field 'scanner_geometry' has several elements at one angle in a ring "
                "(depth-of-interaction layers?); petbind needs one crystal per angle"
            )
        xy = centre[idx, :2]
        if crystal_xy is None:
            crystal_xy = xy
        elif not np.allclose(xy, crystal_xy, atol=tol, rtol=0):
            raise ValueError(f"{where}: field 'scanner_geometry' is not ring-like: ring {r} has other transaxial positions than ring 0")
        crystal_of[idx] = np.arange(n)
    det_of_element = ring_of * n + crystal_of  # per (module * E + element)

    # every detection bin -> (module, element, energy) with the package's helper, once
    num_bins = get_num_detection_bins(info, 0)
    expanded = expand_detection_bins(info, 0, range(num_bins))
    mod_idx = np.fromiter((e.module_index for e in expanded), np.int64, num_bins)
    el_idx = np.fromiter((e.element_index for e in expanded), np.int64, num_bins)
    bin_to_detector = det_of_element[mod_idx * n_el + el_idx]

    # efficiencies per detector: mean over energy bins
    de = info.detection_efficiencies
    eff = None
    mask = np.ones(n, dtype=bool)
    if de is not None and de.detection_bin_efficiencies:
        eb = np.asarray(de.detection_bin_efficiencies[0], dtype=np.float64)
        if eb.shape != (num_bins,):
            raise ValueError(f"{where}: field 'detection_efficiencies.detection_bin_efficiencies' has {eb.size} entries; expected {num_bins}")
        eff = np.bincount(bin_to_detector, eb, minlength=n * nr) / np.bincount(bin_to_detector, minlength=n * nr)
        if n_en > 1:
            log.warning("%s: %d energy bins are merged; crystal efficiencies are their mean", where, n_en)
        mask = ~np.all(eff.reshape(nr, n) == 0, axis=0)
        real = np.tile(mask, nr)
        if np.all(eff[real] == 1.0):
            eff = None
    if de is not None and de.module_pair_efficiencies_vectors:
        log.warning("%s: module-pair efficiencies are present but not carried into petbind corrections", where)
    scanner = Scanner(crystal_xy, ring_z, mask, name=info.model_name or "petsird")

    tof = None
    edges = np.asarray(info.tof_bin_edges[0][0].edges, dtype=np.float64) if info.tof_bin_edges else np.zeros(2)
    if edges.size > 2:
        widths = np.diff(edges)
        if not np.allclose(widths, widths[0], rtol=1e-5) or abs(edges[0] + edges[-1]) > 1e-4 * abs(edges[-1]):
            raise ValueError(f"{where}: field 'tof_bin_edges' must be equal bins centred on 0; got {edges.tolist()}")
        fwhm_mm = float(info.tof_resolution[0][0])
        if not fwhm_mm > 0:
            raise ValueError(f"{where}: field 'tof_resolution' must be positive for TOF data; got {fwhm_mm}")
        tof = TOFParameters(edges.size - 1, float((edges[-1] - edges[0]) / (edges.size - 1)), fwhm_mm * 2 / SPEED_OF_LIGHT_MM_PER_PS)
    window = np.asarray(info.event_energy_bin_edges[0].edges, dtype=float) if info.event_energy_bin_edges else np.array([425.0, 650.0])
    extras = {
        "energy_window_kev": (float(window[0]), float(window[-1])),
        "crystal_efficiencies": eff,
        "calibration_factor": float(de.calibration_factor) if de is not None and de.calibration_factor > 0 else 1.0,
        "num_energy_bins": n_en,
        "det_of_element": det_of_element,
    }
    return scanner, bin_to_detector, tof, extras


def _exam_from_petsird(header, window):
    exam = ExamInfo(energy_window_kev=window)
    pe = header.exam
    if pe is None:
        return exam
    exam.subject_id = pe.patient.patient_id if pe.patient is not None else ""
    if pe.radiopharmaceuticals:
        radio = pe.radiopharmaceuticals[0]
        exam.tracer = radio.radiopharmaceutical_code_sequence.code_meaning if radio.radiopharmaceutical_code_sequence else ""
        exam.isotope = radio.radionuclide_code_sequence.code_meaning if radio.radionuclide_code_sequence else ""
        if radio.radionuclide_total_dose > 0:
            exam.injected_activity_bq = float(radio.radionuclide_total_dose)
        inj = radio.radiopharmaceutical_start_date_time.numpy_value
        if inj.astype(np.int64) != 0:
            exam.injection_time = _datetime64_to_iso(inj)
            if pe.start_of_acquisition is not None:
                exam.scan_start_s = float((pe.start_of_acquisition.numpy_value - inj).astype(np.int64)) / 1e9
        if len(pe.radiopharmaceuticals) > 1:
            log.warning("PETSIRD exam lists %d radiopharmaceuticals; only the first is used", len(pe.radiopharmaceuticals))
    exam.half_life_s = ISOTOPE_HALF_LIFE_S.get(exam.isotope, float("nan"))
    return exam


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------
class PetsirdReader:
    """Stream a PETSIRD binary file as petbind listmode chunks.

    Parameters
    ----------
    path : str or os.PathLike
    chunk_events : int
        Events per chunk (a time block is never split, so a chunk can exceed
        this by one block's events).

    Attributes
    ----------
    scanner, tof, exam, num_events (None until a full pass), corrections
        ``corrections`` holds efficiencies and calibration after opening;
        singles and dead-time blocks are added during the first full pass of
        :meth:`chunks` (PETSIRD interleaves them with the events).

    Raises
    ------
    ValueError
        For a file the ``petsird`` package cannot read (naming the file and
        the part: header or time blocks) or a geometry that is not ring-like.
    """

    def __init__(self, path, chunk_events=1_000_000):
        self.path = os.fspath(path)
        self.chunk_events = int(chunk_events)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        reader = self._open()
        try:
            try:
                self.header = reader.read_header()
            except Exception as exc:
                raise ValueError(f"{self.path}: field 'header' cannot be read by petsird ({type(exc).__name__}: {exc})") from exc
        finally:
            reader._close()  # the stream is not consumed; skip the completeness check
        self.scanner, self._bin_to_det, self.tof, extras = petsird_to_scanner(self.header, self.path)
        self._det_of_element = extras["det_of_element"]
        self.exam = _exam_from_petsird(self.header, extras["energy_window_kev"])
        self.corrections = ListmodeCorrections(
            crystal_efficiencies=extras["crystal_efficiencies"], calibration_factor=extras["calibration_factor"]
        )
        self.num_events = None

    def _open(self):
        petsird = _petsird()
        try:
            return petsird.BinaryPETSIRDReader(self.path)
        except Exception as exc:
            raise ValueError(f"{self.path}: not a PETSIRD binary file ({type(exc).__name__}: {exc})") from exc

    def __repr__(self):
        return f"PetsirdReader({self.path!r}, scanner={self.scanner.name!r}, tof={self.tof is not None})"

    def _events(self, bins_list, tof_list):
        """Detection-bin pairs and TOF indices (Python lists) -> petbind ids and TOF bins."""
        bins = np.array(bins_list, dtype=np.int64)
        if bins.ndim != 2 or bins.shape[1] != 2:
            raise ValueError(f"{self.path}: field 'prompt_events/delayed_events.detection_bins' must hold 2 bins per event")
        if bins.min() < 0 or bins.max() >= self._bin_to_det.size:
            raise ValueError(
                f"{self.path}: field 'prompt_events/delayed_events.detection_bins' out of range "
                f"[{bins.min()}, {bins.max()}]; expected < {self._bin_to_det.size}"
            )
        k = np.array(tof_list, dtype=np.int64)
        if self.tof is None:
            if k.max() > 0:
                raise ValueError(f"{self.path}: field 'tof_idx' is {k.max()} but the file has a single TOF bin")
            k = None
        return self._bin_to_det[bins], k

    def chunks(self, start_ms=None, stop_ms=None) -> Iterator[ListmodeChunk]:
        """Iterate over events with ``start_ms <= time_ms < stop_ms`` (time = block start, ms).

        Yields
        ------
        ListmodeChunk
        """
        petsird = _petsird()
        reader = self._open()
        singles, alive = [], []
        bins_l, tof_l, runs = [], [], []  # runs: (time_ms, is_prompt, count) per block and kind
        buffered = 0
        first = 0
        last_time = -np.inf
        total = 0
        warned = set()

        def emit():
            nonlocal bins_l, tof_l, runs, buffered, first, last_time
            ids, k = self._events(bins_l, tof_l)
            run = np.array(runs, dtype=np.float64).reshape(-1, 3)
            counts = run[:, 2].astype(np.int64)
            t = np.repeat(run[:, 0], counts)
            p = np.repeat(run[:, 1].astype(bool), counts)
            ids, k, t, p = validate_events(f"{self.path} (events {first}..{first + t.size})", self.scanner, self.tof, ids, k, t, p, last_time)
            chunk = ListmodeChunk(ids, k, t, p, first)
            first += t.size
            last_time = float(t[-1])
            bins_l, tof_l, runs, buffered = [], [], [], 0
            return chunk

        try:
            try:
                reader.read_header()
                blocks = reader.read_time_blocks()
                for block in blocks:
                    value = block.value
                    if isinstance(block, petsird.TimeBlock.EventTimeBlock):
                        t_ms = float(value.time_interval.start)
                        prompts = value.prompt_events[0][0] if value.prompt_events else []
                        delayeds = value.delayed_events[0][0] if value.delayed_events else []
                        n_block = len(prompts) + len(delayeds)
                        total += n_block
                        if n_block == 0:
                            continue
                        if (start_ms is not None and t_ms < start_ms) or (stop_ms is not None and t_ms >= stop_ms):
                            continue
                        for events, is_prompt in ((prompts, 1.0), (delayeds, 0.0)):
                            if events:
                                bins_l.extend([e.detection_bins for e in events])
                                tof_l.extend([e.tof_idx for e in events])
                                runs.append((t_ms, is_prompt, len(events)))
                        buffered += n_block
                        if buffered >= self.chunk_events:
                            yield emit()
                    elif isinstance(block, petsird.TimeBlock.SinglesHistogramTimeBlock):
                        singles.append(value)
                    elif isinstance(block, petsird.TimeBlock.DeadTimeTimeBlock):
                        alive.append(value)
                    else:
                        name = type(block).__name__
                        if name not in warned:
                            warned.add(name)
                            log.warning("%s: %s blocks are not used by petbind and are skipped", self.path, name)
            except ValueError:
                raise
            except Exception as exc:
                raise ValueError(
                    f"{self.path}: field 'time_blocks' cannot be read by petsird after {total} events "
                    f"({type(exc).__name__}: {exc}); the file is truncated or corrupt"
                ) from exc
            if buffered:
                yield emit()
        finally:
            reader._close()
        if start_ms is None and stop_ms is None:
            self.num_events = total
        self._set_singles(singles, alive)

    def _set_singles(self, singles, alive):
        info = self.header.scanner
        nd = self.scanner.num_detectors
        petsird = _petsird()
        if singles:
            edges, counts = [], []
            for s in singles:
                edges.append((s.time_interval.start, s.time_interval.stop))
                if info.singles_histogram_level == petsird.SinglesHistogramLevelType.ALL:
                    h = np.asarray(s.singles_per_detection_bin_histogram[0], dtype=np.float64)
                    n_sen = h.size // self._det_of_element.size
                    if n_sen * self._det_of_element.size != h.size:
                        raise ValueError(f"{self.path}: field 'singles_per_detection_bin_histogram' has {h.size} entries; "
                                         f"expected a multiple of {self._det_of_element.size} elements")
                    # singles detection bin = energy + n_energy * element: energy index fastest
                    counts.append(np.bincount(self._det_of_element, h.reshape(-1, n_sen).sum(axis=1), minlength=nd))
                else:
                    counts.append(self._module_singles(s, info))
            self.corrections.singles_block_edges_s, self.corrections.singles_counts = self._blocks(edges, counts, "singles")
        if alive:
            edges, fr = [], []
            for a in alive:
                edges.append((a.time_interval.start, a.time_interval.stop))
                v = np.asarray(a.alive_time_fractions.singles_alive_time_fractions[0], dtype=np.float64)
                n_en = v.size // self._det_of_element.size
                fr.append(np.bincount(self._det_of_element, v.reshape(-1, n_en).mean(axis=1), minlength=nd))
            self.corrections.alive_block_edges_s, self.corrections.alive_fractions = self._blocks(edges, fr, "dead_time")
        self.corrections.validate(nd, where=self.path)

    def _module_singles(self, s, info):
        """Spread each singles unit's counts evenly over its detectors (PETSIRD level 'module')."""
        nd = self.scanner.num_detectors
        lut = np.asarray(info.module_singles_unit_idx_lu_ts[0], dtype=np.int64)
        hist = np.asarray(s.singles_per_singles_unit_histogram, dtype=np.float64).sum(axis=1)
        n_el = len(info.scanner_geometry.replicated_modules[0].object.detecting_elements.transforms)
        unit_of_det = np.full(nd, -1)
        unit_of_det[self._det_of_element] = np.repeat(lut, n_el)  # element order: module * n_el + element
        out = np.zeros(nd)
        ok = unit_of_det >= 0
        per_unit = np.bincount(unit_of_det[ok], minlength=hist.size)
        out[ok] = hist[unit_of_det[ok]] / per_unit[unit_of_det[ok]]
        return out

    def _blocks(self, edges, data, what):
        edges = np.asarray(edges, dtype=np.float64) / 1000.0
        if np.any(edges[1:, 0] != edges[:-1, 1]):
            raise ValueError(f"{self.path}: field '{what}' time blocks are not contiguous; petbind needs back-to-back blocks")
        return np.append(edges[:, 0], edges[-1, 1]), np.stack(data)


# ------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------
def write_petsird(path, scanner, chunks, tof=None, exam=None, corrections=None, time_block_ms=1, crystal_size_mm=None):
    """Write listmode chunks to a PETSIRD binary file (streaming).

    Parameters
    ----------
    path : str or os.PathLike
        Output file; written under a temporary name and renamed when complete.
    scanner : Scanner
    chunks : iterable of ListmodeChunk
        Events in time order (e.g. ``ListmodeReader.chunks()``).
    tof : TOFParameters or None
    exam : ExamInfo, optional
    corrections : ListmodeCorrections, optional
        Singles and dead-time block edges must be whole milliseconds.
    time_block_ms : int
        Length of the PETSIRD event time blocks (ms); event times are
        quantised to multiples of it (floor).
    crystal_size_mm : tuple of 3 float, optional
        See :func:`scanner_to_petsird`.

    Returns
    -------
    int
        Number of events written.
    """
    petsird = _petsird()
    time_block_ms = int(time_block_ms)
    if time_block_ms < 1:
        raise ValueError(f"time_block_ms must be a positive integer; got {time_block_ms}")
    if corrections is not None:
        corrections.validate(scanner.num_detectors)
    header = scanner_to_petsird(scanner, tof, exam, corrections, crystal_size_mm)
    extra_blocks = _correction_blocks(petsird, scanner, corrections, os.fspath(path))
    num_tof = tof.num_bins if tof is not None else 1
    written = 0
    quantised = False

    def make_events(ids, k):
        # PETSIRD wants detection_bin_1 >= detection_bin_2: swap, and mirror TOF with it
        swap = ids[:, 0] < ids[:, 1]
        a = np.where(swap, ids[:, 1], ids[:, 0]).tolist()
        b = np.where(swap, ids[:, 0], ids[:, 1]).tolist()
        kk = np.where(swap, num_tof - 1 - k, k).tolist() if k is not None else [0] * len(a)
        return [petsird.CoincidenceEvent(detection_bins=[x, y], tof_idx=z) for x, y, z in zip(a, b, kk)]

    def event_blocks(ids, k, p, blk):
        """Time blocks of events sorted by block; object construction vectorised per chunk."""
        order = np.lexsort((~p, blk))  # per block: prompts first, then delayeds
        ids, p, blk = ids[order], p[order], blk[order]
        k = None if k is None else k[order]
        events = make_events(ids, k)
        starts = np.flatnonzero(np.diff(blk, prepend=-1))
        ends = np.append(starts[1:], blk.size)
        mids = starts + np.add.reduceat(p.astype(np.int64), starts) if blk.size else starts
        out = []
        for s0, m, e in zip(starts.tolist(), mids.tolist(), ends.tolist()):
            start_ms = int(blk[s0]) * time_block_ms
            out.extend(_due(extra_blocks, start_ms))
            out.append(petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
                time_interval=petsird.TimeInterval(start=start_ms, stop=start_ms + time_block_ms),
                prompt_events=[[events[s0:m]]],
                delayed_events=[[events[m:e]]],
            )))
        return out

    with atomic_output(path) as tmp:
        writer = petsird.BinaryPETSIRDWriter(str(tmp))
        try:
            writer.write_header(header)
            pending = None  # events of the last (maybe incomplete) block of the previous chunk
            for chunk in chunks:
                if len(chunk) == 0:
                    continue
                if tof is not None and chunk.tof_bin is None:
                    raise ValueError(f"{os.fspath(path)}: field 'tof_bin' missing in a chunk of TOF data")
                ids = np.asarray(chunk.detector_ids, dtype=np.int64)
                k = None if tof is None else np.asarray(chunk.tof_bin, dtype=np.int64)
                t = np.asarray(chunk.time_ms, dtype=np.float64)
                p = np.asarray(chunk.is_prompt, dtype=bool)
                if pending is not None:
                    ids = np.concatenate([pending[0], ids])
                    k = None if k is None else np.concatenate([pending[1], k])
                    t = np.concatenate([pending[2], t])
                    p = np.concatenate([pending[3], p])
                blk = np.floor(t / time_block_ms).astype(np.int64)
                if blk.max() * time_block_ms + time_block_ms > np.iinfo(np.uint32).max:
                    raise ValueError(f"{os.fspath(path)}: field 'time_ms' exceeds PETSIRD's uint32 ms range")
                quantised |= bool(np.any(blk * time_block_ms != t))
                cut = int(np.searchsorted(blk, blk[-1]))  # keep the last block for the next chunk
                out = event_blocks(ids[:cut], None if k is None else k[:cut], p[:cut], blk[:cut])
                written += cut
                if out:
                    writer.write_time_blocks(out)
                pending = (ids[cut:], None if k is None else k[cut:], t[cut:], p[cut:])
            out = []
            if pending is not None and pending[2].size:
                blk = np.floor(pending[2] / time_block_ms).astype(np.int64)
                out = event_blocks(pending[0], pending[1], pending[3], blk)
                written += pending[2].size
            out.extend(_due(extra_blocks, np.inf))
            if out:
                writer.write_time_blocks(out)
            writer.close()
        except BaseException:
            try:
                writer._close()
            finally:
                raise
    if quantised:
        log.info("%s: event times quantised to %d ms PETSIRD time blocks", os.fspath(path), time_block_ms)
    return int(written)


def _correction_blocks(petsird, scanner, corrections, where):
    """Singles and dead-time time blocks, sorted by start (ms)."""
    out = []
    if corrections is None:
        return out
    nd = scanner.num_detectors
    if corrections.singles_counts is not None:
        edges_ms = np.asarray(corrections.singles_block_edges_s, float) * 1000
        counts = np.asarray(corrections.singles_counts)
        if np.any(edges_ms != np.round(edges_ms)) or np.any(edges_ms < 0):
            raise ValueError(f"{where}: field 'singles_block_edges_s' must be whole non-negative milliseconds for PETSIRD")
        if np.any(counts != np.round(counts)):
            raise ValueError(f"{where}: field 'singles_counts' must be whole counts for PETSIRD (uint64)")
        for b in range(counts.shape[0]):
            blk = petsird.SinglesHistogramTimeBlock(
                time_interval=petsird.TimeInterval(start=int(edges_ms[b]), stop=int(edges_ms[b + 1])),
                singles_per_detection_bin_histogram=[counts[b].astype(np.uint64).tolist()],
            )
            out.append((edges_ms[b], petsird.TimeBlock.SinglesHistogramTimeBlock(blk)))
    if corrections.alive_fractions is not None:
        edges_ms = np.asarray(corrections.alive_block_edges_s, float) * 1000
        if np.any(edges_ms != np.round(edges_ms)) or np.any(edges_ms < 0):
            raise ValueError(f"{where}: field 'alive_block_edges_s' must be whole non-negative milliseconds for PETSIRD")
        fr = np.asarray(corrections.alive_fractions)
        for b in range(fr.shape[0]):
            atf = petsird.AliveTimeFractions(
                singles_alive_time_fractions=[fr[b].astype(np.float32).reshape(nd)],
                # petbind has per-detector alive fractions only; no module-pair component is written
                module_pair_alive_time_fractions=[],
            )
            blk = petsird.DeadTimeTimeBlock(
                time_interval=petsird.TimeInterval(start=int(edges_ms[b]), stop=int(edges_ms[b + 1])), alive_time_fractions=atf
            )
            out.append((edges_ms[b], petsird.TimeBlock.DeadTimeTimeBlock(blk)))
    out.sort(key=lambda x: x[0])
    return out


def _due(blocks, until_ms):
    """Pop and return the correction blocks starting at or before ``until_ms``."""
    out = []
    while blocks and blocks[0][0] <= until_ms:
        out.append(blocks.pop(0)[1])
    return out
