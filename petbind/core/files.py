"""Files every stage writes: atomic outputs, JSON sidecars and BIDS TSV tables.

Rules (docs/architecture.md):

* every output is written under a temporary name in the destination folder
  and renamed when complete, so a reader never sees half a file;
* a destination that exists and is not a regular file (a symbolic link, a
  FIFO, a device, a folder) is never replaced: that is refused with an error
  naming the path;
* a new file gets the usual permissions, ``0o666`` less the umask;
* TSV cells are written one way everywhere: ``n/a`` for missing values and
  the shortest text that reads back to the same float.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "OutputPathError",
    "atomic_output",
    "atomic_write_text",
    "check_output_path",
    "format_cell",
    "read_json",
    "read_table_tsv",
    "sidecar_path_for",
    "write_json",
    "write_table_tsv",
]


class OutputPathError(ValueError):
    """An output path that cannot be written safely (reported as one line)."""


def _umask():
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path, make_parents=False):
    """Refuse an output path that is unsafe to replace; return it as a Path.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    make_parents : bool
        Create missing parent folders.

    Raises
    ------
    OutputPathError
        When ``path`` exists and is not a regular file (link, FIFO, device,
        folder), or its parent is missing (and ``make_parents`` is false) or
        is not a folder.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None  # a parent is a file: reported below
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file")
        raise OutputPathError(f"{p}: output path is {kind}; expected a regular file or a new name")
    parent = p.parent if str(p.parent) else Path(".")
    for anc in [parent, *parent.parents]:
        if anc.exists() and not anc.is_dir():
            raise OutputPathError(f"{p}: output folder {anc} is a file, not a folder")
        if anc.exists():
            break
    if not parent.is_dir():
        if not make_parents:
            raise OutputPathError(f"{p}: output folder {parent} does not exist")
        parent.mkdir(parents=True, exist_ok=True)
    return p


class atomic_output:
    """A temporary path next to ``path``, renamed to ``path`` on success.

    Use as a context manager (``with atomic_output(p) as tmp: ...``: renamed
    when the block ends normally, removed when it raises) or by hand with
    :meth:`commit` and :meth:`discard` (a writer that stays open across
    calls).

    Parameters
    ----------
    path : str or os.PathLike
        Final destination; see :func:`check_output_path` for what is refused.
    make_parents : bool
        Create missing parent folders.

    Notes
    -----
    The temporary file keeps the final extension (``.nii.gz``, ``.npy``,
    ``.h5``...) because nibabel, NumPy and matplotlib choose a format from the
    name.  It is hidden (``.name.XXXX.tmp.ext``) so that folder scans skip it.
    """

    def __init__(self, path, make_parents=False):
        self.path = check_output_path(path, make_parents)
        name = self.path.name
        ext = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix="." + name + ".", suffix=".tmp" + ext)
        os.close(fd)
        self.tmp_path = Path(tmp)

    def __enter__(self):
        return self.tmp_path

    def commit(self):
        """Rename the temporary file to the destination (checked again first)."""
        check_output_path(self.path)  # the destination may have changed meanwhile
        os.chmod(self.tmp_path, 0o666 & ~_umask())
        os.replace(self.tmp_path, self.path)

    def discard(self):
        """Remove the temporary file (the destination is untouched)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp_path)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()
        return False


def atomic_write_text(path, text, make_parents=True):
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``Path(path)``."""
    with atomic_output(path, make_parents=make_parents) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ------------------------------------------------------------------------------------------------
# JSON sidecars
# ------------------------------------------------------------------------------------------------
def read_json(path) -> dict:
    """Read a JSON object; errors name the file.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not valid UTF-8 JSON or its top level is not an object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: JSON file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, expected a JSON file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object at top level, got {type(obj).__name__}")
    return obj


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    # metadata of an unknown type is kept as its text rather than lost
    return str(obj)


def write_json(path, obj: dict) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def sidecar_path_for(path) -> Path:
    """The BIDS JSON sidecar of a ``.nii``, ``.nii.gz`` or ``.tsv`` file."""
    p = Path(path)
    for ext in (".nii.gz", ".nii", ".tsv"):
        if p.name.endswith(ext):
            return p.with_name(p.name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


# ------------------------------------------------------------------------------------------------
# TSV tables
# ------------------------------------------------------------------------------------------------
def format_cell(value) -> str:
    """One TSV cell: ``n/a`` for None/NaN, exact round-trip text for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        # repr is the shortest text that reads back to the same double
        return "n/a" if math.isnan(v) else repr(v)
    text = str(value)
    if "\t" in text or "\n" in text:
        raise ValueError(f"table cell {text!r} contains a tab or newline; not allowed in TSV")
    return text


def write_table_tsv(path, columns: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write a table as BIDS TSV (``n/a`` for missing values), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.tsv``.
    columns : sequence of str
        Header.
    rows : sequence of sequences
        One entry per row, each with ``len(columns)`` cells.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    columns = [str(c) for c in columns]
    lines = ["\t".join(columns)]
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"{path}: row {i} has {len(row)} cells, header has {len(columns)}")
        lines.append("\t".join(format_cell(v) for v in row))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_table_tsv(path, required: Sequence[str] = ()) -> tuple[list[str], list[dict[str, str]]]:
    """Read a TSV file into its header and a list of row dictionaries (strings).

    Parameters
    ----------
    path : str or os.PathLike
        TSV file with a header line.
    required : sequence of str
        Column names that must be present.

    Returns
    -------
    header : list of str
    rows : list of dict
        Raw string cells keyed by column name.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not UTF-8 text or is empty, a row has the wrong number
        of cells, a column name repeats or a required column is missing.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: TSV file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, expected a TSV file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty file, expected a tab-separated header line")
    header = [h.strip() for h in lines[0].split("\t")]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate column name(s) {dupes} in header")
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; header has {header}")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(header):
            raise ValueError(
                f"{path}: line {lineno} has {len(cells)} tab-separated cells, expected {len(header)} (header {header})"
            )
        rows.append({h: c.strip() for h, c in zip(header, cells)})
    return header, rows
