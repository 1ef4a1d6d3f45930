"""Baseline vs post-dose comparison of binding potential, per subject and per study.

Per subject
-----------
``ΔBP_ND = BP_post - BP_baseline`` and percent change
``100 (BP_post - BP_baseline) / BP_baseline``, as regional tables (from two
``fit`` result TSVs) or as maps (from two 3-D BP_ND NIfTI maps on the same
grid).  The percent change is NaN where the baseline BP_ND is not positive
(no specific binding to lose); such entries are counted in a warning.

Per study
---------
:func:`run_study` reads a study folder (layout and group rules in
:mod:`petbind.quant.study_files`) and writes the tables, figures and
optional voxelwise maps below, all together or none at all.

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
from pathlib import Path
from typing import Sequence

import numpy as np

from petbind.core.files import write_table_tsv
from petbind.quant import stats
from petbind.quant.io import check_same_grid, load_map, save_nifti
from petbind.quant.outputs import OutputSet, output_set
from petbind.quant.study_files import StudyData, load_bpnd_maps, load_study, read_bpnd_tsv

logger = logging.getLogger(__name__)

__all__ = [
    "percent_change",
    "regional_change",
    "write_regional_change",
    "change_maps",
    "subject_change_rows",
    "within_group_statistics",
    "interaction_statistics",
    "voxelwise_statistics",
    "run_study",
    "REGIONAL_CHANGE_COLUMNS",
    "SUBJECT_CHANGE_COLUMNS",
    "WITHIN_GROUP_COLUMNS",
    "INTERACTION_COLUMNS",
    # read from the study folder (petbind.quant.study_files), kept here for callers
    "StudyData",
    "load_study",
    "read_bpnd_tsv",
]

REGIONAL_CHANGE_COLUMNS = ["region", "bp_nd_baseline", "bp_nd_post", "delta_bp_nd", "percent_change"]


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


def change_maps(baseline_path, post_path, out_prefix, mask=None, outputs=None) -> dict[str, Path]:
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
    outputs : petbind.quant.outputs.OutputSet, optional
        Stage the files in this set (the caller commits).

    Returns
    -------
    dict
        ``{"delta": path, "percent": path}`` plus the arrays under
        ``"delta_array"``/``"percent_array"``.
    """
    b, aff_b = load_map(baseline_path)
    p, aff_p = load_map(post_path)
    check_same_grid(b.shape, aff_b, str(baseline_path), p.shape, aff_p, str(post_path))
    delta = p - b
    pct = percent_change(b, p)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        delta = np.where(mask, delta, np.nan)
        pct = np.where(mask, pct, np.nan)
    common = {"Sources": [str(baseline_path), str(post_path)], "SpatialReference": str(baseline_path)}
    prefix = str(out_prefix)
    with output_set(outputs) as outs:
        d_path = save_nifti(prefix + "_delta-bpnd.nii.gz", delta, aff_b, {
            **common, "Description": "BP_ND change, post - baseline", "Units": "unitless",
            "Formula": "delta = BP_post - BP_baseline"}, outputs=outs)
        p_path = save_nifti(prefix + "_pctchange-bpnd.nii.gz", pct, aff_b, {
            **common, "Description": "BP_ND percent change", "Units": "percent",
            "Formula": "100 * (BP_post - BP_baseline) / BP_baseline; n/a (NaN) where BP_baseline <= 0"},
            outputs=outs)
    return {"delta": d_path, "percent": p_path, "delta_array": delta, "percent_array": pct}


# --------------------------------------------------------------------------
# study level
# --------------------------------------------------------------------------
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


def voxelwise_statistics(study_dir, data: StudyData, baseline_session: str = "baseline",
                         post_session: str = "postdose") -> dict[str, dict]:
    """Per-group voxelwise paired t-test of the BP_ND change (maps from :func:`load_bpnd_maps`).

    Returns
    -------
    dict
        group -> ``{"mean", "t", "p", "p_fdr": arrays (x, y, z), "affine", "n", "files"}``;
        groups with fewer than 2 subjects are left out (with a warning).
    """
    out = {}
    grid = None
    for g in data.group_names:
        pids = [p for p, gg in zip(data.participant_ids, data.groups) if gg == g]
        if len(pids) < 2:
            logger.warning("group %s: fewer than 2 subjects, no voxelwise t-map", g)
            continue
        base, grid, files = load_bpnd_maps(study_dir, pids, baseline_session, reference=grid)
        post, grid, _ = load_bpnd_maps(study_dir, pids, post_session, reference=grid)
        mean, t, p = stats.paired_t_map(base, post)
        out[g] = {"mean": mean, "t": t, "p": p, "p_fdr": stats.benjamini_hochberg(p), "affine": grid[1],
                  "n": len(pids), "files": files}
    return out


def _write_voxelwise(outs: OutputSet, out_dir: Path, results: dict, figures: bool) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for g, r in results.items():
        side = {"Description": f"voxelwise paired t-test of BP_ND change (post - baseline), group {g}",
                "Group": g, "NumberOfSubjects": r["n"], "DegreesOfFreedom": r["n"] - 1,
                "Sources": [str(x) for x in r["files"]]}
        for key, stat, units in (("tmap", "t", "t"), ("meandelta", "mean", "unitless"),
                                 ("p", "p", "p (two-sided, uncorrected)"),
                                 ("pfdr", "p_fdr", "p (two-sided, Benjamini-Hochberg FDR over tested voxels)")):
            name = "t" if key == "tmap" else key
            out[f"{g}_{key}"] = save_nifti(out_dir / f"group-{g}_stat-{name}_bpndchange.nii.gz", r[stat],
                                           r["affine"], {**side, "Units": units}, outputs=outs)
        if figures:
            from petbind.quant.figures import plot_change_montage

            out[f"{g}_tmap_png"] = outs.write(out_dir / f"group-{g}_stat-t_bpndchange.png", plot_change_montage,
                                              r["t"], title=f"paired t of ΔBP_ND, {g}", label="t")
    return out


SUBJECT_CHANGE_COLUMNS = ["participant_id", "group", "region", "bp_nd_baseline", "bp_nd_post", "delta_bp_nd",
                          "percent_change"]


def subject_change_rows(data: StudyData) -> list[list]:
    """Rows of :data:`SUBJECT_CHANGE_COLUMNS`: BP_ND of both sessions and the change, per subject and region."""
    rows = []
    pct = percent_change(data.baseline, data.post)
    for i, pid in enumerate(data.participant_ids):
        for j, region in enumerate(data.region_names):
            b, p = data.baseline[i, j], data.post[i, j]
            rows.append([pid, data.groups[i], region, b, p, p - b, pct[i, j]])
    return rows


def run_study(study_dir, out_dir, baseline_session: str = "baseline", post_session: str = "postdose",
              group_column: str = "group", n_permutations: int = 10000, seed: int = 0,
              voxelwise: bool = False, figures: bool = True,
              progress: bool = False, result_pattern: str = "*_bpnd.tsv", groups=None) -> dict[str, Path]:
    """Whole-study comparison: tables (TSV), figures (PNG), optional voxelwise maps.

    Parameters are those of :func:`petbind.quant.study_files.load_study`,
    :func:`interaction_statistics` and :func:`within_group_statistics`;
    ``figures`` switches the PNGs off.  ``groups`` declares the groups, e.g.
    ``("drug", "placebo")``: then every participant must be in one of them,
    each must have a participant and every subject folder must be listed in
    ``participants.tsv`` (``ValueError`` otherwise); the tables follow the
    declared order.

    Writes to ``out_dir``: ``subject_changes.tsv`` (per subject and region),
    ``within_group.tsv``, ``group_by_time.tsv`` (only with two or more
    groups), ``region_changes.png`` (mean ΔBP_ND with CIs per group) and,
    with ``voxelwise``, per-group t, mean-change and p maps.  Every file is
    computed before the first is renamed into place: after an error none of
    them is new or changed.

    Returns
    -------
    dict
        Name -> written path.
    """
    study_dir = Path(study_dir)
    out_dir = Path(out_dir)
    with OutputSet() as outs:
        data = load_study(study_dir, baseline_session, post_session, group_column, result_pattern, groups)
        logger.info("study %s: %d subjects, groups %s, %d regions", study_dir, len(data.participant_ids),
                    data.group_names, len(data.region_names))
        out: dict[str, Path] = {}
        out["subject_changes"] = outs.write(out_dir / "subject_changes.tsv", write_table_tsv,
                                            SUBJECT_CHANGE_COLUMNS, subject_change_rows(data))
        within = within_group_statistics(data)
        out["within_group"] = outs.write(out_dir / "within_group.tsv", write_table_tsv, WITHIN_GROUP_COLUMNS, within)
        if len(data.group_names) >= 2:
            inter = interaction_statistics(data, n_permutations, seed, progress=progress)
            out["group_by_time"] = outs.write(out_dir / "group_by_time.tsv", write_table_tsv, INTERACTION_COLUMNS,
                                              inter)
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
            out["region_changes_png"] = outs.write(
                out_dir / "region_changes.png", plot_region_changes, data.region_names, series,
                title=f"BP$_{{ND}}$ change ({post_session} - {baseline_session}), mean and {CONFIDENCE:.0%} CI")
        if voxelwise:
            results = voxelwise_statistics(study_dir, data, baseline_session, post_session)
            out.update(_write_voxelwise(outs, out_dir, results, figures))
    return out
