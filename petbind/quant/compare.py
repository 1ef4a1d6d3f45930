"""Baseline vs post-dose comparison of binding potential, per subject and per study.

Per subject
-----------
``ΔBP_ND = BP_post - BP_baseline`` and percent change
``100 (BP_post - BP_baseline) / BP_baseline``, as regional tables (from two
``fit`` result TSVs) or as maps (from two 3-D BP_ND NIfTI maps on the same
grid).  The percent change is NaN where the baseline BP_ND is not positive
(no specific binding to lose); such entries are counted in a warning.

Per study: the layout read by ``petbind-quant compare --study DIR``
--------------------------------------------------------------------
::

    DIR/participants.tsv                 columns participant_id, group (+ any)
    DIR/sub-<id>/ses-<baseline>/**/*_bpnd.tsv   fit output of the baseline scan
    DIR/sub-<id>/ses-<post>/**/*_bpnd.tsv       fit output of the post-dose scan
    DIR/sub-<id>/ses-<session>/**/*_bpnd.nii[.gz]  optional BP_ND maps (voxelwise)

``participant_id`` may be given with or without the ``sub-`` prefix.  Each
subject/session folder must hold exactly one ``*_bpnd.tsv`` (searched
recursively; another glob, e.g. ``*_model-srtm_bpnd.tsv``, via
``result_pattern`` / ``--result-pattern``); every subject must list the same
regions.  The session names
default to ``baseline`` and ``postdose``.

Statistics (see :mod:`petbind.quant.stats` for formulas and effect-size choice)
-----------------------------------------------------------------------
* within each group, per region: paired t and Wilcoxon signed-rank on the
  change, mean change with 95 % CI, Cohen's d_z and Hedges' g_z;
* for each pair of groups (group x time interaction), per region: difference
  of mean changes with Welch t, Welch CI, a seeded permutation test and
  Hedges' g;
* Holm and Benjamini-Hochberg adjustment across regions within each family
  (one family = one test, one group or one group pair).

A subject whose BP_ND is NaN in a region (failed fit) is left out of that
region's tests only; the ``n`` columns show how many subjects were used and a
warning gives the count.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from petbind.core.files import read_table_tsv, write_table_tsv
from petbind.quant import stats
from petbind.quant.io import _load_nifti, check_same_grid, save_nifti

logger = logging.getLogger(__name__)

__all__ = [
    "read_bpnd_tsv",
    "percent_change",
    "regional_change",
    "write_regional_change",
    "change_maps",
    "StudyData",
    "read_participants",
    "load_study",
    "within_group_statistics",
    "interaction_statistics",
    "run_study",
    "REGIONAL_CHANGE_COLUMNS",
    "WITHIN_GROUP_COLUMNS",
    "INTERACTION_COLUMNS",
]

REGIONAL_CHANGE_COLUMNS = ["region", "bp_nd_baseline", "bp_nd_post", "delta_bp_nd", "percent_change"]


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


def percent_change(baseline, post) -> np.ndarray:
    """Percent change ``100 (post - baseline) / baseline``.

    Parameters
    ----------
    baseline, post : array_like
        Same shape.

    Returns
    -------
    ndarray
        NaN where ``baseline <= 0`` or either input is NaN.
    """
    b = np.asarray(baseline, dtype=np.float64)
    p = np.asarray(post, dtype=np.float64)
    if b.shape != p.shape:
        raise ValueError(f"percent_change: baseline shape {b.shape} differs from post shape {p.shape}")
    ok = np.isfinite(b) & np.isfinite(p) & (b > 0)
    out = np.full(b.shape, np.nan)
    out[ok] = 100.0 * (p[ok] - b[ok]) / b[ok]
    return out


def regional_change(baseline: dict, post: dict, baseline_source: str = "baseline",
                    post_source: str = "post") -> list[list]:
    """Per-region ΔBP_ND and percent change.

    Parameters
    ----------
    baseline, post : dict
        region -> BP_ND (see :func:`read_bpnd_tsv`).  Both must list the same
        regions.
    baseline_source, post_source : str
        File names for messages.

    Returns
    -------
    list of rows
        ``[region, bp_nd_baseline, bp_nd_post, delta_bp_nd, percent_change]``
        in baseline order (:data:`REGIONAL_CHANGE_COLUMNS`).
    """
    only_b = [r for r in baseline if r not in post]
    only_p = [r for r in post if r not in baseline]
    if only_b or only_p:
        raise ValueError(
            f"{post_source}: regions differ from {baseline_source}: missing {only_b}, extra {only_p}; "
            "fit both sessions with the same atlas"
        )
    regions = list(baseline)
    b = np.array([baseline[r] for r in regions])
    p = np.array([post[r] for r in regions])
    pct = percent_change(b, p)
    n_undef = int(np.sum(np.isfinite(b) & np.isfinite(p) & ~np.isfinite(pct)))
    if n_undef:
        logger.warning("%d region(s) with baseline BP_ND <= 0: percent change set to n/a", n_undef)
    return [[r, b[i], p[i], p[i] - b[i], pct[i]] for i, r in enumerate(regions)]


def write_regional_change(path, rows) -> Path:
    """Write rows from :func:`regional_change` as TSV (atomic)."""
    return write_table_tsv(path, REGIONAL_CHANGE_COLUMNS, rows)


def change_maps(baseline_path, post_path, out_prefix, mask=None) -> dict[str, Path]:
    """ΔBP_ND and percent-change maps from two BP_ND NIfTI maps.

    Parameters
    ----------
    baseline_path, post_path : str or path-like
        3-D BP_ND maps on the same grid (shape and affine).
    out_prefix : str or path-like
        Output prefix: writes ``<prefix>_delta-bpnd.nii.gz`` and
        ``<prefix>_pctchange-bpnd.nii.gz``, each with a JSON sidecar; both
        use the baseline map's affine.
    mask : ndarray of bool, optional
        Voxels outside are NaN.

    Returns
    -------
    dict
        ``{"delta": path, "percent": path}`` plus the arrays under
        ``"delta_array"``/``"percent_array"``.
    """
    img_b, aff_b = _load_nifti(baseline_path)
    img_p, aff_p = _load_nifti(post_path)
    b = np.asarray(img_b.get_fdata(), dtype=np.float64)
    p = np.asarray(img_p.get_fdata(), dtype=np.float64)
    for arr, name in ((b, baseline_path), (p, post_path)):
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr.shape = arr.shape[:3]
        if arr.ndim != 3:
            raise ValueError(f"{name}: expected a 3-D BP_ND map, got shape {arr.shape}")
    check_same_grid(b.shape, aff_b, str(baseline_path), p.shape, aff_p, str(post_path))
    delta = p - b
    pct = percent_change(b, p)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        delta = np.where(mask, delta, np.nan)
        pct = np.where(mask, pct, np.nan)
    common = {"Sources": [str(baseline_path), str(post_path)], "SpatialReference": str(baseline_path)}
    prefix = str(out_prefix)
    d_path = save_nifti(prefix + "_delta-bpnd.nii.gz", delta, aff_b, {
        **common, "Description": "BP_ND change, post - baseline", "Units": "unitless",
        "Formula": "delta = BP_post - BP_baseline"})
    p_path = save_nifti(prefix + "_pctchange-bpnd.nii.gz", pct, aff_b, {
        **common, "Description": "BP_ND percent change", "Units": "percent",
        "Formula": "100 * (BP_post - BP_baseline) / BP_baseline; n/a (NaN) where BP_baseline <= 0"})
    return {"delta": d_path, "percent": p_path, "delta_array": delta, "percent_array": pct}


# --------------------------------------------------------------------------
# study level
# --------------------------------------------------------------------------
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
    """

    participant_ids: list
    groups: list
    region_names: list
    baseline: np.ndarray
    post: np.ndarray
    baseline_files: list
    post_files: list

    @property
    def group_names(self) -> list:
        """Groups in order of first appearance in participants.tsv."""
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


def _find_one(study_dir: Path, pid: str, session: str, patterns: Sequence[str], required: bool = True):
    ses_dir = study_dir / pid / f"ses-{session}"
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
        raise ValueError(f"{ses_dir}: {len(hits)} files match {list(patterns)} ({[str(h) for h in hits]}); expected one")
    return hits[0]


def load_study(study_dir, baseline_session: str = "baseline", post_session: str = "postdose",
               group_column: str = "group", result_pattern: str = "*_bpnd.tsv") -> StudyData:
    """Read participants and regional BP_ND of both sessions (layout in module docstring).

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

    Raises
    ------
    ValueError
        Missing files or sessions, region lists that differ between files.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise ValueError(f"{study_dir}: study folder not found")
    participants = read_participants(study_dir / "participants.tsv", group_column)
    regions: list | None = None
    first_file = None
    base_rows, post_rows, bfiles, pfiles = [], [], [], []
    for pid, _ in participants:
        for session, rows_out, files_out in ((baseline_session, base_rows, bfiles), (post_session, post_rows, pfiles)):
            f = _find_one(study_dir, pid, session, (result_pattern,))
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
                     np.array(base_rows, dtype=np.float64), np.array(post_rows, dtype=np.float64), bfiles, pfiles)


WITHIN_GROUP_COLUMNS = [
    "group", "region", "n", "mean_bp_nd_baseline", "mean_bp_nd_post", "mean_delta_bp_nd", "sd_delta_bp_nd",
    "ci95_low", "ci95_high", "mean_percent_change", "t", "df", "p_t", "p_t_holm", "p_t_fdr_bh",
    "wilcoxon_w", "p_wilcoxon", "wilcoxon_method", "p_wilcoxon_holm", "p_wilcoxon_fdr_bh", "cohens_dz", "hedges_gz",
]

INTERACTION_COLUMNS = [
    "group_a", "group_b", "region", "n_a", "n_b", "mean_delta_a", "mean_delta_b", "difference",
    "ci95_low", "ci95_high", "welch_t", "welch_df", "p_welch", "p_welch_holm", "p_welch_fdr_bh",
    "p_permutation", "n_permutations", "permutation_exact", "p_permutation_holm", "p_permutation_fdr_bh", "hedges_g",
]


def _finite_pairs(b, p):
    ok = np.isfinite(b) & np.isfinite(p)
    return b[ok], p[ok]


#: Confidence level of every interval in the study tables (columns ``ci95_*``).
CONFIDENCE = 0.95


def _adjust_across_regions(block, cols, raw_columns):
    """Fill ``<p>_holm`` and ``<p>_fdr_bh`` of each row from the raw ``<p>`` column
    (Holm and Benjamini-Hochberg across the regions of one comparison)."""
    for raw in raw_columns:
        praw = np.array([row[cols.index(raw)] for row in block], dtype=float)
        for row, h, q in zip(block, stats.holm(praw), stats.benjamini_hochberg(praw)):
            row[cols.index(f"{raw}_holm")] = h
            row[cols.index(f"{raw}_fdr_bh")] = q


def within_group_statistics(data: StudyData) -> list[list]:
    """Rows of :data:`WITHIN_GROUP_COLUMNS`: per group and region, paired tests of the change."""
    rows = []
    groups = np.asarray(data.groups)
    for g in data.group_names:
        sel = groups == g
        block = []
        for j, region in enumerate(data.region_names):
            b, p = _finite_pairs(data.baseline[sel, j], data.post[sel, j])
            dropped = int(sel.sum()) - b.size
            if dropped:
                logger.warning("group %s region %s: %d subject(s) without BP_ND left out", g, region, dropped)
            pct = percent_change(b, p)
            mean_pct = float(np.nanmean(pct)) if np.any(np.isfinite(pct)) else math.nan
            if b.size >= 2:
                r = stats.paired_test(b, p, CONFIDENCE)
                block.append([g, region, b.size, b.mean(), p.mean(), r.mean_diff, r.sd_diff, r.ci_low, r.ci_high,
                              mean_pct, r.t, r.df, r.p_t, None, None, r.w, r.p_wilcoxon, r.wilcoxon_method,
                              None, None, r.cohens_dz, r.hedges_gz])
            else:
                logger.warning("group %s region %s: fewer than 2 subjects, no test", g, region)
                nan = math.nan
                block.append([g, region, b.size, nan, nan, nan, nan, nan, nan, mean_pct, nan, nan, nan, None, None,
                              nan, nan, "none", None, None, nan, nan])
        _adjust_across_regions(block, WITHIN_GROUP_COLUMNS, ("p_t", "p_wilcoxon"))
        rows.extend(block)
    return rows


def interaction_statistics(data: StudyData, n_permutations: int = 10000, seed: int = 0,
                           group_pairs: Sequence[tuple[str, str]] | None = None,
                           progress: bool = False) -> list[list]:
    """Rows of :data:`INTERACTION_COLUMNS`: group x time interaction per group pair and region.

    The statistic is the difference of mean changes ``mean(Δ_a) - mean(Δ_b)``.
    Every region's permutation test uses a generator seeded with ``seed``, so
    results do not depend on region order.

    Parameters
    ----------
    data : StudyData
    n_permutations : int
        Random relabelings (all relabelings are enumerated when fewer).
    seed : int
        Seed of the permutation generator.
    group_pairs : sequence of (str, str), optional
        Default: every pair of groups in participants.tsv order.
    progress : bool
        Show a tqdm progress bar over regions.
    """
    from tqdm import tqdm

    names = data.group_names
    if group_pairs is None:
        group_pairs = [(names[i], names[k]) for i in range(len(names)) for k in range(i + 1, len(names))]
    for a, b in group_pairs:
        for g in (a, b):
            if g not in names:
                raise ValueError(f"group '{g}' not in participants.tsv; groups present: {names}")
    groups = np.asarray(data.groups)
    delta = data.post - data.baseline
    rows = []
    for ga, gb in group_pairs:
        block = []
        for j, region in enumerate(tqdm(data.region_names, desc=f"{ga} vs {gb}", disable=not progress)):
            da = delta[groups == ga, j]
            db = delta[groups == gb, j]
            da, db = da[np.isfinite(da)], db[np.isfinite(db)]
            nan = math.nan
            if da.size >= 2 and db.size >= 2:
                w = stats.welch_t(da, db, CONFIDENCE)
                p_perm, n_used, exact = stats.permutation_test(da, db, n_permutations, np.random.default_rng(seed))
                block.append([ga, gb, region, da.size, db.size, w.mean_a, w.mean_b, w.diff, w.ci_low, w.ci_high,
                              w.t, w.df, w.p, None, None, p_perm, n_used, exact, None, None, w.hedges_g])
            else:
                logger.warning("%s vs %s region %s: fewer than 2 subjects in a group, no test", ga, gb, region)
                block.append([ga, gb, region, da.size, db.size, nan, nan, nan, nan, nan, nan, nan, nan, None, None,
                              nan, 0, False, None, None, nan])
        _adjust_across_regions(block, INTERACTION_COLUMNS, ("p_welch", "p_permutation"))
        rows.extend(block)
    return rows


def _voxelwise(study_dir: Path, data: StudyData, baseline_session: str, post_session: str, out_dir: Path,
               figures: bool) -> dict[str, Path]:
    """Per-group voxelwise paired t-map of the BP_ND change, if every subject has both maps."""
    out: dict[str, Path] = {}
    pats = ("*_bpnd.nii.gz", "*_bpnd.nii")
    for g in data.group_names:
        pids = [p for p, gg in zip(data.participant_ids, data.groups) if gg == g]
        b_maps, p_maps = [], []
        ref_shape = ref_aff = ref_name = None
        for pid in pids:
            for session, acc in ((baseline_session, b_maps), (post_session, p_maps)):
                f = _find_one(study_dir, pid, session, pats, required=True)
                img, aff = _load_nifti(f)
                arr = np.asarray(img.get_fdata(), dtype=np.float64)
                if arr.ndim == 4 and arr.shape[3] == 1:
                    arr = arr[..., 0]
                if arr.ndim != 3:
                    raise ValueError(f"{f}: expected a 3-D BP_ND map, got shape {arr.shape}")
                if ref_shape is None:
                    ref_shape, ref_aff, ref_name = arr.shape, aff, str(f)
                check_same_grid(ref_shape, ref_aff, ref_name, arr.shape, aff, str(f))
                acc.append(arr)
        if len(pids) < 2:
            logger.warning("group %s: fewer than 2 subjects, no voxelwise t-map", g)
            continue
        mean, t, p = stats.paired_t_map(np.stack(b_maps), np.stack(p_maps))
        side = {"Description": f"voxelwise paired t-test of BP_ND change (post - baseline), group {g}",
                "Group": g, "NumberOfSubjects": len(pids), "DegreesOfFreedom": len(pids) - 1,
                "Sources": [str(x) for x in data.baseline_files]}
        out[f"{g}_tmap"] = save_nifti(out_dir / f"group-{g}_stat-t_bpndchange.nii.gz", t, ref_aff,
                                      {**side, "Units": "t"})
        out[f"{g}_meandelta"] = save_nifti(out_dir / f"group-{g}_stat-meandelta_bpndchange.nii.gz", mean, ref_aff,
                                           {**side, "Units": "unitless"})
        out[f"{g}_p"] = save_nifti(out_dir / f"group-{g}_stat-p_bpndchange.nii.gz", p, ref_aff,
                                   {**side, "Units": "p (two-sided, uncorrected)"})
        out[f"{g}_pfdr"] = save_nifti(out_dir / f"group-{g}_stat-pfdr_bpndchange.nii.gz",
                                      stats.benjamini_hochberg(p), ref_aff,
                                      {**side, "Units": "p (two-sided, Benjamini-Hochberg FDR over tested voxels)"})
        if figures:
            from petbind.quant.figures import plot_change_montage
            out[f"{g}_tmap_png"] = plot_change_montage(out_dir / f"group-{g}_stat-t_bpndchange.png", t,
                                                       title=f"paired t of ΔBP_ND, {g}", label="t")
    return out


def run_study(study_dir, out_dir, baseline_session: str = "baseline", post_session: str = "postdose",
              group_column: str = "group", n_permutations: int = 10000, seed: int = 0,
              voxelwise: bool = False, figures: bool = True,
              progress: bool = False, result_pattern: str = "*_bpnd.tsv") -> dict[str, Path]:
    """Whole-study comparison: tables (TSV), figures (PNG), optional voxelwise maps.

    Parameters are those of :func:`load_study`, :func:`interaction_statistics`
    and :func:`within_group_statistics`; ``figures`` switches the PNGs off.

    Writes to ``out_dir``: ``subject_changes.tsv`` (per subject and region),
    ``within_group.tsv``, ``group_by_time.tsv`` (only with two or more
    groups), ``region_changes.png`` (mean ΔBP_ND with CIs per group) and,
    with ``voxelwise``, per-group t, mean-change and p maps.

    Returns
    -------
    dict
        Name -> written path.
    """
    study_dir = Path(study_dir)
    out_dir = Path(out_dir)
    data = load_study(study_dir, baseline_session, post_session, group_column, result_pattern)
    logger.info("study %s: %d subjects, groups %s, %d regions", study_dir, len(data.participant_ids),
                data.group_names, len(data.region_names))
    out: dict[str, Path] = {}
    subj_rows = []
    pct = percent_change(data.baseline, data.post)
    for i, pid in enumerate(data.participant_ids):
        for j, region in enumerate(data.region_names):
            b, p = data.baseline[i, j], data.post[i, j]
            subj_rows.append([pid, data.groups[i], region, b, p, p - b, pct[i, j]])
    out["subject_changes"] = write_table_tsv(
        out_dir / "subject_changes.tsv",
        ["participant_id", "group", "region", "bp_nd_baseline", "bp_nd_post", "delta_bp_nd", "percent_change"],
        subj_rows)
    within = within_group_statistics(data)
    out["within_group"] = write_table_tsv(out_dir / "within_group.tsv", WITHIN_GROUP_COLUMNS, within)
    if len(data.group_names) >= 2:
        inter = interaction_statistics(data, n_permutations, seed, progress=progress)
        out["group_by_time"] = write_table_tsv(out_dir / "group_by_time.tsv", INTERACTION_COLUMNS, inter)
    else:
        logger.warning("only one group (%s): no group x time interaction", data.group_names)
    if figures:
        from petbind.quant.figures import plot_region_changes
        cols = WITHIN_GROUP_COLUMNS
        series = {}
        for g in data.group_names:
            rows = [r for r in within if r[0] == g]
            series[g] = tuple(np.array([r[cols.index(c)] for r in rows], dtype=float)
                              for c in ("mean_delta_bp_nd", "ci95_low", "ci95_high"))
        out["region_changes_png"] = plot_region_changes(
            out_dir / "region_changes.png", data.region_names, series,
            title=f"BP$_{{ND}}$ change ({post_session} - {baseline_session}), mean and {CONFIDENCE:.0%} CI")
    if voxelwise:
        out.update(_voxelwise(study_dir, data, baseline_session, post_session, out_dir, figures))
    return out
