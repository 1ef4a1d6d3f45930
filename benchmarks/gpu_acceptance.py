"""GPU acceptance checks and timings, one table to paste into a note.

Run by ``scripts/gpu_check.sh`` on a GPU machine (``--size full``, a few
minutes on an H100/H200).  ``--size tiny`` runs the same code on small
problems; the test suite runs it through the CuPy stand-in so that this
script works the first time a GPU is lent.

Rows
----
environment          GPU, CuPy, CUDA runtime/driver, NVRTC versions
kernel build         CuPy RawModule of joseph.cu (NVRTC, sm of the device): every kernel loads
TOF offsets > 2^31   span-11 mMR sinogram with 33 TOF bins (72.6 M LORs x 33 = 2.4e9 values):
                     forward and back of LORs whose TOF offset is beyond 2^31 against the NumPy oracle
adjointness          <Ax, y> = <x, A^T y> on the device (TOF sinogram subset with PSF; TOF listmode)
non-TOF fwd/back     span-11 mMR, 344x344x127 image (targets 0.25 s / 0.5 s)
OSEM iteration       span-11 mMR, 17 TOF bins, 8 subsets: sensitivity, one iteration, peak device
                     memory against petbind.recon.osem.sinogram_osem_memory
listmode OSEM        one TOF listmode OSEM iteration over 40 M events (target 2 s)
BF-SRTM maps         voxelwise BF-SRTM, 128x128x64x25 (target 0.5 s), against the CPU on a sample

A check that raises is reported as FAIL with its error and the others still
run; the exit status is 1 when any check failed (a missed speed target is
reported as "slow", not as a failure).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

from petbind.core.device import gpu_status  # noqa: E402
from petbind.recon import kernels  # noqa: E402
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout, TOFParameters  # noqa: E402
from petbind.recon.kernels.reference import back_reference, forward_reference  # noqa: E402
from petbind.recon.osem import ListmodeOSEM, SinogramOSEM, sinogram_osem_memory  # noqa: E402
from petbind.recon.projector import ListmodeProjector, SinogramProjector  # noqa: E402
from petbind.recon.system import SystemModel  # noqa: E402

MIB = 2**20


def _load_quant_benchmark():
    spec = importlib.util.spec_from_file_location("petbind_bench_quant", os.path.join(_HERE, "quant.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Sizes:
    def __init__(self, size):
        self.full = size == "full"
        if self.full:
            self.scanner = Scanner.mmr()
            self.layout = SinogramLayout(self.scanner, 344, max_ring_difference=60, span=11)
            self.grid = ImageGrid((344, 344, 127), (2.0863, 2.0863, 2.03125))
            self.events = 40_000_000
            self.maps_shape = (128, 128, 64)
        else:
            self.scanner = Scanner.cylindrical(60.0, 48, 4, 4.0)
            self.layout = SinogramLayout(self.scanner, 25, span=3, max_ring_difference=3)
            self.grid = ImageGrid((12, 12, 4), 5.0)
            self.events = 20_000
            self.maps_shape = (6, 5, 4)
        self.tof = TOFParameters(num_bins=17, bin_width_mm=25.0, fwhm_ps=400.0)
        # 33 bins push the TOF offsets of a span-11 mMR sinogram past 2^31
        self.tof_wide = TOFParameters(num_bins=33, bin_width_mm=13.0, fwhm_ps=400.0)


def phantom(grid, xp):
    c = grid.voxel_centres_mm()
    r = np.hypot(c[..., 0], c[..., 1])
    img = np.where(r < 0.35 * grid.shape[0] * grid.voxel_size_mm[0], 1.0, 0.0).astype(np.float32)
    img[np.hypot(c[..., 0] - 20, c[..., 1]) < 0.08 * grid.shape[0] * grid.voxel_size_mm[0]] = 4.0
    return xp.asarray(img)


class Runner:
    def __init__(self, cp):
        self.cp = cp
        self.rows = []
        self.failed = False

    def sync(self):
        self.cp.cuda.Device().synchronize()

    def timed(self, fn, repeats=1):
        fn()
        self.sync()
        best = np.inf
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best

    def pool_reset(self):
        pool = self.cp.get_default_memory_pool()
        self.sync()
        pool.free_all_blocks()
        return pool.total_bytes()

    def pool_peak(self, base):
        return self.cp.get_default_memory_pool().total_bytes() - base

    def check(self, name, fn):
        t0 = time.perf_counter()
        try:
            for row in fn():
                self.rows.append((name,) + tuple(row))
        except Exception as exc:  # report and go on: one table, every check
            self.failed = True
            self.rows.append((name, "FAIL", f"{exc.__class__.__name__}: {exc}"[:160], "", ""))
            traceback.print_exc(file=sys.stderr)
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}", file=sys.stderr, flush=True)


def status(ok, slow=False):
    return "ok" if ok and not slow else ("slow" if ok else "FAIL")


def check_environment(cp):
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    rt = cp.cuda.runtime.runtimeGetVersion()
    drv = cp.cuda.runtime.driverGetVersion()
    try:
        nv = ".".join(map(str, cp.cuda.nvrtc.getVersion()))
    except Exception:  # the stand-in, or an old CuPy
        nv = "?"
    mem = props.get("totalGlobalMem", 0) / 2**30
    yield ("ok", f"{name}, {mem:.0f} GiB; CuPy {cp.__version__}; CUDA runtime {rt}, driver {drv}; NVRTC {nv}", "", "")


def check_kernel_build(cp):
    kernels._gpu_modules.clear()
    t0 = time.perf_counter()
    mod = kernels.gpu_module("joseph")
    names = list(kernels.kernel_signatures("joseph"))
    for n in names:
        mod.get_function(n)
    dt = time.perf_counter() - t0
    yield ("ok", f"{len(names)} kernels loaded, sm_{cp.cuda.Device().compute_capability}", f"{dt:.2f} s", "")


def _sample_bins(layout, views, planes, rng, n):
    """Flat indices (within a projector of ``views``) and end points of ``n`` random bins of ``planes``."""
    p = rng.choice(planes, n)
    vi = rng.integers(0, len(views), n)
    r = rng.integers(0, layout.num_radial, n)
    flat = (p * len(views) + vi) * layout.num_radial + r
    s, e = np.empty((n, 3)), np.empty((n, 3))
    for v in np.unique(vi):  # one view at a time: the whole table is gigabytes at mMR size
        sel = vi == v
        sv, ev = layout.lor_endpoints_mm(np.asarray([views[v]]))
        s[sel], e[sel] = sv[p[sel], 0, r[sel]], ev[p[sel], 0, r[sel]]
    return flat, s, e


def random_events(layout, n, rng):
    """Detector pairs of ``n`` random sinogram bins (ring difference within the
    layout's), int32 (n, 2), without building the layout's full pair table."""
    cp_ = layout.crystal_pairs()  # (views, radial, 2): small
    c = cp_[rng.integers(0, layout.num_views, n), rng.integers(0, layout.num_radial, n)]
    nr = layout.scanner.num_rings
    mrd = min(layout.max_ring_difference, nr - 1)
    r1 = rng.integers(0, nr, n)
    r2 = np.clip(r1 + rng.integers(-mrd, mrd + 1, n), 0, nr - 1)
    ncr = layout.scanner.crystals_per_ring
    return np.stack([r1 * ncr + c[:, 0], r2 * ncr + c[:, 1]], axis=1).astype(np.int32)


def check_tof_offsets(cp, sz, rng):
    layout, grid, tof = sz.layout, sz.grid, sz.tof_wide
    proj = SinogramProjector(layout, grid, tof=tof, device="gpu")
    n_lors = proj.num_lors
    max_offset = n_lors * tof.num_bins
    img_h = phantom(grid, np)
    y = proj.forward(cp.asarray(img_h))
    # bins in the last planes: their TOF offsets n * num_bins are the largest
    planes = np.arange(layout.num_planes - max(1, layout.num_planes // 20), layout.num_planes)
    flat, s, e = _sample_bins(layout, proj.views, planes, rng, 64 if sz.full else 16)
    offsets = flat.astype(np.int64) * tof.num_bins
    got = y.reshape(n_lors, tof.num_bins)[cp.asarray(flat)].get()
    mult = layout.plane_multiplicity[flat // (len(proj.views) * layout.num_radial)][:, None]
    want = forward_reference(img_h, s, e, grid, tof) * mult
    err_f = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
    # back: a sinogram that is 1 only in the sampled bins
    del y
    v = cp.zeros((n_lors, tof.num_bins), dtype=cp.float32)
    v[cp.asarray(flat)] = 1.0
    got_b = proj.back(v.reshape(proj.out_shape)).get()
    del v
    want_b = back_reference(np.ones((flat.size, tof.num_bins)) * mult, s, e, grid, tof)
    err_b = float(np.abs(got_b - want_b).max() / max(float(np.abs(want_b).max()), 1e-30))
    beyond = int(np.sum(offsets >= 2**31))
    ok = err_f < 1e-3 and err_b < 1e-3 and (beyond > 0 or not sz.full)
    yield (status(ok), f"max offset {max_offset:.3e} (2^31 = 2.147e9); {beyond}/{flat.size} sampled bins beyond 2^31; "
           f"rel. error fwd {err_f:.1e}, back {err_b:.1e}", "", "< 1e-3")


def check_adjointness(cp, sz, rng):
    views = sz.layout.view_subsets(8)[0]
    proj = SinogramProjector(sz.layout, sz.grid, tof=sz.tof, views=views, device="gpu")
    model = SystemModel(proj, resolution=4.0, grid=sz.grid)
    e1 = model.adjointness_error(rng=1, xp=cp)
    ids = random_events(sz.layout, min(sz.events, 2_000_000), rng)
    lm = ListmodeProjector(sz.scanner, sz.grid, ids, tof_bins=rng.integers(0, sz.tof.num_bins, ids.shape[0]),
                           tof=sz.tof, device="gpu")
    e2 = lm.adjointness_error(rng=2, xp=cp)
    yield (status(e1 < 1e-4), f"TOF sinogram subset + PSF: {e1:.1e}", "", "< 1e-4")
    yield (status(e2 < 1e-4), f"TOF listmode, {ids.shape[0]} events: {e2:.1e}", "", "< 1e-4")


def check_nontof_projection(run, cp, sz):
    base = run.pool_reset()
    proj = SinogramProjector(sz.layout, sz.grid, device="gpu")
    img = phantom(sz.grid, cp)
    y = proj.forward(img)
    tf = run.timed(lambda: proj.forward(img), 3)
    tb = run.timed(lambda: proj.back(y), 3)
    peak = run.pool_peak(base)
    n = proj.num_lors
    yield (status(True, sz.full and tf > 0.25), f"forward, {n:.3e} LORs, {n / tf:.3e} LOR/s, peak {peak / MIB:.0f} MiB",
           f"{tf:.3f} s", "< 0.25 s")
    yield (status(True, sz.full and tb > 0.5), f"back, {n / tb:.3e} LOR/s", f"{tb:.3f} s", "< 0.5 s")


def check_osem(run, cp, sz):
    layout, grid, tof = sz.layout, sz.grid, sz.tof
    model_mem = sinogram_osem_memory(layout, grid, tof, 8, multiplicative=True, additive=True)
    base = run.pool_reset()
    rng = np.random.default_rng(3)
    m = rng.uniform(0.5, 1.0, layout.shape).astype(np.float32)
    rec = SinogramOSEM(layout, grid, tof=tof, multiplicative=m, num_subsets=8, device="gpu")
    truth = phantom(grid, cp)
    prompts = cp.empty(rec.data_shape, dtype=cp.float32)
    for k, model in enumerate(rec.models):  # noiseless prompts, made subset by subset on the device
        prompts[:, k :: rec.num_subsets] = model.expected_counts(truth)
    rec.set_additive(cp.full(rec.data_shape, 0.1, dtype=cp.float32))
    del truth
    t0 = time.perf_counter()
    rec.sensitivities()
    run.sync()
    t_sens = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = rec.reconstruct(prompts, num_iterations=1, progress=False)
    run.sync()
    t_it = time.perf_counter() - t0
    peak = run.pool_peak(base)
    d = int(np.prod(rec.data_shape)) * 4
    ok = bool(cp.isfinite(x).all()) and float(x.max()) > 0
    yield (status(ok), f"sensitivity (8 subsets, TOF from non-TOF m), data {d / 2**30:.2f} GiB", f"{t_sens:.2f} s", "")
    yield (status(ok), f"one iteration, {tof.num_bins} TOF bins, 8 subsets", f"{t_it:.2f} s", "")
    # the prompts live on the device here (the model counts host prompts' subset copies as the same D)
    yield (status(peak <= 1.05 * model_mem["total"]), f"peak {peak / MIB:.0f} MiB; model {model_mem['total'] / MIB:.0f} MiB",
           "", "peak <= model")


def check_listmode_osem(run, cp, sz, rng):
    layout, grid, tof = sz.layout, sz.grid, sz.tof
    n = sz.events
    ids = random_events(layout, n, rng)
    tb = rng.integers(0, tof.num_bins, n).astype(np.int32)
    sens = cp.ones(grid.shape, dtype=cp.float32)
    rec = ListmodeOSEM(sz.scanner, grid, ids, sensitivity=sens, tof_bins=tb, tof=tof, num_subsets=1, device="gpu")
    del ids, tb
    t = run.timed(lambda: rec.reconstruct(1, progress=False), 1)
    yield (status(True, sz.full and t > 2.0), f"one TOF iteration, {n:.2e} events, {n / t:.3e} events/s", f"{t:.2f} s", "< 2 s")


def check_bfsrtm(run, cp, sz, rng):
    from petbind.quant.models import parametric_maps

    q = _load_quant_benchmark()
    ref = q.reference_tac()
    img, _, _ = q.phantom(sz.maps_shape, ref, rng, 6.0)
    d_img = cp.asarray(img)
    kw = dict(weights="duration", progress=False)
    t = run.timed(lambda: parametric_maps("bfsrtm", q.START_S, q.END_S, ref, d_img, **kw), 1)
    gpu = parametric_maps("bfsrtm", q.START_S, q.END_S, ref, d_img, **kw)
    flat = img.reshape(-1, img.shape[-1])
    sample = rng.choice(flat.shape[0], size=min(2000, flat.shape[0]), replace=False)
    cpu = parametric_maps("bfsrtm", q.START_S, q.END_S, ref, flat[sample][:, None, None, :], **kw)
    diff = float(np.nanmax(np.abs(cpu.maps["bp_nd"].ravel() - gpu.maps["bp_nd"].reshape(-1)[cp.asarray(sample)].get())))
    n = int(np.prod(sz.maps_shape))
    yield (status(diff < 1e-6, sz.full and t > 0.5), f"{sz.maps_shape} x {img.shape[-1]} frames, {n / t:.3e} voxels/s; "
           f"max |GPU - CPU| BP_ND {diff:.1e} on {sample.size} voxels", f"{t:.3f} s", "< 0.5 s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("full", "tiny"), default="full")
    ap.add_argument("--skip", nargs="*", default=[], help="names of checks to leave out (e.g. 'listmode OSEM')")
    ap.add_argument("--pytest-summary", default=None,
                    help="result line of a `pytest -m gpu` run to show as the first row ('rc=N; ...')")
    args = ap.parse_args(argv)
    ok, reason = gpu_status()
    if not ok:
        print(f"gpu_acceptance: {reason}", file=sys.stderr)
        return 2
    import cupy as cp

    sz = Sizes(args.size)
    rng = np.random.default_rng(2024)
    run = Runner(cp)
    if args.pytest_summary is not None:
        passed = args.pytest_summary.startswith("rc=0;")
        run.failed = not passed
        run.rows.append(("pytest -m gpu", status(passed), args.pytest_summary[:100], "", "all pass"))
    checks = [
        ("environment", lambda: check_environment(cp)),
        ("kernel build", lambda: check_kernel_build(cp)),
        ("TOF offsets > 2^31", lambda: check_tof_offsets(cp, sz, rng)),
        ("adjointness", lambda: check_adjointness(cp, sz, rng)),
        ("non-TOF fwd/back", lambda: check_nontof_projection(run, cp, sz)),
        ("OSEM iteration", lambda: check_osem(run, cp, sz)),
        ("listmode OSEM", lambda: check_listmode_osem(run, cp, sz, rng)),
        ("BF-SRTM maps", lambda: check_bfsrtm(run, cp, sz, rng)),
    ]
    for name, fn in checks:
        if name in args.skip:
            continue
        run.check(name, fn)
        run.pool_reset()
    print(f"\npetbind GPU acceptance ({args.size})")
    print(f"| {'check':20} | {'status':6} | {'result':100} | {'time':9} | {'target':14} |")
    print(f"|{'-' * 22}|{'-' * 8}|{'-' * 102}|{'-' * 11}|{'-' * 16}|")
    for name, st, result, secs, target in run.rows:
        print(f"| {name:20} | {st:6} | {result:100} | {secs:9} | {target:14} |", flush=True)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
