"""Speed of reading Siemens mMR listmode (PETLINK 32-bit) into petbind events.

A synthetic PETLINK stream is written first (random span-1 bin addresses,
80 % prompts, a time tag every 400 words, as in a clinical mMR file), then read
three ways in the same run:

* ``fromfile``: ``numpy.fromfile`` of the whole file (the I/O baseline);
* ``decode``: :meth:`MMRListmode.chunks` (bin address -> petbind detector ids,
  prompt flag, event time);
* ``decode + histogram``: :func:`histogram_listmode` into a span-11 layout
  (maximum ring difference 60, the Siemens sinogram).

Rates are events per second; the ``ratio`` column is relative to ``decode``.
The issue's target is >= 1e7 events/s for ``decode``.

Usage::

    python benchmarks/rawdata.py --events 2e7 --chunk-words 4194304
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

# Run from a checkout without installing: the repository root is importable.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_HEADER = """!INTERFILE:=
!originating system:=2008
%SMS-MI header name space:=PETLINK bin address
name of data file := {name}
data format:=CoincidenceList
number of rings:=64
%LM event and tag words format (bits):=32
%axial compression:=1
%maximum ring difference:=60
%number of projections:=344
%number of views:=252
!END OF INTERFILE:=
"""


def write_synthetic(folder, num_events, seed=0):
    """Write a synthetic PETLINK file and its header; return the header path."""
    rng = np.random.default_rng(seed)
    num_sinograms = 64 + 2 * sum(64 - d for d in range(1, 61))
    num_bins = num_sinograms * 252 * 344
    per_tag = 400
    num_tags = int(np.ceil(num_events / per_tag))
    path = os.path.join(folder, "synthetic.l")
    with open(path, "wb") as f:
        done = 0
        for k in range(0, num_tags, 10_000):
            tags = np.arange(k, min(k + 10_000, num_tags))
            n_ev = min(len(tags) * per_tag, num_events - done)
            ev = rng.integers(0, num_bins, n_ev, dtype=np.uint32)
            ev |= np.where(rng.random(n_ev) < 0.8, np.uint32(0x40000000), np.uint32(0))
            words = np.empty(n_ev + len(tags), dtype="<u4")
            pos = np.arange(len(tags)) * (per_tag + 1)
            is_tag = np.zeros(words.size, bool)
            is_tag[pos[pos < words.size]] = True
            words[is_tag] = np.uint32(0x80000000) | tags[: int(is_tag.sum())].astype(np.uint32)
            words[~is_tag] = ev
            words.tofile(f)
            done += n_ev
    hdr = os.path.join(folder, "synthetic.l.hdr")
    with open(hdr, "w") as f:
        f.write(_HEADER.format(name=os.path.basename(path)))
    return hdr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", default="2e7", help="number of events in the synthetic file")
    p.add_argument("--chunk-words", type=int, default=1 << 22)
    p.add_argument("--folder", default=None)
    args = p.parse_args(argv)
    from petbind.recon.geometry import SinogramLayout
    from petbind.recon.listmode import histogram_listmode
    from petbind.recon.rawdata.mmr import MMRListmode

    folder = args.folder or tempfile.mkdtemp(prefix="petbind-bench-")
    n = int(float(args.events))
    hdr = write_synthetic(folder, n)
    lm = MMRListmode(hdr, chunk_words=args.chunk_words)
    rows = []
    t0 = time.perf_counter()
    np.fromfile(lm.data_path, dtype="<u4")
    rows.append(("fromfile (I/O baseline)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    count = sum(len(c) for c in lm.chunks())
    rows.append(("decode", time.perf_counter() - t0))
    assert count == n, (count, n)
    layout = SinogramLayout(lm.scanner, 345, 60, 11)
    t0 = time.perf_counter()
    h = histogram_listmode(lm, layout, progress=False)
    rows.append(("decode + histogram span 11", time.perf_counter() - t0))
    assert int(h.num_prompts.sum() + h.num_delayeds.sum()) == n
    os.remove(lm.data_path)
    os.remove(hdr)
    print(f"events = {n:,d}, chunk_words = {args.chunk_words:,d}, file = {4 * (n + n // 400) / 2**20:.0f} MiB")
    print(f"{'step':<28} {'seconds':>8} {'events/s':>12} {'ratio to decode':>16}")
    base = rows[1][1]
    for name, sec in rows:
        print(f"{name:<28} {sec:>8.2f} {n / sec:>12.3g} {sec / base:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
