"""PETSIRD listmode files: any scanner geometry, events read and written in bulk.

The header is read and written by the official ``petsird`` package; the
coincidence events are decoded and encoded as whole NumPy arrays by
:mod:`petbind.recon.rawdata.petsird_binary` (the package makes one Python
object per event, about 2e5 events/s).  The package's own per-event path is
kept (``bulk=False``) as the reference and as the fallback for a schema the
bulk codec does not know.

Mapping between PETSIRD and petbind
-----------------------------------
Geometry (:class:`PetsirdGeometry`)
    PETSIRD describes detecting elements as boxes replicated inside modules
    that are themselves replicated, with one such description per module
    type.  The centre of every detecting element is the module transform ∘
    element transform applied to the centre of its box (the mean of the 8
    corners).  Every (module type, module, element) is a petbind detector,
    numbered type by type, then module, then element:
    ``id = offset[type] + module * elements_per_module + element``; this is
    the row of :meth:`PetsirdGeometry.detector_positions_mm` and of the
    :class:`~petbind.recon.geometry.DetectorArray` used for listmode OSEM on
    any geometry.  A PETSIRD detection bin also holds the energy bin:
    ``bin = (module * elements + element) * energy_bins + energy``.

    A geometry with one module type whose elements form rings (the same
    transaxial positions in every ring, one element per angle) also maps to a
    ring :class:`~petbind.recon.geometry.Scanner`: elements are grouped into
    rings by ``z`` and into crystals by transaxial angle, counter-clockwise
    from the element of detection bin 0.  Sinograms, petbind HDF5 and
    :meth:`PetsirdReader.chunks` need that ring; other geometries are refused
    there with a message that names the reason.

    On writing a ring :class:`Scanner` (:func:`write_petsird`), module ``r``
    is ring ``r`` (a translation to ``ring_z_mm[r]``) and element ``c`` is
    crystal ``c`` (a box rotated to face the axis and moved to
    ``crystal_xy_mm[c]``), so the PETSIRD detection bin equals the petbind
    detector id.  Gap crystals (``crystal_mask == False``) are written as
    elements with detection efficiency 0 and recognised as gaps on reading.
Events (:class:`PetsirdEvents`)
    Events are kept per module-type pair as PETSIRD stores them: module
    types, detection bins, TOF index and the time block ``[time_ms,
    stop_ms)``.  PETSIRD requires ``type_1 > type_2`` or ``bin_1 >= bin_2``;
    the writer swaps pairs that break this and mirrors the TOF bin
    (``k -> K - 1 - k``: PETSIRD's TOF coordinate is ``(t1 - t2) c / 2``,
    positive towards the second detector, which is petbind's convention),
    so the stored LOR is the same line with the same annihilation position.
    PETSIRD stores no time per event: ring-scanner chunks get ``time_ms`` =
    the block start, and :func:`write_petsird` quantises times to blocks of
    ``time_block_ms`` (integer ms).
TOF and energy, per module-type pair
    ``tofBinEdges[t1][t2]`` (mm) and ``tofResolution[t1][t2]`` (FWHM, mm)
    give :meth:`PetsirdGeometry.tof_parameters` for each pair (equal bins
    centred on 0; a single bin means non-TOF; ``num_sigmas`` is not in
    PETSIRD and is read as 3).  ``eventEnergyBinEdges[t]`` (keV) is per
    module type.  For a ring scanner the energy bins are merged (the detector
    id ignores energy) and ``[edges[0], edges[-1]]`` becomes
    ``ExamInfo.energy_window_kev``; for other geometries that window spans
    the edges of all module types.
Corrections
    ``detectionBinEfficiencies`` <-> ``crystal_efficiencies`` (``None`` when
    all real crystals are 1), ``calibrationFactor`` <-> ``calibration_factor``,
    singles histograms (level ``all``; level ``module`` is spread evenly over
    the detectors of each singles unit) <-> ``singles_counts``, dead-time
    blocks (singles alive-time fractions) <-> ``alive_fractions``.  For any
    geometry, :meth:`PetsirdGeometry.pair_efficiencies` combines detection-bin
    and module-pair efficiencies per detector pair (summed over energy bins);
    a module pair with SGID -1 is not in coincidence.  PETSIRD has no
    attenuation map: a μ-map is not written (a warning is logged).
Exam
    tracer / isotope -> radiopharmaceutical / radionuclide code meanings,
    injection time and activity -> the first radiopharmaceutical, scan start
    -> ``startOfAcquisition``, subject id -> patient id.  PETSIRD has no
    half-life: it is taken from a table of common PET isotopes.
Files that break the standard
    The example file of petsird 0.12 (``python -m petsird.helpers.generator``)
    writes three rows of prompt lists for two module types (its row 1 twice).
    Lists outside the lower-triangular module-type matrix are skipped and
    their events counted in a warning; singles, triples and quadruples are
    skipped the same way.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from petbind.recon.geometry import SPEED_OF_LIGHT_MM_PER_PS, DetectorArray, Scanner, TOFParameters
from petbind.recon.rawdata import petsird_binary as _bin
from petbind.core.decay import HALF_LIFE_S
from petbind.core.files import atomic_output
from petbind.recon.rawdata.schema import ExamInfo, ListmodeChunk, ListmodeCorrections, validate_events

__all__ = [
    "PetsirdReader",
    "PetsirdGeometry",
    "PetsirdEvents",
    "write_petsird",
    "write_petsird_events",
    "scanner_to_petsird",
    "petsird_to_scanner",
    "ISOTOPE_HALF_LIFE_S",
]

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




def _mat(transform):
    """PETSIRD rigid transformation as a float64 (3, 4) matrix ``[R | t]``."""
    return np.asarray(transform.matrix, dtype=np.float64).reshape(3, 4)


class PetsirdGeometry:
    """Detectors, TOF and energy binning of any PETSIRD scanner.

    Parameters
    ----------
    info : petsird.ScannerInformation
    where : str
        File name used in error messages.

    Attributes
    ----------
    num_module_types : int
    num_modules, num_elements, num_energy_bins : ndarray of int, shape (num_module_types,)
        Modules of each type, detecting elements per module, energy bins.
    detector_offset : ndarray of int, shape (num_module_types + 1,)
        First detector id of each module type (and the total at the end).
    num_detectors : int
    type_of_detector : ndarray of int, shape (num_detectors,)

    Notes
    -----
    Detector ids: ``offset[type] + module * num_elements[type] + element``.
    Positions are the element box centres carried through the element and
    module transforms, so no ring is assumed.
    """

    def __init__(self, info, where="PETSIRD"):
        self.info = info
        self.where = where
        geom = info.scanner_geometry
        reps = list(geom.replicated_modules) if geom is not None else []
        t_count = len(reps)
        if t_count == 0:
            raise ValueError(f"{where}: field 'scanner_geometry.replicated_modules' is empty; expected at least one module type")
        self.num_module_types = t_count
        self.num_modules = np.array([len(r.transforms) for r in reps], dtype=np.int64)
        self.num_elements = np.array([len(r.object.detecting_elements.transforms) for r in reps], dtype=np.int64)
        if np.any(self.num_modules == 0) or np.any(self.num_elements == 0):
            raise ValueError(f"{where}: field 'scanner_geometry' has a module type without modules or detecting elements")
        edges = list(info.event_energy_bin_edges or [])
        if len(edges) != t_count:
            raise ValueError(
                f"{where}: field 'event_energy_bin_edges' has {len(edges)} entries; expected one per module type ({t_count})"
            )
        self.energy_edges_kev = [np.asarray(e.edges, dtype=np.float64) for e in edges]
        for t, e in enumerate(self.energy_edges_kev):
            if e.size < 2 or not np.all(np.diff(e) > 0):
                raise ValueError(f"{where}: field 'event_energy_bin_edges[{t}]' must be >= 2 increasing edges (keV); got {e.tolist()}")
        self.num_energy_bins = np.array([e.size - 1 for e in self.energy_edges_kev], dtype=np.int64)
        per_type = self.num_modules * self.num_elements
        self.detector_offset = np.concatenate([[0], np.cumsum(per_type)]).astype(np.int64)
        self.num_detectors = int(self.detector_offset[-1])
        self.type_of_detector = np.repeat(np.arange(t_count), per_type)
        self.num_detection_bins = per_type * self.num_energy_bins
        self._positions = None
        self._tof_edges = self._read_pair_table(info.tof_bin_edges, "tof_bin_edges", lambda e: np.asarray(e.edges, np.float64))
        self._tof_fwhm = self._read_pair_table(info.tof_resolution, "tof_resolution", float)
        self.num_tof_bins = np.zeros((t_count, t_count), dtype=np.int64)
        for t1 in range(t_count):
            for t2 in range(t1 + 1):
                e = self._tof_edges[t1][t2]
                if e.size < 2 or not np.all(np.diff(e) > 0):
                    raise ValueError(
                        f"{where}: field 'tof_bin_edges[{t1}][{t2}]' must be >= 2 increasing edges (mm); got {e.tolist()}"
                    )
                self.num_tof_bins[t1, t2] = self.num_tof_bins[t2, t1] = e.size - 1
        self._pair_tables = None

    def _read_pair_table(self, table, name, convert):
        t_count = self.num_module_types
        table = list(table or [])
        if len(table) != t_count or any(len(table[t]) < t + 1 for t in range(t_count)):
            shape = [len(r) for r in table]
            raise ValueError(
                f"{self.where}: field '{name}' has rows of lengths {shape}; expected a lower-triangular matrix "
                f"over {t_count} module types (row t holds t + 1 entries)"
            )
        return [[convert(table[t1][t2]) for t2 in range(t1 + 1)] for t1 in range(t_count)]

    def __repr__(self):
        types = ", ".join(f"{m}x{e}x{n}" for m, e, n in zip(self.num_modules, self.num_elements, self.num_energy_bins))
        return (f"PetsirdGeometry(name={self.info.model_name!r}, module_types={self.num_module_types} "
                f"(modules x elements x energy bins: {types}), num_detectors={self.num_detectors})")

    # -- positions ------------------------------------------------------------------------------
    def detector_positions_mm(self):
        """Centre of every detector, shape ``(num_detectors, 3)`` in mm, ordered by id."""
        if self._positions is None:
            out = []
            for t, rep in enumerate(self.info.scanner_geometry.replicated_modules):
                elements = rep.object.detecting_elements
                corners = np.array([c.c for c in elements.object.shape.corners], dtype=np.float64)
                if corners.shape != (8, 3):
                    raise ValueError(f"{self.where}: module type {t}: detecting element box has corners of shape {corners.shape}; expected (8, 3)")
                centre = np.append(corners.mean(axis=0), 1.0)
                el = np.stack([_mat(tr) for tr in elements.transforms])  # (E, 3, 4)
                mo = np.stack([_mat(tr) for tr in rep.transforms])  # (M, 3, 4)
                local = el @ centre  # (E, 3): element centre in module coordinates
                pos = np.einsum("mij,ej->mei", mo[:, :, :3], local) + mo[:, None, :, 3]
                out.append(pos.reshape(-1, 3))
            self._positions = np.concatenate(out)
        return self._positions

    def detector_array(self):
        """The detectors as a :class:`~petbind.recon.geometry.DetectorArray` (for listmode OSEM)."""
        eff = self.detector_efficiencies()
        return DetectorArray(self.detector_positions_mm(), mask=eff > 0, name=self.info.model_name or "petsird")

    # -- ids ------------------------------------------------------------------------------------
    def detector_ids(self, module_types, detection_bins):
        """petbind detector ids (energy dropped) of detection bins.

        Parameters
        ----------
        module_types : array of int, shape (...)
        detection_bins : array of int, shape (...)

        Returns
        -------
        ndarray of int64, shape (...)
        """
        t = np.asarray(module_types, dtype=np.int64)
        return self.detector_offset[t] + np.asarray(detection_bins, dtype=np.int64) // self.num_energy_bins[t]

    def energy_indices(self, module_types, detection_bins):
        """Energy bin of each detection bin (same shapes as :meth:`detector_ids`)."""
        t = np.asarray(module_types, dtype=np.int64)
        return np.asarray(detection_bins, dtype=np.int64) % self.num_energy_bins[t]

    def detection_bins(self, detector_ids, energy_indices=0):
        """Inverse of :meth:`detector_ids`: ``(module_types, detection_bins)``."""
        d = np.asarray(detector_ids, dtype=np.int64)
        t = self.type_of_detector[d]
        return t, (d - self.detector_offset[t]) * self.num_energy_bins[t] + np.asarray(energy_indices, dtype=np.int64)

    # -- TOF and energy -------------------------------------------------------------------------
    def tof_bin_edges_mm(self, type_1, type_2):
        """TOF bin edges (mm) of a module-type pair (either order)."""
        a, b = max(type_1, type_2), min(type_1, type_2)
        return self._tof_edges[a][b]

    def tof_resolution_mm(self, type_1, type_2):
        """Coincidence timing resolution (FWHM, mm) of a module-type pair."""
        a, b = max(type_1, type_2), min(type_1, type_2)
        return self._tof_fwhm[a][b]

    def tof_parameters(self, type_1, type_2):
        """:class:`TOFParameters` of a module-type pair, ``None`` for a single TOF bin.

        Raises
        ------
        ValueError
            When the bins are not equal and centred on 0 (petbind's TOF model),
            or the resolution is not positive.
        """
        a, b = max(type_1, type_2), min(type_1, type_2)
        edges = self._tof_edges[a][b]
        if edges.size <= 2:
            return None
        widths = np.diff(edges)
        if not np.allclose(widths, widths[0], rtol=1e-5) or abs(edges[0] + edges[-1]) > 1e-4 * abs(edges[-1]):
            raise ValueError(f"{self.where}: field 'tof_bin_edges[{a}][{b}]' must be equal bins centred on 0; got {edges.tolist()}")
        fwhm_mm = self._tof_fwhm[a][b]
        if not fwhm_mm > 0:
            raise ValueError(f"{self.where}: field 'tof_resolution[{a}][{b}]' must be positive for TOF data; got {fwhm_mm}")
        return TOFParameters(edges.size - 1, float((edges[-1] - edges[0]) / (edges.size - 1)), fwhm_mm * 2 / SPEED_OF_LIGHT_MM_PER_PS)

    def energy_bin_edges_kev(self, module_type):
        """Energy bin edges (keV) of a module type."""
        return self.energy_edges_kev[module_type]

    # -- efficiencies ---------------------------------------------------------------------------
    def detection_bin_efficiencies(self, module_type):
        """Efficiency of every detection bin of a module type (ones when the file has none)."""
        de = self.info.detection_efficiencies
        n = int(self.num_detection_bins[module_type])
        if de is None or not de.detection_bin_efficiencies:
            return np.ones(n)
        if len(de.detection_bin_efficiencies) != self.num_module_types:
            raise ValueError(
                f"{self.where}: field 'detection_efficiencies.detection_bin_efficiencies' has "
                f"{len(de.detection_bin_efficiencies)} entries; expected {self.num_module_types} (one per module type)"
            )
        eff = np.asarray(de.detection_bin_efficiencies[module_type], dtype=np.float64)
        if eff.shape != (n,):
            raise ValueError(
                f"{self.where}: field 'detection_efficiencies.detection_bin_efficiencies[{module_type}]' has "
                f"{eff.size} entries; expected {n}"
            )
        return eff

    def detector_efficiencies(self):
        """Mean detection-bin efficiency of each detector over its energy bins, shape ``(num_detectors,)``."""
        out = [self.detection_bin_efficiencies(t).reshape(-1, int(self.num_energy_bins[t])).mean(axis=1)
               for t in range(self.num_module_types)]
        return np.concatenate(out)

    @property
    def calibration_factor(self):
        de = self.info.detection_efficiencies
        return float(de.calibration_factor) if de is not None and de.calibration_factor > 0 else 1.0

    def _module_pair_tables(self):
        """Per type pair: (SGID LUT as a padded array, stacked efficiency matrices) or None."""
        if self._pair_tables is not None:
            return self._pair_tables
        de = self.info.detection_efficiencies
        t_count = self.num_module_types
        tables = [[None] * (t1 + 1) for t1 in range(t_count)]
        vectors = list(de.module_pair_efficiencies_vectors or []) if de is not None else []
        if vectors:
            luts = list(de.module_pair_sgidlut or [])
            for t1 in range(t_count):
                for t2 in range(t1 + 1):
                    name = f"detection_efficiencies.module_pair_sgidlut[{t1}][{t2}]"
                    try:
                        rows = luts[t1][t2]
                        vec = vectors[t1][t2]
                    except IndexError:
                        raise ValueError(f"{self.where}: field '{name}' is missing; expected one per module-type pair") from None
                    n1, n2 = int(self.num_modules[t1]), int(self.num_modules[t2])
                    lut = np.full((n1, n2), -1, dtype=np.int64)
                    if len(rows) != n1:
                        raise ValueError(f"{self.where}: field '{name}' has {len(rows)} rows; expected {n1}")
                    for m, row in enumerate(rows):
                        lut[m, : len(row)] = row
                    size1 = int(self.num_elements[t1] * self.num_energy_bins[t1])
                    size2 = int(self.num_elements[t2] * self.num_energy_bins[t2])
                    values = np.zeros((len(vec), size1, size2))
                    for s, mpe in enumerate(vec):
                        if mpe.sgid != s:
                            raise ValueError(f"{self.where}: field 'module_pair_efficiencies_vectors[{t1}][{t2}][{s}].sgid' is {mpe.sgid}; expected {s}")
                        v = np.asarray(mpe.values, dtype=np.float64)
                        if v.shape != (size1, size2):
                            raise ValueError(
                                f"{self.where}: field 'module_pair_efficiencies_vectors[{t1}][{t2}][{s}].values' has shape "
                                f"{v.shape}; expected ({size1}, {size2})"
                            )
                        values[s] = v
                    if lut.max() >= len(vec):
                        raise ValueError(f"{self.where}: field '{name}' names SGID {lut.max()}; only {len(vec)} are given")
                    tables[t1][t2] = (lut, values)
        self._pair_tables = tables
        return tables

    def pair_efficiencies(self, detector_1, detector_2):
        """Detection efficiency of detector pairs, summed over their energy bins.

        Parameters
        ----------
        detector_1, detector_2 : array of int, shape (n,)
            petbind detector ids (either order).

        Returns
        -------
        ndarray of float64, shape (n,)
            ``sum_{e1,e2} eff[bin1(e1)] eff[bin2(e2)] mpe[SGID][el1, e1][el2, e2]``
            as in the PETSIRD definition (without the calibration factor);
            0 for pairs of modules that are not in coincidence (SGID -1) and
            for a detector paired with itself.
        """
        d1 = np.asarray(detector_1, dtype=np.int64).reshape(-1)
        d2 = np.asarray(detector_2, dtype=np.int64).reshape(-1)
        t1, t2 = self.type_of_detector[d1], self.type_of_detector[d2]
        swap = (t1 < t2) | ((t1 == t2) & (d1 < d2))
        d1, d2 = np.where(swap, d2, d1), np.where(swap, d1, d2)
        t1, t2 = np.where(swap, t2, t1), np.where(swap, t1, t2)
        out = np.zeros(d1.size)
        tables = self._module_pair_tables()
        for a in range(self.num_module_types):
            eff_a = self.detection_bin_efficiencies(a)
            for b in range(a + 1):
                sel = np.flatnonzero((t1 == a) & (t2 == b))
                if sel.size == 0:
                    continue
                eff_b = self.detection_bin_efficiencies(b)
                l1 = d1[sel] - self.detector_offset[a]
                l2 = d2[sel] - self.detector_offset[b]
                ne1, ne2 = int(self.num_energy_bins[a]), int(self.num_energy_bins[b])
                table = tables[a][b]
                if table is not None:
                    lut, values = table
                    sgid = lut[l1 // self.num_elements[a], l2 // self.num_elements[b]]
                    ok = sgid >= 0
                    el1, el2 = l1 % self.num_elements[a], l2 % self.num_elements[b]
                acc = np.zeros(sel.size)
                for e1 in range(ne1):
                    for e2 in range(ne2):
                        w = eff_a[l1 * ne1 + e1] * eff_b[l2 * ne2 + e2]
                        if table is not None:
                            w = w * np.where(ok, values[np.maximum(sgid, 0), el1 * ne1 + e1, el2 * ne2 + e2], 0.0)
                        acc += w
                out[sel] = acc
        out[d1 == d2] = 0.0
        return out

    # -- ring -----------------------------------------------------------------------------------
    def ring_scanner(self):
        """The ring :class:`Scanner` of a ring-like geometry.

        Returns
        -------
        scanner : Scanner
        det_of_detector : ndarray of int64, shape (num_detectors,)
            Ring-scanner detector id of every PETSIRD detector (element).

        Raises
        ------
        ValueError
            When the geometry is not a ring (the message says why).
        """
        where = self.where
        if self.num_module_types != 1:
            raise ValueError(
                f"{where}: field 'scanner_geometry.replicated_modules' has {self.num_module_types} module types; "
                "a ring scanner (sinograms, petbind HDF5) needs one"
            )
        centre = self.detector_positions_mm()
        scale = float(np.abs(centre).max()) or 1.0
        tol = 1e-4 * scale
        ring_of, ring_z = _cluster(centre[:, 2], tol)
        nr = ring_z.size
        counts = np.bincount(ring_of, minlength=nr)
        if np.any(counts != counts[0]):
            raise ValueError(f"{where}: field 'scanner_geometry' is not ring-like: rings hold {sorted(set(counts.tolist()))} elements")
        n = int(counts[0])
        phi = np.arctan2(centre[:, 1], centre[:, 0])
        rel = np.mod(phi - phi[0] + 1e-9, 2 * np.pi)
        crystal_of = np.empty(centre.shape[0], dtype=np.int64)
        crystal_xy = None
        for r in range(nr):
            idx = np.flatnonzero(ring_of == r)
            idx = idx[np.argsort(rel[idx], kind="stable")]
            if np.any(np.diff(rel[idx]) < 1e-7):
                raise ValueError(
                    f"{where}: field 'scanner_geometry' has several elements at one angle in a ring "
                    "(depth-of-interaction layers?); a ring scanner needs one crystal per angle"
                )
            xy = centre[idx, :2]
            if crystal_xy is None:
                crystal_xy = xy
            elif not np.allclose(xy, crystal_xy, atol=tol, rtol=0):
                raise ValueError(f"{where}: field 'scanner_geometry' is not ring-like: ring {r} has other transaxial positions than ring 0")
            crystal_of[idx] = np.arange(n)
        try:
            scanner = Scanner(crystal_xy, ring_z, self._crystal_mask(ring_of * n + crystal_of, n, nr),
                              name=self.info.model_name or "petsird")
        except ValueError as exc:
            raise ValueError(f"{where}: field 'scanner_geometry' is not a petbind ring scanner: {exc}") from None
        return scanner, ring_of * n + crystal_of

    def _crystal_mask(self, det_of, n, nr):
        eff = np.zeros(n * nr)
        eff[det_of] = self.detector_efficiencies()
        return ~np.all(eff.reshape(nr, n) == 0, axis=0)


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
        ``calibration_factor``, ``num_energy_bins``, ``det_of_element``.

    Raises
    ------
    ValueError
        When the geometry is not ring-like (the message says why).
    """
    geo = header if isinstance(header, PetsirdGeometry) else PetsirdGeometry(header.scanner, where)
    scanner, det_of_element = geo.ring_scanner()
    n_en = int(geo.num_energy_bins[0])
    bin_to_detector = np.repeat(det_of_element, n_en)
    nd = scanner.num_detectors
    de = geo.info.detection_efficiencies
    eff = None
    if de is not None and de.detection_bin_efficiencies:
        eff = np.zeros(nd)
        eff[det_of_element] = geo.detector_efficiencies()
        if n_en > 1:
            log.warning("%s: %d energy bins are merged; crystal efficiencies are their mean", where, n_en)
        if np.all(eff[scanner.detector_mask()] == 1.0):
            eff = None
    if de is not None and de.module_pair_efficiencies_vectors:
        log.warning("%s: module-pair efficiencies are present but not carried into petbind ring corrections", where)
    window = geo.energy_bin_edges_kev(0)
    extras = {
        "energy_window_kev": (float(window[0]), float(window[-1])),
        "crystal_efficiencies": eff,
        "calibration_factor": geo.calibration_factor,
        "num_energy_bins": n_en,
        "det_of_element": det_of_element,
    }
    return scanner, bin_to_detector, geo.tof_parameters(0, 0), extras

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
# events
# ------------------------------------------------------------------------------------------------
_EVENT_FIELDS = ("module_types", "detection_bins", "tof_idx", "time_ms", "stop_ms", "is_prompt")


@dataclass
class PetsirdEvents:
    """Coincidence events of a PETSIRD file as arrays, in file order.

    Attributes
    ----------
    module_types : ndarray of uint8, shape (n, 2)
        Module type of the first and second detection.
    detection_bins : ndarray of uint32, shape (n, 2)
        PETSIRD detection bins (numbered within each module type; they hold
        module, element and energy bin).
    tof_idx : ndarray of uint32, shape (n,)
        TOF bin, in the binning of the event's module-type pair.
    time_ms, stop_ms : ndarray of uint32, shape (n,)
        The event's time block ``[time_ms, stop_ms)``, ms since the start of
        the acquisition.
    is_prompt : ndarray of bool, shape (n,)
    first_event : int
        Index of the first event in the file.
    """

    module_types: np.ndarray
    detection_bins: np.ndarray
    tof_idx: np.ndarray
    time_ms: np.ndarray
    stop_ms: np.ndarray
    is_prompt: np.ndarray
    first_event: int = 0

    def __len__(self):
        return int(self.tof_idx.shape[0])

    @classmethod
    def concatenate(cls, parts, first_event=0):
        """One :class:`PetsirdEvents` from several (in order)."""
        parts = list(parts)
        if not parts:
            return cls.empty(first_event)
        if len(parts) == 1:
            p = parts[0]
            return cls(*(getattr(p, f) for f in _EVENT_FIELDS), first_event=first_event)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _EVENT_FIELDS), first_event=first_event)

    @classmethod
    def empty(cls, first_event=0):
        return cls(np.zeros((0, 2), np.uint8), np.zeros((0, 2), np.uint32), np.zeros(0, np.uint32),
                   np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, bool), first_event)

    def select(self, index):
        """The events at ``index`` (boolean mask or integer array)."""
        return PetsirdEvents(*(getattr(self, f)[index] for f in _EVENT_FIELDS), first_event=self.first_event)

    def equals(self, other):
        """Same events, field by field, in the same order."""
        return isinstance(other, PetsirdEvents) and all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in _EVENT_FIELDS
        )


def _check_events(where, geo, ev):
    """Refuse detection bins and TOF indices outside the header's ranges (per module type / pair)."""
    if len(ev) == 0:
        return
    t_count = geo.num_module_types
    t = ev.module_types
    for end in range(2):
        for m in range(t_count):
            sel = ev.detection_bins[:, end] if t_count == 1 else ev.detection_bins[t[:, end] == m, end]
            limit = int(geo.num_detection_bins[m])
            if sel.size and int(sel.max()) >= limit:
                i = int(np.flatnonzero((ev.detection_bins[:, end] >= limit) & (t[:, end] == m))[0])
                raise ValueError(
                    f"{where}: field 'detection_bins' out of range at event {ev.first_event + i}: bin "
                    f"{int(ev.detection_bins[i, end])} of module type {m}; expected < {limit}"
                )
    for a in range(t_count):
        for c in range(t_count):
            sel = ev.tof_idx if t_count == 1 else ev.tof_idx[(t[:, 0] == a) & (t[:, 1] == c)]
            ntof = int(geo.num_tof_bins[a, c])
            if sel.size and int(sel.max()) >= ntof:
                i = int(np.flatnonzero((ev.tof_idx >= ntof) & (t[:, 0] == a) & (t[:, 1] == c))[0])
                raise ValueError(
                    f"{where}: field 'tof_idx' out of range at event {ev.first_event + i}: {int(ev.tof_idx[i])} for module types "
                    f"({a}, {c}); expected < {ntof} (tof_bin_edges of that pair)"
                )
    if np.any(ev.stop_ms < ev.time_ms):
        i = int(np.flatnonzero(ev.stop_ms < ev.time_ms)[0])
        raise ValueError(f"{where}: field 'time_interval' of the block of event {ev.first_event + i} ends before it starts")


def _other_block_cases():
    """``tag -> (TimeBlock case, serializer class)`` of the non-event time blocks."""
    petsird = _petsird()
    from petsird import binary  # noqa: PLC0415

    tb = petsird.TimeBlock
    return {
        1: (tb.ExternalSignalTimeBlock, binary.ExternalSignalTimeBlockSerializer),
        2: (tb.BedMovementTimeBlock, binary.BedMovementTimeBlockSerializer),
        3: (tb.GantryMovementTimeBlock, binary.GantryMovementTimeBlockSerializer),
        4: (tb.DeadTimeTimeBlock, binary.DeadTimeTimeBlockSerializer),
        5: (tb.SinglesHistogramTimeBlock, binary.SinglesHistogramTimeBlockSerializer),
    }


_IO_CLASSES = None


def _io_classes():
    """The package's binary reader and writer with the header's float32 vectors in one piece."""
    global _IO_CLASSES
    if _IO_CLASSES is None:
        petsird = _petsird()

        class Reader(petsird.BinaryPETSIRDReader):
            def _read_header(self):
                return _bin.header_serializer().read(self._stream)

        class Writer(petsird.BinaryPETSIRDWriter):
            def _write_header(self, value):
                _bin.header_serializer().write(self._stream, value)

        _IO_CLASSES = Reader, Writer
    return _IO_CLASSES


def bulk_supported():
    """Whether the installed ``petsird`` package uses the schema the bulk codec decodes."""
    return _bin.schema_supported(_petsird().PETSIRDWriterBase.schema)


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------
class PetsirdReader:
    """Read a PETSIRD binary file: header, geometry and events in bulk.

    Parameters
    ----------
    path : str or os.PathLike
    chunk_events : int
        Events per chunk (a chunk ends after the time block that reaches
        this, so it can exceed it by up to one window of blocks).
    bulk : bool, optional
        Decode events as arrays (default when the installed ``petsird``
        schema is the one :mod:`~petbind.recon.rawdata.petsird_binary` knows)
        or through the package's one-object-per-event reader.
    window_bytes : int
        Bytes decoded at a time by the bulk reader (grown when one time block
        is larger).

    Attributes
    ----------
    header : petsird.Header
    geometry : PetsirdGeometry
        Detectors, TOF and energy bins of any geometry.
    is_ring : bool
        Whether the geometry maps to a ring :class:`Scanner`.
    scanner, tof
        The ring scanner and its TOF parameters (module-type pair (0, 0));
        reading them for a geometry that is not a ring raises ``ValueError``
        saying why.
    exam : ExamInfo
    corrections : ListmodeCorrections
        Efficiencies and calibration after opening; singles and dead-time
        blocks are added during the first full pass of :meth:`chunks` or
        :meth:`events` (PETSIRD interleaves them with the events; ring
        scanners only).
    other_blocks : list of (int, petsird.TimeBlock)
        Non-event time blocks with their start (ms), after a full pass.
    num_events : int or None
        Coincidence events in the file, after a full pass.
    ignored : dict
        Events of the last full pass that petbind does not use (singles,
        triples, quadruples, lists outside the module-type matrix).

    Raises
    ------
    ValueError
        For a file the ``petsird`` package cannot read (naming the file and
        the part: header or time blocks).

    Examples
    --------
    ::

        r = PetsirdReader("scan.petsird")
        for ev in r.events():            # any geometry: PetsirdEvents
            ids = r.geometry.detector_ids(ev.module_types, ev.detection_bins)
        for chunk in r.chunks():         # ring scanners: ListmodeChunk
            ...
    """

    def __init__(self, path, chunk_events=1_000_000, bulk=None, window_bytes=1 << 19):
        self.path = os.fspath(path)
        self.chunk_events = int(chunk_events)
        self.window_bytes = max(1024, int(window_bytes))
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        petsird = _petsird()
        with open(self.path, "rb") as f:
            try:
                reader = _io_classes()[0](f)
            except Exception as exc:
                raise ValueError(f"{self.path}: not a PETSIRD binary file ({type(exc).__name__}: {exc})") from exc
            try:
                self.header = reader.read_header()
            except Exception as exc:
                raise ValueError(f"{self.path}: field 'header' cannot be read by petsird ({type(exc).__name__}: {exc})") from exc
            # the header's end: the file position less what the package buffered but did not consume
            stream = reader._stream
            self._events_offset = f.tell() - (stream._last_read_count - stream._offset)
        if bulk is None:
            bulk = bulk_supported()
            if not bulk:
                log.warning("%s: petsird %s has a schema the bulk decoder does not know; reading one event object at a time",
                            self.path, getattr(petsird, "__version__", "?"))
        self.bulk = bool(bulk)
        self.geometry = PetsirdGeometry(self.header.scanner, self.path)
        geo = self.geometry
        try:
            self._scanner, self._bin_to_det, self._tof, extras = petsird_to_scanner(geo, self.path)
            self._det_of_element = extras["det_of_element"]
            self.is_ring, self._ring_error = True, None
            window = extras["energy_window_kev"]
            self.corrections = ListmodeCorrections(
                crystal_efficiencies=extras["crystal_efficiencies"], calibration_factor=extras["calibration_factor"]
            )
        except ValueError as exc:
            self.is_ring, self._ring_error = False, str(exc)
            edges = geo.energy_edges_kev
            window = (float(min(e[0] for e in edges)), float(max(e[-1] for e in edges)))
            self.corrections = ListmodeCorrections(calibration_factor=geo.calibration_factor)
        self.exam = _exam_from_petsird(self.header, window)
        self.num_events = None
        self.other_blocks = []
        self.ignored = {}

    @property
    def scanner(self):
        if not self.is_ring:
            raise ValueError(f"{self._ring_error}; use PetsirdReader.events() and .geometry (listmode OSEM on detector positions)")
        return self._scanner

    @property
    def tof(self):
        if not self.is_ring:
            raise ValueError(f"{self._ring_error}; TOF bins are per module-type pair (.geometry.tof_parameters(t1, t2)): "
                             "use PetsirdReader.events() and listmode OSEM on detector positions")
        return self._tof

    def __repr__(self):
        return f"PetsirdReader({self.path!r}, {self.geometry!r}, ring={self.is_ring})"

    # -- raw events -----------------------------------------------------------------------------
    def events(self, start_ms=None, stop_ms=None) -> Iterator[PetsirdEvents]:
        """Iterate over the coincidence events of blocks with ``start_ms <= block start < stop_ms``.

        Works for any geometry.  A pass over the whole file (no time limits)
        sets :attr:`num_events`, :attr:`other_blocks`, :attr:`ignored` and,
        for a ring scanner, the singles and dead-time corrections.

        Yields
        ------
        PetsirdEvents
            Chunks of about ``chunk_events`` events, in file order.

        Raises
        ------
        ValueError
            For a truncated or corrupt stream (naming the byte offset) and for
            detection bins or TOF indices outside the header's ranges.
        """
        source = self._bulk_lists if self.bulk else self._object_lists
        pending, buffered, first = [], 0, 0
        state = {"total": 0, "other": [], "ignored": dict.fromkeys(("singles", "triples", "quadruples", "extra_rows"), 0)}
        for part in source(start_ms, stop_ms, state):
            if len(part):
                pending.append(part)
                buffered += len(part)
            if buffered >= self.chunk_events:
                ev = PetsirdEvents.concatenate(pending, first)
                _check_events(self.path, self.geometry, ev)
                yield ev
                first += buffered
                pending, buffered = [], 0
        if buffered:
            ev = PetsirdEvents.concatenate(pending, first)
            _check_events(self.path, self.geometry, ev)
            yield ev
        self.other_blocks = state["other"]
        self.ignored = {k: v for k, v in state["ignored"].items() if v}
        if start_ms is None and stop_ms is None:
            self.num_events = state["total"]
            self._report_ignored()
            if self.is_ring:
                self._set_singles([b.value for _, b in self.other_blocks if isinstance(b, _petsird().TimeBlock.SinglesHistogramTimeBlock)],
                                  [b.value for _, b in self.other_blocks if isinstance(b, _petsird().TimeBlock.DeadTimeTimeBlock)])

    def _report_ignored(self):
        what = {"singles": "single events", "triples": "triple coincidences", "quadruples": "quadruple coincidences",
                "extra_rows": "coincidences in lists outside the lower-triangular module-type matrix "
                              f"(the header has {self.geometry.num_module_types} module types)"}
        for key, n in self.ignored.items():
            log.warning("%s: %d %s are not used by petbind and were skipped", self.path, n, what[key])
        tb = _petsird().TimeBlock
        used = (tb.SinglesHistogramTimeBlock, tb.DeadTimeTimeBlock) if self.is_ring else ()
        unused = sorted({type(b).__name__.split(".")[-1] for _, b in self.other_blocks if not isinstance(b, used)})
        if unused:
            log.warning("%s: %s blocks are not used by petbind (kept in .other_blocks)", self.path, ", ".join(unused))

    def _keep(self, start, start_ms, stop_ms):
        return (start_ms is None or start >= start_ms) and (stop_ms is None or start < stop_ms)

    def _bulk_lists(self, start_ms, stop_ms, state):
        """Event arrays of consecutive windows of the stream (bulk decoder)."""
        from petsird._binary import CodedInputStream  # noqa: PLC0415

        num_types = self.geometry.num_module_types
        window = self.window_bytes
        cases = None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos, remaining = self._events_offset, 0
            buf = np.empty(window + _bin.PADDING, dtype=np.uint8)
            while True:
                left = size - pos
                if left <= 0:
                    raise ValueError(f"{self.path}: field 'time_blocks' ends at byte {pos} without the stream's closing 0 after "
                                     f"{state['total']} events; the file is truncated")
                nbytes = min(window, left)
                if buf.size < nbytes + _bin.PADDING:
                    buf = np.empty(nbytes + _bin.PADDING, dtype=np.uint8)
                f.seek(pos)
                if f.readinto(memoryview(buf)[:nbytes]) != nbytes:
                    raise ValueError(f"{self.path}: short read at byte {pos}")
                try:
                    tokens, ends = _bin.decode_varints(buf, nbytes)
                    walk = _bin.walk_blocks(tokens, 0, remaining, num_types, max_count=left)
                except ValueError as exc:
                    raise ValueError(f"{self.path}: field 'time_blocks' is corrupt near byte {pos}: {exc}") from None
                for key, n in walk.ignored.items():
                    state["ignored"][key] += n
                if walk.lists:
                    lists = np.array(walk.lists, dtype=np.int64)
                    state["total"] += int(lists[:, 4].sum())
                    if start_ms is not None or stop_ms is not None:
                        keep = np.ones(len(lists), bool)
                        if start_ms is not None:
                            keep &= lists[:, 5] >= start_ms
                        if stop_ms is not None:
                            keep &= lists[:, 5] < stop_ms
                        lists = lists[keep]
                    lists = lists[lists[:, 4] > 0]
                    if len(lists):
                        yield PetsirdEvents(**_bin.gather_events(tokens, lists))
                advanced = 0 if walk.position == 0 else int(ends[walk.position - 1]) + 1
                remaining = walk.remaining
                if walk.stop == "end":
                    pos += advanced
                    if pos != size:
                        log.warning("%s: %d bytes after the end of the PETSIRD stream are ignored", self.path, size - pos)
                    return
                if walk.stop == "other":
                    cases = cases or _other_block_cases()
                    case, serializer = cases[walk.tag]
                    f.seek(pos + advanced + 1)  # after the one-byte union tag
                    stream = CodedInputStream(f)
                    try:
                        value = serializer().read(stream)
                    except Exception as exc:
                        raise ValueError(f"{self.path}: field 'time_blocks' ({case.__name__} at byte {pos + advanced}) cannot be read "
                                         f"by petsird ({type(exc).__name__}: {exc}); the file is truncated or corrupt") from exc
                    state["other"].append((int(value.time_interval.start), case(value)))
                    pos = f.tell() - (stream._last_read_count - stream._offset)
                    remaining -= 1
                    continue
                if advanced == 0:
                    if nbytes == left:
                        raise ValueError(f"{self.path}: field 'time_blocks' ends inside a time block at byte {pos} after "
                                         f"{state['total']} events; the file is truncated")
                    window *= 2  # one time block is larger than the window
                    continue
                pos += advanced

    def _object_lists(self, start_ms, stop_ms, state):
        """Event arrays of each time block through the package's event objects (reference path)."""
        petsird = _petsird()
        num_types = self.geometry.num_module_types
        reader = petsird.BinaryPETSIRDReader(self.path)
        try:
            try:
                reader.read_header()
                for block in reader.read_time_blocks():
                    value = block.value
                    if not isinstance(block, petsird.TimeBlock.EventTimeBlock):
                        state["other"].append((int(value.time_interval.start), block))
                        continue
                    start, stop = int(value.time_interval.start), int(value.time_interval.stop)
                    ign = state["ignored"]
                    ign["singles"] += sum(len(s) for s in value.single_events)
                    ign["triples"] += sum(len(c) for a in value.triple_events for b in a for c in b)
                    ign["quadruples"] += sum(len(d) for a in value.quadruple_events for b in a for c in b for d in c)
                    types, bins, tof, prompt = [], [], [], []
                    for is_prompt, matrix in ((True, value.prompt_events), (False, value.delayed_events)):
                        for i, row in enumerate(matrix):
                            for j, events in enumerate(row):
                                if i >= num_types or j > i:
                                    ign["extra_rows"] += len(events)
                                    continue
                                state["total"] += len(events)
                                if not self._keep(start, start_ms, stop_ms) or not events:
                                    continue
                                bins.extend([e.detection_bins for e in events])
                                tof.extend([e.tof_idx for e in events])
                                types.append((i, j, len(events)))
                                prompt.append(is_prompt)
                    if not bins:
                        continue
                    counts = np.array([c for _, _, c in types], dtype=np.int64)
                    n = int(counts.sum())
                    yield PetsirdEvents(
                        np.repeat(np.array([(i, j) for i, j, _ in types], dtype=np.uint8), counts, axis=0),
                        np.array(bins, dtype=np.uint32).reshape(n, 2),
                        np.array(tof, dtype=np.uint32),
                        np.full(n, start, dtype=np.uint32),
                        np.full(n, stop, dtype=np.uint32),
                        np.repeat(np.array(prompt, dtype=bool), counts),
                    )
            except ValueError:
                raise
            except Exception as exc:
                raise ValueError(
                    f"{self.path}: field 'time_blocks' cannot be read by petsird after {state['total']} events "
                    f"({type(exc).__name__}: {exc}); the file is truncated or corrupt"
                ) from exc
        finally:
            reader._close()

    # -- ring-scanner chunks ----------------------------------------------------------------------
    def chunks(self, start_ms=None, stop_ms=None) -> Iterator[ListmodeChunk]:
        """Iterate over events of a ring scanner as petbind listmode chunks.

        Events with ``start_ms <= time_ms < stop_ms`` (time = block start, ms).

        Yields
        ------
        ListmodeChunk

        Raises
        ------
        ValueError
            For a geometry that is not a ring (use :meth:`events`), and as
            :meth:`events`.
        """
        scanner, tof = self.scanner, self.tof
        last_time = -np.inf
        for ev in self.events(start_ms, stop_ms):
            ids = self._bin_to_det[ev.detection_bins]
            k = ev.tof_idx.astype(np.int16) if tof is not None else None
            t = ev.time_ms.astype(np.float64)
            where = f"{self.path} (events {ev.first_event}..{ev.first_event + len(ev)})"
            ids, k, t, p = validate_events(where, scanner, tof, ids, k, t, ev.is_prompt, last_time)
            last_time = float(t[-1])
            yield ListmodeChunk(ids, k, t, p, ev.first_event)

    def _set_singles(self, singles, alive):
        info = self.header.scanner
        nd = self._scanner.num_detectors
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
        nd = self._scanner.num_detectors
        lut = np.asarray(info.module_singles_unit_idx_lu_ts[0], dtype=np.int64)
        hist = np.asarray(s.singles_per_singles_unit_histogram, dtype=np.float64).sum(axis=1)
        n_el = int(self.geometry.num_elements[0])
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
# writers
# ------------------------------------------------------------------------------------------------
class _StreamWriter:
    """Writes a header, then time blocks: event blocks in bulk, other blocks through the package.

    Event blocks are consecutive runs of events with the same time interval;
    a run at the end of one call is held back until the next call (or
    :meth:`close`) because the next chunk may continue it.
    """

    def __init__(self, f, header, where, bulk=True):
        petsird = _petsird()
        self.where = where
        self.geometry = PetsirdGeometry(header.scanner, where)
        info = header.scanner
        self.prompts = info.prompt_event_policy != petsird.CoincidencePolicy.NONE
        self.delayeds = info.delayed_event_policy != petsird.CoincidencePolicy.NONE
        t_count = self.geometry.num_module_types
        self.template, self.slots, pairs = _bin.block_template(t_count, self.prompts, self.delayeds)
        self.num_slots = len(pairs)
        self.pairs = pairs
        self.slot_of = np.full((2, t_count, t_count), -1, dtype=np.int64)
        for s, (kind, i, j) in enumerate(pairs):
            self.slot_of[kind, i, j] = s
        self.bulk = bulk
        self.writer = (_io_classes()[1] if bulk else petsird.BinaryPETSIRDWriter)(f)
        self.writer.write_header(header)
        self.writer.write_time_blocks([])  # enter the stream state; writes nothing
        self.pending = None
        self.other = []  # (start_ms, TimeBlock), sorted
        self.written = 0

    def add_other_blocks(self, blocks):
        self.other = sorted(self.other + [(int(s), b) for s, b in blocks], key=lambda x: x[0])

    def write(self, ev, final=False):
        if self.pending is not None:
            ev = PetsirdEvents.concatenate([self.pending, ev])
            self.pending = None
        if len(ev) == 0:
            if final:
                self._write_other(np.inf)
            return
        key = (ev.time_ms.astype(np.uint64) << np.uint64(32)) | ev.stop_ms.astype(np.uint64)
        new_run = np.empty(len(ev), dtype=bool)
        new_run[0] = True
        np.not_equal(key[1:], key[:-1], out=new_run[1:])
        if not final:
            cut = int(np.flatnonzero(new_run)[-1])  # the last run may continue in the next chunk
            self.pending = ev.select(slice(cut, None))
            ev, new_run = ev.select(slice(0, cut)), new_run[:cut]
            if len(ev) == 0:
                return
        kind = np.where(ev.is_prompt, _bin.PROMPT, _bin.DELAYED)
        slot = self.slot_of[kind, ev.module_types[:, 0], ev.module_types[:, 1]]
        if np.any(slot < 0):
            i = int(np.flatnonzero(slot < 0)[0])
            what = "prompt" if ev.is_prompt[i] else "delayed"
            raise ValueError(f"{self.where}: event {i} is a {what} coincidence of module types {ev.module_types[i].tolist()}, "
                             f"which the header's {what}_event_policy or module types do not allow")
        run = np.cumsum(new_run) - 1
        order = np.argsort(run * self.num_slots + slot, kind="stable")  # file order inside each list
        starts = np.flatnonzero(new_run)
        start_ms, stop_ms = ev.time_ms[starts], ev.stop_ms[starts]
        # other blocks go before the first event block that starts at or after them
        firsts = [int(np.argmax(start_ms >= s)) if np.any(start_ms >= s) else len(starts) for s, _ in self.other]
        cuts = sorted(set(firsts + [len(starts)]))
        lo = 0
        for hi in cuts:
            if hi > lo:
                self._write_events(ev, order, run, slot, start_ms, stop_ms, lo, hi, starts)
            self._write_other(start_ms[hi] if hi < len(starts) else (np.inf if final else -np.inf))
            lo = hi
        if final:
            self._write_other(np.inf)

    def _write_events(self, ev, order, run, slot, start_ms, stop_ms, lo, hi, starts):
        first = int(starts[lo])
        last = int(starts[hi]) if hi < len(starts) else len(ev)
        idx = order[first:last]  # runs are contiguous in file order, so their sorted events are too
        counts = np.bincount((run[idx] - lo) * self.num_slots + slot[idx], minlength=(hi - lo) * self.num_slots)
        if self.bulk:
            tokens = np.empty((idx.size, 3), dtype=np.uint32)
            tokens[:, :2] = ev.detection_bins[idx]
            tokens[:, 2] = ev.tof_idx[idx]
            data = _bin.encode_event_blocks(self.template, self.slots, start_ms[lo:hi], stop_ms[lo:hi],
                                            counts.reshape(hi - lo, self.num_slots), tokens.ravel())
            self.writer._stream.write_bytes_directly(data.tobytes())
        else:
            self.writer.write_time_blocks(self._block_objects(ev, idx, counts.reshape(hi - lo, self.num_slots),
                                                              start_ms[lo:hi], stop_ms[lo:hi]))
        self.written += idx.size

    def _block_objects(self, ev, idx, counts, start_ms, stop_ms):
        """The package's objects for the reference (per-event) writer."""
        petsird = _petsird()
        t_count = self.geometry.num_module_types
        b = ev.detection_bins[idx].tolist()
        k = ev.tof_idx[idx].tolist()
        events = [petsird.CoincidenceEvent(detection_bins=x, tof_idx=z) for x, z in zip(b, k)]
        out, pos = [], 0
        for r in range(counts.shape[0]):
            mats = {}
            for kind, present in ((_bin.PROMPT, self.prompts), (_bin.DELAYED, self.delayeds)):
                mats[kind] = [[[] for _ in range(i + 1)] for i in range(t_count)] if present else []
            for s, (kind, i, j) in enumerate(self.pairs):
                c = int(counts[r, s])
                mats[kind][i][j] = events[pos:pos + c]
                pos += c
            out.append(petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
                time_interval=petsird.TimeInterval(start=int(start_ms[r]), stop=int(stop_ms[r])),
                prompt_events=mats[_bin.PROMPT], delayed_events=mats[_bin.DELAYED])))
        return out

    def _write_other(self, until_ms):
        due = []
        while self.other and self.other[0][0] <= until_ms:
            due.append(self.other.pop(0)[1])
        if due:
            self.writer.write_time_blocks(due)

    def close(self):
        self.write(PetsirdEvents.empty(), final=True)
        self.writer.close()

    def abort(self):
        self.writer._close()


def _canonical_order(ev, geo, where):
    """Swap detections so that ``type_1 > type_2`` or ``bin_1 >= bin_2`` (PETSIRD's rule), mirroring TOF."""
    t, b = ev.module_types, ev.detection_bins
    if geo.num_module_types == 1:
        swap = b[:, 0] < b[:, 1]
    else:
        swap = (t[:, 0] < t[:, 1]) | ((t[:, 0] == t[:, 1]) & (b[:, 0] < b[:, 1]))
    if not swap.any():
        return ev
    t_count = geo.num_module_types
    codes = [0] if t_count == 1 else np.unique(t[swap, 0].astype(np.int64) * t_count + t[swap, 1]).tolist()
    for code in codes:
        a, c = divmod(code, t_count)
        e = geo.tof_bin_edges_mm(a, c)
        if not np.allclose(e, -e[::-1], atol=1e-4 * max(1.0, float(np.abs(e).max()))):
            raise ValueError(f"{where}: events of module types ({a}, {c}) need swapping to PETSIRD's order, "
                             "but their TOF bins are not symmetric about 0, so the TOF bin cannot be mirrored")
    if t_count == 1:
        ntof = np.uint32(geo.num_tof_bins[0, 0])
        types = t
    else:
        ntof = geo.num_tof_bins[t[:, 0], t[:, 1]].astype(np.uint32)
        types = np.where(swap[:, None], t[:, ::-1], t)
    return PetsirdEvents(
        types,
        np.where(swap[:, None], b[:, ::-1], b),
        np.where(swap, ntof - np.uint32(1) - ev.tof_idx, ev.tof_idx),
        ev.time_ms, ev.stop_ms, ev.is_prompt, ev.first_event,
    )


def write_petsird_events(path, header, events, other_blocks=(), bulk=None):
    """Write PETSIRD coincidence events with a given header (any geometry), streaming.

    Parameters
    ----------
    path : str or os.PathLike
        Output file; written under a temporary name and renamed when complete.
    header : petsird.Header
        Written as is (e.g. ``PetsirdReader.header``).
    events : iterable of PetsirdEvents
        In time-block order; consecutive events with the same time interval
        form one time block (lists per module-type pair, prompts then
        delayeds).  Pairs that break PETSIRD's order are swapped.
    other_blocks : iterable of (int, petsird.TimeBlock)
        Non-event blocks with their start (ms), written before the first
        event block that starts at or after them (e.g.
        ``PetsirdReader.other_blocks``).
    bulk : bool, optional
        Encode events as arrays (default when the schema is supported) or
        through the package's event objects.

    Returns
    -------
    int
        Number of events written.

    Examples
    --------
    Read and write back any PETSIRD file, event for event::

        r = PetsirdReader("in.petsird")
        chunks = list(r.events())
        write_petsird_events("out.petsird", r.header, chunks, r.other_blocks)
    """
    where = os.fspath(path)
    bulk = bulk_supported() if bulk is None else bool(bulk)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        w = _StreamWriter(f, header, where, bulk)
        try:
            w.add_other_blocks(other_blocks)
            for ev in events:
                _check_events(where, w.geometry, ev)
                w.write(_canonical_order(ev, w.geometry, where))
            w.close()
        except BaseException:
            w.abort()
            raise
    return int(w.written)


def write_petsird(path, scanner, chunks, tof=None, exam=None, corrections=None, time_block_ms=1, crystal_size_mm=None,
                  bulk=None):
    """Write ring-scanner listmode chunks to a PETSIRD binary file (streaming).

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
    bulk : bool, optional
        See :func:`write_petsird_events`.

    Returns
    -------
    int
        Number of events written.
    """
    petsird = _petsird()
    where = os.fspath(path)
    time_block_ms = int(time_block_ms)
    if time_block_ms < 1:
        raise ValueError(f"time_block_ms must be a positive integer; got {time_block_ms}")
    if corrections is not None:
        corrections.validate(scanner.num_detectors)
    header = scanner_to_petsird(scanner, tof, exam, corrections, crystal_size_mm)
    extra = _correction_blocks(petsird, scanner, corrections, where)
    num_tof = tof.num_bins if tof is not None else 1
    state = {"quantised": False}

    def as_events():
        for chunk in chunks:
            n = len(chunk)
            if n == 0:
                continue
            if tof is not None and chunk.tof_bin is None:
                raise ValueError(f"{where}: field 'tof_bin' missing in a chunk of TOF data")
            ids = np.asarray(chunk.detector_ids, dtype=np.int64)
            t = np.asarray(chunk.time_ms, dtype=np.float64)
            blk = np.floor(t / time_block_ms).astype(np.int64)
            if n and int(blk.max()) * time_block_ms + time_block_ms > np.iinfo(np.uint32).max:
                raise ValueError(f"{where}: field 'time_ms' exceeds PETSIRD's uint32 ms range")
            state["quantised"] |= bool(np.any(blk * time_block_ms != t))
            k = np.zeros(n, np.int64) if tof is None else np.asarray(chunk.tof_bin, dtype=np.int64)
            if k.size and (k.min() < 0 or k.max() >= num_tof):
                raise ValueError(f"{where}: field 'tof_bin' out of range [{k.min()}, {k.max()}]; expected 0 <= k < {num_tof}")
            start = (blk * time_block_ms).astype(np.uint32)
            # the written geometry has one energy bin and detection bin == detector id
            yield PetsirdEvents(np.zeros((n, 2), np.uint8), ids.astype(np.uint32), k.astype(np.uint32), start,
                                start + np.uint32(time_block_ms), np.asarray(chunk.is_prompt, dtype=bool))

    n = write_petsird_events(path, header, as_events(), extra, bulk=bulk)
    if state["quantised"]:
        log.info("%s: event times quantised to %d ms PETSIRD time blocks", where, time_block_ms)
    return n

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
