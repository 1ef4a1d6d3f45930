"""``petbind-simulate``: write a simulated [11C]AZ10419369 baseline / post-dose study.

Usage::

    petbind-simulate OUT [--subjects N] [--seed S] [--kinetics {srtm,2tcm}]
                         [--effect REGION=FRACTION]... [--scanner NAME] [--quiet]
                         [--frames SPEC] [--sensitivity-cps-per-kbq F] [--voxel-mm F]
                         [--listmode] [--petsird] [--images {true,noisy}] [--no-noise]
                         [--device {auto,cpu,gpu}] [-v]

Writes the raw study (one multi-frame sinogram file per session, PET-BIDS
sidecars, atlases, ``participants.tsv``) and ``OUT/ground_truth.tsv``
(``subject``, ``session``, ``group``, ``region``, ``bp_nd``, ``r1``); see
:mod:`petbind.sim.study`.  ``--effect`` sets the drug group's post-dose BP_ND
to baseline x (1 + FRACTION) in REGION (repeatable; given at all, it replaces
the default, the hippocampus +16.7 % of Tiger et al. 2020).  Bad input exits
with status 2 and one line on stderr, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from pathlib import Path

__all__ = ["build_parser", "config_from_args", "main"]

log = logging.getLogger("petbind.simulate")

PROG = "petbind-simulate"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: ...``, exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number; got {text!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"must be > 0; got {text}")
        return v

    return parse


def _effect(text):
    region, sep, value = text.partition("=")
    if not sep or not region.strip():
        raise argparse.ArgumentTypeError(f"expected REGION=FRACTION (e.g. hippocampus=0.167); got {text!r}")
    try:
        frac = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: FRACTION must be a number; got {value!r}") from None
    if not (math.isfinite(frac) and frac > -1):
        raise argparse.ArgumentTypeError(f"{text!r}: FRACTION must be > -1 (BP_ND x (1 + FRACTION) must stay > 0)")
    return region.strip(), frac


def build_parser():
    """The ``petbind-simulate`` argument parser."""
    from petbind.recon.geometry import SCANNER_PRESETS

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                epilog="Defaults and sources of the simulated physiology: see petbind.sim.study.StudyConfig.")
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--subjects", type=_positive(int), default=4,
                   help="number of subjects, alternately drug / placebo (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--kinetics", choices=("srtm", "2tcm"), default="srtm",
                   help="model generating the target TACs (default srtm)")
    p.add_argument("--effect", type=_effect, action="append", metavar="REGION=FRACTION",
                   help="drug group post-dose BP_ND = baseline x (1 + FRACTION) in REGION; repeatable "
                        "(default: hippocampus=0.167, Tiger et al. 2020)")
    p.add_argument("--scanner", choices=list(SCANNER_PRESETS), default="demo-small",
                   help="preset scanner (default demo-small: 96 crystals x 14 rings, fast on a CPU)")
    p.add_argument("--frames", default=None,
                   help="frame durations, e.g. '6x10s,3x20s,6x30s,5x1m,5x2m,8x5m,3x10m' (the default, 90 min)")
    p.add_argument("--sensitivity-cps-per-kbq", type=_positive(float), default=None,
                   help="count level: cps/kBq of a centred point source (default 10)")
    p.add_argument("--voxel-mm", type=_positive(float), default=None,
                   help="simulation and atlas voxel (mm; default: the scanner preset's)")
    p.add_argument("--listmode", action="store_true", help="also write each session as listmode (_pet-listmode.h5)")
    p.add_argument("--petsird", action="store_true", help="also write each session as PETSIRD listmode")
    p.add_argument("--images", choices=("true", "noisy"), default=None, help="also write the 4-D activity images")
    p.add_argument("--no-noise", action="store_true", help="store expected counts instead of Poisson draws")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="projector device (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no summary line")
    p.add_argument("-v", "--verbose", action="store_true", help="log per-session counts and timings")
    return p


def config_from_args(args):
    """:class:`~petbind.sim.study.StudyConfig` from parsed arguments, resolved and validated.

    Raises
    ------
    ValueError
        For settings the parser cannot check alone (unknown region, frames...).
    """
    from petbind.core.frames import Frames
    from petbind.sim.study import StudyConfig

    kw = dict(num_subjects=args.subjects, seed=args.seed, model=args.kinetics, scanner=args.scanner,
              write_listmode=args.listmode, write_petsird=args.petsird, write_images=args.images,
              poisson_noise=not args.no_noise, quiet=args.quiet, device=args.device)
    if args.effect is not None:
        effects = {}
        for region, frac in args.effect:
            if region in effects:
                raise ValueError(f"--effect {region} given twice")
            effects[region] = frac
        kw["drug_effect"] = effects
    if args.frames is not None:
        try:
            kw["frame_durations_s"] = tuple(Frames.from_string(args.frames).duration_s.tolist())
        except ValueError as exc:
            raise ValueError(f"--frames: {exc}") from None
    if args.sensitivity_cps_per_kbq is not None:
        kw["sensitivity_cps_per_kbq"] = args.sensitivity_cps_per_kbq
    if args.voxel_mm is not None:
        kw["voxel_size_mm"] = args.voxel_mm
    try:
        return StudyConfig(**kw).resolved()
    except ValueError as exc:
        msg = str(exc)
        # name the option rather than the config field
        for field, opt in (("drug_effect", "--effect"), ("voxel_size_mm", "--voxel-mm"), ("num_subjects", "--subjects"),
                           ("sensitivity_cps_per_kbq", "--sensitivity-cps-per-kbq"), ("frame_durations_s", "--frames")):
            msg = msg.replace(f"StudyConfig.{field}", opt)
        raise ValueError(msg) from None


def main(argv=None):
    """Run ``petbind-simulate``; return 0, or 2 for bad input (one line on stderr)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("petbind").setLevel(logging.INFO if args.verbose else logging.WARNING)
    out = args.out
    try:
        config = config_from_args(args)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out}: exists and is not a folder")
    except (ValueError, TypeError) as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    from petbind.sim.study import simulate_study

    created = not out.exists()
    t0 = time.time()
    try:
        sessions = simulate_study(out, config)
    except BaseException as exc:
        if created and out.exists():
            shutil.rmtree(out, ignore_errors=True)  # ours, and incomplete: leave nothing behind
        if isinstance(exc, (ValueError, FileNotFoundError, PermissionError)):
            print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        raise
    if not args.quiet:
        print(f"simulated {len(sessions)} sessions of {config.num_subjects} subjects into {out} "
              f"in {time.time() - t0:.0f} s; truth in {out / 'ground_truth.tsv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
