"""Simulate a baseline / post-dose [11C]AZ10419369 study (BIDS-like tree).

Example (CI/demo size, about a minute on 2 CPU cores)::

    PYTHONPATH=. python scripts/simulate_study.py /tmp/study --subjects 4 --images noisy

Writes listmode (``_pet-listmode.h5``), PET-BIDS sidecars, atlases,
``participants.tsv`` and ``ground_truth.tsv``; see ``recon/study.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petbind.sim.study import StudyConfig, simulate_study  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--subjects", type=int, default=4, help="number of subjects (alternately drug / placebo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=("srtm", "2tcm"), default="srtm", help="kinetic model generating the TACs")
    p.add_argument("--images", choices=("true", "noisy"), default=None, help="also write 4-D images (_pet.nii.gz)")
    p.add_argument("--no-listmode", action="store_true", help="skip listmode simulation (images only)")
    p.add_argument("--petsird", action="store_true", help="also write each listmode file as PETSIRD")
    p.add_argument("--sensitivity", type=float, default=StudyConfig.sensitivity_cps_per_kbq,
                   help="count level: cps/kBq of a centred point source (default %(default)s)")
    p.add_argument("--voxel-mm", type=float, default=4.0, help="simulation grid voxel size (mm)")
    p.add_argument("--drug-effect", type=float, default=-0.20,
                   help="fractional BP_ND change in 5-HT1B-rich regions for the drug group (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log per-frame counts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.no_listmode and args.images is None:
        p.error("--no-listmode needs --images, or nothing would be simulated")
    cfg = StudyConfig(
        num_subjects=args.subjects, seed=args.seed, model=args.model, write_images=args.images,
        write_listmode=not args.no_listmode, write_petsird=args.petsird, sensitivity_cps_per_kbq=args.sensitivity, voxel_size_mm=args.voxel_mm,
        quiet=args.quiet, device=args.device,
    )
    cfg.drug_effect = {k: args.drug_effect for k in cfg.drug_effect}
    t0 = time.time()
    sessions = simulate_study(args.out, cfg)
    print(f"simulated {len(sessions)} sessions of {args.subjects} subjects into {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
