"""Benchmark of voxelwise kinetic modelling (petbind.quant.models).

Times voxelwise BF-SRTM and MRTM2 on a simulated noisy dynamic image
(``--size full``: 128x128x64 voxels x 25 frames) on the CPU and, when CuPy
sees a GPU, on the GPU, against a per-voxel ``scipy.optimize.least_squares``
SRTM loop timed on a sample of voxels in the same run.  Then prints the bias
and SD of BP_ND per model on the noisy simulated voxels.

Run::

    PYTHONPATH=. python benchmarks/quant.py --size small
    PYTHONPATH=. python benchmarks/quant.py --size full --device cpu
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings

import os

# This file is named like the package it measures: drop its own folder from
# the import path (Python puts it first when run as a script) and use the
# repository root instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
from scipy.signal import lfilter  # noqa: E402

from petbind.quant.models import fit_model, parametric_maps, srtm_forward  # noqa: E402

SIZES = {"small": (32, 32, 16), "full": (128, 128, 64)}
# 25 frames, 85 min: 4x15 s, 4x30 s, 3x60 s, 2x120 s, 6x300 s, 6x450 s.
DUR_S = np.array([15] * 4 + [30] * 4 + [60] * 3 + [120] * 2 + [300] * 6 + [450] * 6, dtype=float)
END_S = np.cumsum(DUR_S)
START_S = END_S - DUR_S
HALF_LIFE_MIN = 20.364  # C-11
K1_REF, K2_REF = 0.3, 0.15
BP_LEVELS = np.array([0.5, 1.0, 1.5, 2.0])
R1_TRUE = 1.0


def reference_tac():
    """1TC reference from a plasma input, integrated on a 0.5 s grid (exact
    exponential recursion), then frame-averaged."""
    dt = 0.5 / 60.0
    t = np.arange(0.0, END_S[-1] / 60.0 + dt, dt)
    cp = 8.0e4 * t * np.exp(-4.0 * t) + 2.0e3 * np.exp(-0.3 * t) + 8.0e2 * np.exp(-0.02 * t)
    e = math.exp(-K2_REF * dt)
    c = lfilter([K1_REF * (1 - e) / K2_REF], [1.0, -e], cp)
    return np.array([c[(t >= a / 60) & (t < b / 60)].mean() for a, b in zip(START_S, END_S)])


def noise_sd(tac, scale):
    """Counts-like noise SD: var ~ C / (dt * decay factor) (Mazoyer 1986)."""
    lam = math.log(2) / HALF_LIFE_MIN
    s, e = START_S / 60, END_S / 60
    d = (np.exp(-lam * s) - np.exp(-lam * e)) / (lam * (e - s))
    return scale * np.sqrt(np.maximum(tac, 0) / ((e - s) * d))


def phantom(shape, ref, rng, noise_scale):
    """Image whose voxels belong to four BP_ND classes (blocks along x),
    R1 = 1, SRTM kinetics, counts-like Gaussian noise; float32 like a
    reconstructed image."""
    nx = shape[0]
    cls = np.minimum((np.arange(nx) * len(BP_LEVELS)) // nx, len(BP_LEVELS) - 1)
    tacs = np.stack([srtm_forward(START_S, END_S, ref, R1_TRUE, R1_TRUE * K2_REF, bp) for bp in BP_LEVELS])
    sds = np.stack([noise_sd(t, noise_scale) for t in tacs])
    img = np.empty(shape + (len(DUR_S),), dtype=np.float32)
    for x in range(nx):
        k = cls[x]
        img[x] = tacs[k] + sds[k] * rng.standard_normal(shape[1:] + (len(DUR_S),), dtype=np.float32)
    bp_true = np.broadcast_to(BP_LEVELS[cls][:, None, None], shape)
    return img, bp_true, tacs


def time_maps(model, ref, img, xp, **kw):
    t0, c0 = time.perf_counter(), time.process_time()
    pm = parametric_maps(model, START_S, END_S, ref, img, xp=xp, weights="duration", progress=False, **kw)
    if xp.__name__ == "cupy":
        xp.cuda.Stream.null.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, pm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    ap.add_argument("--baseline-voxels", type=int, default=200, help="voxels in the per-voxel scipy loop")
    ap.add_argument("--bias-voxels", type=int, default=2000, help="voxels per BP class for the bias table")
    ap.add_argument("--noise", type=float, default=6.0, help="noise scale (counts-like SD factor)")
    ap.add_argument("--chunk-size", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore", RuntimeWarning)

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(("cpu", np))
    if args.device in ("auto", "gpu"):
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                devices.append(("gpu", cupy))
        except Exception as exc:  # CuPy absent or no driver
            if args.device == "gpu":
                sys.exit(f"--device gpu: CuPy/GPU not usable ({exc.__class__.__name__}: {exc})")

    rng = np.random.default_rng(args.seed)
    shape = SIZES[args.size]
    ref = reference_tac()
    img, bp_true, tacs = phantom(shape, ref, rng, args.noise)
    n_vox = int(np.prod(shape))
    cov = [float(noise_sd(t, args.noise)[-1] / t[-1]) for t in tacs]
    print(f"image {shape} x {len(DUR_S)} frames = {n_vox} voxels, {img.nbytes / 2**20:.0f} MiB float32; "
          f"voxel noise SD / signal in the last frame {100 * min(cov):.0f}-{100 * max(cov):.0f} %")

    # Per-voxel scipy.optimize baseline (SRTM NLS, one least_squares per voxel).
    flat = img.reshape(n_vox, -1)
    sample = rng.choice(n_vox, size=min(args.baseline_voxels, n_vox), replace=False)
    t0, c0 = time.perf_counter(), time.process_time()
    fit_model("srtm", START_S, END_S, ref, flat[sample].T.astype(np.float64), weights="duration")
    t_base, c_base = time.perf_counter() - t0, time.process_time() - c0
    base_vps = len(sample) / t_base

    rows = [("scipy least_squares SRTM loop (cpu)", len(sample), t_base, c_base, base_vps, n_vox / base_vps)]
    k2p = K2_REF
    results = {}
    for dev, xp in devices:
        data = img if dev == "cpu" else xp.asarray(img)
        for model, kw in (("bfsrtm", {}), ("mrtm2", {"k2prime_per_min": k2p, "tstar_min": 0.0})):
            secs, cpu_s, pm = time_maps(model, ref, data, xp, chunk_size=args.chunk_size, **kw)
            rows.append((f"{model} voxelwise ({dev})", n_vox, secs, cpu_s, n_vox / secs, secs))
            results[(model, dev)] = pm

    print("\nTiming (duration weights; bfsrtm: 100 bases + refinement; mrtm2: k2' given)")
    print(f"{'method':38s} {'voxels':>8s} {'wall s':>8s} {'cpu s':>8s} {'voxels/s':>10s} {'image s':>9s} {'speed-up':>9s}")
    for name, nv, secs, cpu_s, vps, full_s in rows:
        print(f"{name:38s} {nv:8d} {secs:8.2f} {cpu_s:8.2f} {vps:10.0f} {full_s:9.1f} {vps / base_vps:9.0f}")
    print("image s: whole image (the baseline's is extrapolated from its sample); speed-up: voxels/s over the "
          "baseline's; cpu s: process CPU time, all threads (wall time depends on other load)")

    # Bias and SD of BP_ND on the noisy voxels, per model and BP class.
    print(f"\nBP_ND on noisy voxels (noise scale {args.noise}): bias % and SD (absolute), per true BP_ND")
    cls_of = np.broadcast_to(bp_true, shape).reshape(-1)
    picks = {bp: rng.choice(np.nonzero(cls_of == bp)[0], size=min(args.bias_voxels, int(np.sum(cls_of == bp))),
                            replace=False) for bp in BP_LEVELS}
    header = f"{'model':8s} {'n/class':>8s} " + " ".join(f"{'BP=' + str(bp):>18s}" for bp in BP_LEVELS)
    print(header)
    for model in ("srtm", "bfsrtm", "srtm2", "mrtm", "mrtm2", "logan"):
        kw = {}
        if model in ("srtm2", "mrtm2", "logan"):
            kw["k2prime_per_min"] = k2p
        if model == "logan":
            kw["tstar_min"] = 20.0
        cells = []
        nper = min(args.baseline_voxels // 2, args.bias_voxels) if model == "srtm" else args.bias_voxels
        for bp in BP_LEVELS:
            idx = picks[bp][:nper]
            res = fit_model(model, START_S, END_S, ref, flat[idx].T.astype(np.float64), weights="duration", **kw)
            est = res.parameters["bp_nd"]
            est = est[np.isfinite(est)]
            cells.append(f"{100 * (est.mean() / bp - 1):+7.2f}% sd {est.std(ddof=1):6.3f}")
        print(f"{model:8s} {nper:8d} " + " ".join(f"{c:>18s}" for c in cells))
    for (model, dev), pm in results.items():
        bpm = pm.maps["bp_nd"]
        bpm = bpm.get() if dev == "gpu" else bpm
        ok = np.isfinite(bpm)
        print(f"{model} map ({dev}): {int(ok.sum())}/{n_vox} finite; median BP_ND/true "
              f"{np.median(bpm[ok] / np.asarray(bp_true)[ok]):.4f}")
    if len(devices) == 2:
        for model in ("bfsrtm", "mrtm2"):
            a = results[(model, "cpu")].maps["bp_nd"]
            b = results[(model, "gpu")].maps["bp_nd"].get()
            print(f"{model}: max |GPU - CPU| BP_ND = {np.nanmax(np.abs(a - b)):.2e}")


if __name__ == "__main__":
    main()
