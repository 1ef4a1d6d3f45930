"""petbind HDF5 sinogram files: a dynamic acquisition binned frame by frame.

Layout (field by field in ``docs/formats.md``): the common groups of
:mod:`petbind.recon.rawdata.schema` (``/scanner``, ``/tof``, ``/exam``,
``/corrections``, the same as in listmode files), ``/layout`` (the
:class:`~petbind.recon.geometry.SinogramLayout`), ``/frames`` (frame start and
end times) and ``/sinograms`` with one dataset per kind of sinogram:
``prompts``, ``delayeds`` and ``scatter`` have a leading frame axis,
``normalisation`` and ``attenuation`` do not.

Files are written with :class:`SinogramWriter` (block by block, so a study
larger than memory can be written; the file appears under its final name only
when every block of every frame has been written) or
:func:`write_sinograms_h5` (arrays in memory), and read with
:class:`SinogramReader` (one frame at a time, every field checked when the
file is opened and every frame's values when it is read) or
:func:`read_sinograms_h5` (everything in memory).  Errors name the file and
the field.

``format_version`` 1.0 files (one frame, no frame axis, timing in ``/frame``)
are read as a single frame.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import h5py
import numpy as np

from petbind.core.files import atomic_output
from petbind.core.frames import Frames, validate_frame_times
from petbind.recon.geometry import SinogramLayout, TOFParameters
from petbind.recon.rawdata.schema import (
    FORMAT_VERSION,
    ExamInfo,
    H5FileWriter,
    ListmodeCorrections,
    check_version,
    field_error,
    h5_attr,
    h5_dataset,
    open_h5,
    read_array,
    read_scanner,
    read_tof,
    write_scanner,
    write_tof,
)

__all__ = [
    "FRAME_SINOGRAMS",
    "SINOGRAM_NAMES",
    "SinogramData",
    "SinogramReader",
    "SinogramWriter",
    "read_sinograms_h5",
    "write_sinograms_h5",
]

log = logging.getLogger(__name__)

#: Sinograms a file may hold.
SINOGRAM_NAMES = ("prompts", "delayeds", "scatter", "normalisation", "attenuation")
#: Sinograms with a leading frame axis (the others are the same for every frame).
FRAME_SINOGRAMS = ("prompts", "delayeds", "scatter")
#: Sinograms with a trailing TOF axis when the data are TOF.
TOF_SINOGRAMS = ("prompts", "delayeds", "scatter")
#: Sinograms holding counts or expected counts (must be >= 0).
_NONNEGATIVE = ("prompts", "delayeds", "scatter", "normalisation", "attenuation")


def _sino_shape(layout, tof, name, num_frames=None):
    """Shape of sinogram ``name``: ``[(F,)] + layout.shape [+ (T,)]``."""
    lead = (int(num_frames),) if name in FRAME_SINOGRAMS and num_frames is not None else ()
    return lead + layout.shape + ((tof.num_bins,) if tof is not None and name in TOF_SINOGRAMS else ())


def _check_name(name):
    if name not in SINOGRAM_NAMES:
        raise ValueError(f"unknown sinogram {name!r}; expected one of {SINOGRAM_NAMES}")


@dataclass
class SinogramData:
    """A whole sinogram file in memory (see :func:`read_sinograms_h5`).

    Attributes
    ----------
    layout : SinogramLayout
    frame_start_s, frame_end_s : ndarray of float64, shape (F,)
        Frame edges (s after scan start, i.e. after ``exam.scan_start_s``).
    tof : TOFParameters or None
    prompts, delayeds, scatter : ndarray or None
        Shape ``(F,) + layout.shape`` (+ ``(tof.num_bins,)`` when TOF); counts
        (integers) or expected counts (floats).
    normalisation, attenuation : ndarray or None
        Shape ``layout.shape``; multiplicative factors (non-TOF), optional.
    exam : ExamInfo or None
    corrections : ListmodeCorrections or None
        Crystal efficiencies, singles, dead time, μ-map and calibration, as in
        listmode files.
    """

    layout: SinogramLayout
    frame_start_s: np.ndarray
    frame_end_s: np.ndarray
    tof: Optional[TOFParameters] = None
    prompts: Optional[np.ndarray] = None
    delayeds: Optional[np.ndarray] = None
    scatter: Optional[np.ndarray] = None
    normalisation: Optional[np.ndarray] = None
    attenuation: Optional[np.ndarray] = None
    exam: Optional[ExamInfo] = None
    corrections: Optional[ListmodeCorrections] = None

    @property
    def num_frames(self):
        return int(np.size(self.frame_start_s))

    @property
    def frame_duration_s(self):
        return np.asarray(self.frame_end_s) - np.asarray(self.frame_start_s)

    def frames(self):
        """The frames as :class:`petbind.core.frames.Frames` (s after scan start)."""
        return Frames.from_edges(self.frame_start_s, self.frame_end_s)


class SinogramWriter(H5FileWriter):
    """Write a multi-frame sinogram file block by block.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (``.h5``); written under a temporary name in the same
        folder and renamed by :meth:`close` once every block of every
        declared sinogram has been written (a failed or incomplete write
        leaves nothing behind).
    layout : SinogramLayout
    frame_start_s, frame_end_s : array of float, shape (F,)
        Frame edges (s after scan start), validated like every frame list.
    tof : TOFParameters, optional
    exam : ExamInfo, optional
    corrections : ListmodeCorrections, optional
        Validated against the scanner.
    sinograms : dict of str to dtype
        The frame sinograms this file will hold (a subset of
        :data:`FRAME_SINOGRAMS`) and their dtype, e.g.
        ``{"prompts": np.uint16, "delayeds": np.uint16}``.
    chunk_planes : int, optional
        Planes per HDF5 chunk (one frame per chunk); best equal to the plane
        blocks passed to :meth:`write`.
    compression : {"gzip", "lzf", None}

    Examples
    --------
    >>> import tempfile, os
    >>> from petbind.recon.geometry import Scanner
    >>> layout = SinogramLayout(Scanner.cylindrical(60.0, 16, 2, 4.0), 7)
    >>> path = os.path.join(tempfile.mkdtemp(), "sino.h5")
    >>> with SinogramWriter(path, layout, [0.0], [60.0], sinograms={"prompts": np.uint16}) as w:
    ...     w.write("prompts", np.ones((1,) + layout.shape, np.uint16))
    >>> int(SinogramReader(path).frame("prompts", 0).sum()) == layout.num_bins
    True
    """

    def __init__(self, path, layout, frame_start_s, frame_end_s, tof=None, exam=None, corrections=None,
                 sinograms=None, chunk_planes=None, compression="gzip"):
        if not isinstance(layout, SinogramLayout):
            raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
        if tof is not None and not isinstance(tof, TOFParameters):
            raise TypeError(f"tof must be TOFParameters or None; got {type(tof).__name__}")
        if exam is not None and not isinstance(exam, ExamInfo):
            raise TypeError(f"exam must be ExamInfo or None; got {type(exam).__name__}")
        if compression not in ("gzip", "lzf", None):
            raise ValueError(f"compression must be one of 'gzip', 'lzf', None; got {compression!r}")
        self.path = os.fspath(path)
        self.frame_start_s, self.frame_end_s = validate_frame_times(frame_start_s, frame_end_s, f"{self.path} (writing): frames")
        if corrections is not None:
            if not isinstance(corrections, ListmodeCorrections):
                raise TypeError(f"corrections must be ListmodeCorrections or None; got {type(corrections).__name__}")
            corrections.validate(layout.scanner.num_detectors, where=f"{self.path} (writing)", prefix="corrections/")
        sinograms = dict(sinograms or {})
        for name in sinograms:
            if name not in FRAME_SINOGRAMS:
                raise ValueError(f"{self.path}: frame sinogram {name!r} unknown; expected one of {FRAME_SINOGRAMS}")
        self.layout, self.tof, self.exam, self.corrections = layout, tof, exam, corrections
        self.num_frames = int(self.frame_start_s.size)
        cp = layout.num_planes if chunk_planes is None else max(1, min(int(chunk_planes), layout.num_planes))
        self._written = {name: np.zeros((self.num_frames, layout.num_planes), bool) for name in sinograms}
        self._static = {}
        self._atomic = atomic_output(self.path)
        self._closed = False
        try:
            self._file = h5py.File(self._atomic.tmp_path, "w")
            f = self._file
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["petbind_kind"] = "sinograms"
            write_scanner(f.create_group("scanner"), layout.scanner)
            g = f.create_group("layout")
            g.attrs["num_radial"] = layout.num_radial
            g.attrs["max_ring_difference"] = layout.max_ring_difference
            g.attrs["span"] = layout.span
            g.attrs["axis_names"] = ",".join(layout.axis_names)
            write_tof(f, tof)
            if exam is not None:
                exam._write(f.create_group("exam"))
            fr = f.create_group("frames")
            fr.create_dataset("frame_start_s", data=self.frame_start_s)
            fr.create_dataset("frame_end_s", data=self.frame_end_s)
            s = f.create_group("sinograms")
            opts = dict(compression=compression, shuffle=compression is not None)
            if compression == "gzip":
                opts["compression_opts"] = 1
            self._ds = {}
            for name, dtype in sinograms.items():
                shape = _sino_shape(layout, tof, name, self.num_frames)
                chunks = (1, cp) + shape[2:]
                self._ds[name] = s.create_dataset(name, shape, np.dtype(dtype), chunks=chunks, **opts)
            self._opts = opts
        except BaseException:
            self._abort()
            raise

    def write(self, name, data, frames=None, planes=None):
        """Write a block of a frame sinogram.

        Parameters
        ----------
        name : str
            One of the ``sinograms`` declared at creation.
        data : ndarray, shape (len(frames), len(planes), views, radial[, tof])
            Values (cast to the dataset's dtype; integers must fit it).
        frames, planes : slice or int, optional
            Contiguous frame and plane ranges (default all).
        """
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        if name not in self._ds:
            raise ValueError(f"{self.path}: sinogram {name!r} was not declared; declared: {sorted(self._ds)}")
        fsl = _as_slice(frames, self.num_frames, "frames")
        psl = _as_slice(planes, self.layout.num_planes, "planes")
        ds = self._ds[name]
        want = (fsl.stop - fsl.start, psl.stop - psl.start) + ds.shape[2:]
        data = np.asarray(data)
        if data.shape != want:
            raise ValueError(f"{self.path}: field 'sinograms/{name}' block has shape {data.shape}; expected {want}")
        if ds.dtype.kind in "iu":
            info = np.iinfo(ds.dtype)
            if data.size and (data.min() < info.min or data.max() > info.max):
                raise ValueError(f"{self.path}: field 'sinograms/{name}' values [{data.min()}, {data.max()}] do not fit {ds.dtype}")
        ds[fsl, psl] = data.astype(ds.dtype, copy=False)
        self._written[name][fsl, psl] = True

    def write_static(self, name, data):
        """Write ``normalisation`` or ``attenuation`` (shape ``layout.shape``, float32)."""
        if name not in ("normalisation", "attenuation"):
            raise ValueError(f"{self.path}: static sinogram must be 'normalisation' or 'attenuation'; got {name!r}")
        data = np.asarray(data, dtype=np.float32)
        if data.shape != self.layout.shape:
            raise ValueError(f"{self.path}: field 'sinograms/{name}' has shape {data.shape}; expected {self.layout.shape}")
        self._static[name] = data

    def set_corrections(self, corrections):
        """Replace the correction inputs (written when the file is closed)."""
        if corrections is not None:
            if not isinstance(corrections, ListmodeCorrections):
                raise TypeError(f"corrections must be ListmodeCorrections or None; got {type(corrections).__name__}")
            corrections.validate(self.layout.scanner.num_detectors, where=f"{self.path} (writing)", prefix="corrections/")
        self.corrections = corrections

    def close(self):
        """Check that every block was written, finish the file and rename it."""
        if self._closed:
            return
        try:
            for name, done in self._written.items():
                if not done.all():
                    k, p = np.argwhere(~done)[0]
                    raise ValueError(f"{self.path}: field 'sinograms/{name}' incomplete: frame {k}, plane {p} never written")
            s = self._file["sinograms"]
            for name, data in self._static.items():
                s.create_dataset(name, data=data, **self._opts)
            if self.corrections is not None:
                self.corrections._write(self._file.create_group("corrections"))
            self._file.close()
            self._atomic.commit()
        except BaseException:
            self._abort()
            raise
        self._closed = True
        log.info("wrote %d frames of %s to %s", self.num_frames, sorted(self._ds), self.path)


def _as_slice(value, size, what):
    if value is None:
        return slice(0, size)
    if isinstance(value, (int, np.integer)):
        i = int(value)
        if not 0 <= i < size:
            raise ValueError(f"{what} index {i} out of range [0, {size})")
        return slice(i, i + 1)
    if isinstance(value, slice):
        start, stop, step = value.indices(size)
        if step != 1 or stop <= start:
            raise ValueError(f"{what} must be a non-empty contiguous range; got {value}")
        return slice(start, stop)
    arr = np.asarray(value).reshape(-1)
    if arr.size == 0 or np.any(np.diff(arr) != 1) or arr[0] < 0 or arr[-1] >= size:
        raise ValueError(f"{what} must be contiguous indices in [0, {size}); got {arr.tolist()[:8]}")
    return slice(int(arr[0]), int(arr[-1]) + 1)


def write_sinograms_h5(path, layout, frame_start_s, frame_end_s, prompts=None, delayeds=None, scatter=None,
                       normalisation=None, attenuation=None, tof=None, exam=None, corrections=None, compression="gzip"):
    """Write a whole multi-frame sinogram file from arrays in memory.

    Parameters
    ----------
    path : str or os.PathLike
    layout : SinogramLayout
    frame_start_s, frame_end_s : array of float, shape (F,)
        Frame edges (s after scan start).
    prompts, delayeds, scatter : ndarray, optional
        Shape ``(F,) + layout.shape`` (+ ``(tof.num_bins,)`` for TOF); counts
        or expected counts; the dtype is kept.
    normalisation, attenuation : ndarray, optional
        Shape ``layout.shape``.
    tof : TOFParameters, optional
    exam : ExamInfo, optional
    corrections : ListmodeCorrections, optional
    compression : {"gzip", "lzf", None}

    Raises
    ------
    ValueError
        When an array's shape does not match the layout and the frames
        (nothing is written).
    """
    if not isinstance(layout, SinogramLayout):
        raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
    nf = int(np.size(frame_start_s))
    frame_arrays = {k: v for k, v in (("prompts", prompts), ("delayeds", delayeds), ("scatter", scatter)) if v is not None}
    static = {k: v for k, v in (("normalisation", normalisation), ("attenuation", attenuation)) if v is not None}
    for name, arr in {**frame_arrays, **static}.items():
        want = _sino_shape(layout, tof, name, nf)
        if np.shape(arr) != want:
            raise ValueError(f"{os.fspath(path)}: field '{name}' has shape {np.shape(arr)}; expected {want} for {layout}"
                             f"{'' if name not in FRAME_SINOGRAMS else f' and {nf} frames'}")
    with SinogramWriter(path, layout, frame_start_s, frame_end_s, tof=tof, exam=exam, corrections=corrections,
                        sinograms={k: np.asarray(v).dtype for k, v in frame_arrays.items()}, compression=compression) as w:
        for name, arr in frame_arrays.items():
            w.write(name, arr)
        for name, arr in static.items():
            w.write_static(name, arr)


class SinogramReader:
    """Open a petbind sinogram file; read it one frame at a time.

    Parameters
    ----------
    path : str or os.PathLike

    Attributes
    ----------
    path : str
    layout : SinogramLayout
    scanner : Scanner
        ``layout.scanner`` (with ``resolution_fwhm_mm`` when the file knows it).
    tof : TOFParameters or None
    exam : ExamInfo or None
    corrections : ListmodeCorrections or None
    frame_start_s, frame_end_s : ndarray of float64, shape (F,)
        Frame edges (s after scan start).
    names : tuple of str
        The sinograms the file holds.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        When the file is not a readable petbind sinogram file of a supported
        version, or a field is missing or has the wrong dtype or shape.  The
        message names the file and the field.  Values (finite, >= 0) are
        checked when a frame is read.

    Examples
    --------
    See :class:`SinogramWriter`.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        with open_h5(self.path) as f:
            check_version(f, self.path, "sinograms")
            self.scanner = read_scanner(f, self.path)
            if "layout" not in f:
                raise field_error(self.path, "layout", "(group) is missing")
            try:
                self.layout = SinogramLayout(
                    self.scanner,
                    h5_attr(f, self.path, "layout", "num_radial", int),
                    h5_attr(f, self.path, "layout", "max_ring_difference", int),
                    h5_attr(f, self.path, "layout", "span", int),
                )
            except ValueError as exc:
                raise field_error(self.path, "layout", str(exc)) from exc
            self.tof = read_tof(f, self.path)
            self.exam = ExamInfo._read(f, self.path) if "exam" in f else None
            self.corrections = ListmodeCorrections._read(f, self.path, self.scanner.num_detectors)
            self._legacy = "frames" not in f and "frame" in f
            if self._legacy:
                # format 1.0: one frame without a frame axis; timing in /frame (NaN when unknown)
                start = h5_attr(f, self.path, "frame", "start_s", float, math.nan, required=False)
                dur = h5_attr(f, self.path, "frame", "duration_s", float, math.nan, required=False)
                self.frame_start_s, self.frame_end_s = np.array([start]), np.array([start + dur])
            else:
                if "frames" not in f:
                    raise field_error(self.path, "frames", "(group) is missing")
                fs = read_array(self.path, h5_dataset(f, self.path, "frames/frame_start_s", "fiu", 1))
                fe = read_array(self.path, h5_dataset(f, self.path, "frames/frame_end_s", "fiu", 1, fs.shape))
                self.frame_start_s, self.frame_end_s = validate_frame_times(
                    fs, fe, f"{self.path}: field 'frames/frame_start_s', 'frames/frame_end_s'")
            if "sinograms" not in f:
                raise field_error(self.path, "sinograms", "(group) is missing")
            names = []
            for name in f["sinograms"]:
                if name not in SINOGRAM_NAMES:
                    raise field_error(self.path, f"sinograms/{name}", f"is unknown; expected one of {SINOGRAM_NAMES}")
                want = _sino_shape(self.layout, self.tof, name, None if self._legacy else self.num_frames)
                h5_dataset(f, self.path, f"sinograms/{name}", "fiu", len(want), want)
                names.append(name)
            self.names = tuple(n for n in SINOGRAM_NAMES if n in names)

    @property
    def num_frames(self):
        return int(self.frame_start_s.size)

    @property
    def frame_duration_s(self):
        return self.frame_end_s - self.frame_start_s

    def frames(self):
        """The frames as :class:`petbind.core.frames.Frames` (s after scan start)."""
        return Frames.from_edges(self.frame_start_s, self.frame_end_s, source=f"{self.path}: field 'frames'")

    def __repr__(self):
        return (f"SinogramReader({self.path!r}, frames={self.num_frames}, sinograms={list(self.names)}, "
                f"shape={self.layout.shape}, tof={self.tof is not None}, scanner={self.scanner.name!r})")

    def _read(self, name, key):
        _check_name(name)
        if name not in self.names:
            raise field_error(self.path, f"sinograms/{name}", f"is missing; the file holds {list(self.names)}")
        with open_h5(self.path) as f:
            ds = f["sinograms"][name]
            try:
                data = ds[key]
            except OSError as exc:
                raise field_error(self.path, f"sinograms/{name}", f"cannot be read ({exc}); the file is truncated or corrupt") from exc
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            raise field_error(self.path, f"sinograms/{name}", "holds NaN or infinite values")
        if name in _NONNEGATIVE and data.dtype.kind in "fi" and data.size and data.min() < 0:
            raise field_error(self.path, f"sinograms/{name}", f"holds negative values (min {data.min()}); expected >= 0")
        return data

    def frame(self, name, k):
        """Sinogram ``name`` of frame ``k``: shape ``layout.shape`` (+ TOF axis)."""
        if name not in FRAME_SINOGRAMS:
            raise ValueError(f"{name!r} has no frame axis; use static({name!r})")
        k = range(self.num_frames)[k]
        return self._read(name, () if self._legacy else k)

    def prompts(self, k):
        """Prompt counts of frame ``k``."""
        return self.frame("prompts", k)

    def delayeds(self, k):
        """Delayed-window counts of frame ``k``."""
        return self.frame("delayeds", k)

    def all_frames(self, name):
        """Sinogram ``name`` of every frame: shape ``(F,) + layout.shape`` (+ TOF axis)."""
        data = self._read(name, ())
        return data[None] if self._legacy and name in FRAME_SINOGRAMS else data

    def static(self, name):
        """``normalisation`` or ``attenuation`` (shape ``layout.shape``), or None when absent."""
        if name not in ("normalisation", "attenuation"):
            raise ValueError(f"static sinogram must be 'normalisation' or 'attenuation'; got {name!r}")
        return self._read(name, ()) if name in self.names else None


def read_sinograms_h5(path):
    """Read a whole sinogram file into memory (small files; see :class:`SinogramReader`).

    Returns
    -------
    SinogramData

    Raises
    ------
    ValueError
        Naming the file and the field for a wrong version, missing field,
        shape that does not match the stored layout and frames, or a
        negative or non-finite value.
    """
    r = SinogramReader(path)
    out = SinogramData(layout=r.layout, frame_start_s=r.frame_start_s, frame_end_s=r.frame_end_s, tof=r.tof,
                       exam=r.exam, corrections=r.corrections)
    for name in r.names:
        setattr(out, name, r.all_frames(name) if name in FRAME_SINOGRAMS else r.static(name))
    return out
