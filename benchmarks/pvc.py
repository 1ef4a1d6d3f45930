"""Benchmark of partial-volume correction (petbind.quant.pvc).

On the shipped brain phantom's labels (native 2 mm grid) with a 25-frame
dynamic image, times

- building the GTM (one blur per region inside its padded bounding box)
  against the obvious baseline measured in the same run: one full-image
  ``gaussian_filter`` per region;
- GTM correction of all frames (regional means + one solve);
- RBV of all frames;

on the CPU and, when CuPy sees a GPU, on the GPU.  It also prints the
largest difference between the boxed and the full-image matrix (should be
round-off) and the recovery of the phantom's regional values.

Run::

    PYTHONPATH=. python benchmarks/pvc.py [--fwhm-mm 5] [--frames 25] [--device cpu|gpu|both]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import scipy.ndimage as ndi

from petbind.core.device import gpu_available
from petbind.quant.pvc import GaussianPSF, gtm_correct, gtm_matrix, rbv_correct
from petbind.sim.phantom import load_brain_phantom


def _sync(xp):
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def _timed(fn, xp, repeat=1):
    best = np.inf
    out = None
    for _ in range(repeat):
        _sync(xp)
        t0 = time.perf_counter()
        out = fn()
        _sync(xp)
        best = min(best, time.perf_counter() - t0)
    return best, out


def naive_gtm(labels, rows, psf, xp):
    """Full-image blur of every indicator, regional sums by bincount: the plain baseline."""
    nd = ndi if xp is np else __import__("cupyx.scipy.ndimage", fromlist=["gaussian_filter"])
    lab = xp.asarray(labels)
    lut = np.full(int(labels.max()) + 1, len(rows))
    lut[rows] = np.arange(len(rows))
    idx = xp.asarray(lut)[lab].reshape(-1)
    counts = xp.bincount(idx, minlength=len(rows) + 1)[:-1]
    m = xp.empty((len(rows), len(rows)))
    for j, rj in enumerate(rows):
        w = nd.gaussian_filter((lab == rj).astype(xp.float64), psf.sigma_voxels, mode="constant", truncate=4.0)
        m[:, j] = xp.bincount(idx, weights=w.reshape(-1), minlength=len(rows) + 1)[:-1] / counts
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fwhm-mm", type=float, default=5.0)
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--device", choices=("cpu", "gpu", "both"), default="both")
    args = p.parse_args(argv)

    ph = load_brain_phantom()
    labels = ph.labels.astype(np.int32)
    names = {k: v for k, v in ph.label_table.items() if k != 0 and np.any(labels == k)}
    psf = GaussianPSF.from_affine(args.fwhm_mm, ph.affine)
    rng = np.random.default_rng(0)
    rows = sorted(names) + [0]
    truth = rng.uniform(1000.0, 20000.0, size=(len(rows), args.frames))
    table = np.zeros((labels.max() + 1, args.frames))
    table[rows] = truth
    piece = table[labels]
    image = np.stack([ndi.gaussian_filter(piece[..., f], psf.sigma_voxels, mode="constant", truncate=4.0)
                      for f in range(args.frames)], axis=3)

    devices = ["cpu"] if args.device == "cpu" else ["gpu"] if args.device == "gpu" else ["cpu", "gpu"]
    print(f"grid {labels.shape}, voxel {psf.voxel_size_mm} mm, {len(rows)} regions incl. background, "
          f"{args.frames} frames, FWHM {args.fwhm_mm} mm")
    print(f"{'device':6s} {'GTM boxed s':>12s} {'GTM full s':>11s} {'speed-up':>9s} {'max|dM|':>9s} "
          f"{'GTM corr s':>11s} {'RBV s':>8s} {'max rel err GTM':>16s} {'max rel err RBV':>16s}")
    for dev in devices:
        if dev == "gpu" and not gpu_available():
            print("gpu    (skipped: CuPy sees no GPU)")
            continue
        if dev == "gpu":
            import cupy as xp
        else:
            xp = np
        lab_x, img_x = xp.asarray(labels), xp.asarray(image)
        t_box, g = _timed(lambda: gtm_matrix(lab_x, names, psf), xp)
        t_full, m_full = _timed(lambda: naive_gtm(labels, rows, psf, xp), xp)
        dm = float(np.max(np.abs(np.asarray(g.matrix.get() if xp is not np else g.matrix)
                                 - (m_full.get() if xp is not np else m_full))))
        t_corr, res = _timed(lambda: gtm_correct(img_x, lab_x, g), xp, repeat=3)
        t_rbv, out = _timed(lambda: rbv_correct(img_x, lab_x, g), xp)
        vals = res.values.get() if xp is not np else res.values
        out = out.get() if xp is not np else out
        err_gtm = float(np.max(np.abs(vals / truth - 1)))
        err_rbv = float(np.max(np.abs(out / piece - 1)))
        print(f"{dev:6s} {t_box:12.3f} {t_full:11.3f} {t_full / t_box:9.1f} {dm:9.1e} {t_corr:11.3f} {t_rbv:8.3f} "
              f"{err_gtm:16.1e} {err_rbv:16.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
