"""Peak memory of writing, reading and histogramming listmode files of growing size.

Each size runs in its own subprocess so that ``ru_maxrss`` (peak resident
memory of that process) measures that size alone.  With streaming, the peak
depends on the chunk size and the sinogram, not on the number of events.

Usage::

    python benchmarks/streaming.py --sizes 1e5,1e6,1e7 --chunk-events 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# Run from a checkout without installing: the repository root is importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _child(num_events, chunk_events, folder):
    import numpy as np

    from petbind.recon.geometry import Scanner, SinogramLayout
    from petbind.recon.rawdata.hdf5 import ListmodeReader, ListmodeWriter
    from petbind.recon.listmode import histogram_listmode

    rng = np.random.default_rng(0)
    scanner = Scanner.demo()
    path = os.path.join(folder, f"lm_{num_events}.h5")
    duration_ms = 3_600_000.0
    t0 = time.perf_counter()
    with ListmodeWriter(path, scanner, chunk_events=chunk_events) as w:
        done = 0
        while done < num_events:
            n = min(chunk_events, num_events - done)
            lo = duration_ms * done / num_events
            hi = duration_ms * (done + n) / num_events
            ids = rng.integers(0, scanner.num_detectors, (n, 2), dtype=np.int32)
            w.append(ids, None, np.sort(rng.uniform(lo, hi, n)), rng.random(n) < 0.9)
            done += n
    t_write = time.perf_counter() - t0
    rss_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    layout = SinogramLayout(scanner, 101, max_ring_difference=5)
    t0 = time.perf_counter()
    h = histogram_listmode(ListmodeReader(path, chunk_events=chunk_events), layout, "6x10m", progress=False)
    t_hist = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = int(h.num_prompts.sum() + h.num_delayeds.sum())
    size = os.path.getsize(path)
    os.remove(path)
    return dict(events=num_events, file_mb=size / 2**20, write_s=t_write, hist_s=t_hist,
                peak_write_mb=rss_write / 1024, peak_total_mb=rss / 1024, histogrammed=total)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated event counts")
    p.add_argument("--chunk-events", type=int, default=1_000_000)
    p.add_argument("--folder", default=None, help="where to put the temporary files")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.chunk_events, args.folder)))
        return 0
    folder = args.folder or tempfile.mkdtemp(prefix="petbind-bench-")
    rows = []
    for size in [int(float(s)) for s in args.sizes.split(",")]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(size), "--chunk-events", str(args.chunk_events), "--folder", folder],
            check=True, capture_output=True, text=True, env=dict(os.environ),
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"chunk_events = {args.chunk_events}")
    print(f"{'events':>12} {'file MiB':>9} {'write s':>8} {'hist s':>7} {'peak RSS write MiB':>19} {'peak RSS total MiB':>19} {'histogrammed':>13}")
    for r in rows:
        print(f"{r['events']:>12,d} {r['file_mb']:>9.1f} {r['write_s']:>8.2f} {r['hist_s']:>7.2f} "
              f"{r['peak_write_mb']:>19.1f} {r['peak_total_mb']:>19.1f} {r['histogrammed']:>13,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
