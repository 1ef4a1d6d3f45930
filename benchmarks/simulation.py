"""Benchmark of the acquisition simulator (petbind.sim.acquisition): cost against count level.

One session of the default study (the ``demo-small`` preset, its 6 mm grid
and layout, the 17 regions of the brain phantom as basis images, 2TCM TACs,
the 36-frame 90-min framing) is simulated at several count levels
(``--sensitivities``, cps/kBq).  For each it prints the prompts drawn, the CPU
and wall time of drawing and writing the multi-frame sinogram file, and the
ratio of that time to the lowest count level measured in the same run: the
sinogram-domain simulation should stay flat (one Poisson draw per bin and
frame whatever the counts).  The cost of projecting the basis images (once
per study: every session of a study shares them) is printed beside it.  With ``--listmode``
the expansion of the counts into listmode events (which does grow with the
counts) is timed too, as the baseline that the sinogram path avoids.

Run::

    PYTHONPATH=. python benchmarks/simulation.py [--sensitivities 1,10,100] [--listmode] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from petbind.recon.geometry import SinogramLayout
from petbind.sim.acquisition import AcquisitionSimulator, BasisActivity
from petbind.sim.kinetics import FengInput, frame_times_s, simulate_regional_tacs
from petbind.sim.phantom import BrainPhantom, load_brain_phantom, resample_phantom
from petbind.sim.study import StudyConfig, _study_grid


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sensitivities", default="1,10,100", help="count levels, cps/kBq (default 1,10,100)")
    p.add_argument("--listmode", action="store_true", help="also time the listmode expansion")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    args = p.parse_args(argv)
    levels = [float(v) for v in args.sensitivities.split(",")]

    cfg = StudyConfig(model="2tcm").resolved()
    ph = load_brain_phantom()
    grid = _study_grid(cfg)
    shifted = BrainPhantom(ph.labels, ph.label_table, ph.mu_map_per_mm, ph.affine.copy())
    shifted.affine[:3, 3] += np.asarray(cfg.head_offset_mm)
    on_grid = resample_phantom(grid, shifted)
    names = list(cfg.regions)
    basis = np.stack([on_grid.fractions[on_grid.index_of(n)] for n in names]).astype(np.float32)
    fs, fe = frame_times_s(cfg.frame_durations_s)
    tacs = simulate_regional_tacs(cfg.regions, fs, fe, model="2tcm", plasma=FengInput())
    act = BasisActivity(basis, np.stack([tacs.tacs[n] for n in names]))
    layout = SinogramLayout(cfg.scanner, cfg.num_radial, cfg.max_ring_difference, cfg.span)
    print(f"scanner {cfg.scanner.name}: {layout.num_bins} bins x {fs.size} frames, grid {grid.shape} "
          f"({cfg.voxel_size_mm:g} mm), {len(names)} basis images, PSF {cfg.scanner.resolution_fwhm_mm} mm")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, s in enumerate(levels):
            sim = AcquisitionSimulator(layout, grid, on_grid.mu_map_per_mm, sensitivity_cps_per_kbq=s,
                                       scatter_fraction=cfg.scatter_fraction, randoms_fraction=cfg.randoms_fraction,
                                       device=args.device, quiet=True)
            wall_p, cpu_p, acq = _timed(lambda: sim.acquire(act, fs, fe, seed=0))
            path = Path(tmp) / f"s{i}.h5"
            wall, cpu, _ = _timed(lambda: acq.write_h5(path))
            prompts = sum(st.prompts for st in acq.frame_stats)
            row = {"sens": s, "prompts": prompts, "wall": wall, "cpu": cpu, "mb": path.stat().st_size / 1e6}
            if args.listmode:
                from petbind.recon.rawdata.sinograms import SinogramReader

                r = SinogramReader(path)
                lm = Path(tmp) / f"l{i}.h5"
                wall_l, cpu_l, n = _timed(lambda: acq.write_listmode_h5(
                    lm, lambda k: (r.prompts(k).astype(np.int64), r.delayeds(k).astype(np.int64))))
                row.update(lm_wall=wall_l, lm_cpu=cpu_l, lm_events=n)
            rows.append(row)
            base = rows[0]
            line = (f"{s:>8g} cps/kBq  {prompts:>12.4g} prompts  projections: cpu {cpu_p:5.2f} s  "
                    f"draw + write: wall {wall:6.2f} s  cpu {cpu:6.2f} s  "
                    f"x{cpu / base['cpu']:5.2f} (cpu vs {base['sens']:g} cps/kBq)  file {row['mb']:.1f} MB")
            if args.listmode:
                line += (f"  | listmode: {row['lm_events']:.3g} events, wall {row['lm_wall']:6.1f} s  "
                         f"x{row['lm_cpu'] / base['lm_cpu']:6.1f}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
