"""``DERIV/report.html``: one static, self-contained page per study.

It opens from disk without a server: every figure is a PNG embedded as a
``data:`` URI and there is no script or external style.  Sections:

* summary and QC flags (failed fits, bound hits, counts per frame, failed sessions);
* the group tables (within-group changes and group × time, with p-values and CIs);
* for simulated studies (``ground_truth.tsv`` in the raw folder): estimated
  vs true BP_ND and ΔBP_ND;
* per session: TAC fits with residuals, BP_ND map slices (``--maps``);
* ΔBP_ND and %-change maps per group (``--maps``);
* provenance: settings, software versions, input checksums.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path

import numpy as np

from petbind.core.files import atomic_write_text, read_json, read_table_tsv, sidecar_path_for

__all__ = ["write_report"]

log = logging.getLogger(__name__)

_STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.85em}
td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
.flag{color:#b00}.ok{color:#070}
details{margin:0.3em 0}summary{cursor:pointer;font-weight:bold}
img{max-width:100%}
"""


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt(v):
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return html.escape(v)
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
    return html.escape(str(v))


def _table(header, rows, left=1):
    out = ["<table><tr>" + "".join(f"<th class='{'l' if i < left else ''}'>{html.escape(str(h))}</th>"
                                   for i, h in enumerate(header)) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class='{'l' if i < left else ''}'>{_fmt(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


def _tsv_table(path, columns=None, left=3):
    header, rows = read_table_tsv(path)
    cols = [c for c in (columns or header) if c in header]
    return _table(cols, [[r[c] for c in cols] for r in rows], left=left)


def _tac_figure(tacs_path, fit_path, options):
    """TACs, fitted curves and residuals of one session (re-fitted from the stored TACs)."""
    from petbind.quant.io import read_tacs_tsv
    from petbind.quant.models import fit_model
    from petbind.quant.tacs import split_reference

    table = read_tacs_tsv(tacs_path)
    _, rows = read_table_tsv(fit_path)
    names = [r["region"] for r in rows]
    ref, names, tac = split_reference(table, options.reference, names)
    side = read_json(sidecar_path_for(fit_path))
    res = fit_model(options.model, table.frame_start_s, table.frame_end_s, ref, tac, weights=options.weights,
                    half_life_min=side.get("HalfLifeMin"))
    fitted = np.asarray(res.fitted, float).reshape(tac.shape)
    t = 0.5 * (table.frame_start_s + table.frame_end_s) / 60.0
    fig = _figure(9, 5)
    ax, axr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    ax.plot(t, ref / 1e3, "k--", lw=1, label=f"{options.reference} (reference)")
    for j, n in enumerate(names):
        c = f"C{j % 10}"
        ax.plot(t, tac[:, j] / 1e3, "o", ms=2.5, color=c)
        ax.plot(t, fitted[:, j] / 1e3, "-", lw=1, color=c, label=n)
        axr.plot(t, (tac[:, j] - fitted[:, j]) / 1e3, ".-", lw=0.6, ms=2, color=c)
    axr.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("kBq/mL")
    axr.set_ylabel("residual")
    axr.set_xlabel("time (min)")
    ax.legend(fontsize=6, ncol=3)
    ax.set_title(f"{options.model.upper()} fits", fontsize=10)
    return _png(fig)


def _slices_figure(volume, title, cmap="viridis", symmetric=False):
    vol = np.nan_to_num(np.asarray(volume, float))
    fig = _figure(9, 3)
    axes = fig.subplots(1, 3)
    finite = vol[vol != 0]
    vmax = float(np.percentile(np.abs(finite), 99)) if finite.size else 1.0
    kw = dict(cmap="RdBu_r" if symmetric else cmap, vmin=-vmax if symmetric else 0.0, vmax=vmax or 1.0)
    cx, cy, cz = (s // 2 for s in vol.shape)
    im = None
    for ax, sl, lab in zip(axes, (vol[:, :, cz].T, vol[:, cy, :].T, vol[cx, :, :].T), ("axial", "coronal", "sagittal")):
        im = ax.imshow(sl, origin="lower", **kw)
        ax.set_title(lab, fontsize=8)
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _truth_section(study_dir, deriv_dir, options):
    """Estimated vs true BP_ND and ΔBP_ND (group means) with the acceptance checks."""
    from petbind.pipeline.truth import recovery_table, recovery_verdicts

    groups = tuple(options.groups)
    rows = recovery_table(study_dir, deriv_dir, options.model, groups, options.baseline_session,
                          options.post_session)
    header = ["region", "volume mL", "true BP_ND (baseline)", "estimated", "ratio"]
    for g in groups:
        header += [f"true ΔBP_ND {g}", f"estimated ΔBP_ND {g}", "SE"]
    body = []
    for r in rows:
        line = [r.region + ("" if r.judged else " (not judged)"), r.volume_ml, r.true_baseline, r.est_baseline,
                r.ratio]
        for g in groups:
            line += [r.true_delta[g], r.est_delta[g], r.se_delta[g]]
        body.append(line)
    checks = "".join(f"<li class='{'ok' if ok else 'flag'}'>{'ok' if ok else 'MISS'}: {html.escape(name)}"
                     f"{'' if ok else ': ' + html.escape(detail)}</li>" for name, ok, detail in recovery_verdicts(rows, groups))
    return "<h2>Estimated vs true (simulated study)</h2>" + _table(header, body) + f"<ul>{checks}</ul>"


def write_report(study_dir, deriv_dir, options, outcomes, plan):
    """Write ``DERIV/report.html`` (atomically) and return its path.

    Parameters
    ----------
    study_dir, deriv_dir : Path
    options : PipelineOptions
    outcomes : list of SessionOutcome
    plan : StudyPlan

    Returns
    -------
    pathlib.Path
    """
    import nibabel as nib

    from petbind import __version__

    deriv_dir = Path(deriv_dir)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>petbind study report</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>petbind study report</h1><p>Raw study: {html.escape(str(Path(study_dir).resolve()))}<br>"
             f"petbind {html.escape(__version__)}; model {options.model.upper()}, reference "
             f"{html.escape(options.reference)}, PVC {options.pvc}, OSEM {options.iterations} iterations × "
             f"{options.subsets} subsets</p>"]

    # ---- QC flags
    fits, flags, qc_rows = {}, [], []
    for o in outcomes:
        out = Path(deriv_dir) / o.subject / o.session / "pet"
        stem = f"{o.subject}_{o.session}"
        if o.status == "failed":
            flags.append(f"{o.subject} {o.session}: FAILED: {o.error} ({o.file})")
            qc_rows.append([o.subject, o.session, "failed", "", "", "", ""])
            continue
        fit = out / f"{stem}_desc-{options.model}_bpnd.tsv"
        fits[(o.subject, o.session)] = fit
        _, rows = read_table_tsv(fit)
        bad = [r["region"] for r in rows if r["status"] != "0"]
        bound = [r["region"] for r in rows if r.get("bound_hit") == "true"]
        pet_side = read_json(out / f"{stem}_rec-osem_pet.json")
        counts = [s.get("prompts", 0) for s in pet_side.get("FrameStatistics", [])]
        res = pet_side.get("EffectiveResolutionFWHM_mm")
        if bad:
            flags.append(f"{o.subject} {o.session}: non-zero fit status in {bad}")
        if bound:
            flags.append(f"{o.subject} {o.session}: parameter bound hit in {bound}")
        low = [k for k, c in enumerate(counts) if c < 1000]
        if low:
            flags.append(f"{o.subject} {o.session}: frames {low} hold fewer than 1000 prompts")
        qc_rows.append([o.subject, o.session, o.status, len(rows) - len(bad), len(bad),
                        f"{min(counts):.3g} – {max(counts):.3g}" if counts else "n/a",
                        "n/a" if res is None else " × ".join(f"{v:.1f}" for v in res)])
    parts.append("<h2>Quality control</h2>")
    parts.append("<p class='ok'>No flags.</p>" if not flags else
                 "<ul>" + "".join(f"<li class='flag'>{html.escape(f)}</li>" for f in flags) + "</ul>")
    parts.append(_table(["subject", "session", "status", "fits ok", "fits flagged", "prompts per frame",
                         "effective FWHM (mm)"], qc_rows, left=3))

    # ---- group tables
    gdir = deriv_dir / "group"
    if (gdir / "within_group.tsv").exists():
        parts.append("<h2>Group statistics</h2><h3>Within groups (post − baseline)</h3>")
        parts.append(_tsv_table(gdir / "within_group.tsv"))
        if (gdir / "group_by_time.tsv").exists():
            parts.append("<h3>Group × time</h3>" + _tsv_table(gdir / "group_by_time.tsv"))
    if plan.has_ground_truth and fits:
        try:
            parts.append(_truth_section(study_dir, deriv_dir, options))
        except (ValueError, KeyError, OSError) as exc:
            log.warning("report: no estimated-vs-true table (%s)", exc)

    # ---- group maps
    maps = sorted(gdir.glob("group-*_stat-meandelta_bpndchange.nii.gz")) if gdir.exists() else []
    if maps:
        parts.append("<h2>Change maps</h2>")
        for m in maps:
            g = m.name.split("_")[0].removeprefix("group-")
            parts.append(f"<img src='{_slices_figure(nib.load(m).get_fdata(), f'mean ΔBP_ND, {g}', symmetric=True)}'"
                         f" alt='mean delta BP_ND {html.escape(g)}'>")
            pct = _group_percent_map(deriv_dir, g, plan, options)
            if pct is not None:
                parts.append(f"<img src='{_slices_figure(pct, f'mean %-change of BP_ND, {g}', symmetric=True)}'"
                             f" alt='percent change {html.escape(g)}'>")

    # ---- sessions
    parts.append("<h2>Sessions</h2>")
    for o in outcomes:
        stem = f"{o.subject}_{o.session}"
        parts.append(f"<details id='{html.escape(stem)}'><summary>{html.escape(o.subject)} "
                     f"{html.escape(o.session)} ({o.status})</summary>")
        if o.status != "failed":
            out = deriv_dir / o.subject / o.session / "pet"
            fit = fits[(o.subject, o.session)]
            parts.append(_tsv_table(fit, ["region", "bp_nd", "se_bp_nd", "r1", "k2_per_min", "status_name",
                                          "bound_hit"], left=1))
            try:
                tacs = out / f"{stem}_desc-{options.pvc}pvc_tacs.tsv"
                parts.append(f"<img src='{_tac_figure(tacs, fit, options)}' alt='TAC fits {html.escape(stem)}'>")
            except (ValueError, OSError) as exc:
                parts.append(f"<p class='flag'>TAC figure unavailable: {html.escape(str(exc))}</p>")
            bp = out / f"{stem}_desc-{options.model}_bpnd.nii.gz"
            if bp.exists():
                parts.append(f"<img src='{_slices_figure(nib.load(bp).get_fdata(), 'BP_ND')}' "
                             f"alt='BP_ND map {html.escape(stem)}'>")
        else:
            parts.append(f"<p class='flag'>{html.escape(str(o.error))}</p>")
        parts.append("</details>")

    # ---- provenance
    parts.append("<h2>Provenance</h2>")
    parts.append(_table(["setting", "value"], [[k, str(v)] for k, v in options.to_dict().items()]))
    inputs = []
    for o in outcomes:
        side = sidecar_path_for(deriv_dir / o.subject / o.session / "pet" / f"{o.subject}_{o.session}_rec-osem_pet.nii.gz")
        if side.exists():
            prov = read_json(side).get("PipelineProvenance", {})
            software = prov.get("Software", {})
            inputs += [[p, c] for p, c in prov.get("Inputs", {}).items()]
    if inputs:
        parts.append("<p>Software: " + html.escape(", ".join(f"{k} {v}" for k, v in software.items())) + "</p>")
        parts.append("<h3>Input checksums (SHA-256)</h3>" + _table(["file", "sha256"], inputs, left=2))
    parts.append("</body></html>\n")
    return atomic_write_text(deriv_dir / "report.html", "\n".join(parts))


def _group_percent_map(deriv_dir, group, plan, options):
    """Mean voxelwise %-change of BP_ND over a group's subjects (None without maps)."""
    import nibabel as nib

    maps = []
    for sub, g in plan.groups.items():
        if g != group:
            continue
        files = [deriv_dir / sub / f"ses-{s}" / "pet" / f"{sub}_ses-{s}_desc-{options.model}_bpnd.nii.gz"
                 for s in (options.baseline_session, options.post_session)]
        if not all(f.exists() for f in files):
            return None
        b, p = (np.asarray(nib.load(f).get_fdata(), float) for f in files)
        with np.errstate(divide="ignore", invalid="ignore"):
            maps.append(np.where(np.abs(b) > 1e-3, 100.0 * (p - b) / b, np.nan))
    return None if not maps else np.nanmean(np.stack(maps), axis=0)
