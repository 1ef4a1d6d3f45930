"""petbind HDF5 listmode files: written and read in bounded chunks.

* ``/`` attributes ``format_version`` (``"MAJOR.MINOR"``) and ``petbind_kind``
  (``"listmode"``).
* ``/scanner``, ``/tof`` (TOF data only), ``/exam``, ``/corrections``: see
  :mod:`petbind.recon.rawdata.schema`.
* ``/listmode``: columns ``detector_ids`` (N, 2) int32, ``tof_bin`` (N,) int16
  (TOF only), ``time_ms`` (N,) float64, ``is_prompt`` (N,) bool; chunked and
  compressed, so a file of 1e9 events is read in bounded chunks.

Every file is written to a temporary name in the destination folder and
renamed with :func:`os.replace` when complete; a failed write leaves no file
behind.  Opening a file checks version, required fields, dtypes, shapes and
value ranges, and every error names the file and the field.  Field by field:
``docs/formats.md``.
"""

from __future__ import annotations

import bisect
import logging
import os

import h5py
import numpy as np

from petbind.core.files import atomic_output
from petbind.recon.geometry import Scanner, TOFParameters
from petbind.recon.rawdata.schema import (
    FORMAT_VERSION,
    ExamInfo,
    H5FileWriter,
    ListmodeChunk,
    ListmodeCorrections,
    check_version,
    field_error,
    h5_attr,
    h5_dataset,
    open_h5,
    read_scanner,
    read_tof,
    validate_events,
    write_scanner,
    write_tof,
)

__all__ = ["ListmodeWriter", "ListmodeReader"]

log = logging.getLogger(__name__)


class ListmodeWriter(H5FileWriter):
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
            write_scanner(f.create_group("scanner"), scanner)
            write_tof(f, tof)
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
        with open_h5(self.path) as f:
            check_version(f, self.path, "listmode")
            self.scanner = read_scanner(f, self.path)
            self.tof = read_tof(f, self.path)
            self.exam = ExamInfo._read(f, self.path)
            self.corrections = ListmodeCorrections._read(f, self.path, self.scanner.num_detectors)
            if "listmode" not in f:
                raise field_error(self.path, "listmode", "(group) is missing")
            ids = h5_dataset(f, self.path, "listmode/detector_ids", "iu", 2, (None, 2))
            n = ids.shape[0]
            h5_dataset(f, self.path, "listmode/time_ms", "fiu", 1, (n,))
            h5_dataset(f, self.path, "listmode/is_prompt", "b", 1, (n,))
            if self.tof is not None:
                h5_dataset(f, self.path, "listmode/tof_bin", "iu", 1, (n,))
            elif "listmode/tof_bin" in f:
                raise field_error(self.path, "listmode/tof_bin", "is present but the file has no 'tof' group")
            declared = h5_attr(f, self.path, "listmode", "num_events", int)
            if declared != n:
                raise field_error(self.path, "listmode/num_events", f"says {declared} events but the columns hold {n}")
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
        with open_h5(self.path) as f:
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
        with open_h5(self.path) as f:
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
                        raise field_error(
                            self.path, f"listmode/{name}", f"events {a}..{b} cannot be read ({exc}); the file is truncated or corrupt"
                        ) from exc
                ids, k, t, p = validate_events(
                    f"{self.path} (events {a}..{b})", self.scanner, self.tof,
                    cols["detector_ids"], cols.get("tof_bin"), cols["time_ms"], cols["is_prompt"], last,
                )
                last = float(t[-1])
                yield ListmodeChunk(ids, k, t, p, a)
