"""The data model shared by petbind's raw-data files, and HDF5 schema helpers.

Every raw format (petbind HDF5, PETSIRD, Siemens listmode...) is read into the
same objects: :class:`ExamInfo`, :class:`ListmodeCorrections` and streams of
:class:`ListmodeChunk`.  The HDF5 helpers here check each field on reading and
name the file and the field in every error.  Field-by-field documentation:
``docs/formats.md``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import h5py
import numpy as np

from petbind.recon.geometry import Scanner, TOFParameters

__all__ = [
    "FORMAT_VERSION",
    "H5FileWriter",
    "ExamInfo",
    "ListmodeChunk",
    "ListmodeCorrections",
    "check_version",
    "field_error",
    "h5_attr",
    "h5_dataset",
    "open_h5",
    "read_array",
    "read_scanner",
    "read_tof",
    "validate_events",
    "write_scanner",
    "write_tof",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = "1.1"



# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def field_error(path, fld, msg):
    return ValueError(f"{path}: field '{fld}' {msg}")


def open_h5(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(
            f"{path}: cannot be opened as HDF5 ({exc}); the file is truncated, corrupt or not a petbind file"
        ) from exc


def h5_dataset(f, path, name, kind, ndim=None, shape=None):
    """Fetch a dataset, checking presence, dtype kind and shape."""
    if name not in f:
        raise field_error(path, name, "is missing")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise field_error(path, name, f"must be a dataset; found {type(ds).__name__}")
    if ds.dtype.kind not in kind:
        raise field_error(path, name, f"has dtype {ds.dtype}; expected kind {kind!r} (b=bool, i/u=integer, f=float)")
    if ndim is not None and ds.ndim != ndim:
        raise field_error(path, name, f"has {ds.ndim} dimensions, shape {ds.shape}; expected {ndim}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(ds.shape, shape)):
            if want is not None and got != want:
                raise field_error(path, name, f"has shape {ds.shape}; expected {tuple(shape)} (axis {axis})")
    return ds


def h5_attr(f, path, group, name, cast, default=None, required=True):
    obj = f[group] if group else f
    if name not in obj.attrs:
        if required:
            raise field_error(path, f"{group}/{name}" if group else name, "(attribute) is missing")
        return default
    value = obj.attrs[name]
    try:
        if cast is str:
            return value.decode() if isinstance(value, bytes) else str(value)
        return cast(value)
    except (TypeError, ValueError) as exc:
        raise field_error(path, f"{group}/{name}", f"(attribute) has invalid value {value!r}: {exc}") from exc


def read_array(path, ds):
    try:
        return ds[()]
    except OSError as exc:
        raise field_error(path, ds.name.lstrip("/"), f"cannot be read ({exc}); the file is truncated or corrupt") from exc


def check_version(f, path, kind):
    """Check ``format_version`` and ``petbind_kind`` of an open file."""
    version = h5_attr(f, path, "", "format_version", str)
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise field_error(path, "format_version", f"is {version!r}; expected 'MAJOR.MINOR'") from None
    if major != int(FORMAT_VERSION.split(".")[0]):
        raise field_error(path, "format_version", f"is {version}; this petbind reads major version {FORMAT_VERSION.split('.')[0]}")
    got = h5_attr(f, path, "", "petbind_kind", str)
    if got != kind:
        raise field_error(path, "petbind_kind", f"is {got!r}; expected {kind!r}")


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
            raise field_error(path, "exam", "(group) is missing")
        kw = {}
        for fl in fields(cls):
            cast = str if fl.type == "str" else (float if fl.type == "float" else None)
            if fl.name == "energy_window_kev":
                kw[fl.name] = tuple(np.asarray(f["exam"].attrs.get(fl.name, fl.default), dtype=float).tolist())
            else:
                kw[fl.name] = h5_attr(f, path, "exam", fl.name, cast, fl.default, required=False)
        try:
            return cls(**kw)
        except ValueError as exc:
            raise field_error(path, "exam", str(exc)) from exc


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
                kw[name] = read_array(path, h5_dataset(f, path, f"corrections/{name}", kinds.get(name, "fiu")))
        kw["calibration_factor"] = h5_attr(f, path, "corrections", "calibration_factor", float, 1.0, required=False)
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


def write_scanner(group, scanner):
    group.attrs["name"] = scanner.name
    if scanner.resolution_fwhm_mm is not None:
        group.attrs["resolution_fwhm_mm"] = float(scanner.resolution_fwhm_mm)
    group.create_dataset("crystal_xy_mm", data=scanner.crystal_xy_mm)
    group.create_dataset("ring_z_mm", data=scanner.ring_z_mm)
    group.create_dataset("crystal_mask", data=scanner.crystal_mask)


def read_scanner(f, path):
    if "scanner" not in f:
        raise field_error(path, "scanner", "(group) is missing")
    xy = read_array(path, h5_dataset(f, path, "scanner/crystal_xy_mm", "f", 2, (None, 2)))
    z = read_array(path, h5_dataset(f, path, "scanner/ring_z_mm", "f", 1))
    mask = read_array(path, h5_dataset(f, path, "scanner/crystal_mask", "bui", 1, (xy.shape[0],)))
    name = h5_attr(f, path, "scanner", "name", str, "scanner", required=False)
    fwhm = h5_attr(f, path, "scanner", "resolution_fwhm_mm", float, None, required=False)
    try:
        return Scanner(xy, z, mask.astype(bool), name=name, resolution_fwhm_mm=fwhm)
    except ValueError as exc:
        raise field_error(path, "scanner", str(exc)) from exc


def write_tof(f, tof):
    if tof is None:
        return
    g = f.create_group("tof")
    g.attrs["num_bins"] = int(tof.num_bins)
    g.attrs["bin_width_mm"] = float(tof.bin_width_mm)
    g.attrs["fwhm_ps"] = float(tof.fwhm_ps)
    g.attrs["num_sigmas"] = float(tof.num_sigmas)


def read_tof(f, path):
    if "tof" not in f:
        return None
    try:
        return TOFParameters(
            h5_attr(f, path, "tof", "num_bins", int),
            h5_attr(f, path, "tof", "bin_width_mm", float),
            h5_attr(f, path, "tof", "fwhm_ps", float),
            h5_attr(f, path, "tof", "num_sigmas", float, 3.0, required=False),
        )
    except ValueError as exc:
        raise field_error(path, "tof", str(exc)) from exc


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


class H5FileWriter:
    """Shared end of life of petbind's HDF5 writers: a ``with`` block commits, an error discards.

    Subclasses open ``self._file`` on ``self._atomic.tmp_path`` (an
    :class:`~petbind.core.files.atomic_output`) and define ``close()``, which
    commits; whatever fails before that leaves no file behind.
    """

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
