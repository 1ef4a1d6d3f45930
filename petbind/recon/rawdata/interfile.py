"""STIR Interfile: images (``.hv``/``.v``) and projection data (``.hs``/``.s``), both ways.

The conventions are STIR's, stated and mapped onto petbind's geometry in
:mod:`petbind.recon.rawdata.stir`; in short:

Images
    Interfile axis ``[1]`` runs fastest; STIR writes ``[1] = x``, ``[2] = y``,
    ``[3] = z``.  STIR's frame is (left, posterior, inferior) for a head-first
    supine patient and petbind's is RAS+, so the array is flipped on all three
    axes when read and written.  ``first pixel offset (mm) [1], [2]`` place the
    first voxel in ``x``/``y`` (default: the scanner axis through voxel
    ``n // 2``); the middle plane lies at the scanner's axial centre, shifted by
    ``first pixel offset (mm) [3]``.  The result is a diagonal RAS+ affine.
Projection data
    ``[4] segment``, then ``[3] axial coordinate, [2] view`` (``SegmentBySinogram``)
    or ``[3] view, [2] axial coordinate`` (``SegmentByView``), ``[1] tangential
    coordinate``, and for TOF an outermost ``[5] timing positions``.  Segments
    are stored in the order of the per-segment header lists; every STIR bin is
    moved to the petbind bin of the same LOR (detector pair, rings, TOF
    direction) of a :class:`~petbind.recon.geometry.SinogramLayout`.  A scanner
    is given by its parameters or by STIR's name alone (``originating system``,
    e.g. ``Siemens mMR``, ``ECAT 953``, ``PRT-1``).  Arc-corrected and view-mashed
    data are not crystal pairs: they are read with STIR's own LOR per bin
    (:meth:`InterfileSinogram.lor_endpoints_mm`) and ``layout`` is ``None``.
"""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np

from petbind.recon.geometry import SPEED_OF_LIGHT_MM_PER_PS, SinogramLayout, TOFParameters
from petbind.core.files import atomic_output
from petbind.recon.rawdata.stir import (
    STIR_SCANNERS,
    StirProjData,
    StirSegment,
    find_stir_scanner,
    stir_image_affine,
    stir_image_offsets,
)

__all__ = [
    "read_interfile_header",
    "read_interfile_image",
    "write_interfile_image",
    "read_interfile_sinogram",
    "write_interfile_sinogram",
    "stir_projdata_from_header",
    "InterfileSinogram",
]

log = logging.getLogger(__name__)

_NUMBER_FORMATS = {
    ("float", 4): np.float32,
    ("float", 8): np.float64,
    ("short float", 4): np.float32,
    ("long float", 8): np.float64,
    ("signed integer", 1): np.int8,
    ("signed integer", 2): np.int16,
    ("signed integer", 4): np.int32,
    ("unsigned integer", 1): np.uint8,
    ("unsigned integer", 2): np.uint16,
    ("unsigned integer", 4): np.uint32,
}


def _format_of(dtype):
    dtype = np.dtype(dtype)
    kind = {"f": "float", "i": "signed integer", "u": "unsigned integer"}.get(dtype.kind)
    if kind is None or (kind, dtype.itemsize) not in _NUMBER_FORMATS:
        raise TypeError(f"Interfile data must be float32/64 or 8/16/32-bit integers; got {dtype}")
    return kind, dtype.itemsize


def _norm_key(key):
    key = key.strip().lstrip("!").strip().lower()
    key = re.sub(r"\s+", " ", key)
    key = re.sub(r"\s*\[\s*(\d+)\s*\]", r"[\1]", key)
    return key


def _parse_value(text):
    text = text.strip()
    if text.startswith("{") and text.endswith("}"):
        return [v.strip() for v in text[1:-1].split(",") if v.strip()]
    return text


def read_interfile_header(path):
    """Parse an Interfile header into a dict.

    Keys are lower-cased, without ``!`` and with normalised spaces
    (``"matrix size[1]"``); brace lists become lists of strings.

    Raises
    ------
    ValueError
        When the file does not start with ``!INTERFILE`` (naming the file).
    """
    path = os.fspath(path)
    with open(path, "r", encoding="latin-1") as f:
        lines = f.read().splitlines()
    header = {}
    seen_start = False
    for raw in lines:
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if ":=" not in line:
            continue
        key, value = line.split(":=", 1)
        key = _norm_key(key)
        if key == "interfile":
            seen_start = True
            continue
        if key == "end of interfile":
            break
        header[key] = _parse_value(value)
    if not seen_start:
        raise ValueError(f"{path}: field '!INTERFILE' missing; not an Interfile header")
    return header


def _get(header, path, key, cast=str, default=None, required=True):
    if key not in header:
        if required:
            raise ValueError(f"{path}: field '{key}' is missing")
        return default
    value = header[key]
    try:
        if isinstance(value, list):
            return [cast(v) for v in value]
        return cast(value)
    except ValueError:
        raise ValueError(f"{path}: field '{key}' has invalid value {value!r}") from None


def _dtype_from_header(header, path):
    fmt = _get(header, path, "number format").lower()
    nbytes = _get(header, path, "number of bytes per pixel", int)
    if (fmt, nbytes) not in _NUMBER_FORMATS:
        raise ValueError(
            f"{path}: field 'number format' / 'number of bytes per pixel' = {fmt!r} / {nbytes} not supported; "
            f"expected one of {sorted(_NUMBER_FORMATS)}"
        )
    order = _get(header, path, "imagedata byte order", str, "LITTLEENDIAN", required=False).upper()
    if order not in ("LITTLEENDIAN", "BIGENDIAN"):
        raise ValueError(f"{path}: field 'imagedata byte order' is {order!r}; expected LITTLEENDIAN or BIGENDIAN")
    return np.dtype(_NUMBER_FORMATS[(fmt, nbytes)]).newbyteorder("<" if order == "LITTLEENDIAN" else ">")


def _read_data(header, path, count):
    name = _get(header, path, "name of data file")
    data_path = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.exists(data_path):
        raise ValueError(f"{path}: field 'name of data file' names {data_path}, which does not exist")
    dtype = _dtype_from_header(header, path)
    offset = _get(header, path, "data offset in bytes[1]", int, 0, required=False)
    size = os.path.getsize(data_path)
    need = offset + count * dtype.itemsize
    if size < need:
        raise ValueError(
            f"{path}: field 'name of data file' {data_path} holds {size} bytes; the header needs {need} "
            "(matrix sizes x bytes per pixel + offset); the data file is truncated or the header wrong"
        )
    data = np.fromfile(data_path, dtype=dtype, count=count, offset=offset).astype(dtype.newbyteorder("="))
    scale = _get(header, path, "image scaling factor[1]", float, 1.0, required=False)
    if scale != 1.0:
        data = data * scale
    return data


def _write_header(path, lines):
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="latin-1") as f:
            f.write("\n".join(lines) + "\n")


def _write_data(path, array):
    with atomic_output(path) as tmp:
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tofile(tmp)


def _data_path_for(header_path, ext):
    base, _ = os.path.splitext(os.fspath(header_path))
    return base + ext


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def write_interfile_image(path, image, affine):
    """Write a 3-D image as STIR Interfile (``.hv`` header + ``.v`` data) that STIR places where petbind has it.

    Parameters
    ----------
    path : str
        Header path (``.hv``); the data go to the same name with ``.v``.
    image : ndarray, shape (x, y, z)
        float32/float64 or integer data (stored as is, little endian).
    affine : ndarray, shape (4, 4)
        Diagonal RAS+ NIfTI affine with positive voxel sizes (mm), in
        petbind's scanner frame.

    Notes
    -----
    The array is flipped on all three axes (STIR's frame) and ``first pixel
    offset (mm) [1..3]`` are chosen by STIR's origin rules
    (:func:`petbind.recon.rawdata.stir.stir_image_offsets`).  STIR's
    ray-tracing projector only accepts images whose ``x``/``y`` offsets are
    ``-(n // 2)`` voxels (the scanner axis through a voxel centre); other
    images are written faithfully and a warning says so.

    Raises
    ------
    ValueError
        For a non-diagonal affine or a non-3-D image.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"{path}: image must be 3-D (x, y, z); got shape {image.shape}")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be 4x4; got {affine.shape}")
    off = affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))
    if np.any(off != 0) or np.any(np.diag(affine)[:3] <= 0):
        raise ValueError(f"{path}: affine must be 4x4 diagonal with positive voxel sizes (Interfile has no rotation)")
    kind, nbytes = _format_of(image.dtype)
    vox = np.diag(affine)[:3]
    x0, y0, z_shift = stir_image_offsets(image.shape, affine)
    for axis, (value, n, v) in enumerate(zip((x0, y0), image.shape[:2], vox[:2])):
        if abs(value + (n // 2) * v) > 1e-3 * v:
            log.warning(
                "%s: the image is not centred on the scanner axis in %s (first pixel offset %.4g mm instead of %.4g mm); "
                "STIR reads it in place but its ray-tracing projector refuses shifted x/y origins",
                path, "xy"[axis], value, -(n // 2) * v,
            )
    data_path = _data_path_for(path, ".v")
    lines = [
        "!INTERFILE  :=",
        "!imaging modality := PT",
        f"name of data file := {os.path.basename(data_path)}",
        "!version of keys := STIR4.0",
        "!GENERAL DATA :=",
        "!GENERAL IMAGE DATA :=",
        "!type of data := PET",
        "patient orientation := head_in",
        "patient rotation := supine",
        "imagedata byte order := LITTLEENDIAN",
        "!PET STUDY (General) :=",
        "!PET data type := Image",
        "process status := Reconstructed",
        f"!number format := {kind}",
        f"!number of bytes per pixel := {nbytes}",
        "number of dimensions := 3",
    ]
    for i, label in enumerate("xyz"):
        lines += [
            f"matrix axis label [{i + 1}] := {label}",
            f"!matrix size [{i + 1}] := {image.shape[i]}",
            f"scaling factor (mm/pixel) [{i + 1}] := {float(vox[i])!r}",
        ]
    for i, value in enumerate((x0, y0, z_shift)):
        lines.append(f"first pixel offset (mm) [{i + 1}] := {value!r}")
    lines += ["number of time frames := 1", "image scaling factor[1] := 1", "data offset in bytes[1] := 0",
              "quantification units := 1", "!END OF INTERFILE :="]
    # STIR's array (x, y, z) is petbind's flipped on every axis; the file holds x fastest
    _write_data(data_path, image[::-1, ::-1, ::-1].transpose(2, 1, 0))
    _write_header(path, lines)


def read_interfile_image(path):
    """Read a STIR Interfile image into petbind's frame.

    Returns
    -------
    image : ndarray, shape (x, y, z)
        STIR's array flipped on all three axes (RAS+).
    affine : ndarray, shape (4, 4)
        Diagonal RAS+ affine (mm) from ``scaling factor (mm/pixel)`` and
        STIR's origin rules (see the module docstring).

    Raises
    ------
    ValueError
        Naming the file and the key for missing or inconsistent keys, or a
        data file shorter than the header says.
    """
    path = os.fspath(path)
    h = read_interfile_header(path)
    ndim = _get(h, path, "number of dimensions", int)
    if ndim != 3:
        raise ValueError(f"{path}: field 'number of dimensions' is {ndim}; expected 3 for an image")
    frames = _get(h, path, "number of time frames", int, 1, required=False)
    if frames != 1:
        raise ValueError(f"{path}: field 'number of time frames' is {frames}; only single-frame images are supported")
    shape = [_get(h, path, f"matrix size[{i}]", int) for i in (1, 2, 3)]
    if min(shape) < 1:
        raise ValueError(f"{path}: field 'matrix size' must be positive; got {shape}")
    vox = [_get(h, path, f"scaling factor (mm/pixel)[{i}]", float, 1.0, required=False) for i in (1, 2, 3)]
    if min(vox) <= 0:
        raise ValueError(f"{path}: field 'scaling factor (mm/pixel)' must be positive; got {vox}")
    offsets = [_get(h, path, f"first pixel offset (mm)[{i}]", float, None, required=False) for i in (1, 2, 3)]
    labels = [str(h.get(f"matrix axis label[{i}]", "xyz"[i - 1])).lower() for i in (1, 2, 3)]
    if labels != ["x", "y", "z"]:
        raise ValueError(f"{path}: field 'matrix axis label' is {labels}; expected x, y, z")
    data = _read_data(h, path, int(np.prod(shape)))
    stir = data.reshape(shape[2], shape[1], shape[0]).transpose(2, 1, 0)
    image = np.ascontiguousarray(stir[::-1, ::-1, ::-1])
    return image, stir_image_affine(shape, vox, offsets)


# ------------------------------------------------------------------------------------------------
# projection data
# ------------------------------------------------------------------------------------------------
class InterfileSinogram:
    """Projection data read from STIR Interfile.

    Attributes
    ----------
    data : ndarray
        With a ``layout``: shape ``layout.shape`` (``+ (num_tof_bins,)``), in
        petbind order.  Without (arc-corrected or view-mashed data): shape
        ``(num_sinograms, num_views, num_tangential[, num_tof_bins])`` in STIR's
        storage order of segments and axial positions, one bin per LOR of
        :meth:`lor_endpoints_mm`.
    layout : SinogramLayout or None
        ``None`` when the bins are not crystal pairs.
    measured : ndarray of bool or None
        With a layout: ``True`` for petbind bins that hold a STIR bin and
        touch no gap crystal (``False`` bins carry no measurement).
    tof : TOFParameters or None
        petbind's TOF convention: bin ``k`` centred ``(k - (n-1)/2) w`` from
        the LOR midpoint towards the LOR's end point.
    projdata : StirProjData
        The header's STIR geometry.
    header : dict
    """

    def __init__(self, data, layout, header, projdata=None, tof=None, measured=None):
        self.data, self.layout, self.header = data, layout, header
        self.projdata, self.tof, self.measured = projdata, tof, measured

    def lor_endpoints_mm(self):
        """LOR end points of every bin (petbind frame, mm), shape ``data.shape[:3] + (3,)``.

        With a layout these are the layout's crystal pairs; otherwise STIR's
        representative LOR of each bin (:meth:`StirProjData.lor_endpoints_mm`).
        """
        if self.layout is not None:
            return self.layout.lor_endpoints_mm()
        parts = [self.projdata.lor_endpoints_mm(i) for i in range(len(self.projdata.segments))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def __repr__(self):
        what = self.layout if self.layout is not None else "STIR LOR geometry (arc-corrected or view-mashed)"
        return f"InterfileSinogram(shape={self.data.shape}, {what}, tof={self.tof is not None})"


_ARC_CORRECTED = {"arc correction", "arc corrected", "radial arc-correction"}


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _scanner_value(h, path, key, info, fact, scale=1.0, cast=float, default=None):
    """Header value (times ``scale``) or the named STIR scanner's ``fact``; error naming the key otherwise."""
    if key in h and str(h[key]).strip() != "":
        try:
            return cast(float(h[key]) * scale) if cast is float else cast(h[key])
        except ValueError:
            raise ValueError(f"{path}: field '{key}' has invalid value {h[key]!r}") from None
    if info is not None:
        return getattr(info, fact)
    if default is not None:
        return default
    known = ", ".join(i.name for i in STIR_SCANNERS)
    name = h.get("originating system", "")
    raise ValueError(
        f"{path}: field '{key}' is missing and 'originating system' ({name!r}) is not one of STIR's scanners "
        f"({known}); give the scanner parameters in the header"
    )


def stir_projdata_from_header(h, path):
    """STIR geometry and storage facts of a projection-data header.

    Returns
    -------
    projdata : StirProjData
    by_view : bool
        ``SegmentByView`` storage (view outside axial position).
    timing_order : list of int
        Timing position numbers in storage order (``[0]`` for non-TOF).

    Raises
    ------
    ValueError
        Naming the file and the field.
    """
    ndim = _get(h, path, "number of dimensions", int)
    if ndim not in (4, 5):
        raise ValueError(f"{path}: field 'number of dimensions' is {ndim}; expected 4, or 5 for TOF")
    labels = {}
    for i in range(1, ndim + 1):
        labels[str(_get(h, path, f"matrix axis label[{i}]")).lower()] = i
    if labels.get("tangential coordinate") != 1 or labels.get("segment") != 4 or \
            sorted((labels.get("view"), labels.get("axial coordinate"))) != [2, 3] or \
            (ndim == 5 and labels.get("timing positions") != 5):
        raise ValueError(
            f"{path}: field 'matrix axis label' is {sorted(labels, key=labels.get)}; expected tangential coordinate, "
            "view / axial coordinate, segment (and timing positions for TOF) as STIR writes them"
        )
    by_view = labels["view"] == 3
    num_views = _get(h, path, f"matrix size[{labels['view']}]", int)
    num_tang = _get(h, path, "matrix size[1]", int)
    num_segs = _get(h, path, "matrix size[4]", int)
    axial = _as_list(_get(h, path, f"matrix size[{labels['axial coordinate']}]", int))
    mins = _as_list(_get(h, path, "minimum ring difference per segment", int))
    maxs = _as_list(_get(h, path, "maximum ring difference per segment", int))
    for key, v in ((f"matrix size[{labels['axial coordinate']}]", axial), ("minimum ring difference per segment", mins),
                   ("maximum ring difference per segment", maxs)):
        if len(v) != num_segs:
            raise ValueError(f"{path}: field '{key}' has {len(v)} entries; expected one per segment ({num_segs})")
    if "segment sequence" in h:
        raise ValueError(
            f"{path}: field 'segment sequence' is present: the file was written by petbind < 0.3, whose sinogram "
            "conventions differ from STIR's; write it again with this version"
        )
    sums = [a + b for a, b in zip(mins, maxs)]
    order = sorted(range(num_segs), key=lambda i: sums[i])
    zero = [i for i in order if sums[i] == 0]
    if not zero:
        raise ValueError(f"{path}: fields 'minimum/maximum ring difference per segment' hold no segment 0 (ring difference 0)")
    rank0 = order.index(zero[0])
    number = {i: order.index(i) - rank0 for i in range(num_segs)}
    segments = [StirSegment(number[i], mins[i], maxs[i], axial[i]) for i in range(num_segs)]

    name = str(h.get("originating system", "") or h.get("scanner type", ""))
    info = find_stir_scanner(name) or find_stir_scanner(h.get("scanner type", ""))
    n = _scanner_value(h, path, "number of detectors per ring", info, "num_detectors_per_ring", cast=int)
    rings = _scanner_value(h, path, "number of rings", info, "num_rings", cast=int)
    inner = _scanner_value(h, path, "inner ring diameter (cm)", info, "inner_ring_radius_mm", 5.0)
    doi = _scanner_value(h, path, "average depth of interaction (cm)", info, "average_depth_of_interaction_mm", 10.0,
                         default=0.0)
    spacing = _scanner_value(h, path, "distance between rings (cm)", info, "ring_spacing_mm", 10.0)
    bin_size = _scanner_value(h, path, "default bin size (cm)", None, "default_bin_size_mm", 10.0,
                              default=info.default_bin_size_mm if info else 0.0)
    view_offset = _get(h, path, "view offset (degrees)", float, 0.0, required=False)
    arc = any(str(c).strip().lower() in _ARC_CORRECTED for c in _as_list(h.get("applied corrections", [])))
    if arc:
        bin_size = _get(h, path, "effective central bin size (cm)", float, bin_size / 10.0, required=False) * 10.0
        if not bin_size > 0:
            raise ValueError(f"{path}: field 'default bin size (cm)' is needed for arc-corrected data")
    for key, value in (("number of detectors per ring", n), ("number of rings", rings), ("inner ring diameter (cm)", inner),
                       ("distance between rings (cm)", spacing)):
        if not value > 0:
            raise ValueError(f"{path}: field '{key}' must be positive; got {value}")
    if n % 2 or n % num_views:
        raise ValueError(f"{path}: field 'matrix size' (view) is {num_views}; it must divide the "
                         f"{n} detectors per ring in halves (view mashing)")
    if 2 * num_views > n:
        raise ValueError(f"{path}: field 'matrix size' (view) is {num_views}; at most {n // 2} for {n} detectors per ring")
    tof, timing = None, [0]
    if ndim == 5:
        nt = _get(h, path, "matrix size[5]", int)
        mash = _get(h, path, "tof mashing factor", int, 1, required=False)
        size_ps = _get(h, path, "size of unmashed tof time bins (ps)", float)
        fwhm = _get(h, path, "tof timing resolution (ps)", float)
        tof = TOFParameters.from_bin_width_ps(nt, mash * size_ps, fwhm)
        timing = _as_list(_get(h, path, "tof bin order", int, list(range(-(nt // 2), nt - nt // 2)), required=False))
        if sorted(timing) != list(range(-(nt // 2), nt - nt // 2)):
            raise ValueError(f"{path}: field 'TOF bin order' is {timing}; expected a permutation of {-(nt // 2)}..{nt - 1 - nt // 2}")
    gaps = (info.gap_period, info.gap_detectors) if info is not None and info.num_detectors_per_ring == n else (0, ())
    try:
        pd = StirProjData(n, rings, inner + doi, spacing, view_offset, segments, num_views, num_tang, arc, bin_size, tof,
                          gaps[0], gaps[1], name=info.name if info else (name or "stir"))
        for s in pd.segments:
            pd.ring_pairs(s)
    except ValueError as exc:
        raise ValueError(f"{path}: fields 'matrix size' / ring differences per segment: {exc}") from None
    return pd, by_view, timing


def _data_file(h, path):
    name = _get(h, path, "name of data file")
    data_path = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.exists(data_path):
        raise ValueError(f"{path}: field 'name of data file' names {data_path}, which does not exist")
    return data_path


def read_interfile_sinogram(path, scanner=None, layout=None):
    """Read STIR projection data (``.hs``) into petbind order.

    Parameters
    ----------
    path : str
    scanner : Scanner, optional
        Use this petbind scanner (same detectors per ring and rings) instead of
        the cylinder of the header; crystal ``c`` is STIR detector
        ``c - N // 4``, ring ``r`` STIR ring ``R - 1 - r``.
    layout : SinogramLayout, optional
        Target layout; default :meth:`StirProjData.default_layout` (on
        ``scanner`` when given).  STIR bins it cannot hold are counted and
        reported in the log.

    Returns
    -------
    InterfileSinogram
        ``layout`` is ``None`` for arc-corrected or view-mashed data, which
        keep STIR's bins with their own LORs.

    Raises
    ------
    ValueError
        Naming the file and the key when keys are missing or inconsistent, the
        segments are not petbind's span (for crystal-pair data), or the data
        file is short.
    """
    path = os.fspath(path)
    h = read_interfile_header(path)
    kind = str(_get(h, path, "pet data type", str, "Emission", required=False))
    if kind.lower() not in ("emission", "transmission", "scatter", "randoms", "normalisation", "normalization", "acf"):
        raise ValueError(f"{path}: field '!PET data type' is {kind!r}; expected projection data such as Emission")
    frames = _get(h, path, "number of time frames", int, 1, required=False)
    if frames != 1:
        raise ValueError(f"{path}: field 'number of time frames' is {frames}; only single-frame projection data are read")
    pd, by_view, timing = stir_projdata_from_header(h, path)
    nv, nt, ntof = pd.num_views, pd.num_tangential, pd.num_tof_bins
    dtype = _dtype_from_header(h, path)
    data_path = _data_file(h, path)
    offset = _get(h, path, "data offset in bytes[1]", int, 0, required=False)
    scale = _get(h, path, "image scaling factor[1]", float, 1.0, required=False)
    per_timing = sum(s.num_axial for s in pd.segments) * nv * nt
    need = offset + per_timing * ntof * dtype.itemsize
    if os.path.getsize(data_path) < need:
        raise ValueError(
            f"{path}: field 'name of data file' {data_path} holds {os.path.getsize(data_path)} bytes; the header needs "
            f"{need} (matrix sizes x bytes per pixel + offset); the data file is truncated or the header wrong"
        )
    out_dtype = np.float64 if dtype.itemsize == 8 and dtype.kind == "f" else np.float32

    def block(j, i):
        """Segment ``i`` (storage order) of timing position ``j`` (storage index) as (axial, view, tangential)."""
        seg = pd.segments[i]
        start = sum(s.num_axial for s in pd.segments[:i]) * nv * nt + j * per_timing
        b = np.fromfile(data_path, dtype=dtype, count=seg.num_axial * nv * nt, offset=offset + start * dtype.itemsize)
        b = b.astype(out_dtype) * scale if scale != 1.0 else b.astype(out_dtype)
        return b.reshape(nv, seg.num_axial, nt).transpose(1, 0, 2) if by_view else b.reshape(seg.num_axial, nv, nt)

    # storage index of each timing position sorted ascending; STIR's positive positions point to the first
    # detector, petbind's to the LOR end, so the axis runs the other way for bins stored in STIR's orientation
    jidx = np.argsort(timing)
    crystal_pairs = not pd.arc_corrected and pd.view_mashing == 1
    if not crystal_pairs:
        log.info("%s: %s data are kept as STIR bins with STIR's LOR per bin (no crystal-pair layout)",
                 path, "arc-corrected" if pd.arc_corrected else f"view-mashed ({pd.view_mashing:g})")
        nsino = sum(s.num_axial for s in pd.segments)
        data = np.empty((nsino, nv, nt) + ((ntof,) if pd.tof else ()), dtype=out_dtype)
        for k in range(ntof):
            j = int(jidx[k])
            rows = 0
            for i, seg in enumerate(pd.segments):
                b = block(j, i)
                if pd.tof:
                    data[rows:rows + seg.num_axial, ..., ntof - 1 - k] = b
                else:
                    data[rows:rows + seg.num_axial] = b
                rows += seg.num_axial
        return InterfileSinogram(data, None, h, pd, pd.tof, None)

    try:
        if layout is None:
            layout = pd.default_layout()
            if scanner is not None:
                layout = SinogramLayout(scanner, layout.num_radial, layout.max_ring_difference, layout.span)
        pd.span_and_max_ring_difference(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}" if not str(exc).startswith(path) else str(exc)) from None
    sc = layout.scanner
    if (sc.crystals_per_ring, sc.num_rings) != (pd.num_detectors, pd.num_rings):
        raise ValueError(
            f"{path}: fields 'number of detectors per ring' / 'number of rings' are {pd.num_detectors} / {pd.num_rings}; "
            f"the scanner has {sc.crystals_per_ring} / {sc.num_rings}"
        )
    out = np.zeros(layout.num_bins * ntof, dtype=out_dtype)
    measured = np.zeros(layout.num_bins, dtype=bool)
    lost = 0.0
    for i in range(len(pd.segments)):
        try:
            bins, sw = pd.petbind_bins(layout, i)
        except ValueError as exc:
            raise ValueError(f"{path}: field 'minimum/maximum ring difference per segment': {exc}") from None
        ok = bins >= 0
        measured[bins[ok]] = True
        for k in range(ntof):
            b = block(int(jidx[k]), i)
            lost += float(np.abs(b[~ok]).sum())
            if pd.tof:
                tk = np.where(sw, k, ntof - 1 - k)
                out[bins[ok] * ntof + tk[ok]] = b[ok]
            else:
                out[bins[ok]] = b[ok]
    if lost:
        log.warning("%s: STIR bins with a total of %g (absolute) fall outside %s and were dropped", path, lost, layout)
    measured &= layout.bin_mask().reshape(-1)
    shape = layout.shape + ((ntof,) if pd.tof else ())
    return InterfileSinogram(out.reshape(shape), layout, h, pd, pd.tof, measured.reshape(layout.shape))


def _cylinder_of(scanner, path):
    """STIR cylinder parameters of a petbind scanner: radius, ring spacing, view offset (deg); warns on deviations."""
    n = scanner.crystals_per_ring
    xy = scanner.crystal_xy_mm
    radius = scanner.radius_mm
    phi0 = math.atan2(xy[0, 1], xy[0, 0])
    offset = phi0 + 2 * math.pi * (n // 4) / n - math.pi / 2
    offset = (offset + math.pi) % (2 * math.pi) - math.pi
    angle = 2 * np.pi * (np.arange(n) - n // 4) / n + np.pi / 2 + offset
    ideal = radius * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    dev = float(np.hypot(*(xy - ideal).T).max())
    if dev > 0.1:
        log.warning("%s: %s is not a cylinder with evenly spaced crystals; STIR's model moves crystals by up to %.2f mm",
                    path, scanner.name, dev)
    z = scanner.ring_z_mm
    spacing = float(np.diff(z).mean()) if z.size > 1 else 1.0
    if z.size > 1 and (np.ptp(np.diff(z)) > 1e-6 * spacing or spacing <= 0):
        raise ValueError(f"{path}: rings of {scanner.name} are not evenly spaced along +z; STIR cannot describe them")
    return radius, spacing, math.degrees(offset)


def _projdata_for_layout(layout, tof, path):
    sc = layout.scanner
    radius, spacing, offset = _cylinder_of(sc, path)
    span, mrd = layout.span, layout.max_ring_difference
    top = int(math.floor(mrd / span + 0.5))
    segments = []
    for s in range(-top, top + 1):
        lo, hi = max(s * span - span // 2, -mrd), min(s * span + span // 2, mrd)
        planes = np.count_nonzero(layout.plane_segment == s)
        segments.append(StirSegment(s, lo, hi, planes))
    nt = layout.num_radial + (1 - layout.num_radial % 2)
    if nt > sc.crystals_per_ring - 1:
        nt -= 2
        log.warning("%s: %d radial bins need %d STIR tangential positions; the outermost are dropped", path, layout.num_radial, nt)
    info = None
    for cand in STIR_SCANNERS:
        if (cand.num_detectors_per_ring, cand.num_rings) == (sc.crystals_per_ring, sc.num_rings) and \
                abs(cand.ring_spacing_mm - spacing) < 1e-3 and abs(cand.effective_radius_mm - radius) < 0.5:
            info = cand
    gaps = (info.gap_period, info.gap_detectors) if info is not None else (0, ())
    return StirProjData(sc.crystals_per_ring, sc.num_rings, radius, spacing, offset, segments, layout.num_views, nt,
                        tof=tof, gap_period=gaps[0], gap_detectors=gaps[1], name=info.name if info else "userdefined")


def write_interfile_sinogram(path, data, layout, exam=None, tof=None, frame_start_s=None, frame_duration_s=None):
    """Write a sinogram as STIR Interfile (``.hs`` + ``.s``) that STIR reads as the same LORs.

    Parameters
    ----------
    path : str
        Header path (``.hs``); data go to the same name with ``.s``.
    data : ndarray, shape ``layout.shape`` (``+ (tof.num_bins,)``)
    layout : SinogramLayout
    exam : ExamInfo, optional
        Adds isotope and tracer keys.
    tof : TOFParameters, optional
        Writes a 5-D TOF sinogram (``matrix axis label [5] := timing positions``).
    frame_start_s, frame_duration_s : float, optional

    Notes
    -----
    The scanner is described by its parameters (a cylinder through the mean
    crystal radius; ``View offset (degrees)`` from crystal 0); a scanner that
    matches one of STIR's by size is also named (``originating system``).
    Segments are written from the most negative to the most positive, each as
    ``SegmentBySinogram``.  An even number of radial bins is written as one
    more tangential position (STIR's range is asymmetric the other way), the
    extra positions holding 0.
    """
    path = os.fspath(path)
    data = np.asarray(data)
    want = layout.shape + ((tof.num_bins,) if tof is not None else ())
    if data.shape != want:
        raise ValueError(f"{path}: sinogram has shape {data.shape}; expected {want} (plane, view, radial[, tof]) for {layout}")
    kind, nbytes = _format_of(data.dtype)
    pd = _projdata_for_layout(layout, tof, path)
    ntof = pd.num_tof_bins
    data_path = _data_path_for(path, ".s")
    lst = lambda values: "{ " + ",".join(str(v) for v in values) + "}"  # noqa: E731
    name = pd.name
    info = find_stir_scanner(name)
    # a scanner STIR knows by name gets its own values where they agree, so STIR reads it without warnings
    if info is not None and abs(info.effective_radius_mm - pd.radius_mm) < 1e-6:
        inner, doi = info.inner_ring_radius_mm, info.average_depth_of_interaction_mm
    else:
        inner, doi = pd.radius_mm, 0.0
    bin_size = info.default_bin_size_mm if info is not None else pd.radius_mm * math.sin(math.pi / pd.num_detectors)
    max_bins = max(pd.num_tangential, info.max_num_non_arccorrected_bins) if info is not None else pd.num_tangential
    arc_bins = info.default_num_arccorrected_bins if info is not None else pd.num_tangential
    lines = [
        "!INTERFILE  :=",
        "!imaging modality := PT",
        f"name of data file := {os.path.basename(data_path)}",
        f"originating system := {name}",
        "!version of keys := STIR6.0",
        "!GENERAL DATA :=",
        "!GENERAL IMAGE DATA :=",
        "!type of data := PET",
        "patient orientation := head_in",
        "patient rotation := supine",
        "imagedata byte order := LITTLEENDIAN",
    ]
    if exam is not None and exam.isotope:
        lines += ["number of radionuclides := 1", f"radionuclide name[1] := {exam.isotope}"]
        if math.isfinite(exam.half_life_s):
            lines.append(f"radionuclide halflife (sec)[1] := {exam.half_life_s!r}")
    lines += [
        "!PET STUDY (General) :=",
        "!PET data type := Emission",
        "applied corrections := {None}",
        f"!number format := {kind}",
        f"!number of bytes per pixel := {nbytes}",
        f"number of dimensions := {5 if tof is not None else 4}",
    ]
    if tof is not None:
        lines += ["matrix axis label [5] := timing positions", f"!matrix size [5] := {ntof}", "TOF mashing factor := 1"]
    lines += [
        "matrix axis label [4] := segment",
        f"!matrix size [4] := {len(pd.segments)}",
        "matrix axis label [3] := axial coordinate",
        f"!matrix size [3] := {lst(s.num_axial for s in pd.segments)}",
        "matrix axis label [2] := view",
        f"!matrix size [2] := {pd.num_views}",
        "matrix axis label [1] := tangential coordinate",
        f"!matrix size [1] := {pd.num_tangential}",
        f"minimum ring difference per segment := {lst(s.min_ring_difference for s in pd.segments)}",
        f"maximum ring difference per segment := {lst(s.max_ring_difference for s in pd.segments)}",
        "Scanner parameters:=",
        f"Scanner type := {name}",
        f"Number of rings := {pd.num_rings}",
        f"Number of detectors per ring := {pd.num_detectors}",
        f"Inner ring diameter (cm) := {2 * inner / 10:.8g}",
        f"Average depth of interaction (cm) := {doi / 10:.8g}",
        f"Distance between rings (cm) := {pd.ring_spacing_mm / 10:.8g}",
        f"Default bin size (cm) := {bin_size / 10:.8g}",
        f"View offset (degrees) := {pd.view_offset_deg:.8g}",
        f"Maximum number of non-arc-corrected bins := {max_bins}",
        f"Default number of arc-corrected bins := {arc_bins}",
    ]
    if tof is not None:
        lines += [
            f"Maximum number of (unmashed) TOF time bins := {ntof}",
            f"Size of unmashed TOF time bins (ps) := {tof.bin_width_mm * 2 / SPEED_OF_LIGHT_MM_PER_PS!r}",
            f"TOF timing resolution (ps) := {float(tof.fwhm_ps)!r}",
        ]
    lines += ["End scanner parameters:=", f"petbind span := {layout.span}",
              f"petbind max ring difference := {layout.max_ring_difference}", f"petbind radial bins := {layout.num_radial}"]
    if exam is not None and exam.tracer:
        lines.append(f"radiopharmaceutical := {exam.tracer}")
    lines.append("number of time frames := 1")
    if frame_duration_s is not None and math.isfinite(frame_duration_s):
        lines.append(f"image duration (sec)[1] := {float(frame_duration_s)!r}")
    if frame_start_s is not None and math.isfinite(frame_start_s):
        lines.append(f"image relative start time (sec)[1] := {float(frame_start_s)!r}")
    lines += ["image scaling factor[1] := 1", "data offset in bytes[1] := 0", "!END OF INTERFILE :="]
    flat = data.reshape(-1)
    tables = [pd.petbind_bins(layout, i) for i in range(len(pd.segments))]
    out_dtype = data.dtype.newbyteorder("<")
    with atomic_output(data_path) as tmp:
        with open(tmp, "wb") as f:
            for k in range(ntof):  # timing positions ascending, outermost
                for bins, sw in tables:
                    ok = bins >= 0
                    b = np.zeros(bins.shape, dtype=out_dtype)
                    if tof is not None:
                        tk = np.where(sw, k, ntof - 1 - k)
                        b[ok] = flat[bins[ok] * ntof + tk[ok]]
                    else:
                        b[ok] = flat[bins[ok]]
                    b.tofile(f)
    n_written = sum(int((bins >= 0).sum()) for bins, _ in tables)
    if n_written != layout.num_bins:
        missing = np.ones(layout.num_bins, bool)
        for bins, _ in tables:
            missing[bins[bins >= 0]] = False
        dropped = float(np.abs(data.reshape(layout.num_bins, -1)[missing]).sum())
        if dropped:
            log.warning("%s: %d petbind bins (sum %g) have no STIR bin (gaps or radial range) and are not written",
                        path, int(missing.sum()), dropped)
    _write_header(path, lines)
