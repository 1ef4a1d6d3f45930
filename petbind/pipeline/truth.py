"""Estimated vs true: how well a study run recovered a simulated study's BP_ND and its change.

A simulated raw study carries ``ground_truth.tsv`` (``subject``, ``session``,
``group``, ``region``, ``bp_nd``).  :func:`recovery_table` sets the
derivatives of a run beside it, region by region; :func:`recovery_verdicts`
applies the acceptance rules of the demo:

* baseline BP_ND: the group-mean estimate within ±10 % of the true mean in
  every region of at least 2 mL with specific binding (true BP_ND ≥ 0.3;
  a relative error of a near-zero BP_ND, e.g. white matter's 0.1, measures
  nothing a PET study can resolve, so those regions are shown but not judged);
* ΔBP_ND: each group's mean estimated change within its own standard error
  (the SE of the mean of the subjects' estimated changes) of the mean true
  change, in the same regions;
* sign: right wherever the true mean change exceeds twice that SE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petbind.core.files import read_json, read_table_tsv

__all__ = ["RegionRecovery", "recovery_table", "recovery_verdicts", "format_recovery"]

#: Regions smaller than this (mL) are shown but not judged.
MIN_VOLUME_ML = 2.0
#: Regions whose true BP_ND is below this are shown but not judged on relative error.
MIN_BP_ND = 0.3
#: Tolerance on the baseline BP_ND ratio.
BP_TOLERANCE = 0.10


@dataclass
class RegionRecovery:
    """One region of :func:`recovery_table` (group means over subjects)."""

    region: str
    volume_ml: float
    true_baseline: float
    est_baseline: float
    true_delta: dict  # group -> mean true ΔBP_ND
    est_delta: dict  # group -> mean estimated ΔBP_ND
    se_delta: dict  # group -> SE of the mean estimated ΔBP_ND
    p_interaction: float

    @property
    def ratio(self):
        return self.est_baseline / self.true_baseline if self.true_baseline else math.nan

    @property
    def judged(self):
        return self.volume_ml >= MIN_VOLUME_ML and self.true_baseline >= MIN_BP_ND


def _num(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def recovery_table(raw_dir, deriv_dir, model, groups, baseline="baseline", post="postdose"):
    """Per region: true and estimated baseline BP_ND and ΔBP_ND per group.

    Parameters
    ----------
    raw_dir, deriv_dir : path
        The simulated study (with ``ground_truth.tsv``) and the run's derivatives.
    model : str
        The fit whose ``*_desc-<model>_bpnd.tsv`` files are compared.
    groups : sequence of str
    baseline, post : str
        Session names (without ``ses-``).

    Returns
    -------
    list of RegionRecovery
        In the order of the fit tables.
    """
    raw_dir, deriv_dir = Path(raw_dir), Path(deriv_dir)
    _, truth_rows = read_table_tsv(raw_dir / "ground_truth.tsv", required=("subject", "session", "group", "region",
                                                                           "bp_nd"))
    truth, group_of = {}, {}
    for r in truth_rows:
        truth[(r["subject"], r["session"], r["region"])] = float(r["bp_nd"])
        group_of[r["subject"]] = r["group"]
    est, regions, volume = {}, [], {}
    b, p = f"ses-{baseline}", f"ses-{post}"
    for sub in sorted(group_of):
        for ses in (b, p):
            fit = deriv_dir / sub / ses / "pet" / f"{sub}_{ses}_desc-{model}_bpnd.tsv"
            if not fit.exists():
                continue
            _, rows = read_table_tsv(fit)
            for r in rows:
                est[(sub, ses, r["region"])] = _num(r["bp_nd"])
                if r["region"] not in regions:
                    regions.append(r["region"])
            tacs = sorted(fit.parent.glob(f"{sub}_{ses}_desc-*_tacs.json"))
            if tacs:
                for name, n in read_json(tacs[0]).get("VoxelCount", {}).items():
                    volume.setdefault(name, n)
    voxel_ml = _voxel_ml(deriv_dir)
    inter = {}
    gbt = deriv_dir / "group" / "group_by_time.tsv"
    if gbt.exists():
        _, rows = read_table_tsv(gbt)
        inter = {r["region"]: _num(r.get("p_welch")) for r in rows}
    out = []
    for region in regions:
        subs = [s for s in group_of if (s, b, region) in est]
        tb = [truth[(s, b, region)] for s in subs if (s, b, region) in truth]
        eb = [est[(s, b, region)] for s in subs if math.isfinite(est[(s, b, region)])]
        td, ed, se = {}, {}, {}
        for g in groups:
            members = [s for s in subs if group_of[s] == g and (s, p, region) in est]
            t = [truth[(s, p, region)] - truth[(s, b, region)] for s in members]
            e = [est[(s, p, region)] - est[(s, b, region)] for s in members]
            e = [v for v in e if math.isfinite(v)]
            td[g] = float(np.mean(t)) if t else math.nan
            ed[g] = float(np.mean(e)) if e else math.nan
            se[g] = float(np.std(e, ddof=1) / math.sqrt(len(e))) if len(e) > 1 else math.nan
        out.append(RegionRecovery(region, volume.get(region, 0) * voxel_ml, float(np.mean(tb)) if tb else math.nan,
                                  float(np.mean(eb)) if eb else math.nan, td, ed, se,
                                  inter.get(region, math.nan)))
    return out


def _voxel_ml(deriv_dir):
    """Voxel volume (mL) of the reconstructed images (from the first image header)."""
    import nibabel as nib

    for pet in sorted(Path(deriv_dir).glob("sub-*/ses-*/pet/*_rec-osem_pet.nii.gz")):
        zooms = nib.load(str(pet)).header.get_zooms()[:3]
        return float(np.prod(zooms)) / 1000.0
    return math.nan


def recovery_verdicts(rows, groups):
    """The demo's three acceptance checks.

    Returns
    -------
    list of (str, bool, str)
        Check name, passed, detail (the regions that fail).
    """
    judged = [r for r in rows if r.judged]
    bad_bp = [f"{r.region} {r.ratio:.2f}" for r in judged if not abs(r.ratio - 1) <= BP_TOLERANCE]
    bad_delta, bad_sign = [], []
    for r in judged:
        for g in groups:
            t, e, s = r.true_delta[g], r.est_delta[g], r.se_delta[g]
            if not abs(e - t) <= s:
                bad_delta.append(f"{r.region} ({g}: {e:+.3f} vs {t:+.3f} ± {s:.3f})")
            if abs(t) > 2 * s and np.sign(e) != np.sign(t):
                bad_sign.append(f"{r.region} ({g})")
    names = ", ".join(r.region for r in judged)
    return [
        (f"baseline BP_ND within ±{BP_TOLERANCE:.0%} in regions >= {MIN_VOLUME_ML:g} mL with BP_ND >= {MIN_BP_ND:g} "
         f"({names})", not bad_bp, "; ".join(bad_bp)),
        ("group mean ΔBP_ND within its standard error of the truth", not bad_delta, "; ".join(bad_delta)),
        ("sign of ΔBP_ND right wherever the true change exceeds its noise (2 SE)", not bad_sign, "; ".join(bad_sign)),
    ]


def format_recovery(rows, groups):
    """Fixed-width text table of :func:`recovery_table`."""
    head = f"{'region':<24}{'mL':>6}{'BP true':>9}{'est':>7}{'ratio':>7}"
    for g in groups:
        head += f"{'ΔBP ' + g[:8]:>15}{'(true)':>8}{'± SE':>7}"
    head += f"{'p g×t':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (f"{r.region:<24}{r.volume_ml:>6.1f}{r.true_baseline:>9.3f}{r.est_baseline:>7.3f}{r.ratio:>7.2f}")
        for g in groups:
            line += f"{r.est_delta[g]:>+15.3f}{r.true_delta[g]:>+8.3f}{r.se_delta[g]:>7.3f}"
        line += f"{r.p_interaction:>8.3f}"
        lines.append(line + ("" if r.judged else "   (not judged)"))
    return "\n".join(lines)
