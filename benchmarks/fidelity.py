"""Error budget of BP_ND and ΔBP_ND: where does the pipeline lose the truth?

A seeded simulated session pair (baseline and post-dose of one drug-group
subject, with a known change in every region) goes through the chain one
step at a time, and every step is quantified with the same kinetic model:

====================  ===============================================================
stage                 TACs from
====================  ===============================================================
model                 the true regional TACs (only the kinetic model's bias)
voxels                the true activity image on the atlas grid (tissue fractions
                      in the voxels: partial volume of voxelisation)
blur                  the true image blurred by the scanner's PSF (no PVC)
blur+gtm              ... + GTM with the true PSF
recon-N               OSEM of the *expected* counts (no noise), N iterations, without
                      and with the PSF model, without and with GTM at the measured
                      effective resolution
poisson               OSEM of Poisson counts at the study's count level (the defaults)
====================  ===============================================================

Each table row is a region: recovery (estimated / true) of baseline BP_ND
and of ΔBP_ND, per stage; timings per stage at the end.  Run::

    python benchmarks/fidelity.py [--model srtm] [--iterations 1 2 4 8] [--quick]

The closing note of the fidelity issue quotes its final table.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

log = logging.getLogger("fidelity")


def study_config(args):
    """The benchmark study: the demo's set-up (demo-small scanner, 12 frames), one drug-group subject
    with the same relative change in every region."""
    from dataclasses import replace

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    from demo import demo_config

    cfg = demo_config(num_subjects=1, device="cpu", quiet=True, seed=args.seed)
    cfg = replace(cfg, drug_effect={n: args.effect for n, rk in cfg.regions.items() if rk.bp_nd > 0}, model=args.kinetics,
                  sensitivity_cps_per_kbq=args.sensitivity)
    if args.scanner_fwhm_mm is not None:
        cfg = replace(cfg, resolution_fwhm_mm=args.scanner_fwhm_mm)
    return cfg.resolved()


def build(args):
    """Truth, activity basis, simulator and atlas of the benchmark study (as petbind.sim.study builds them)."""
    from petbind.core.frames import Frames
    from petbind.recon.geometry import SinogramLayout
    from petbind.sim.acquisition import AcquisitionSimulator, random_crystal_efficiencies
    from petbind.sim.kinetics import AZ10419369_REFERENCE, FengInput, frame_times_s, simulate_regional_tacs
    from petbind.sim.phantom import BrainPhantom, load_brain_phantom, resample_phantom
    from petbind.sim.study import _study_grid, study_truth  # noqa: PLC2701 - benchmark reuses the study set-up

    cfg = study_config(args)
    ph = load_brain_phantom()
    shifted = BrainPhantom(ph.labels, ph.label_table, ph.mu_map_per_mm, ph.affine.copy())
    shifted.affine[:3, 3] += np.asarray(cfg.head_offset_mm, float)
    grid = _study_grid(cfg)
    on_grid = resample_phantom(grid, shifted)
    active = list(cfg.regions)
    basis = np.stack([on_grid.fractions[on_grid.index_of(n)] for n in active]).astype(np.float32)
    _, sessions = study_truth(cfg)
    fs, fe = frame_times_s(cfg.frame_durations_s)
    layout = SinogramLayout(cfg.scanner, cfg.num_radial, cfg.max_ring_difference, cfg.span)
    eff = random_crystal_efficiencies(cfg.scanner, np.random.default_rng(1), cfg.crystal_efficiency_spread)
    sim = AcquisitionSimulator(layout, grid, on_grid.mu_map_per_mm, crystal_efficiencies=eff,
                               scatter_fraction=cfg.scatter_fraction, randoms_fraction=cfg.randoms_fraction,
                               resolution_fwhm_mm=cfg.resolution_fwhm_mm,
                               sensitivity_cps_per_kbq=cfg.sensitivity_cps_per_kbq, device="cpu", quiet=True)
    tacs = []
    for truth in sessions:
        plasma = FengInput().scaled(truth.injected_activity_bq / 400e6)
        t = simulate_regional_tacs(truth.regions, fs, fe, model=cfg.model, plasma=plasma,
                                   reference=AZ10419369_REFERENCE)
        tacs.append(np.stack([t.tacs[n] for n in active]))  # (regions, frames)
    return dict(cfg=cfg, grid=grid, atlas=on_grid, active=active, basis=basis, sessions=sessions, fs=fs, fe=fe,
                layout=layout, sim=sim, tacs=tacs, frames=Frames.from_edges(fs, fe),
                scanner_fwhm_mm=float(np.max(sim.resolution.fwhm_mm)) if sim.resolution is not None else 0.0)


def atlas_means(images, labels, names, atlas):
    """Regional means (regions × frames) of a 4-D image over atlas labels."""
    out = []
    flat = images.reshape(-1, images.shape[-1])
    lab = labels.reshape(-1)
    for n in names:
        m = lab == atlas.index_of(n)
        out.append(flat[m].mean(axis=0))
    return np.stack(out)


def fit_bp(tacs, names, ref, fs, fe, model):
    from petbind.quant.models import fit_model

    targets = [n for n in names if n != ref]
    y = np.stack([tacs[names.index(n)] for n in targets], axis=1)
    res = fit_model(model, fs, fe, tacs[names.index(ref)], y, weights="duration")
    return dict(zip(targets, np.asarray(res.parameters["bp_nd"], float).reshape(-1)))


def gtm_tacs(images, labels, names, atlas, fwhm, voxel, fractions=None):
    from petbind.quant.pvc import GaussianPSF, gtm_correct, gtm_matrix

    gtm = gtm_matrix(labels, atlas.names, GaussianPSF(fwhm, voxel), fractions=fractions)
    res = gtm_correct(images, labels, gtm)
    return np.stack([np.asarray(res.values[res.region_names.index(n)]) for n in names])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="srtm")
    p.add_argument("--kinetics", default="srtm", choices=("srtm", "2tcm"))
    p.add_argument("--reference", default="cerebellum")
    p.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--subsets", type=int, default=24)
    p.add_argument("--scanner-fwhm-mm", type=float, default=None,
                   help="true resolution of the simulated scanner (default: the preset's)")
    p.add_argument("--pipeline", action="store_true",
                   help="also run petbind-study (its own scatter, randoms and resolution estimates) on the same study")
    p.add_argument("--sensitivity", type=float, default=10.0, help="cps/kBq (count level of the Poisson stage)")
    p.add_argument("--effect", type=float, default=0.2, help="drug effect in every region (fraction)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--psf", default="both", choices=("both", "on", "off"), help="OSEM resolution model")
    p.add_argument("--noise", default="both", choices=("both", "expected", "poisson"))
    p.add_argument("--min-ml", type=float, default=0.0, help="only regions of at least this volume")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from petbind.quant.io import Atlas
    from petbind.recon.osem import SinogramOSEM
    from petbind.recon.resolution import matched_resolution, measure_resolution
    from petbind.recon.system import GaussianFilter

    t0 = time.time()
    b = build(args)
    args.scanner_fwhm_mm = b["scanner_fwhm_mm"]
    grid, on, active, fs, fe = b["grid"], b["atlas"], b["active"], b["fs"], b["fe"]
    labels = on.labels
    names = [n for n in active if np.any(labels == on.index_of(n)) and n not in ("scalp", "skull", "csf", "ventricles")]
    atlas = Atlas(labels=labels.astype(np.int32), names={i: n for i, n in on.label_table.items() if i > 0},
                  affine=grid.affine, path="phantom")
    ref = args.reference
    voxel_ml = float(np.prod(grid.voxel_size_mm)) / 1000
    vol = {n: float(np.sum(labels == on.index_of(n))) * voxel_ml for n in names}
    names = [n for n in names if vol[n] >= args.min_ml or n == ref]
    true_bp = [{n: s.regions[n].bp_nd for n in names} for s in b["sessions"]]
    timings, results = {}, {}

    def record(stage, tacs_pair, t_start):
        results[stage] = [fit_bp(t, names, ref, fs, fe, args.model) for t in tacs_pair]
        timings[stage] = time.time() - t_start

    # model only
    t = time.time()
    record("model", [np.stack([tac[active.index(n)] for n in names]) for tac in b["tacs"]], t)
    # images
    images = [np.moveaxis(np.tensordot(tac.T, b["basis"], axes=1), 0, -1) for tac in b["tacs"]]
    t = time.time()
    record("voxels", [atlas_means(im, labels, names, on) for im in images], t)
    blur = GaussianFilter(grid, b["scanner_fwhm_mm"])
    blurred = [np.stack([blur.forward(im[..., k].astype(np.float32)) for k in range(im.shape[-1])], axis=-1)
               for im in images]
    t = time.time()
    record("blur", [atlas_means(im, labels, names, on) for im in blurred], t)
    t = time.time()
    record("blur+gtm(true)", [gtm_tacs(im, labels, names, atlas, b["scanner_fwhm_mm"], grid.voxel_size_mm)
                              for im in blurred], t)
    fractions = {n: on.fractions[i] for i, n in on.label_table.items() if i > 0}
    t = time.time()
    record("blur+gtmfrac(true)", [gtm_tacs(im, labels, names, atlas, b["scanner_fwhm_mm"], grid.voxel_size_mm,
                                           fractions) for im in blurred], t)
    rng = np.random.default_rng(11)
    test_object = sum(float(rng.uniform(1.0, 3.0)) * f for f in fractions.values()).astype(np.float32)

    # reconstruction of expected and Poisson counts with the true corrections
    from petbind.core.decay import decay_integral
    from petbind.sim.acquisition import BasisActivity

    sim = b["sim"]
    m0 = (sim.kappa * sim.normalisation * np.asarray(sim.attenuation)).astype(np.float32)
    lam = sim.decay_constant_per_s
    data = []
    t = time.time()
    for si, tac in enumerate(b["tacs"]):
        data.append(sim.simulate_sinograms(BasisActivity(b["basis"], tac), fs, fe, seed=100 + si))
    timings["simulate"] = time.time() - t
    for psf_model in ((None, b["scanner_fwhm_mm"]) if args.psf == "both" else
                      ((None,) if args.psf == "off" else (b["scanner_fwhm_mm"],))):
        rec = SinogramOSEM(b["layout"], grid, multiplicative=m0, resolution_fwhm_mm=psf_model,
                           num_subsets=args.subsets, device="cpu")
        tag = "psf" if psf_model else "nopsf"
        t = time.time()
        res = measure_resolution(b["layout"], grid, b["scanner_fwhm_mm"], psf_fwhm_mm=psf_model,
                                 num_iterations=max(args.iterations), num_subsets=args.subsets, device="cpu")
        matched = {}
        for it in args.iterations:
            matched[it] = matched_resolution(b["layout"], grid, b["scanner_fwhm_mm"], test_object,
                                             psf_fwhm_mm=psf_model, num_iterations=it, num_subsets=args.subsets,
                                             mask=labels > 0, device="cpu")
            log.warning("%s at %d it: matched FWHM %s (rms %.3f)", tag, it, np.round(matched[it]["fwhm_mm"], 2).tolist(),
                        matched[it]["relative_rms"])
        log.warning("%s at %d it: point-source FWHM %s", tag, max(args.iterations), np.round(res["fwhm_mm"], 2).tolist())
        timings[f"resolution-{tag}"] = time.time() - t
        for kind in (("expected", "poisson") if args.noise == "both" else (args.noise,)):
            t = time.time()
            per_iter = {it: [] for it in args.iterations}
            for si, d in enumerate(data):
                imgs = {it: np.zeros(grid.shape + (fs.size,), np.float32) for it in args.iterations}
                for k in range(fs.size):
                    dk = decay_integral(fs[k], fe[k], lam)
                    add = (d["scatter"][k] + d["randoms"][k]).astype(np.float32) / np.float32(dk)
                    y = (d["trues"][k] + d["scatter"][k] + d["randoms"][k]) if kind == "expected" else d["prompts"][k]
                    y = y.astype(np.float32) / np.float32(dk)

                    def cb(it, x, k=k):
                        if it in imgs:  # it counts full iterations from 1
                            imgs[it][..., k] = x

                    rec.reconstruct(y, max(args.iterations), progress=False, callback=cb, additive=add,
                                    x0=np.full(grid.shape, max(float(np.mean(images[si][..., k])), 1e-3), np.float32))
                for it in args.iterations:
                    per_iter[it].append(imgs[it])
            for it in args.iterations:
                stage = f"{kind}-{tag}-it{it}"
                tt = time.time()
                record(stage, [atlas_means(im, labels, names, on) for im in per_iter[it]], tt)
                record(stage + "+gtmfrac(matched)", [gtm_tacs(im, labels, names, atlas, matched[it]["fwhm_mm"],
                                                              grid.voxel_size_mm, fractions) for im in per_iter[it]], tt)
                if it == max(args.iterations):
                    record(stage + "+gtm(points)", [gtm_tacs(im, labels, names, atlas, res["fwhm_mm"],
                                                             grid.voxel_size_mm) for im in per_iter[it]], tt)
            timings[f"recon-{kind}-{tag}"] = time.time() - t

    if args.pipeline:
        # the whole pipeline on the same study written to files: its own scatter, randoms, κ and resolution
        import tempfile

        from petbind.pipeline.options import PipelineOptions
        from petbind.pipeline.run import run_pipeline
        from petbind.sim.study import simulate_study

        t = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            simulate_study(os.path.join(tmp, "raw"), b["cfg"])
            opts = PipelineOptions(device="cpu", quiet=True, subsets=args.subsets, iterations=max(args.iterations),
                                   groups=("drug",), n_permutations=10, exclude_regions=("scalp", "skull"))
            run_pipeline(os.path.join(tmp, "raw"), os.path.join(tmp, "deriv"), opts)
            pipe = []
            for ses in ("baseline", "postdose"):
                from petbind.core.files import read_table_tsv

                _, rows = read_table_tsv(os.path.join(tmp, "deriv", "sub-01", f"ses-{ses}", "pet",
                                                      f"sub-01_ses-{ses}_desc-srtm_bpnd.tsv"))
                pipe.append({r["region"]: float(r["bp_nd"]) for r in rows})
        results[f"pipeline (petbind-study, {max(args.iterations)}x{args.subsets})"] = pipe
        timings["pipeline"] = time.time() - t

    # ---- tables
    stages = list(results)
    targets = [n for n in names if n != ref]
    print(f"\nBP_ND recovery (estimated / true), baseline; model {args.model}, kinetics {args.kinetics}, "
          f"scanner FWHM {args.scanner_fwhm_mm:g} mm, voxels {grid.voxel_size_mm[0]:g} mm, "
          f"{args.subsets} subsets, {args.sensitivity:g} cps/kBq")
    _print(targets, vol, stages, lambda s, n: results[s][0][n] / true_bp[0][n])
    print("\nΔBP_ND recovery (estimated change / true change)")
    _print(targets, vol, stages,
           lambda s, n: (results[s][1][n] - results[s][0][n]) / (true_bp[1][n] - true_bp[0][n]))
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {time.time() - t0:.0f}")


def _print(targets, vol, stages, f):
    w = max(len(s) for s in stages)
    print(f"{'stage':<{w}} " + " ".join(f"{n[:10]:>10}" for n in targets))
    print(f"{'volume mL':<{w}} " + " ".join(f"{vol[n]:>10.1f}" for n in targets))
    for s in stages:
        vals = []
        for n in targets:
            try:
                v = f(s, n)
            except (KeyError, ZeroDivisionError):
                v = math.nan
            vals.append(f"{v:>10.2f}")
        print(f"{s:<{w}} " + " ".join(vals))


if __name__ == "__main__":
    main()
