"""petbind HDF5 files: listmode (streamed in chunks) and sinograms.

The layout of both files is documented field by field in ``docs/formats.md``.
In short:

* ``/`` attributes ``format_version`` (``"MAJOR.MINOR"``) and ``petbind_kind``
  (``"listmode"`` or ``"sinograms"``).
* ``/scanner``: ``crystal_xy_mm`` (N, 2), ``ring_z_mm`` (R,), ``crystal_mask``
  (N,), attribute ``name``.
* ``/tof`` (only for TOF data): attributes ``num_bins``, ``bin_width_mm``,
  ``fwhm_ps``, ``num_sigmas``.
* ``/exam``: attributes of :class:`ExamInfo`.
* ``/corrections``: optional inputs of :class:`ListmodeCorrections`.
* ``/listmode``: columns ``detector_ids`` (N, 2) int32, ``tof_bin`` (N,) int16
  (TOF only), ``time_ms`` (N,) float64, ``is_prompt`` (N,) bool; chunked and
  compressed, so a file of 1e9 events is read in bounded chunks.

Every file is written to a temporary name in the destination folder and
renamed with :func:`os.replace` when complete; a failed write leaves no file
behind.  Opening a file checks version, required fields, dtypes, shapes and
value ranges, and every error names the file and the field.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import h5py
import numpy as np

from petbind.core.files import atomic_output
from petbind.recon.geometry import Scanner, SinogramLayout, TOFParameters

__all__ = [
    "FORMAT_VERSION",
    "ExamInfo",
    "ListmodeCorrections",
    "ListmodeChunk",
    "ListmodeWriter",
    "ListmodeReader",
    "SinogramData",
    "write_sinograms_h5",
    "read_sinograms_h5",
]

log = logging.getLogger(__name__)

#: Version written into every petbind HDF5 file (``MAJOR.MINOR``).  Readers
#: accept any file with the same major version.
FORMAT_VERSION = "1.0"

_SINOGRAM_NAMES = ("prompts", "delayeds", "normalisation", "attenuation", "scatter")
#: sinograms that carry a TOF axis when the data are TOF
_TOF_SINOGRAMS = ("prompts", "delayeds", "scatter")


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _err(path, fld, msg):
    return ValueError(f"{path}: field '{fld}' {msg}")


def _open_h5(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(
            f"{path}: cannot be opened as HDF5 ({exc}); the file is truncated, corrupt or not a petbind file"
        ) from exc


def _dataset(f, path, name, kind, ndim=None, shape=None):
    """Fetch a dataset, checking presence, dtype kind and shape."""
    if name not in f:
        raise _err(path, name, "is missing")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise _err(path, name, f"must be a dataset; found {type(ds).__name__}")
    if ds.dtype.kind not in kind:
        raise _err(path, name, f"has dtype {ds.dtype}; expected kind {kind!r} (b=bool, i/u=integer, f=float)")
    if ndim is not None and ds.ndim != ndim:
        raise _err(path, name, f"has {ds.ndim} dimensions, shape {ds.shape}; expected {ndim}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(ds.shape, shape)):
            if want is not None and got != want:
                raise _err(path, name, f"has shape {ds.shape}; expected {tuple(shape)} (axis {axis})")
    return ds


def _attr(f, path, group, name, cast, default=None, required=True):
    obj = f[group] if group else f
    if name not in obj.attrs:
        if required:
            raise _err(path, f"{group}/{name}" if group else name, "(attribute) is missing")
        return default
    value = obj.attrs[name]
    try:
        if cast is str:
            return value.decode() if isinstance(value, bytes) else str(value)
        return cast(value)
    except (TypeError, ValueError) as exc:
        raise _err(path, f"{group}/{name}", f"(attribute) has invalid value {value!r}: {exc}") from exc


def _read_array(path, ds):
    try:
        return ds[()]
    except OSError as exc:
        raise _err(path, ds.name.lstrip("/"), f"cannot be read ({exc}); the file is truncated or corrupt") from exc


def check_version(f, path, kind):
    """Check ``format_version`` and ``petbind_kind`` of an open file."""
    version = _attr(f, path, "", "format_version", str)
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise _err(path, "format_version", f"is {version!r}; expected 'MAJOR.MINOR'") from None
    if major != int(FORMAT_VERSION.split(".")[0]):
        raise _err(path, "format_version", f"is {version}; this petbind reads major version {FORMAT_VERSION.split('.')[0]}")
    got = _attr(f, path, "", "petbind_kind", str)
    if got != kind:
        raise _err(path, "petbind_kind", f"is {got!r}; expected {kind!r}")


# ------------------------------------------------------------------------------------------------
# metadata dataclasses
# ------------------------------------------------------------------------------------------------
@dataclass
class ExamInfo:
    """Study metadata stored with listmode and sinograms.

    Parameters
    ----------
    tracer : str
        Radiopharmaceutical, e.g. ``"[11C]AZ10419369"``.
    isotope : str
        Radionuclide, e.g. ``"C11"``.
    half_life_s : float
        Physical half-life in s (``C11``: 1221.84 s).
    injection_time : str
        ISO 8601 date and time of injection.
    injected_activity_bq : float
        Injected activity at ``injection_time`` (Bq).
    scan_start_s : float
        Start of the acquisition (listmode time 0) after injection (s).
    subject_id, description : str
        Free text.
    energy_window_kev : tuple of 2 float
        Lower and upper energy discriminator (keV).
    """

    tracer: str = ""
    isotope: str = ""
    half_life_s: float = float("nan")
    injection_time: str = ""
    injected_activity_bq: float = float("nan")
    scan_start_s: float = 0.0
    subject_id: str = ""
    description: str = ""
    energy_window_kev: tuple = (425.0, 650.0)

    def __post_init__(self):
        self.half_life_s = float(self.half_life_s)
        self.injected_activity_bq = float(self.injected_activity_bq)
        self.scan_start_s = float(self.scan_start_s)
        ew = tuple(float(v) for v in self.energy_window_kev)
        if len(ew) != 2 or not ew[0] < ew[1]:
            raise ValueError(f"ExamInfo.energy_window_kev must be (lower, upper) with lower < upper; got {ew}")
        self.energy_window_kev = ew
        if not (math.isnan(self.half_life_s) or self.half_life_s > 0):
            raise ValueError(f"ExamInfo.half_life_s must be positive; got {self.half_life_s}")
        self.injection_time = str(self.injection_time)
        if self.injection_time:
            try:
                _dt.datetime.fromisoformat(self.injection_time)
            except ValueError:
                raise ValueError(
                    f"ExamInfo.injection_time must be ISO 8601 like '2026-01-01T10:00:00'; got {self.injection_time!r}"
                ) from None

    def __eq__(self, other):
        # NaN marks "unknown" and equals NaN here, so round trips compare equal
        if not isinstance(other, ExamInfo):
            return NotImplemented
        for fl in fields(self):
            a, b = getattr(self, fl.name), getattr(other, fl.name)
            if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
                continue
            if a != b:
                return False
        return True

    @property
    def decay_constant_per_s(self):
        """``ln 2 / half_life_s`` (1/s)."""
        return math.log(2.0) / self.half_life_s

    def _write(self, group):
        for fl in fields(self):
            value = getattr(self, fl.name)
            group.attrs[fl.name] = np.asarray(value, dtype=float) if fl.name == "energy_window_kev" else value

    @classmethod
    def _read(cls, f, path):
        if "exam" not in f:
            raise _err(path, "exam", "(group) is missing")
        kw = {}
        for fl in fields(cls):
            cast = str if fl.type == "str" else (float if fl.type == "float" else None)
            if fl.name == "energy_window_kev":
                kw[fl.name] = tuple(np.asarray(f["exam"].attrs.get(fl.name, fl.default), dtype=float).tolist())
            else:
                kw[fl.name] = _attr(f, path, "exam", fl.name, cast, fl.default, required=False)
        try:
            return cls(**kw)
        except ValueError as exc:
            raise _err(path, "exam", str(exc)) from exc


@dataclass
class ListmodeCorrections:
    """Correction inputs that travel with listmode data.

    Parameters
    ----------
    crystal_efficiencies : ndarray, shape (num_detectors,), optional
        Relative detection efficiency of each detector (1 = nominal, 0 for gaps).
    singles_block_edges_s : ndarray, shape (num_blocks + 1,), optional
        Edges of the singles time blocks (s from scan start), increasing.
    singles_counts : ndarray, shape (num_blocks, num_detectors), optional
        Singles counted by each detector in each block.
    alive_block_edges_s : ndarray, shape (num_alive_blocks + 1,), optional
        Edges of the dead-time blocks (s from scan start).
    alive_fractions : ndarray, shape (num_alive_blocks, num_detectors), optional
        Measured fraction of time each detector was alive (PETSIRD dead-time blocks).
    mu_map_per_mm : ndarray, shape (x, y, z), optional
        Linear attenuation coefficients at 511 keV (1/mm).
    mu_map_affine : ndarray, shape (4, 4), optional
        NIfTI RAS+ affine of ``mu_map_per_mm`` (required with it).
    calibration_factor : float
        Scanner calibration (Bq/mL per reconstructed count rate unit).
    """

    crystal_efficiencies: Optional[np.ndarray] = None
    singles_block_edges_s: Optional[np.ndarray] = None
    singles_counts: Optional[np.ndarray] = None
    alive_block_edges_s: Optional[np.ndarray] = None
    alive_fractions: Optional[np.ndarray] = None
    mu_map_per_mm: Optional[np.ndarray] = None
    mu_map_affine: Optional[np.ndarray] = None
    calibration_factor: float = 1.0

    _ARRAYS = (
        "crystal_efficiencies",
        "singles_block_edges_s",
        "singles_counts",
        "alive_block_edges_s",
        "alive_fractions",
        "mu_map_per_mm",
        "mu_map_affine",
    )

    def validate(self, num_detectors, where="ListmodeCorrections", prefix=""):
        """Check shapes and values against a scanner with ``num_detectors`` detectors.

        Raises
        ------
        ValueError
            Naming ``where`` and the offending field.
        """
        def bad(name, msg):
            return ValueError(f"{where}: field '{prefix}{name}' {msg}")

        if not (np.isfinite(self.calibration_factor) and self.calibration_factor > 0):
            raise bad("calibration_factor", f"must be positive and finite; got {self.calibration_factor}")
        if self.crystal_efficiencies is not None:
            e = np.asarray(self.crystal_efficiencies)
            if e.shape != (num_detectors,):
                raise bad("crystal_efficiencies", f"has shape {e.shape}; expected ({num_detectors},)")
            if not np.all(np.isfinite(e)) or np.any(e < 0):
                raise bad("crystal_efficiencies", "must be finite and >= 0")
        for edges_name, data_name in (("singles_block_edges_s", "singles_counts"), ("alive_block_edges_s", "alive_fractions")):
            edges, data = getattr(self, edges_name), getattr(self, data_name)
            if (edges is None) != (data is None):
                raise bad(data_name, f"and '{edges_name}' must be given together")
            if edges is None:
                continue
            edges, data = np.asarray(edges), np.asarray(data)
            if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
                raise bad(edges_name, f"must be 1-D, at least 2 entries, strictly increasing; got shape {edges.shape}")
            if data.shape != (edges.size - 1, num_detectors):
                raise bad(data_name, f"has shape {data.shape}; expected ({edges.size - 1}, {num_detectors})")
            if not np.all(np.isfinite(data)) or np.any(data < 0):
                raise bad(data_name, "must be finite and >= 0")
            if data_name == "alive_fractions" and np.any(data > 1):
                raise bad(data_name, "must lie in [0, 1]")
        if (self.mu_map_per_mm is None) != (self.mu_map_affine is None):
            raise bad("mu_map_affine", "and 'mu_map_per_mm' must be given together")
        if self.mu_map_per_mm is not None:
            if np.asarray(self.mu_map_per_mm).ndim != 3:
                raise bad("mu_map_per_mm", f"must be 3-D (x, y, z); got shape {np.shape(self.mu_map_per_mm)}")
            if np.asarray(self.mu_map_affine).shape != (4, 4):
                raise bad("mu_map_affine", f"must be 4x4; got shape {np.shape(self.mu_map_affine)}")

    def _write(self, group):
        group.attrs["calibration_factor"] = float(self.calibration_factor)
        for name in self._ARRAYS:
            value = getattr(self, name)
            if value is not None:
                group.create_dataset(name, data=np.asarray(value))

    @classmethod
    def _read(cls, f, path, num_detectors):
        if "corrections" not in f:
            return None
        g = f["corrections"]
        kinds = {"mu_map_affine": "f", "crystal_efficiencies": "f", "mu_map_per_mm": "f", "alive_fractions": "f"}
        kw = {}
        for name in cls._ARRAYS:
            if name in g:
                kw[name] = _read_array(path, _dataset(f, path, f"corrections/{name}", kinds.get(name, "fiu")))
        kw["calibration_factor"] = _attr(f, path, "corrections", "calibration_factor", float, 1.0, required=False)
        out = cls(**kw)
        out.validate(num_detectors, where=path, prefix="corrections/")
        return out

    def equals(self, other):
        """Field-by-field equality (arrays compared exactly)."""
        if not isinstance(other, ListmodeCorrections) or self.calibration_factor != other.calibration_factor:
            return False
        for name in self._ARRAYS:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None) or (a is not None and not np.array_equal(np.asarray(a), np.asarray(b))):
                return False
        return True


def _write_scanner(group, scanner):
    group.attrs["name"] = scanner.name
    group.create_dataset("crystal_xy_mm", data=scanner.crystal_xy_mm)
    group.create_dataset("ring_z_mm", data=scanner.ring_z_mm)
    group.create_dataset("crystal_mask", data=scanner.crystal_mask)


def _read_scanner(f, path):
    if "scanner" not in f:
        raise _err(path, "scanner", "(group) is missing")
    xy = _read_array(path, _dataset(f, path, "scanner/crystal_xy_mm", "f", 2, (None, 2)))
    z = _read_array(path, _dataset(f, path, "scanner/ring_z_mm", "f", 1))
    mask = _read_array(path, _dataset(f, path, "scanner/crystal_mask", "bui", 1, (xy.shape[0],)))
    name = _attr(f, path, "scanner", "name", str, "scanner", required=False)
    try:
        return Scanner(xy, z, mask.astype(bool), name=name)
    except ValueError as exc:
        raise _err(path, "scanner", str(exc)) from exc


def _write_tof(f, tof):
    if tof is None:
        return
    g = f.create_group("tof")
    g.attrs["num_bins"] = int(tof.num_bins)
    g.attrs["bin_width_mm"] = float(tof.bin_width_mm)
    g.attrs["fwhm_ps"] = float(tof.fwhm_ps)
    g.attrs["num_sigmas"] = float(tof.num_sigmas)


def _read_tof(f, path):
    if "tof" not in f:
        return None
    try:
        return TOFParameters(
            _attr(f, path, "tof", "num_bins", int),
            _attr(f, path, "tof", "bin_width_mm", float),
            _attr(f, path, "tof", "fwhm_ps", float),
            _attr(f, path, "tof", "num_sigmas", float, 3.0, required=False),
        )
    except ValueError as exc:
        raise _err(path, "tof", str(exc)) from exc


# ------------------------------------------------------------------------------------------------
# listmode
# ------------------------------------------------------------------------------------------------
@dataclass
class ListmodeChunk:
    """A bounded block of consecutive listmode events.

    Attributes
    ----------
    detector_ids : ndarray of int32, shape (n, 2)
    tof_bin : ndarray of int16, shape (n,), or None for non-TOF data
    time_ms : ndarray of float64, shape (n,)
        Time of each event after scan start (ms).
    is_prompt : ndarray of bool, shape (n,)
        ``True`` for prompts, ``False`` for delayed coincidences.
    first_event : int
        Index of the first event of this chunk in the file.
    """

    detector_ids: np.ndarray
    tof_bin: Optional[np.ndarray]
    time_ms: np.ndarray
    is_prompt: np.ndarray
    first_event: int = 0

    def __len__(self):
        return int(self.time_ms.shape[0])


def validate_events(where, scanner, tof, detector_ids, tof_bin, time_ms, is_prompt, last_time_ms=-np.inf):
    """Check one block of events; return them with canonical dtypes.

    Parameters
    ----------
    where : str
        File (or writer) name used in error messages.
    scanner : Scanner
    tof : TOFParameters or None
    detector_ids : array of int, shape (n, 2)
    tof_bin : array of int, shape (n,), or None (must be None iff ``tof`` is None)
    time_ms : array of float, shape (n,)
        Non-decreasing, finite, >= 0 and >= ``last_time_ms``.
    is_prompt : array of bool, shape (n,)

    Returns
    -------
    detector_ids (int32), tof_bin (int16 or None), time_ms (float64), is_prompt (bool)

    Raises
    ------
    ValueError, TypeError
        Naming ``where`` and the field.
    """
    ids = np.asarray(detector_ids)
    if ids.ndim != 2 or ids.shape[1] != 2:
        raise ValueError(f"{where}: field 'detector_ids' must have shape (n, 2); got {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{where}: field 'detector_ids' must be integers; got dtype {ids.dtype}")
    n = ids.shape[0]
    t = np.asarray(time_ms)
    if t.shape != (n,):
        raise ValueError(f"{where}: field 'time_ms' must have shape ({n},); got {t.shape}")
    if t.dtype.kind not in "iuf":
        raise TypeError(f"{where}: field 'time_ms' must be numeric; got dtype {t.dtype}")
    t = t.astype(np.float64, copy=False)
    p = np.asarray(is_prompt)
    if p.shape != (n,):
        raise ValueError(f"{where}: field 'is_prompt' must have shape ({n},); got {p.shape}")
    if p.dtype != np.bool_:
        raise TypeError(f"{where}: field 'is_prompt' must be bool; got dtype {p.dtype}")
    if n == 0:
        return ids.astype(np.int32), (None if tof is None else np.zeros(0, np.int16)), t, p
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= scanner.num_detectors:
        bad = int(np.flatnonzero((ids < 0).any(1) | (ids >= scanner.num_detectors).any(1))[0])
        raise ValueError(
            f"{where}: field 'detector_ids' out of range at event {bad}: {ids[bad].tolist()}; "
            f"expected 0 <= id < {scanner.num_detectors}"
        )
    ids = ids.astype(np.int32, copy=False)
    if not scanner.crystal_mask.all():
        gap = ~scanner.crystal_mask[ids % scanner.crystals_per_ring]
        if gap.any():
            bad = int(np.flatnonzero(gap.any(1))[0])
            raise ValueError(
                f"{where}: field 'detector_ids' names a gap crystal (crystal_mask False) at event {bad}: {ids[bad].tolist()}"
            )
    if not np.all(np.isfinite(t)) or t.min() < 0:
        raise ValueError(f"{where}: field 'time_ms' must be finite and >= 0")
    dt = np.diff(t)
    if t[0] < last_time_ms or (dt.size and dt.min() < 0):
        bad = 0 if t[0] < last_time_ms else int(np.flatnonzero(dt < 0)[0]) + 1
        prev = last_time_ms if bad == 0 else t[bad - 1]
        raise ValueError(
            f"{where}: field 'time_ms' is not monotonic (non-decreasing): event {bad} at {t[bad]} ms follows {prev} ms"
        )
    if tof is None:
        if tof_bin is not None:
            raise ValueError(f"{where}: field 'tof_bin' given but the data are non-TOF (tof=None)")
        return ids, None, t, p
    if tof_bin is None:
        raise ValueError(f"{where}: field 'tof_bin' is required for TOF data ({tof.num_bins} bins)")
    k = np.asarray(tof_bin)
    if k.shape != (n,):
        raise ValueError(f"{where}: field 'tof_bin' must have shape ({n},); got {k.shape}")
    if k.dtype.kind not in "iu":
        raise TypeError(f"{where}: field 'tof_bin' must be integers; got dtype {k.dtype}")
    if int(k.min()) < 0 or int(k.max()) >= tof.num_bins:
        raise ValueError(f"{where}: field 'tof_bin' out of range [{int(k.min())}, {int(k.max())}]; expected 0 <= k < {tof.num_bins}")
    return ids, k.astype(np.int16, copy=False), t, p


class ListmodeWriter:
    """Stream coincidence events into a petbind HDF5 listmode file.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.h5``).  Written to a temporary file in the same folder
        and renamed on :meth:`close`; removed if the ``with`` block raises.
    scanner : Scanner
    tof : TOFParameters or None
        TOF binning of ``tof_bin``; ``None`` for non-TOF data.
    exam : ExamInfo, optional
    corrections : ListmodeCorrections, optional
    chunk_events : int
        Events buffered in memory before they are written (bounds memory).
    compression : {"gzip", "lzf", None}
        HDF5 filter of the event columns.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "lm.h5")
    >>> scanner = Scanner.demo()
    >>> with ListmodeWriter(path, scanner) as w:
    ...     w.append(np.array([[0, 100]]), None, np.array([1.0]), np.array([True]))
    >>> ListmodeReader(path).num_events
    1
    """

    def __init__(self, path, scanner, tof=None, exam=None, corrections=None, chunk_events=1_000_000, compression="gzip"):
        if not isinstance(scanner, Scanner):
            raise TypeError(f"scanner must be a Scanner; got {type(scanner).__name__}")
        if tof is not None and not isinstance(tof, TOFParameters):
            raise TypeError(f"tof must be TOFParameters or None; got {type(tof).__name__}")
        if exam is None:
            exam = ExamInfo()
        if not isinstance(exam, ExamInfo):
            raise TypeError(f"exam must be ExamInfo or None; got {type(exam).__name__}")
        if corrections is not None:
            if not isinstance(corrections, ListmodeCorrections):
                raise TypeError(f"corrections must be ListmodeCorrections or None; got {type(corrections).__name__}")
            corrections.validate(scanner.num_detectors)
        if compression not in ("gzip", "lzf", None):
            raise ValueError(f"compression must be one of 'gzip', 'lzf', None; got {compression!r}")
        chunk_events = int(chunk_events)
        if chunk_events < 1:
            raise ValueError(f"chunk_events must be >= 1; got {chunk_events}")
        self.path = os.fspath(path)
        self.scanner, self.tof, self.exam, self.corrections = scanner, tof, exam, corrections
        self.chunk_events = chunk_events
        self._atomic = atomic_output(self.path)
        self._buffer = []
        self._buffered = 0
        self.num_events = 0
        self._last_time_ms = -np.inf
        self._closed = False
        try:
            self._file = h5py.File(self._atomic.tmp_path, "w")
            f = self._file
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["petbind_kind"] = "listmode"
            _write_scanner(f.create_group("scanner"), scanner)
            _write_tof(f, tof)
            exam._write(f.create_group("exam"))
            g = f.create_group("listmode")
            rows = min(chunk_events, 1 << 16)
            opts = dict(compression=compression, shuffle=compression is not None)
            if compression == "gzip":
                opts["compression_opts"] = 1
            self._ds = {
                "detector_ids": g.create_dataset("detector_ids", (0, 2), np.int32, maxshape=(None, 2), chunks=(rows, 2), **opts),
                "time_ms": g.create_dataset("time_ms", (0,), np.float64, maxshape=(None,), chunks=(rows,), **opts),
                "is_prompt": g.create_dataset("is_prompt", (0,), np.bool_, maxshape=(None,), chunks=(rows,), **opts),
            }
            if tof is not None:
                self._ds["tof_bin"] = g.create_dataset("tof_bin", (0,), np.int16, maxshape=(None,), chunks=(rows,), **opts)
            g.attrs["num_events"] = 0
            g.attrs["time_sorted"] = True
        except BaseException:
            self._abort()
            raise

    def append(self, detector_ids, tof_bin, time_ms, is_prompt):
        """Add a block of events (validated; see :func:`validate_events`).

        Parameters
        ----------
        detector_ids : array of int, shape (n, 2)
            Detector ids ``ring * crystals_per_ring + crystal`` of both photons.
        tof_bin : array of int, shape (n,), or None
            TOF bin per event; ``None`` for non-TOF data.
        time_ms : array of float, shape (n,)
            Time after scan start (ms), non-decreasing across all appends.
        is_prompt : array of bool, shape (n,)
        """
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        ids, k, t, p = validate_events(
            f"{self.path} (writing)", self.scanner, self.tof, detector_ids, tof_bin, time_ms, is_prompt, self._last_time_ms
        )
        if t.size == 0:
            return
        self._last_time_ms = float(t[-1])
        self._buffer.append((ids, k, t, p))
        self._buffered += t.size
        if self._buffered >= self.chunk_events:
            self._flush()

    def set_corrections(self, corrections):
        """Replace the correction inputs (written when the file is closed).

        Useful when they become known only while streaming, e.g. PETSIRD
        singles blocks interleaved with the events.
        """
        if corrections is not None:
            if not isinstance(corrections, ListmodeCorrections):
                raise TypeError(f"corrections must be ListmodeCorrections or None; got {type(corrections).__name__}")
            corrections.validate(self.scanner.num_detectors, where=f"{self.path} (writing)")
        self.corrections = corrections

    def _flush(self):
        if not self._buffer:
            return
        ids = np.concatenate([b[0] for b in self._buffer])
        t = np.concatenate([b[2] for b in self._buffer])
        p = np.concatenate([b[3] for b in self._buffer])
        cols = {"detector_ids": ids, "time_ms": t, "is_prompt": p}
        if self.tof is not None:
            cols["tof_bin"] = np.concatenate([b[1] for b in self._buffer])
        n0, n1 = self.num_events, self.num_events + t.size
        for name, data in cols.items():
            ds = self._ds[name]
            ds.resize(n1, axis=0)
            ds[n0:n1] = data
        self.num_events = n1
        self._buffer, self._buffered = [], 0

    def close(self):
        """Flush, finish the file and rename it to its final name."""
        if self._closed:
            return
        try:
            self._flush()
            self._file["listmode"].attrs["num_events"] = self.num_events
            if self.corrections is not None:
                self.corrections._write(self._file.create_group("corrections"))
            self._file.close()
            self._atomic.commit()
        except BaseException:
            self._abort()
            raise
        self._closed = True
        log.info("wrote %d events to %s", self.num_events, self.path)

    def _abort(self):
        self._closed = True
        try:
            if getattr(self, "_file", None) is not None:
                self._file.close()
        finally:
            self._atomic.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort()
        return False


class ListmodeReader:
    """Read a petbind HDF5 listmode file in bounded chunks.

    Parameters
    ----------
    path : str or os.PathLike
    chunk_events : int
        Maximum number of events per chunk yielded by :meth:`chunks`.

    Attributes
    ----------
    scanner : Scanner
    tof : TOFParameters or None
    exam : ExamInfo
    corrections : ListmodeCorrections or None
    num_events : int

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file is not a readable petbind listmode file of a supported
        version, or a field is missing or has the wrong dtype or shape.  The
        message names the file and the field.  Event values (id ranges,
        monotonic time) are checked per chunk while iterating.
    """

    def __init__(self, path, chunk_events=1_000_000):
        self.path = os.fspath(path)
        self.chunk_events = int(chunk_events)
        if self.chunk_events < 1:
            raise ValueError(f"chunk_events must be >= 1; got {chunk_events}")
        with _open_h5(self.path) as f:
            check_version(f, self.path, "listmode")
            self.scanner = _read_scanner(f, self.path)
            self.tof = _read_tof(f, self.path)
            self.exam = ExamInfo._read(f, self.path)
            self.corrections = ListmodeCorrections._read(f, self.path, self.scanner.num_detectors)
            if "listmode" not in f:
                raise _err(self.path, "listmode", "(group) is missing")
            ids = _dataset(f, self.path, "listmode/detector_ids", "iu", 2, (None, 2))
            n = ids.shape[0]
            _dataset(f, self.path, "listmode/time_ms", "fiu", 1, (n,))
            _dataset(f, self.path, "listmode/is_prompt", "b", 1, (n,))
            if self.tof is not None:
                _dataset(f, self.path, "listmode/tof_bin", "iu", 1, (n,))
            elif "listmode/tof_bin" in f:
                raise _err(self.path, "listmode/tof_bin", "is present but the file has no 'tof' group")
            declared = _attr(f, self.path, "listmode", "num_events", int)
            if declared != n:
                raise _err(self.path, "listmode/num_events", f"says {declared} events but the columns hold {n}")
            self.num_events = n

    def __repr__(self):
        return f"ListmodeReader({self.path!r}, num_events={self.num_events}, tof={self.tof is not None}, scanner={self.scanner.name!r})"

    def _index_of_time(self, ds, t_ms):
        """First event index with ``time_ms >= t_ms`` (binary search on the sorted column)."""

        class _View:
            def __len__(_self):
                return ds.shape[0]

            def __getitem__(_self, i):
                return float(ds[i])

        return bisect.bisect_left(_View(), t_ms)

    def time_range_ms(self):
        """``(first, last)`` event time (ms); ``(nan, nan)`` for an empty file."""
        if self.num_events == 0:
            return float("nan"), float("nan")
        with _open_h5(self.path) as f:
            ds = f["listmode/time_ms"]
            return float(ds[0]), float(ds[self.num_events - 1])

    def chunks(self, start_ms=None, stop_ms=None):
        """Iterate over the events with ``start_ms <= time_ms < stop_ms``.

        Parameters
        ----------
        start_ms, stop_ms : float, optional
            Half-open time window (ms after scan start); ``None`` is unbounded.

        Yields
        ------
        ListmodeChunk
            At most ``chunk_events`` events each; every chunk is validated
            (id ranges, TOF range, monotonic time across chunks).
        """
        with _open_h5(self.path) as f:
            g = f["listmode"]
            ds_t = g["time_ms"]
            lo = 0 if start_ms is None else self._index_of_time(ds_t, float(start_ms))
            hi = self.num_events if stop_ms is None else self._index_of_time(ds_t, float(stop_ms))
            last = -np.inf
            if lo > 0:
                last = float(ds_t[lo - 1])
            for a in range(lo, hi, self.chunk_events):
                b = min(a + self.chunk_events, hi)
                cols = {}
                for name in ("detector_ids", "time_ms", "is_prompt") + (("tof_bin",) if self.tof is not None else ()):
                    try:
                        cols[name] = g[name][a:b]
                    except OSError as exc:
                        raise _err(
                            self.path, f"listmode/{name}", f"events {a}..{b} cannot be read ({exc}); the file is truncated or corrupt"
                        ) from exc
                ids, k, t, p = validate_events(
                    f"{self.path} (events {a}..{b})", self.scanner, self.tof,
                    cols["detector_ids"], cols.get("tof_bin"), cols["time_ms"], cols["is_prompt"], last,
                )
                last = float(t[-1])
                yield ListmodeChunk(ids, k, t, p, a)


# ------------------------------------------------------------------------------------------------
# sinograms
# ------------------------------------------------------------------------------------------------
@dataclass
class SinogramData:
    """Sinograms of one frame with their layout.

    Attributes
    ----------
    layout : SinogramLayout
    tof : TOFParameters or None
    prompts, delayeds, scatter : ndarray or None
        Shape ``layout.shape`` (+ ``(tof.num_bins,)`` when TOF), counts.
    normalisation, attenuation : ndarray or None
        Shape ``layout.shape``; multiplicative factors (non-TOF).
    exam : ExamInfo or None
    frame_start_s, frame_duration_s : float
        Frame timing after scan start (s); NaN when unknown.
    """

    layout: SinogramLayout
    tof: Optional[TOFParameters] = None
    prompts: Optional[np.ndarray] = None
    delayeds: Optional[np.ndarray] = None
    normalisation: Optional[np.ndarray] = None
    attenuation: Optional[np.ndarray] = None
    scatter: Optional[np.ndarray] = None
    exam: Optional[ExamInfo] = None
    frame_start_s: float = float("nan")
    frame_duration_s: float = float("nan")


def _expected_sino_shape(layout, tof, name):
    return layout.shape + ((tof.num_bins,) if tof is not None and name in _TOF_SINOGRAMS else ())


def write_sinograms_h5(
    path,
    layout,
    prompts=None,
    delayeds=None,
    normalisation=None,
    attenuation=None,
    scatter=None,
    tof=None,
    exam=None,
    frame_start_s=float("nan"),
    frame_duration_s=float("nan"),
    compression="gzip",
):
    """Write sinograms and their layout to a petbind HDF5 file.

    Parameters
    ----------
    path : str or os.PathLike
    layout : SinogramLayout
    prompts, delayeds, scatter : ndarray, optional
        Shape ``layout.shape`` (+ ``(tof.num_bins,)`` for TOF), counts.
    normalisation, attenuation : ndarray, optional
        Shape ``layout.shape``.
    tof : TOFParameters, optional
    exam : ExamInfo, optional
    frame_start_s, frame_duration_s : float
        Frame timing (s after scan start).

    Raises
    ------
    ValueError
        When a sinogram's shape does not match the layout.
    """
    if not isinstance(layout, SinogramLayout):
        raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
    arrays = dict(prompts=prompts, delayeds=delayeds, normalisation=normalisation, attenuation=attenuation, scatter=scatter)
    for name, arr in arrays.items():
        if arr is None:
            continue
        want = _expected_sino_shape(layout, tof, name)
        if np.shape(arr) != want:
            raise ValueError(f"{os.fspath(path)}: field '{name}' has shape {np.shape(arr)}; expected {want} for {layout}")
    opts = dict(compression=compression, shuffle=compression is not None)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["petbind_kind"] = "sinograms"
            _write_scanner(f.create_group("scanner"), layout.scanner)
            g = f.create_group("layout")
            g.attrs["num_radial"] = layout.num_radial
            g.attrs["max_ring_difference"] = layout.max_ring_difference
            g.attrs["span"] = layout.span
            g.attrs["axis_names"] = ",".join(layout.axis_names)
            _write_tof(f, tof)
            if exam is not None:
                exam._write(f.create_group("exam"))
            fr = f.create_group("frame")
            fr.attrs["start_s"] = float(frame_start_s)
            fr.attrs["duration_s"] = float(frame_duration_s)
            s = f.create_group("sinograms")
            for name, arr in arrays.items():
                if arr is not None:
                    s.create_dataset(name, data=np.asarray(arr), **opts)


def read_sinograms_h5(path):
    """Read a file written by :func:`write_sinograms_h5`.

    Returns
    -------
    SinogramData

    Raises
    ------
    ValueError
        Naming the file and the field for a wrong version, missing field or
        a shape that does not match the stored layout.
    """
    path = os.fspath(path)
    with _open_h5(path) as f:
        check_version(f, path, "sinograms")
        scanner = _read_scanner(f, path)
        if "layout" not in f:
            raise _err(path, "layout", "(group) is missing")
        try:
            layout = SinogramLayout(
                scanner,
                _attr(f, path, "layout", "num_radial", int),
                _attr(f, path, "layout", "max_ring_difference", int),
                _attr(f, path, "layout", "span", int),
            )
        except ValueError as exc:
            raise _err(path, "layout", str(exc)) from exc
        tof = _read_tof(f, path)
        exam = ExamInfo._read(f, path) if "exam" in f else None
        out = SinogramData(layout=layout, tof=tof, exam=exam)
        if "frame" in f:
            out.frame_start_s = _attr(f, path, "frame", "start_s", float, float("nan"), required=False)
            out.frame_duration_s = _attr(f, path, "frame", "duration_s", float, float("nan"), required=False)
        if "sinograms" not in f:
            raise _err(path, "sinograms", "(group) is missing")
        for name in f["sinograms"]:
            if name not in _SINOGRAM_NAMES:
                raise _err(path, f"sinograms/{name}", f"is unknown; expected one of {_SINOGRAM_NAMES}")
            want = _expected_sino_shape(layout, tof, name)
            ds = _dataset(f, path, f"sinograms/{name}", "fiu", len(want), want)
            setattr(out, name, _read_array(path, ds))
        return out
