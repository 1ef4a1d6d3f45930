"""File input/output for quantification: TAC tables, 4-D PET images, atlases.

Conventions
-----------
* TAC tables are PET-BIDS derivative TSV files: columns ``frame_start`` and
  ``frame_end`` in seconds from injection, then one column per region in
  Bq/mL.  The literal ``n/a`` (BIDS missing value) and ``NaN`` are refused.
* 4-D PET images are NIfTI ``(x, y, z, t)`` with a PET-BIDS JSON sidecar.
  Frame timing is taken from the sidecar's ``FrameTimesStart`` and
  ``FrameDuration`` (seconds), never from the NIfTI header.  If the sidecar
  gives ``InjectionStart`` (seconds relative to ``TimeZero``), frame times
  are shifted so that they are relative to injection.
* Atlases are an integer label NIfTI plus a BIDS-style label TSV with at
  least the columns ``index`` and ``name``.  Label 0 is background.

Treatment of bad values (decided once, here)
--------------------------------------------
* NaN or infinite values in a TAC table or a PET image are refused with a
  ``ValueError`` naming the file, the column/frame and the count.
* Negative values are allowed (a regional or voxel mean of a noisy,
  unconstrained reconstruction can be slightly negative in early frames);
  they are counted and reported with a ``logging`` warning, never clipped.

Every file is written to a temporary name in the destination folder and then
``os.replace``-d, so a crash never leaves a half-written output (see
:mod:`petbind.quant.outputs` for files that must appear together).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from petbind.core.files import (
    read_json,
    read_table_tsv,
    sidecar_path_for,
    write_json,
    write_table_tsv,
)
from petbind.core.frames import validate_frame_times
from petbind.quant.outputs import output_set

logger = logging.getLogger(__name__)

__all__ = [
    "TACTable",
    "PETImage",
    "Atlas",
    "read_tacs_tsv",
    "write_tacs_tsv",
    "load_pet",
    "load_atlas",
    "load_map",
    "check_same_grid",
    "save_nifti",
]

#: Unit strings accepted in a PET sidecar and their factor to Bq/mL.
_UNIT_TO_BQ_PER_ML = {"bq/ml": 1.0, "kbq/ml": 1e3, "mbq/ml": 1e6}


def _parse_float(text: str, path, column: str, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: column '{column}' line {lineno}: expected a number, got {text!r}") from None


# --------------------------------------------------------------------------
# TAC tables
# --------------------------------------------------------------------------
@dataclass
class TACTable:
    """Regional time-activity curves.

    Attributes
    ----------
    frame_start_s, frame_end_s : ndarray, shape (n_frames,)
        Frame start/end in seconds from injection (float64).
    region_names : list of str
        One name per region (column order).
    values : ndarray, shape (n_frames, n_regions)
        Mean activity concentration in Bq/mL.
    source : str
        Where the table came from (used in error messages).
    """

    frame_start_s: np.ndarray
    frame_end_s: np.ndarray
    region_names: list
    values: np.ndarray
    source: str = field(default="TAC table", compare=False)

    def __post_init__(self):
        self.frame_start_s, self.frame_end_s = validate_frame_times(self.frame_start_s, self.frame_end_s, self.source)
        self.region_names = [str(n) for n in self.region_names]
        self.values = np.asarray(self.values, dtype=np.float64)
        n_frames = self.frame_start_s.size
        if self.values.ndim == 1 and len(self.region_names) == 1:
            self.values = self.values.reshape(-1, 1)
        if self.values.ndim != 2:
            raise ValueError(f"{self.source}: values must be 2-D (n_frames, n_regions), got shape {self.values.shape}")
        if self.values.shape != (n_frames, len(self.region_names)):
            raise ValueError(
                f"{self.source}: values have shape {self.values.shape}, expected "
                f"(n_frames={n_frames}, n_regions={len(self.region_names)})"
            )
        if len(set(self.region_names)) != len(self.region_names):
            dupes = sorted({n for n in self.region_names if self.region_names.count(n) > 1})
            raise ValueError(f"{self.source}: duplicate region name(s) {dupes}")
        for reserved in ("frame_start", "frame_end"):
            if reserved in self.region_names:
                raise ValueError(f"{self.source}: '{reserved}' is reserved and cannot be a region name")
        bad = ~np.isfinite(self.values)
        if bad.any():
            j = int(np.flatnonzero(bad.any(axis=0))[0])
            raise ValueError(
                f"{self.source}: region '{self.region_names[j]}' has {int(bad[:, j].sum())} NaN/inf value(s); "
                "expected finite Bq/mL values in every frame"
            )
        n_neg = int((self.values < 0).sum())
        if n_neg:
            logger.warning("%s: %d negative TAC value(s) kept as they are (noise)", self.source, n_neg)

    @property
    def n_frames(self) -> int:
        return int(self.frame_start_s.size)

    @property
    def frame_mid_s(self) -> np.ndarray:
        """Frame mid times in seconds."""
        return 0.5 * (self.frame_start_s + self.frame_end_s)

    def column(self, name: str) -> np.ndarray:
        """Return the TAC of region ``name`` (Bq/mL, shape (n_frames,)).

        Raises
        ------
        ValueError
            If the region is absent; the message lists the available names.
        """
        try:
            j = self.region_names.index(name)
        except ValueError:
            raise ValueError(
                f"{self.source}: region '{name}' not found; available regions: {self.region_names}"
            ) from None
        return self.values[:, j].copy()

    def subset(self, names: Sequence[str]) -> "TACTable":
        """Return a new table with only the regions ``names`` (in that order)."""
        cols = [self.column(n) for n in names]
        return TACTable(self.frame_start_s.copy(), self.frame_end_s.copy(), list(names),
                        np.stack(cols, axis=1) if cols else np.zeros((self.n_frames, 0)), self.source)

    def __repr__(self) -> str:
        return (
            f"TACTable(n_frames={self.n_frames}, regions={self.region_names}, "
            f"span={self.frame_start_s[0]:g}-{self.frame_end_s[-1]:g} s, source={self.source!r})"
        )


def read_tacs_tsv(path: str | os.PathLike) -> TACTable:
    """Read a PET-BIDS derivative TAC table.

    Parameters
    ----------
    path : str or path-like
        TSV with columns ``frame_start``, ``frame_end`` (s) and one column per
        region (Bq/mL).

    Returns
    -------
    TACTable

    Raises
    ------
    ValueError
        Missing ``frame_start``/``frame_end``, no region column, non-numeric,
        NaN or ``n/a`` cells, unsorted or overlapping frames.  The message
        names the file and the column.
    """
    path = Path(path)
    header, rows = read_table_tsv(path, required=("frame_start", "frame_end"))
    if not rows:
        raise ValueError(f"{path}: no frame rows after the header")
    regions = [h for h in header if h not in ("frame_start", "frame_end")]
    if not regions:
        raise ValueError(f"{path}: no region columns; expected frame_start, frame_end, then one column per region")
    for col in header:
        for lineno, row in enumerate(rows, start=2):
            if row[col].lower() in ("n/a", "nan", ""):
                raise ValueError(
                    f"{path}: column '{col}' line {lineno} is {row[col]!r}; missing or NaN values are not "
                    "accepted in a TAC table"
                )
    start = [_parse_float(r["frame_start"], path, "frame_start", i) for i, r in enumerate(rows, start=2)]
    end = [_parse_float(r["frame_end"], path, "frame_end", i) for i, r in enumerate(rows, start=2)]
    values = np.array(
        [[_parse_float(r[c], path, c, i) for c in regions] for i, r in enumerate(rows, start=2)], dtype=np.float64
    )
    return TACTable(np.array(start), np.array(end), regions, values, source=str(path))


def write_tacs_tsv(path: str | os.PathLike, table: TACTable) -> Path:
    """Write a :class:`TACTable` as PET-BIDS derivative TSV (atomic).

    Values are written with ``repr`` so the round trip is exact.
    """
    rows = [
        [table.frame_start_s[i], table.frame_end_s[i], *table.values[i]] for i in range(table.n_frames)
    ]
    return write_table_tsv(path, ["frame_start", "frame_end", *table.region_names], rows)


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
@dataclass
class PETImage:
    """A dynamic PET image with frame timing.

    Attributes
    ----------
    data : ndarray, shape (x, y, z, t)
        Activity concentration in Bq/mL.
    affine : ndarray, shape (4, 4)
        float64 NIfTI RAS+ affine (mm).
    frame_start_s, frame_end_s : ndarray, shape (t,)
        Seconds from injection.
    sidecar : dict
        The PET-BIDS JSON sidecar as read.
    path : str
        Image file name (for messages).
    """

    data: np.ndarray
    affine: np.ndarray
    frame_start_s: np.ndarray
    frame_end_s: np.ndarray
    sidecar: dict
    path: str = ""

    @property
    def shape(self) -> tuple:
        return self.data.shape

    def __repr__(self) -> str:
        return f"PETImage(shape={self.data.shape}, n_frames={self.frame_start_s.size}, path={self.path!r})"


@dataclass
class Atlas:
    """An integer label image with region names.

    Attributes
    ----------
    labels : ndarray of int32, shape (x, y, z)
        0 is background.
    affine : ndarray, shape (4, 4)
        float64 RAS+ affine (mm).
    names : dict[int, str]
        Label index -> region name (background excluded).
    path : str
        Label image file name.
    """

    labels: np.ndarray
    affine: np.ndarray
    names: dict
    path: str = ""

    @property
    def region_names(self) -> list:
        return [self.names[k] for k in sorted(self.names)]

    def index_of(self, name: str) -> int:
        """Return the label index of region ``name`` (error lists available names)."""
        for k, v in self.names.items():
            if v == name:
                return int(k)
        raise ValueError(f"{self.path}: region '{name}' not in atlas; available regions: {self.region_names}")

    def mask(self, names: Sequence[str] | None = None) -> np.ndarray:
        """Boolean mask of the regions ``names`` (all labelled voxels if None)."""
        if names is None:
            return self.labels > 0
        idx = [self.index_of(n) for n in names]
        return np.isin(self.labels, idx)

    def __repr__(self) -> str:
        return f"Atlas(shape={self.labels.shape}, n_regions={len(self.names)}, path={self.path!r})"


def _load_nifti(path):
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise ValueError(f"{path}: cannot read as NIfTI ({exc})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    return img, affine


def _gzip_complete(path, img) -> None:
    """Refuse a ``.nii.gz`` whose gzip stream is cut short.

    nibabel decompresses only as far as the voxels reach, so a file that lost
    its last bytes (the end of the stream and the gzip trailer) can still
    give every voxel, and is then read without an error.  The trailer's
    ISIZE field (uncompressed size mod 2**32) must equal the size the header
    implies; otherwise (a truncated file, or a legitimately unusual one such
    as multi-member gzip) the stream is decompressed to its end, which checks
    the end-of-stream marker and the CRC.
    """
    import gzip
    import zlib

    hdr = img.header
    expected = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() >= 18:  # smallest gzip member: 10-byte header + 8-byte trailer
            fh.seek(-4, os.SEEK_END)
            if int.from_bytes(fh.read(4), "little") == expected % 2**32:
                return
    n = 0
    try:
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 24):
                n += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(
            f"{path}: cannot read the image data ({exc.__class__.__name__}: {exc}); the file is truncated or corrupt"
        ) from None
    if n < expected:
        raise ValueError(f"{path}: the file holds {n} bytes of image data but its header needs {expected}; "
                         "the file is truncated")


def _image_array(img, path, fdata_dtype=None) -> np.ndarray:
    """The voxel array of a loaded image; a truncated or corrupt file is a ``ValueError`` naming it.

    nibabel reads the header at ``load`` and the voxels only here, so this is
    where a truncated ``.nii.gz`` (EOFError), a short ``.nii`` (OSError) or
    damaged compressed data (zlib.error) shows up.
    """
    import zlib

    try:
        if fdata_dtype is None:
            data = np.asarray(img.dataobj)
        else:
            data = img.get_fdata(dtype=fdata_dtype)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise ValueError(
            f"{path}: cannot read the image data ({exc.__class__.__name__}: {exc}); the file is truncated or corrupt"
        ) from None
    if str(path).endswith(".gz"):
        _gzip_complete(path, img)
    return data


def load_map(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3-D map (e.g. BP_ND) as float64.

    Parameters
    ----------
    path : str or path-like
        ``.nii``/``.nii.gz``, shape (x, y, z) or (x, y, z, 1).

    Returns
    -------
    data : ndarray, shape (x, y, z)
    affine : ndarray, shape (4, 4)

    Raises
    ------
    FileNotFoundError
        Missing file.
    ValueError
        Unreadable, truncated or not 3-D.
    """
    img, affine = _load_nifti(path)
    arr = np.asarray(_image_array(img, path, np.float64), dtype=np.float64)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D map, got shape {arr.shape}")
    return arr, affine


def _sidecar_number_list(sidecar: dict, key: str, json_path) -> np.ndarray:
    if key not in sidecar:
        raise ValueError(f"{json_path}: field '{key}' missing; PET-BIDS sidecar needs FrameTimesStart and FrameDuration (s)")
    val = sidecar[key]
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        val = [val]
    try:
        arr = np.asarray(val, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{json_path}: field '{key}' must be a list of numbers (seconds), got {val!r}") from None
    return arr


def load_pet(nifti_path: str | os.PathLike, json_path: str | os.PathLike | None = None,
             dtype=np.float32) -> PETImage:
    """Load a 4-D PET NIfTI and its PET-BIDS sidecar.

    Parameters
    ----------
    nifti_path : str or path-like
        ``.nii`` or ``.nii.gz`` image, shape (x, y, z, t) (a 3-D image is
        accepted as one frame).
    json_path : str or path-like, optional
        Sidecar; default is the image name with ``.json``.
    dtype : numpy dtype
        Data type of the returned array (float32 keeps big studies in memory).

    Returns
    -------
    PETImage

    Raises
    ------
    FileNotFoundError
        Image or sidecar missing.
    ValueError
        Missing/invalid ``FrameTimesStart``/``FrameDuration``, frame count
        different from the image time axis, unsorted or overlapping frames,
        unknown ``Units``, NaN or infinite voxels.

    Notes
    -----
    ``frame_start_s = FrameTimesStart - InjectionStart`` (``InjectionStart``
    taken as 0 when absent) and ``frame_end_s = frame_start_s +
    FrameDuration``.  ``Units`` of ``kBq/mL`` or ``MBq/mL`` are converted to
    Bq/mL; anything else other than ``Bq/mL`` is refused.
    """
    nifti_path = Path(nifti_path)
    json_path = sidecar_path_for(nifti_path) if json_path is None else Path(json_path)
    img, affine = _load_nifti(nifti_path)
    sidecar = read_json(json_path)
    starts = _sidecar_number_list(sidecar, "FrameTimesStart", json_path)
    durs = _sidecar_number_list(sidecar, "FrameDuration", json_path)
    if starts.size != durs.size:
        raise ValueError(
            f"{json_path}: FrameTimesStart has {starts.size} entries but FrameDuration has {durs.size}"
        )
    injection = sidecar.get("InjectionStart", 0.0)
    if not isinstance(injection, (int, float)) or isinstance(injection, bool):
        raise ValueError(f"{json_path}: field 'InjectionStart' must be a number of seconds, got {injection!r}")
    start = starts - float(injection)
    frame_start_s, frame_end_s = validate_frame_times(start, start + durs, f"{json_path} (FrameTimesStart/FrameDuration)")

    shape = img.shape
    if len(shape) == 3:
        shape = (*shape, 1)
    elif len(shape) != 4:
        raise ValueError(f"{nifti_path}: expected a 4-D (x, y, z, t) image, got shape {img.shape}")
    if shape[3] != frame_start_s.size:
        raise ValueError(
            f"{nifti_path}: image has {shape[3]} frames on its time axis but {json_path} "
            f"FrameTimesStart/FrameDuration list {frame_start_s.size}"
        )
    if "Units" not in sidecar:
        logger.warning("%s: no 'Units' field; taking the image to be in Bq/mL", json_path)
    units = sidecar.get("Units", "Bq/mL")
    factor = _UNIT_TO_BQ_PER_ML.get(str(units).strip().lower())
    if factor is None:
        raise ValueError(
            f"{json_path}: field 'Units' is {units!r}; expected one of Bq/mL, kBq/mL, MBq/mL"
        )
    data = np.asarray(_image_array(img, nifti_path, np.float32 if np.dtype(dtype) == np.float32 else np.float64),
                      dtype=dtype)
    data = data.reshape(shape)
    if factor != 1.0:
        data *= factor
    finite = np.isfinite(data)
    if not finite.all():
        per_frame = (~finite).reshape(-1, shape[3]).sum(axis=0)
        f = int(np.flatnonzero(per_frame)[0])
        raise ValueError(
            f"{nifti_path}: {int((~finite).sum())} NaN/inf voxel(s) (first in frame {f}); expected finite Bq/mL "
            "(set voxels outside the field of view to 0)"
        )
    n_neg = int((data < 0).sum())
    if n_neg:
        logger.info("%s: %d negative voxel value(s) kept (noise)", nifti_path, n_neg)
    return PETImage(data, affine, frame_start_s, frame_end_s, sidecar, str(nifti_path))


def load_atlas(label_nifti: str | os.PathLike, label_tsv: str | os.PathLike) -> Atlas:
    """Load an integer label image and its label table.

    Parameters
    ----------
    label_nifti : str or path-like
        3-D NIfTI of integer labels (0 = background).
    label_tsv : str or path-like
        TSV with at least ``index`` and ``name`` columns.  An entry with
        index 0 is taken as the background name and not used as a region.

    Returns
    -------
    Atlas

    Raises
    ------
    ValueError
        Non-integer or negative labels, labels in the image that the TSV does
        not name, duplicate indices or names, non-3-D image.
    """
    label_nifti = Path(label_nifti)
    label_tsv = Path(label_tsv)
    img, affine = _load_nifti(label_nifti)
    data = _image_array(img, label_nifti)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{label_nifti}: expected a 3-D label image, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise ValueError(f"{label_nifti}: label image has non-integer values; expected integer labels")
    labels = data.astype(np.int64)
    if labels.min(initial=0) < 0:
        raise ValueError(f"{label_nifti}: negative label {labels.min()}; expected labels >= 0 (0 = background)")
    _, rows = read_table_tsv(label_tsv, required=("index", "name"))
    names: dict[int, str] = {}
    seen: set[int] = set()
    for lineno, row in enumerate(rows, start=2):
        try:
            idx = int(row["index"])
        except ValueError:
            raise ValueError(f"{label_tsv}: column 'index' line {lineno}: expected an integer, got {row['index']!r}") from None
        name = row["name"]
        if not name or name == "n/a":
            raise ValueError(f"{label_tsv}: column 'name' line {lineno} is empty")
        if idx in seen:
            raise ValueError(f"{label_tsv}: column 'index' value {idx} appears twice")
        seen.add(idx)
        if idx < 0:
            raise ValueError(f"{label_tsv}: column 'index' line {lineno}: negative index {idx}")
        if idx == 0:
            continue
        if name in names.values():
            raise ValueError(f"{label_tsv}: column 'name' value '{name}' appears twice")
        names[idx] = name
    present = np.unique(labels)
    unnamed = [int(v) for v in present if v != 0 and v not in names]
    if unnamed:
        raise ValueError(
            f"{label_nifti}: label value(s) {unnamed[:10]} are not listed in {label_tsv} (column 'index'); "
            "every non-zero label needs a name"
        )
    return Atlas(labels.astype(np.int32), affine, names, str(label_nifti))


def check_same_grid(shape_a, affine_a, name_a, shape_b, affine_b, name_b, atol_mm: float = 1e-3) -> None:
    """Raise ``ValueError`` unless two images share spatial shape and affine.

    Parameters
    ----------
    shape_a, shape_b : tuple
        Image shapes (only the first three axes are compared).
    affine_a, affine_b : ndarray, shape (4, 4)
    name_a, name_b : str
        File names for the message.
    atol_mm : float
        Tolerance on affine entries (mm).
    """
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        raise ValueError(
            f"{name_b}: grid shape {tuple(shape_b[:3])} differs from {name_a} shape {tuple(shape_a[:3])}; "
            "resample to the same grid first"
        )
    if not np.allclose(affine_a, affine_b, atol=atol_mm, rtol=0):
        raise ValueError(
            f"{name_b}: affine differs from {name_a} (max difference "
            f"{float(np.max(np.abs(np.asarray(affine_a) - np.asarray(affine_b)))):.3g} mm); resample to the same grid first"
        )


def _write_nifti(path, data, affine) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def save_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, sidecar: dict | None = None,
               outputs=None) -> Path:
    """Save a NIfTI image (float32 for float data) and optional JSON sidecar, atomically.

    Parameters
    ----------
    path : str or path-like
        ``.nii`` or ``.nii.gz`` destination.
    data : ndarray
        Image, ``(x, y, z[, t])``.
    affine : array_like, shape (4, 4)
        Voxel-to-RAS+ affine in mm.
    sidecar : dict, optional
        JSON sidecar written next to the image.
    outputs : petbind.quant.outputs.OutputSet, optional
        Stage both files in this set (the caller commits); default: image and
        sidecar appear together when this call returns.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float32)
    with output_set(outputs) as outs:
        outs.write(path, _write_nifti, data, affine)
        if sidecar is not None:
            outs.write(sidecar_path_for(path), write_json, sidecar)
    return Path(path)
