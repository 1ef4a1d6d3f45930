"""Write the digital brain phantom shipped in ``petbind/sim/data/``.

Writes, each through a temporary file renamed when complete:

* ``brain_phantom_labels.nii.gz``  uint8 label image, 2 mm voxels (RAS+)
* ``brain_phantom_mumap.nii.gz``   linear attenuation coefficient at 511 keV (1/mm)
* ``brain_phantom_labels.tsv``     BIDS-style look-up table (``index``, ``name``)

Run from the repository root::

    python scripts/make_phantom.py [--out petbind/sim/data]

The anatomy is described in :mod:`petbind.sim.phantom_data`.
"""

import argparse
import logging
from pathlib import Path

from petbind.sim.phantom_data import write_phantom

LOG = logging.getLogger("make_phantom")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "petbind" / "sim" / "data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, ml in write_phantom(args.out).items():
        LOG.info("%-24s %8.1f mL", name, ml)
    LOG.info("wrote the phantom to %s", args.out)


if __name__ == "__main__":
    main()
