"""Interfile images (``.hv``/``.v``) and sinograms (``.hs``/``.s``) as written by STIR.

Axis mapping
------------
Images
    Interfile stores axis ``[1]`` fastest.  STIR writes ``[1] = x``,
    ``[2] = y``, ``[3] = z``, so the raw data are a C array ``(z, y, x)``;
    petbind arrays are ``(x, y, z)`` and are transposed on reading and
    writing.  ``scaling factor (mm/pixel) [i]`` is the voxel size and
    ``first pixel offset (mm) [i]`` the centre of the first voxel along axis
    ``i``, which becomes the diagonal NIfTI affine (no axis flips: the
    Interfile x, y, z are taken to be petbind scanner coordinates; STIR's own
    gantry frame has y pointing down, so check orientation with a known
    phantom when exchanging data with STIR).
Sinograms
    Written in STIR's ``SegmentBySinogram`` order: ``[4] segment``,
    ``[3] axial coordinate``, ``[2] view``, ``[1] tangential coordinate``.
    Segments are stored in petbind's plane order ``0, +1, -1, +2, -2, ...``
    and say so in ``segment sequence``; per-segment lists (``!matrix size
    [3]``, ``minimum/maximum ring difference per segment``) run over segment
    numbers from the most negative to the most positive, as in STIR.  Inside a
    segment planes are ordered by increasing axial position in both.  The
    ring difference is petbind's ``ring2 - ring1``.  Views and tangential
    positions are copied index by index; STIR's choice of the first view
    angle and tangential sign may differ from petbind's crystal-pair
    convention (see :class:`petbind.recon.geometry.SinogramLayout`).  ``SegmentByView``
    files are read too.  TOF sinograms are not supported.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from petbind.recon.geometry import Scanner, SinogramLayout
from petbind.core.files import atomic_output

__all__ = [
    "read_interfile_header",
    "read_interfile_image",
    "write_interfile_image",
    "read_interfile_sinogram",
    "write_interfile_sinogram",
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
    """Write a 3-D image as STIR Interfile (``.hv`` header + ``.v`` data).

    Parameters
    ----------
    path : str
        Header path (``.hv``); the data go to the same name with ``.v``.
    image : ndarray, shape (x, y, z)
        float32/float64 or integer data (stored as is, little endian).
    affine : ndarray, shape (4, 4)
        Diagonal NIfTI affine with positive voxel sizes (mm).

    Raises
    ------
    ValueError
        For a non-diagonal affine or a non-3-D image.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"{path}: image must be 3-D (x, y, z); got shape {image.shape}")
    affine = np.asarray(affine, dtype=float)
    off = affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))
    if affine.shape != (4, 4) or np.any(off != 0) or np.any(np.diag(affine)[:3] <= 0):
        raise ValueError(f"{path}: affine must be 4x4 diagonal with positive voxel sizes (Interfile has no rotation)")
    kind, nbytes = _format_of(image.dtype)
    data_path = _data_path_for(path, ".v")
    lines = [
        "!INTERFILE  :=",
        "!imaging modality := PT",
        f"name of data file := {os.path.basename(data_path)}",
        "!version of keys := STIR4.0",
        "!GENERAL DATA :=",
        "!GENERAL IMAGE DATA :=",
        "!type of data := PET",
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
            f"scaling factor (mm/pixel) [{i + 1}] := {float(affine[i, i])!r}",
        ]
    for i in range(3):
        lines.append(f"first pixel offset (mm) [{i + 1}] := {float(affine[i, 3])!r}")
    lines += ["number of time frames := 1", "image scaling factor[1] := 1", "data offset in bytes[1] := 0",
              "quantification units := 1", "!END OF INTERFILE :="]
    _write_data(data_path, image.transpose(2, 1, 0))
    _write_header(path, lines)


def read_interfile_image(path):
    """Read a STIR Interfile image.

    Returns
    -------
    image : ndarray, shape (x, y, z)
    affine : ndarray, shape (4, 4)
        Diagonal NIfTI affine (mm) from ``scaling factor (mm/pixel)`` and
        ``first pixel offset (mm)``.

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
    origin = [_get(h, path, f"first pixel offset (mm)[{i}]", float, 0.0, required=False) for i in (1, 2, 3)]
    if min(vox) <= 0:
        raise ValueError(f"{path}: field 'scaling factor (mm/pixel)' must be positive; got {vox}")
    labels = [str(h.get(f"matrix axis label[{i}]", "xyz"[i - 1])).lower() for i in (1, 2, 3)]
    if labels != ["x", "y", "z"]:
        raise ValueError(f"{path}: field 'matrix axis label' is {labels}; expected x, y, z")
    data = _read_data(h, path, int(np.prod(shape)))
    image = data.reshape(shape[2], shape[1], shape[0]).transpose(2, 1, 0).copy()
    affine = np.eye(4)
    affine[:3, :3] = np.diag(vox)
    affine[:3, 3] = origin
    return image, affine


# ------------------------------------------------------------------------------------------------
# sinograms
# ------------------------------------------------------------------------------------------------
class InterfileSinogram:
    """Sinogram read from Interfile.

    Attributes
    ----------
    data : ndarray, shape ``layout.shape``
        In petbind order ``(plane, view, radial)``.
    layout : SinogramLayout
    header : dict
        All header keys (see :func:`read_interfile_header`).
    """

    def __init__(self, data, layout, header):
        self.data, self.layout, self.header = data, layout, header

    def __repr__(self):
        return f"InterfileSinogram(shape={self.data.shape}, layout={self.layout})"


def _segments(layout):
    """Segments in petbind plane order with their planes and ring-difference range."""
    segs = []
    for s in dict.fromkeys(layout.plane_segment.tolist()):
        planes = np.flatnonzero(layout.plane_segment == s)
        diffs = np.diff(layout.ring_pairs[np.isin(layout.plane_of_ring_pair, planes)], axis=1).ravel()
        segs.append((s, planes, int(diffs.min()), int(diffs.max())))
    return segs


def write_interfile_sinogram(path, data, layout, exam=None):
    """Write a non-TOF sinogram as STIR Interfile (``.hs`` + ``.s``).

    Parameters
    ----------
    path : str
        Header path (``.hs``); data go to the same name with ``.s``.
    data : ndarray, shape ``layout.shape``
    layout : SinogramLayout
    exam : ExamInfo, optional
        Adds isotope and tracer keys.
    """
    data = np.asarray(data)
    if data.shape != layout.shape:
        raise ValueError(f"{path}: sinogram has shape {data.shape}; expected {layout.shape} (plane, view, radial) for {layout}")
    kind, nbytes = _format_of(data.dtype)
    sc = layout.scanner
    segs = _segments(layout)
    by_number = sorted(segs, key=lambda s: s[0])
    ring_spacing = float(np.median(np.diff(sc.ring_z_mm))) if sc.num_rings > 1 else 0.0
    bin_size_mm = np.pi * sc.radius_mm / sc.crystals_per_ring
    data_path = _data_path_for(path, ".s")
    lst = lambda values: "{ " + ",".join(str(v) for v in values) + "}"  # noqa: E731
    lines = [
        "!INTERFILE  :=",
        "!imaging modality := PT",
        f"name of data file := {os.path.basename(data_path)}",
        "originating system := userdefined",
        "!version of keys := STIR4.0",
        "!GENERAL DATA :=",
        "!GENERAL IMAGE DATA :=",
        "!type of data := PET",
        "imagedata byte order := LITTLEENDIAN",
        "!PET STUDY (General) :=",
        "!PET data type := Emission",
        "applied corrections := {None}",
        f"!number format := {kind}",
        f"!number of bytes per pixel := {nbytes}",
        "number of dimensions := 4",
        "matrix axis label [4] := segment",
        f"!matrix size [4] := {len(segs)}",
        "matrix axis label [3] := axial coordinate",
        f"!matrix size [3] := {lst(len(s[1]) for s in by_number)}",
        "matrix axis label [2] := view",
        f"!matrix size [2] := {layout.num_views}",
        "matrix axis label [1] := tangential coordinate",
        f"!matrix size [1] := {layout.num_radial}",
        f"minimum ring difference per segment := {lst(s[2] for s in by_number)}",
        f"maximum ring difference per segment := {lst(s[3] for s in by_number)}",
        f"segment sequence := {lst(s[0] for s in segs)}",
        "Scanner parameters:=",
        "Scanner type := userdefined",
        f"Number of rings := {sc.num_rings}",
        f"Number of detectors per ring := {sc.crystals_per_ring}",
        f"Inner ring diameter (cm) := {2 * sc.radius_mm / 10!r}",
        "Average depth of interaction (cm) := 0",
        f"Distance between rings (cm) := {ring_spacing / 10!r}",
        f"Default bin size (cm) := {bin_size_mm / 10!r}",
        "View offset (degrees) := 0",
        f"Maximum number of non-arc-corrected bins := {layout.num_radial}",
        f"Default number of arc-corrected bins := {layout.num_radial}",
        "End scanner parameters:=",
        f"effective central bin size (cm) := {bin_size_mm / 10!r}",
        f"petbind span := {layout.span}",
        f"petbind max ring difference := {layout.max_ring_difference}",
    ]
    if exam is not None:
        lines += [f"isotope name := {exam.isotope}", f"radiopharmaceutical := {exam.tracer}"]
    lines += ["number of time frames := 1", "image scaling factor[1] := 1", "data offset in bytes[1] := 0", "!END OF INTERFILE :="]
    # petbind planes are already segment by segment in this order, axial position increasing
    order = np.concatenate([s[1] for s in segs])
    _write_data(data_path, data[order])
    _write_header(path, lines)


def read_interfile_sinogram(path, scanner=None):
    """Read a STIR Interfile sinogram (``.hs``) into petbind order.

    Parameters
    ----------
    path : str
    scanner : Scanner, optional
        The scanner; default a cylindrical scanner from the header's scanner
        parameters (rings, detectors per ring, inner ring diameter plus depth
        of interaction, ring distance).

    Returns
    -------
    InterfileSinogram

    Raises
    ------
    ValueError
        Naming the file and the key when keys are missing, the segments do not
        form a petbind layout, the data are TOF or the data file is short.
    """
    path = os.fspath(path)
    h = read_interfile_header(path)
    kind = _get(h, path, "pet data type", str, "Emission", required=False)
    if kind.lower() not in ("emission", "transmission", "scatter", "randoms", "normalisation", "normalization"):
        raise ValueError(f"{path}: field '!PET data type' is {kind!r}; expected sinogram data such as Emission")
    ndim = _get(h, path, "number of dimensions", int)
    if ndim != 4:
        raise ValueError(f"{path}: field 'number of dimensions' is {ndim}; expected 4 (TOF sinograms are not supported)")
    if int(_get(h, path, "number of tof time bins", str, "1", required=False) or 1) > 1:
        raise ValueError(f"{path}: field 'Number of TOF time bins' > 1; TOF sinograms are not supported")
    labels = {_get(h, path, f"matrix axis label[{i}]").lower(): i for i in (1, 2, 3, 4)}
    for need in ("segment", "view", "axial coordinate", "tangential coordinate"):
        if need not in labels:
            raise ValueError(f"{path}: field 'matrix axis label' lacks {need!r}; got {sorted(labels)}")
    if labels["segment"] != 4 or labels["tangential coordinate"] != 1:
        raise ValueError(f"{path}: field 'matrix axis label' order {labels} is not SegmentBySinogram or SegmentByView")
    by_view = labels["view"] == 3
    num_views = _get(h, path, f"matrix size[{labels['view']}]", int)
    num_tang = _get(h, path, "matrix size[1]", int)
    num_segs = _get(h, path, "matrix size[4]", int)
    axial = _get(h, path, f"matrix size[{labels['axial coordinate']}]", int)
    axial = axial if isinstance(axial, list) else [axial]
    mins = _get(h, path, "minimum ring difference per segment", int)
    maxs = _get(h, path, "maximum ring difference per segment", int)
    mins, maxs = (v if isinstance(v, list) else [v] for v in (mins, maxs))
    for key, v in (("matrix size[3]", axial), ("minimum ring difference per segment", mins), ("maximum ring difference per segment", maxs)):
        if len(v) != num_segs:
            raise ValueError(f"{path}: field '{key}' has {len(v)} entries; expected one per segment ({num_segs})")
    seg_numbers = list(range(-(num_segs // 2), num_segs // 2 + 1))
    default_seq = [0] + [s for i in range(1, num_segs // 2 + 1) for s in (-i, i)]
    seq = _get(h, path, "segment sequence", int, default_seq, required=False)
    seq = seq if isinstance(seq, list) else [seq]
    if sorted(seq) != seg_numbers:
        raise ValueError(f"{path}: field 'segment sequence' is {seq}; expected a permutation of {seg_numbers}")
    if scanner is None:
        nr = _get(h, path, "number of rings", int)
        n = _get(h, path, "number of detectors per ring", int)
        radius = 10 * (_get(h, path, "inner ring diameter (cm)", float) / 2 + _get(h, path, "average depth of interaction (cm)", float, 0.0, required=False))
        spacing = 10 * _get(h, path, "distance between rings (cm)", float)
        scanner = Scanner.cylindrical(radius, n, nr, spacing, name=_get(h, path, "originating system", str, "interfile", required=False))
    zero = seg_numbers.index(0)
    span = maxs[zero] - mins[zero] + 1
    max_rd = max(max(abs(a), abs(b)) for a, b in zip(mins, maxs))
    try:
        layout = SinogramLayout(scanner, num_tang, max_rd, span)
    except ValueError as exc:
        raise ValueError(f"{path}: fields 'maximum ring difference per segment' / 'matrix size' do not fit the scanner: {exc}") from None
    if layout.num_views != num_views:
        raise ValueError(f"{path}: field 'matrix size' (view) is {num_views}; the scanner has {layout.num_views} views")
    ours = {s: (planes, lo, hi) for s, planes, lo, hi in _segments(layout)}
    for i, s in enumerate(seg_numbers):
        if s not in ours or len(ours[s][0]) != axial[i] or (ours[s][1], ours[s][2]) != (mins[i], maxs[i]):
            got = (len(ours[s][0]), ours[s][1], ours[s][2]) if s in ours else None
            raise ValueError(
                f"{path}: field 'matrix size[3]' / ring differences of segment {s} ({axial[i]} positions, "
                f"{mins[i]}..{maxs[i]}) do not match a petbind layout with span {span}: {got}"
            )
    total = sum(axial) * num_views * num_tang
    flat = _read_data(h, path, total)
    out = np.empty(layout.shape, dtype=flat.dtype)
    pos = 0
    for s in seq:
        planes = ours[s][0]
        size = len(planes) * num_views * num_tang
        block = flat[pos:pos + size]
        pos += size
        if by_view:
            block = block.reshape(num_views, len(planes), num_tang).transpose(1, 0, 2)
        else:
            block = block.reshape(len(planes), num_views, num_tang)
        out[planes] = block
    return InterfileSinogram(out, layout, h)
