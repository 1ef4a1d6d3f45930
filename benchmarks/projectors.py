"""Projector throughput: LORs per second, forward and back.

Prints one table row per (device, geometry, TOF) with LORs/s and the seconds
of one whole projection, forward and back, the speed-up over the slow NumPy
oracle (``petbind.recon.kernels.reference``) timed in the same run on a sample
of the same LORs, and on the GPU the peak device memory of the case (CuPy's
pool, emptied before each case, grows to the largest set of buffers alive at
once); then the process's peak host memory.

    python benchmarks/projectors.py --device gpu --size mmr   # the GPU targets below

GPU targets (H200): span-11 mMR non-TOF forward under 0.25 s, back under 0.5 s.

    python benchmarks/projectors.py               # size "ci", CPU (and GPU when present)
    python benchmarks/projectors.py --size mmr    # Biograph mMR-like, 344x344x127
    python benchmarks/projectors.py --device cpu

Sizes
-----
ci
    Cylindrical scanner, radius 330 mm, 400 crystals/ring, 16 rings 4 mm apart,
    span 1, 149 radial bins; 64x64x16 image of 4 mm voxels.
mmr
    ``Scanner.mmr()``, span 11, max ring difference 60, 344 radial bins;
    344x344x127 image of 2.0863x2.0863x2.03125 mm voxels.

The CPU target for ``ci`` on 2 cores is parallelproj 2.0's C/OpenMP Joseph
projector on the same machine, measured at about 7e6 LORs/s forward and
2.2e6 LORs/s back on idle cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from petbind.core.device import gpu_available, gpu_status  # noqa: E402
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters  # noqa: E402
from petbind.recon.kernels.reference import back_reference, forward_reference  # noqa: E402
from petbind.recon.projector import ListmodeProjector, SinogramProjector  # noqa: E402


def setup(size):
    if size == "ci":
        scanner = Scanner.cylindrical(330.0, 400, 16, 4.0)
        layout = SinogramLayout(scanner, 149, span=1)
        grid = ImageGrid((64, 64, 16), 4.0)
    else:
        scanner = Scanner.mmr()
        layout = SinogramLayout(scanner, 344, max_ring_difference=60, span=11)
        grid = ImageGrid((344, 344, 127), (2.0863, 2.0863, 2.03125))
    # TOF as on current scanners: ~400 ps FWHM, 17 bins of 25 mm (~167 ps)
    tof = TOFParameters(num_bins=17, bin_width_mm=25.0, fwhm_ps=400.0)
    return scanner, layout, grid, tof


def best_time(fn, repeats, sync):
    fn()
    sync()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def phantom(grid, xp):
    c = grid.voxel_centres_mm()
    r = np.hypot(c[..., 0], c[..., 1])
    img = (r < 0.4 * grid.shape[0] * grid.voxel_size_mm[0]).astype(np.float32)
    return xp.asarray(img)


def random_bins(layout, n, rng):
    """``n`` random non-gap sinogram bins: LOR end points (mm) and detector pairs,
    without building the whole (possibly 70-million-bin) layout."""
    cp = layout.crystal_pairs()  # (views, radial, 2), small
    mask = layout.scanner.crystal_mask
    p = rng.integers(0, layout.num_planes, 4 * n)
    v = rng.integers(0, layout.num_views, 4 * n)
    r = rng.integers(0, layout.num_radial, 4 * n)
    c = cp[v, r]
    ok = mask[c[:, 0]] & mask[c[:, 1]]
    p, c = p[ok][:n], c[ok][:n]
    xy = layout.scanner.crystal_xy_mm
    start = np.concatenate([xy[c[:, 0]], layout.plane_z_mm[p, :1]], axis=1)
    end = np.concatenate([xy[c[:, 1]], layout.plane_z_mm[p, 1:]], axis=1)
    first = np.searchsorted(layout.plane_of_ring_pair, np.arange(layout.num_planes))
    rings = layout.ring_pairs[first][p]
    ncr = layout.scanner.crystals_per_ring
    pairs = np.stack([rings[:, 0] * ncr + c[:, 0], rings[:, 1] * ncr + c[:, 1]], axis=1)
    return start, end, pairs


def oracle_rate(layout, grid, tof, img, rng, n_sample):
    """LORs/s of the NumPy oracle on a random sample of the layout's LORs."""
    s, e, _ = random_bins(layout, n_sample, rng)
    t0 = time.perf_counter()
    y = forward_reference(img, s, e, grid, tof)
    tf = time.perf_counter() - t0
    t0 = time.perf_counter()
    back_reference(y, s, e, grid, tof)
    tb = time.perf_counter() - t0
    return n_sample / tf, n_sample / tb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("ci", "mmr"), default="ci")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--oracle-lors", type=int, default=1500, help="LORs timed with the NumPy oracle")
    ap.add_argument("--listmode-events", type=int, default=2_000_000)
    args = ap.parse_args(argv)

    devices = ["cpu", "gpu"] if args.device == "auto" else [args.device]
    if "gpu" in devices and not gpu_available():
        if args.device == "gpu":
            raise SystemExit(f"--device gpu: {gpu_status()[1]}")
        devices.remove("gpu")
    scanner, layout, grid, tof = setup(args.size)
    rng = np.random.default_rng(0)
    img_np = phantom(grid, np)
    print(f"size={args.size}: {layout!r}\n  {grid!r}\n  TOF {tof.num_bins} bins x {tof.bin_width_mm} mm, {tof.fwhm_ps} ps FWHM")
    print(f"  threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cores={os.cpu_count()}")

    # The TOF sinogram is benchmarked on a view subset to bound output memory.
    tof_views = layout.view_subsets(8)[0]
    ora = {
        "nontof": oracle_rate(layout, grid, None, img_np, rng, args.oracle_lors),
        "tof": oracle_rate(layout, grid, tof, img_np, rng, max(args.oracle_lors // 3, 100)),
    }
    _, _, pairs = random_bins(layout, args.listmode_events, rng)
    tof_bins = rng.integers(0, tof.num_bins, pairs.shape[0])

    hdr = (f"{'device':6} {'geometry':9} {'tof':6} {'LORs':>11} {'fwd LOR/s':>11} {'back LOR/s':>11} {'fwd s':>8} "
           f"{'back s':>8} {'fwd/oracle':>11} {'back/oracle':>11} {'peak MiB':>9}")
    print(hdr)
    print("-" * len(hdr), flush=True)

    def print_row(row):
        # one row as soon as it is measured: the mmr size takes many minutes on a CPU
        dev, geom, kind, n, f, b, rf, rb, peak = row
        peak_s = "-" if peak is None else f"{peak / 2**20:.0f}"
        print(f"{dev:6} {geom:9} {kind:6} {n:11d} {f:11.3e} {b:11.3e} {n / f:8.3f} {n / b:8.3f} {rf:11.0f} {rb:11.0f} "
              f"{peak_s:>9}", flush=True)

    rows = []
    for dev in devices:
        if dev == "gpu":
            import cupy as xp

            sync = xp.cuda.Device().synchronize
            pool = xp.get_default_memory_pool()
            pool.free_all_blocks()
        else:
            xp, sync, pool = np, (lambda: None), None
        img = xp.asarray(img_np)
        # Built inside each case so that the peak memory includes the projector's resident tables.
        cases = [
            ("sinogram", "nontof", lambda: SinogramProjector(layout, grid, device=dev)),
            ("sinogram", "tof", lambda: SinogramProjector(layout, grid, tof=tof, views=tof_views, device=dev)),
            ("listmode", "nontof", lambda: ListmodeProjector(scanner, grid, pairs, device=dev)),
            ("listmode", "tof", lambda: ListmodeProjector(scanner, grid, pairs, tof_bins=tof_bins, tof=tof, device=dev)),
        ]
        for geom, kind, make in cases:
            if pool is not None:
                sync()
                pool.free_all_blocks()
                base = pool.total_bytes()
            op = make()
            n_lors = int(np.prod(op.out_shape[:3])) if geom == "sinogram" else op.num_events
            y = op.forward(img)
            tf = best_time(lambda: op.forward(img), args.repeats, sync)
            tb = best_time(lambda: op.back(y), args.repeats, sync)
            of, ob = ora[kind]
            peak = None if pool is None else pool.total_bytes() - base
            rows.append((dev, geom, kind, n_lors, n_lors / tf, n_lors / tb, (n_lors / tf) / of, (n_lors / tb) / ob, peak))
            print_row(rows[-1])
            y = op = None  # free the case before the next one is built

    print(f"NumPy oracle (same run): non-TOF {ora['nontof'][0]:.3e} fwd / {ora['nontof'][1]:.3e} back LOR/s; "
          f"TOF {ora['tof'][0]:.3e} / {ora['tof'][1]:.3e}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak host memory (max RSS): {peak_mib:.0f} MiB")



if __name__ == "__main__":
    main()
