"""``petbind-study``: a whole study from raw data to group statistics and report.html.

Usage::

    petbind-study RAW --out DERIV [--pvc {none,gtm,rbv}] [--model M] [--quiet] ...

Writes, per session, ``DERIV/sub-XX/ses-YY/pet/``:
``sub-XX_ses-YY_rec-osem_pet.nii.gz`` (+ .json, 4-D Bq/mL),
``sub-XX_ses-YY_desc-<pvc>pvc_tacs.tsv`` (+ .json),
``sub-XX_ses-YY_desc-<model>_bpnd.tsv`` (+ .json; columns ``region``, ``model``,
``bp_nd``, ``r1``, ``k2_per_min``, ``k2prime_per_min``, ``status``, ...) and
with ``--maps`` the parametric maps; then ``DERIV/group/*.tsv`` and
``DERIV/report.html``.

Exit status: 0 when every session and the group stage succeeded; 2 for bad
input (one line on stderr naming the file and the field; nothing is written);
1 when some sessions failed (each listed with its file and reason).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from petbind.pipeline.options import DEFAULT_EXCLUDED_REGIONS, DEVICE_CHOICES, PVC_CHOICES, PipelineOptions

__all__ = ["build_parser", "options_from_args", "main"]

PROG = "petbind-study"


def build_parser():
    """The ``petbind-study`` argument parser."""
    from petbind.quant.models import MODELS
    from petbind.recon.corrections import SCATTER_FWHM_MM

    d = PipelineOptions()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("study_dir", help="raw study folder (sub-*/ses-*/pet/*_pet-{listmode,sinograms}.h5, anat atlas)")
    p.add_argument("--out", required=True, help="derivatives folder")
    p.add_argument("--model", default=d.model, choices=MODELS, help=f"kinetic model (default {d.model})")
    p.add_argument("--reference", default=d.reference, help=f"reference region (default {d.reference})")
    p.add_argument("--pvc", default=d.pvc, choices=PVC_CHOICES,
                   help=f"partial-volume correction (default {d.pvc}): regional GTM (Rousset 1998) of every TAC, "
                        "the reference included, with the measured effective resolution; rbv also corrects --maps")
    p.add_argument("--pvc-fwhm-mm", type=float, default=None,
                   help="effective resolution for PVC (FWHM, mm); default: measured by reconstructing point sources "
                        "with the same settings")
    p.add_argument("--iterations", type=int, default=d.iterations, help=f"OSEM iterations (default {d.iterations})")
    p.add_argument("--subsets", type=int, default=d.subsets, help=f"OSEM view subsets (default {d.subsets})")
    p.add_argument("--psf-fwhm-mm", type=float, default=None,
                   help="resolution model FWHM (mm); 0: none. Default: the scanner preset's PSF with --pvc none; none "
                        "with PVC, which recovers regional BP_ND better after OSEM without it "
                        "(benchmarks/fidelity.py)")
    p.add_argument("--device", default=d.device, choices=DEVICE_CHOICES, help="device (default auto)")
    p.add_argument("--frames", default=None, help="frame definition overriding the sidecars (listmode input), "
                                                  "e.g. '6x10s,3x20s,8x5m'")
    p.add_argument("--maps", action="store_true", help="also voxelwise parametric maps and voxelwise group maps")
    p.add_argument("--weights", default=d.weights, choices=("none", "duration", "counts"),
                   help=f"frame weights of the fits (default {d.weights})")
    p.add_argument("--regions", nargs="+", default=None, help="target regions (default: all not excluded)")
    p.add_argument("--exclude-regions", nargs="*", default=list(DEFAULT_EXCLUDED_REGIONS),
                   help="atlas regions not fitted (default: %(default)s)")
    p.add_argument("--groups", nargs="+", default=list(d.groups),
                   help="the groups of participants.tsv, exactly (default: %(default)s)")
    p.add_argument("--sensitivity-cps-per-kbq", type=float, default=None,
                   help="compute the calibration κ from this point-source sensitivity instead of the file's "
                        "calibration_factor")
    p.add_argument("--num-radial", type=int, default=None, help="radial bins of listmode input (default: events)")
    p.add_argument("--max-ring-difference", type=int, default=None, help="listmode input (default: events)")
    p.add_argument("--scatter-fwhm-mm", type=float, default=SCATTER_FWHM_MM,
                   help=f"blur width of the tail-fitted scatter model (mm, default {SCATTER_FWHM_MM:g})")
    p.add_argument("--no-tof", action="store_true", help="sum TOF bins of TOF files")
    p.add_argument("--acq", default=None, help="BIDS acq- label selecting the raw file of each session")
    p.add_argument("--run", default=None, help="BIDS run- index selecting the raw file of each session")
    p.add_argument("--baseline-session", default=d.baseline_session)
    p.add_argument("--post-session", default=d.post_session)
    p.add_argument("--n-permutations", type=int, default=d.n_permutations,
                   help=f"group x time permutations (default {d.n_permutations})")
    p.add_argument("--listmode-osem", default=d.listmode_osem, choices=("auto", "always", "never"),
                   help="listmode input: reconstruct frames from their events (auto: frames with fewer than 0.1 "
                        "prompts per sinogram bin, where it is faster; default auto)")
    p.add_argument("--workers", type=int, default=None, help="start a local Dask cluster of N worker processes")
    p.add_argument("--scheduler", default=None,
                   help="address of a running dask.distributed scheduler to join (e.g. tcp://host:8786)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--force", action="store_true", help="redo every stage even when its outputs are current")
    return p


def options_from_args(args):
    """:class:`PipelineOptions` from parsed arguments."""
    return PipelineOptions(
        model=args.model, reference=args.reference, iterations=args.iterations, subsets=args.subsets,
        psf_fwhm_mm=args.psf_fwhm_mm, pvc=args.pvc, pvc_fwhm_mm=args.pvc_fwhm_mm, device=args.device,
        frames=args.frames, maps=args.maps, quiet=args.quiet, force=args.force,
        sensitivity_cps_per_kbq=args.sensitivity_cps_per_kbq, num_radial=args.num_radial,
        max_ring_difference=args.max_ring_difference, weights=args.weights,
        regions=None if args.regions is None else tuple(args.regions),
        exclude_regions=tuple(args.exclude_regions), groups=tuple(args.groups),
        baseline_session=args.baseline_session, post_session=args.post_session,
        n_permutations=args.n_permutations, tof=not args.no_tof, scatter_fwhm_mm=args.scatter_fwhm_mm,
        acq=args.acq, run=args.run, workers=args.workers, scheduler=args.scheduler, listmode_osem=args.listmode_osem,
    )


def setup_logging(quiet):
    """Log to stderr: INFO normally, WARNING with ``--quiet``."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("petbind").setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv=None):
    """Run ``petbind-study``; return the exit status (0, 1 or 2)."""
    from petbind.pipeline.run import run_pipeline

    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    try:
        result = run_pipeline(args.study_dir, args.out, options_from_args(args))
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as exc:
        msg = " ".join(str(exc).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if result.failures:
        print(f"{PROG}: {len(result.failures)} session(s) failed:", file=sys.stderr)
        for o in result.failures:
            print(f"  {o.subject} {o.session}: {o.file}: {o.error}", file=sys.stderr)
        return 1
    if not args.quiet:
        n_done = sum(1 for o in result.sessions if o.status == "done")
        print(f"{n_done} session(s) processed, {len(result.sessions) - n_done} reused; group results in "
              f"{Path(args.out) / 'group'}; report {result.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
