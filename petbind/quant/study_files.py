"""Reading a study's fit results and participants for the group comparison.

Layout read by ``petbind-quant compare --study DIR`` and
:func:`petbind.quant.compare.run_study`::

    DIR/participants.tsv                 columns participant_id, group (+ any)
    DIR/sub-<id>/ses-<baseline>/**/*_bpnd.tsv   fit output of the baseline scan
    DIR/sub-<id>/ses-<post>/**/*_bpnd.tsv       fit output of the post-dose scan
    DIR/sub-<id>/ses-<session>/**/*_bpnd.nii[.gz]  optional BP_ND maps (voxelwise)

``participant_id`` may be given with or without the ``sub-`` prefix.  Each
subject/session folder must hold exactly one ``*_bpnd.tsv`` (searched
recursively; another glob, e.g. ``*_model-srtm_bpnd.tsv``, via
``result_pattern``); every subject must list the same regions.

Groups
------
With declared groups (``groups=("drug", "placebo")``) every participant must
belong to one of them, every declared group must have a participant and every
``sub-*`` folder must have a row in ``participants.tsv``; anything else is a
``ValueError`` naming the file, the subject and the group, because a typo
(``drugg``, ``Drug``) would otherwise make a third group and silently shrink
the real one.  Without declared groups the groups are whatever the table
lists, and a subject folder without a row is left out with a warning.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from petbind.core.files import read_table_tsv
from petbind.quant.io import check_same_grid, load_map

logger = logging.getLogger(__name__)

__all__ = [
    "StudyData",
    "read_bpnd_tsv",
    "read_participants",
    "check_declared_groups",
    "find_session_file",
    "load_study",
    "load_bpnd_maps",
]


def read_bpnd_tsv(path: str | os.PathLike) -> dict[str, float]:
    """Read regional BP_ND from a ``fit`` result TSV.

    Parameters
    ----------
    path : str or path-like
        TSV with at least ``region`` and ``bp_nd`` columns (``n/a`` = failed fit).

    Returns
    -------
    dict
        region name -> BP_ND (NaN for ``n/a``), in file order.

    Raises
    ------
    ValueError
        Missing columns, duplicate regions, non-numeric ``bp_nd``.
    """
    _, rows = read_table_tsv(path, required=("region", "bp_nd"))
    if not rows:
        raise ValueError(f"{path}: no region rows")
    out: dict[str, float] = {}
    for lineno, row in enumerate(rows, start=2):
        name = row["region"]
        if name in out:
            raise ValueError(f"{path}: column 'region' value '{name}' appears twice")
        txt = row["bp_nd"]
        if txt.lower() in ("n/a", "nan", ""):
            out[name] = math.nan
            continue
        try:
            out[name] = float(txt)
        except ValueError:
            raise ValueError(f"{path}: column 'bp_nd' line {lineno}: expected a number, got {txt!r}") from None
    n_nan = sum(math.isnan(v) for v in out.values())
    if n_nan:
        logger.warning("%s: %d region(s) with BP_ND n/a (failed fits)", path, n_nan)
    return out


@dataclass
class StudyData:
    """Regional BP_ND of a two-session study.

    Attributes
    ----------
    participant_ids : list of str
        With the ``sub-`` prefix.
    groups : list of str
        Group of each participant.
    region_names : list of str
    baseline, post : ndarray, shape (n_subjects, n_regions)
        BP_ND; NaN for failed fits.
    baseline_files, post_files : list of Path
    declared_groups : tuple of str, optional
        The groups declared by the caller (their order is the table order).
    """

    participant_ids: list
    groups: list
    region_names: list
    baseline: np.ndarray
    post: np.ndarray
    baseline_files: list
    post_files: list
    declared_groups: tuple | None = None

    @property
    def group_names(self) -> list:
        """Declared groups in their order, else groups in order of first appearance in participants.tsv."""
        if self.declared_groups is not None:
            return list(self.declared_groups)
        return list(dict.fromkeys(self.groups))


def read_participants(path, group_column: str = "group") -> list[tuple[str, str]]:
    """Read ``participants.tsv`` -> list of (``sub-<id>``, group).

    Raises
    ------
    ValueError
        Missing ``participant_id`` or group column, empty or ``n/a`` group,
        duplicate participants.
    """
    _, rows = read_table_tsv(path, required=("participant_id", group_column))
    out = []
    seen = set()
    for lineno, row in enumerate(rows, start=2):
        pid = row["participant_id"]
        if not pid or pid == "n/a":
            raise ValueError(f"{path}: column 'participant_id' line {lineno} is empty")
        pid = pid if pid.startswith("sub-") else f"sub-{pid}"
        if pid in seen:
            raise ValueError(f"{path}: column 'participant_id' value '{pid}' appears twice")
        seen.add(pid)
        grp = row[group_column]
        if not grp or grp.lower() == "n/a":
            raise ValueError(f"{path}: column '{group_column}' line {lineno} ({pid}) has no group")
        out.append((pid, grp))
    if not out:
        raise ValueError(f"{path}: no participants listed")
    return out


def _declared(groups) -> tuple:
    if isinstance(groups, (str, bytes)) or not all(isinstance(g, str) for g in groups):
        raise TypeError(f"groups: expected a sequence of group names, e.g. ('drug', 'placebo'); got {groups!r}")
    groups = tuple(groups)
    if not groups or any(not g.strip() for g in groups):
        raise ValueError(f"groups: expected one or more non-empty group names; got {groups!r}")
    if len(set(groups)) != len(groups):
        raise ValueError(f"groups: each group may be declared once; got {groups!r}")
    return groups


def check_declared_groups(participants, groups, source, group_column: str = "group") -> tuple:
    """Check that every participant is in a declared group and every group has a participant.

    Parameters
    ----------
    participants : list of (str, str)
        From :func:`read_participants`.
    groups : sequence of str
        The declared group names, e.g. ``("drug", "placebo")``.
    source : str or path-like
        ``participants.tsv`` (for messages).
    group_column : str
        Its group column.

    Returns
    -------
    tuple of str
        ``groups``.

    Raises
    ------
    ValueError
        A participant with an undeclared group (a typo such as ``drugg`` or
        ``Drug``), or a declared group without participants.
    """
    groups = _declared(groups)
    for pid, g in participants:
        if g not in groups:
            close = difflib.get_close_matches(g, groups, n=1) or [x for x in groups if x.lower() == g.lower()]
            hint = f"; did you mean '{close[0]}'? (group names are case-sensitive)" if close else ""
            raise ValueError(f"{source}: participant '{pid}' has {group_column} '{g}', which is not one of the "
                             f"declared groups {list(groups)}{hint}")
    present = {g for _, g in participants}
    for g in groups:
        if g not in present:
            raise ValueError(f"{source}: declared group '{g}' has no participant (column '{group_column}' lists "
                             f"{sorted(present)})")
    return groups


def find_session_file(study_dir, pid: str, session: str, patterns: Sequence[str], required: bool = True):
    """The one file matching ``patterns`` under ``study_dir/pid/ses-<session>/`` (recursive).

    Returns ``None`` when nothing matches and ``required`` is false.

    Raises
    ------
    ValueError
        Missing session folder or file (when ``required``), or several
        matching files.
    """
    ses_dir = Path(study_dir) / pid / f"ses-{session}"
    if not ses_dir.is_dir():
        if required:
            raise ValueError(f"{ses_dir}: session folder not found (expected DIR/{pid}/ses-{session}/)")
        return None
    hits = sorted({p for pat in patterns for p in ses_dir.rglob(pat)})
    if not hits:
        if required:
            raise ValueError(f"{ses_dir}: no file matching {list(patterns)} found (expected one fit result)")
        return None
    if len(hits) > 1:
        raise ValueError(f"{ses_dir}: {len(hits)} files match {list(patterns)} ({[str(h) for h in hits]}); "
                         "expected one")
    return hits[0]


def _unlisted_subjects(study_dir: Path, participants) -> list[Path]:
    listed = {pid for pid, _ in participants}
    return [d for d in sorted(study_dir.glob("sub-*")) if d.is_dir() and d.name not in listed]


def load_study(study_dir, baseline_session: str = "baseline", post_session: str = "postdose",
               group_column: str = "group", result_pattern: str = "*_bpnd.tsv", groups=None) -> StudyData:
    """Read participants and regional BP_ND of both sessions (layout in the module docstring).

    Parameters
    ----------
    study_dir : str or path-like
    baseline_session, post_session : str
        Session labels (folders ``ses-<label>``).
    group_column : str
        Column of ``participants.tsv`` holding the group.
    result_pattern : str
        Glob of the fit result inside each session folder (searched
        recursively), e.g. ``*_model-srtm_bpnd.tsv`` when several models were
        fitted.
    groups : sequence of str, optional
        Declared groups, e.g. ``("drug", "placebo")``: see the module
        docstring for what is then checked.

    Raises
    ------
    ValueError
        Missing files or sessions, region lists that differ between files,
        and with declared groups: an undeclared or empty group, a subject
        folder without a ``participants.tsv`` row.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ValueError(f"{study_dir}: study folder not found")
    table = study_dir / "participants.tsv"
    participants = read_participants(table, group_column)
    declared = None if groups is None else check_declared_groups(participants, groups, table, group_column)
    unlisted = _unlisted_subjects(study_dir, participants)
    if unlisted and declared is not None:
        raise ValueError(f"{unlisted[0]}: subject folder has no row in {table}; add it with its {group_column} "
                         f"(one of {list(declared)}) or remove the folder")
    if unlisted:
        logger.warning("%s: subject folder(s) %s have no row in %s and are left out", study_dir,
                       [d.name for d in unlisted], table)
    regions: list | None = None
    first_file = None
    base_rows, post_rows, bfiles, pfiles = [], [], [], []
    for pid, _ in participants:
        for session, rows_out, files_out in ((baseline_session, base_rows, bfiles), (post_session, post_rows, pfiles)):
            f = find_session_file(study_dir, pid, session, (result_pattern,))
            vals = read_bpnd_tsv(f)
            if regions is None:
                regions, first_file = list(vals), f
            elif sorted(vals) != sorted(regions):
                missing = [r for r in regions if r not in vals]
                extra = [r for r in vals if r not in regions]
                raise ValueError(f"{f}: regions differ from {first_file}: missing {missing}, extra {extra}")
            rows_out.append([vals[r] for r in regions])
            files_out.append(f)
    return StudyData([p for p, _ in participants], [g for _, g in participants], regions,
                     np.array(base_rows, dtype=np.float64), np.array(post_rows, dtype=np.float64), bfiles, pfiles,
                     declared)


#: Globs of the BP_ND maps read for the voxelwise statistics.
BPND_MAP_PATTERNS = ("*_bpnd.nii.gz", "*_bpnd.nii")


def load_bpnd_maps(study_dir, participant_ids: Sequence[str], session: str,
                   patterns: Sequence[str] = BPND_MAP_PATTERNS, reference=None):
    """Stack one BP_ND map per participant for one session.

    Parameters
    ----------
    study_dir : str or path-like
    participant_ids : sequence of str
        ``sub-<id>`` folders.
    session : str
        Session label.
    patterns : sequence of str
        Globs of the map inside ``ses-<session>/`` (exactly one must match).
    reference : (shape, affine, name), optional
        Grid every map must be on (default: the first map's).

    Returns
    -------
    maps : ndarray, shape (n_subjects, x, y, z)
    grid : (shape, affine, name)
        The grid of the maps (pass it as ``reference`` for the other session).
    files : list of Path
    """
    arrays, files = [], []
    for pid in participant_ids:
        f = find_session_file(study_dir, pid, session, patterns, required=True)
        arr, aff = load_map(f)
        if reference is None:
            reference = (arr.shape, aff, str(f))
        check_same_grid(reference[0], reference[1], reference[2], arr.shape, aff, str(f))
        arrays.append(arr)
        files.append(f)
    return np.stack(arrays), reference, files
