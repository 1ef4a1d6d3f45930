"""Throughput of PETSIRD reading and writing: bulk NumPy codec against the package's per-event objects.

The baseline is the ``petsird`` package's own reader and writer, one Python
object per coincidence event (``bulk=False``, the path petbind used before),
measured in the same run on a smaller file of the same scanner and block
size (its rate does not depend on the file size).

Usage::

    python benchmarks/petsird_io.py                      # 3e6 events, baseline 2e5
    python benchmarks/petsird_io.py --events 1e7 --events-per-block 5000

Prints one table: wall-clock events/s and the ratio to the baseline of the
same operation, and the process CPU time (a machine shared with other work
slows the wall clock, not the CPU time).  The scanner is a ring of 504 x 64 crystals (mMR-sized ids,
3-byte varints) with 13 TOF bins.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# Run from a checkout without installing: the repository root is importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_chunks(num_events, events_per_block, chunk_events, tof_bins, seed=0):
    import numpy as np

    from petbind.recon.geometry import Scanner
    from petbind.recon.rawdata.schema import ListmodeChunk

    scanner = Scanner.cylindrical(328.0, 504, 64, 4.0625, name="bench")
    rng = np.random.default_rng(seed)
    chunks, done = [], 0
    while done < num_events:
        n = min(chunk_events, num_events - done)
        ids = rng.integers(0, scanner.num_detectors, (n, 2), dtype=np.int64).astype(np.int32)
        t = (np.arange(done, done + n) // events_per_block).astype(np.float64)  # ms; one block per ms
        k = rng.integers(0, tof_bins, n).astype(np.int16)
        chunks.append(ListmodeChunk(ids, k, t, rng.random(n) < 0.9, done))
        done += n
    return scanner, chunks


def timed(fn):
    """Wall-clock and process CPU seconds of ``fn()`` (the CPU time is what other load on the machine cannot inflate)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t0, time.process_time() - c0), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=float, default=3e6, help="events in the bulk file")
    parser.add_argument("--baseline-events", type=float, default=2e5, help="events for the per-event baseline")
    parser.add_argument("--events-per-block", type=int, default=1000, help="events per 1 ms time block")
    parser.add_argument("--chunk-events", type=int, default=1_000_000)
    parser.add_argument("--tof-bins", type=int, default=13)
    args = parser.parse_args(argv)

    import logging

    import numpy as np

    from petbind.recon.geometry import TOFParameters
    from petbind.recon.rawdata.petsird_io import PetsirdReader, write_petsird

    logging.basicConfig(level=logging.WARNING)
    n_bulk, n_base = int(args.events), int(args.baseline_events)
    tof = TOFParameters(args.tof_bins, 20.0, 400.0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        big, small = os.path.join(folder, "big.petsird"), os.path.join(folder, "small.petsird")
        scanner, chunks = make_chunks(n_bulk, args.events_per_block, args.chunk_events, args.tof_bins)
        _, small_chunks = make_chunks(n_base, args.events_per_block, args.chunk_events, args.tof_bins, seed=1)

        def write(path, ch, bulk):
            return write_petsird(path, scanner, ch, tof=tof, bulk=bulk)

        def count(it):
            return sum(len(c) for c in it)

        base = {}
        s, n = timed(lambda: write(small, small_chunks, False))
        base["write"] = n / s[0]
        rows.append(("write", "package objects (baseline)", n, s))
        s, n = timed(lambda: write(big, chunks, True))
        rows.append(("write", "bulk", n, s))
        size_mb = os.path.getsize(big) / 2**20

        s, n = timed(lambda: count(PetsirdReader(small, chunk_events=args.chunk_events, bulk=False).events()))
        base["read events"] = n / s[0]
        rows.append(("read events", "package objects (baseline)", n, s))
        s, n = timed(lambda: count(PetsirdReader(big, chunk_events=args.chunk_events, bulk=True).events()))
        rows.append(("read events", "bulk", n, s))

        s, n = timed(lambda: count(PetsirdReader(small, chunk_events=args.chunk_events, bulk=False).chunks()))
        base["read ring chunks"] = n / s[0]
        rows.append(("read ring chunks", "package objects (baseline)", n, s))
        s, n = timed(lambda: count(PetsirdReader(big, chunk_events=args.chunk_events, bulk=True).chunks()))
        rows.append(("read ring chunks", "bulk", n, s))

        # the same file both ways: the bulk reader must return the package's events
        a = list(PetsirdReader(small, bulk=True).events())
        b = list(PetsirdReader(small, bulk=False).events())
        same = all(x.equals(y) for x, y in zip(a, b)) and len(a) == len(b)

    print(f"PETSIRD I/O, ring 504 x 64 crystals, {args.tof_bins} TOF bins, {args.events_per_block} events per 1 ms block, "
          f"{os.cpu_count()} CPUs, numpy {np.__version__}; bulk file {size_mb:.0f} MiB ({size_mb * 2**20 / n_bulk:.1f} B/event)")
    print(f"| {'operation':<17} | {'path':<27} | {'events':>9} | {'wall s':>7} | {'events/s':>9} | {'x baseline':>10} "
          f"| {'CPU s':>6} | {'events/CPU s':>12} |")
    print(f"|{'-' * 19}|{'-' * 29}|{'-' * 10}:|{'-' * 8}:|{'-' * 10}:|{'-' * 11}:|{'-' * 7}:|{'-' * 13}:|")
    for op, path, n, (wall, cpu) in rows:
        rate = n / wall
        print(f"| {op:<17} | {path:<27} | {n:>9d} | {wall:>7.2f} | {rate:>9.3g} | {rate / base[op]:>10.1f} "
              f"| {cpu:>6.2f} | {n / cpu:>12.3g} |")
    print(f"load average over the last minute at the end: {os.getloadavg()[0]:.1f} (other processes slow the wall-clock rates)")
    print(f"bulk reader output equals the package's: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
