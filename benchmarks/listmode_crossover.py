"""Where listmode OSEM beats sinogram OSEM: time per frame against the number of events.

Sinogram OSEM costs the same for every frame (it visits every bin); listmode
OSEM costs in proportion to the frame's events.  For each count level a frame
of a uniform cylinder is drawn on the demo scanner, then reconstructed both
ways with the study defaults (4 iterations x 24 subsets, same system model);
the table gives seconds per frame, their ratio, and the relative difference
of the two images' mean inside the cylinder.  ``petbind-study
--listmode-osem auto`` switches below 0.1 events per bin, where the ratio
crossed 1 on 2 CPU cores (0.1-0.3 events per bin).  Run::

    python benchmarks/listmode_crossover.py [--device cpu|gpu] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"))
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--subsets", type=int, default=24)
    args = ap.parse_args(argv)

    from petbind.core.device import to_numpy
    from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout
    from petbind.recon.osem import ListmodeOSEM, SinogramOSEM

    scanner = Scanner.preset("demo-small")
    layout = SinogramLayout(scanner, 40, 6)
    grid = ImageGrid((27, 34, 24), 6.0)
    c = grid.voxel_centres_mm()
    inside = np.hypot(c[..., 0], c[..., 1] / 1.2) < 60
    truth = inside.astype(np.float32)
    rec = SinogramOSEM(layout, grid, num_subsets=args.subsets, device=args.device)
    from petbind.recon.projector import SinogramProjector

    ybar = np.asarray(to_numpy(SinogramProjector(layout, grid, device=args.device).forward(truth)), np.float64)
    pairs = layout.detector_pairs().reshape(-1, 2)
    sens = sum(s for s in rec.sensitivities())
    rng = np.random.default_rng(0)
    num_bins = layout.num_bins if hasattr(layout, "num_bins") else int(np.prod(layout.shape))
    print(f"demo-small layout: {num_bins} bins; OSEM {args.iterations} x {args.subsets}; device {args.device}")
    print(f"{'events':>10} {'events/bins':>12} {'sinogram s':>11} {'listmode s':>11} {'lm/sino':>8} {'mean diff':>10}")
    for events in (1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6):
        counts = rng.poisson(ybar * (events / ybar.sum())).astype(np.float32)
        flat = counts.reshape(-1).astype(np.int64)
        ids = np.repeat(pairs, flat, axis=0)
        x0 = np.full(grid.shape, float(events / ybar.sum()), np.float32)
        best_s = best_l = np.inf
        for _ in range(args.repeats):
            t = time.perf_counter()
            xs = rec.reconstruct(counts, args.iterations, x0=x0, progress=False)
            best_s = min(best_s, time.perf_counter() - t)
            t = time.perf_counter()
            lm = ListmodeOSEM(scanner, grid, ids, sens, num_subsets=min(args.subsets, len(ids)), device=args.device)
            xl = lm.reconstruct(args.iterations, x0=x0, progress=False)
            best_l = min(best_l, time.perf_counter() - t)
        xs, xl = np.asarray(to_numpy(xs)), np.asarray(to_numpy(xl))
        diff = xl[inside].mean() / xs[inside].mean() - 1
        print(f"{int(events):>10d} {events / num_bins:>12.3f} {best_s:>11.3f} {best_l:>11.3f} {best_l / best_s:>8.2f} "
              f"{diff:>+10.3%}", flush=True)


if __name__ == "__main__":
    main()
