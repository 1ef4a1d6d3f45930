"""``petbind-quant``: TACs, kinetic model fits, parametric maps and comparisons.

Subcommands
-----------
``tacs``     4-D PET image + sidecar + atlas -> regional TAC table (``_tacs.tsv``),
             optionally partial-volume corrected (``--pvc gtm|rbv --psf-fwhm-mm F``)
``fit``      TAC table -> one row per target region (BP_ND, R1, k2, k2')
``map``      4-D PET image -> voxelwise parametric maps (NIfTI + JSON), optionally
             on the RBV-corrected image (``--pvc rbv --psf-fwhm-mm F``)
``compare``  two sessions (result TSVs or BP_ND maps) -> change tables/maps,
             or ``--study DIR`` -> group statistics tables and figures

Typical chain::

    petbind-quant tacs sub-01_ses-baseline_pet.nii.gz --atlas atlas.nii.gz \\
        --labels atlas.tsv --out sub-01_ses-baseline_tacs.tsv
    petbind-quant fit sub-01_ses-baseline_tacs.tsv --reference cerebellum \\
        --model srtm --out sub-01_ses-baseline_bpnd.tsv
    petbind-quant compare --study study/ --out-dir results/

Bad input, or an output that cannot be written (a folder that is a file, a
full disk), prints one line ``petbind-quant: error: ...`` and exits with 2.
The output files of one command (table, sidecar, figure; every map) appear
together or not at all (:mod:`petbind.quant.outputs`): after an error no
output is new or changed.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np

from petbind.core.decay import C11_HALF_LIFE_S, half_life_s
from petbind.core.frames import check_scan_length
from petbind.quant.models import MODELS, REGISTRY
from petbind.quant.results import FIT_COLUMNS

logger = logging.getLogger("petbind.quant")

MODEL_CHOICES = MODELS
WEIGHT_CHOICES = ("none", "duration", "counts")

DEFAULT_HALF_LIFE_MIN = C11_HALF_LIFE_S / 60.0




class InputError(ValueError):
    """Bad command-line input (reported as one line, exit code 2)."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a message is logged.

    ``main`` may run many times in one process (the study pipeline, tests)
    with ``sys.stderr`` swapped in between; a handler that kept the stream
    of its first run would write to a closed one.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logger.setLevel(level)
    if not any(getattr(h, "_petbind_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._petbind_cli = True
        logger.addHandler(handler)


def _half_life_from_sidecar(sidecar: dict, source) -> float | None:
    nuc = sidecar.get("TracerRadionuclide")
    if nuc is None:
        return None
    try:
        return half_life_s(nuc, f"{source}: field 'TracerRadionuclide'") / 60.0
    except ValueError as exc:
        raise InputError(f"{exc}; or pass --half-life-min") from None


def _resolve_half_life(arg_value, sidecar: dict | None, source) -> float:
    if arg_value is not None:
        if not (arg_value > 0 and math.isfinite(arg_value)):
            raise InputError(f"--half-life-min must be a positive number of minutes, got {arg_value}")
        return float(arg_value)
    if sidecar:
        hl = _half_life_from_sidecar(sidecar, source)
        if hl is not None:
            logger.info("half-life %.4g min from %s TracerRadionuclide", hl, source)
            return hl
    logger.info("half-life %.5g min (11C default)", DEFAULT_HALF_LIFE_MIN)
    return DEFAULT_HALF_LIFE_MIN


def _check_model_options(args) -> None:
    if args.tstar_min is not None and not (args.tstar_min >= 0 and math.isfinite(args.tstar_min)):
        raise InputError(f"--tstar-min must be >= 0 minutes, got {args.tstar_min}")
    if args.k2prime_per_min is not None and not (args.k2prime_per_min > 0 and math.isfinite(args.k2prime_per_min)):
        raise InputError(f"--k2prime-per-min must be > 0 per minute, got {args.k2prime_per_min}")


def _to_host(a) -> np.ndarray:
    """NumPy copy of a NumPy or CuPy array (maps come back on the device they were fitted on)."""
    return a.get() if hasattr(a, "get") and type(a).__module__.split(".")[0] == "cupy" else np.asarray(a)


def _read_optional_sidecar(path: Path) -> dict | None:
    from petbind.core.files import read_json, sidecar_path_for

    side = sidecar_path_for(path)
    return read_json(side) if side.exists() else None


def _pvc_psf(args, affine):
    """The PSF for ``--pvc`` (``None`` for ``--pvc none``), after checking the options agree."""
    from petbind.quant.pvc import GaussianPSF

    if args.pvc == "none":
        if args.psf_fwhm_mm is not None:
            raise InputError("--psf-fwhm-mm is only used with --pvc gtm or rbv (got --pvc none)")
        return None
    if args.psf_fwhm_mm is None:
        raise InputError(f"--pvc {args.pvc} needs --psf-fwhm-mm F (or three values x y z), the image's "
                         "effective resolution FWHM in mm")
    if len(args.psf_fwhm_mm) not in (1, 3) or not all(math.isfinite(f) and f >= 0 for f in args.psf_fwhm_mm):
        raise InputError(f"--psf-fwhm-mm expects one or three finite numbers >= 0 (mm), got {args.psf_fwhm_mm}")
    return GaussianPSF.from_affine(args.psf_fwhm_mm, affine)


def _pvc_sidecar(args, psf, uncorrected) -> dict:
    return {"Method": args.pvc, "Reference": {"gtm": "Rousset et al. 1998 J Nucl Med 39:904",
                                              "rbv": "Thomas et al. 2011 Eur J Nucl Med Mol Imaging 38:1104"}[args.pvc],
            "FWHM_mm": list(psf.fwhm_mm), "VoxelSize_mm": list(psf.voxel_size_mm),
            "Background": "unlabelled voxels modelled as one region", "UncorrectedRegions": list(uncorrected)}


def _emit(args, paths) -> None:
    if not args.quiet:
        for p in paths:
            print(p)


# --------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------
def cmd_tacs(args) -> list[Path]:
    from petbind.core.files import sidecar_path_for
    from petbind.quant.io import load_atlas, load_pet
    from petbind.quant.outputs import OutputSet
    from petbind.quant.results import tacs_sidecar, write_tacs
    from petbind.quant.tacs import tacs_from_image

    with OutputSet() as outs:
        for path in (args.out, sidecar_path_for(args.out)):
            outs.stage(path)  # a bad output path fails before any work
        pet = load_pet(args.image, args.json)
        atlas = load_atlas(args.atlas, args.labels)
        psf = _pvc_psf(args, pet.affine)
        if psf is None:
            if args.pvc_uncorrected:
                raise InputError("--pvc-uncorrected needs --pvc gtm or rbv")
            table = tacs_from_image(pet, atlas, args.regions, progress=not args.quiet)
        else:
            from petbind.quant.pvc import pvc_tacs

            table = pvc_tacs(pet, atlas, psf, method=args.pvc, regions=args.regions,
                             uncorrected=args.pvc_uncorrected or (), progress=not args.quiet)
        side = tacs_sidecar(table, atlas, [args.image, args.atlas, args.labels], pet.sidecar,
                            None if psf is None else _pvc_sidecar(args, psf, args.pvc_uncorrected or ()))
        out = write_tacs(args.out, table, side, outputs=outs)
    logger.info("%d regions x %d frames -> %s", len(table.region_names), table.n_frames, out)
    return [out]


def cmd_fit(args) -> list[Path]:
    from petbind.core.files import sidecar_path_for
    from petbind.quant.io import read_tacs_tsv
    from petbind.quant.outputs import OutputSet
    from petbind.quant.results import write_fit_tsv
    from petbind.quant.tacs import split_reference

    _check_model_options(args)
    with OutputSet() as outs:
        for path in (args.out, sidecar_path_for(args.out), args.figure):
            if path:
                outs.stage(path)  # a bad output path fails before any work
        table = read_tacs_tsv(args.tacs)
        ref, names, tac = split_reference(table, args.reference, args.regions)
        half_life = _resolve_half_life(args.half_life_min, _read_optional_sidecar(Path(args.tacs)), args.tacs)
        check_scan_length(table.frame_end_s[-1], half_life * 60.0, f"{args.tacs}: column 'frame_end'")
        from petbind.quant.models import fit_model

        res = fit_model(args.model, table.frame_start_s, table.frame_end_s, ref, tac, weights=args.weights,
                        tstar_min=args.tstar_min, k2prime_per_min=args.k2prime_per_min, half_life_min=half_life)
        n = len(names)
        written = [write_fit_tsv(args.out, res, names, args.reference, {
            "Description": f"{res.model} fit of {args.tacs}",
            "Sources": [str(args.tacs)],
            "Weights": args.weights,
            "TStarMin": args.tstar_min,
            "K2PrimePerMin": args.k2prime_per_min,
            "HalfLifeMin": half_life,
        }, outputs=outs)]
        if args.figure:
            from petbind.quant.figures import plot_tac_fits

            fitted = np.asarray(res.fitted, dtype=float).reshape(table.n_frames, n)
            written.append(outs.write(args.figure, plot_tac_fits, table.frame_start_s, table.frame_end_s, ref, tac,
                                      fitted, names, model=res.model, reference_name=args.reference,
                                      bp_nd=np.asarray(res.parameters["bp_nd"], float).reshape(-1)))
    n_bad = int(np.sum(np.asarray(res.status).reshape(-1) != 0))
    if n_bad:
        logger.warning("%s: %d of %d region fit(s) with non-zero status", args.out, n_bad, n)
    return written


def cmd_map(args) -> list[Path]:
    from petbind.quant.io import check_same_grid, load_atlas, load_pet
    from petbind.quant.outputs import OutputSet
    from petbind.quant.results import map_paths, write_parametric_maps
    from petbind.quant.tacs import tacs_from_image

    _check_model_options(args)
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise InputError(f"--threshold must be a finite number (Bq/mL), got {args.threshold}")
    prefix = str(args.out_prefix)
    with OutputSet() as outs:
        for path in map_paths(prefix) + ([args.figure] if args.figure else []):
            outs.stage(path)  # a bad output path fails before any work
        pet = load_pet(args.image, args.json)
        atlas = load_atlas(args.atlas, args.labels)
        check_same_grid(pet.data.shape, pet.affine, pet.path, atlas.labels.shape, atlas.affine, atlas.path)
        psf = _pvc_psf(args, pet.affine)
        if psf is None and args.pvc_uncorrected_reference:
            raise InputError("--pvc-uncorrected-reference needs --pvc rbv")
        ref = tacs_from_image(pet, atlas, [args.reference]).column(args.reference)
        if args.no_atlas_mask:
            if args.mask_regions:
                raise InputError("--mask-regions and --no-atlas-mask exclude each other")
            mask = None
        else:
            mask = atlas.mask(args.mask_regions)
            if not mask.any():
                raise InputError(f"{args.atlas}: mask from atlas is empty")
        half_life = _resolve_half_life(args.half_life_min, pet.sidecar, args.json or args.image)
        check_scan_length(pet.frame_end_s[-1], half_life * 60.0,
                          f"{args.json or args.image}: field 'FrameTimesStart'/'FrameDuration'")
        xp = None
        if args.device == "gpu":
            import importlib.util

            if importlib.util.find_spec("cupy") is None:
                raise InputError("--device gpu needs CuPy (pip install 'petbind[gpu]' or cupy-cuda12x); "
                                 "use --device cpu")
            xp = "cupy"
        data = pet.data
        if psf is not None:
            from petbind.quant.pvc import gtm_matrix, rbv_correct, regional_means

            if xp == "cupy":
                import cupy

                data = cupy.asarray(data)
            gtm = gtm_matrix(atlas.labels, atlas.names, psf, progress=not args.quiet)
            data = rbv_correct(data, atlas.labels, gtm, progress=not args.quiet)
            if not args.pvc_uncorrected_reference:
                # The reference TAC gets the same correction as the voxels it is compared with.
                ref = _to_host(regional_means(data, atlas.labels, [atlas.index_of(args.reference)])[0][0])
        from petbind.quant.models import parametric_maps

        pm = parametric_maps(args.model, pet.frame_start_s, pet.frame_end_s, ref, data, mask=mask,
                             threshold=args.threshold, weights=args.weights, tstar_min=args.tstar_min,
                             k2prime_per_min=args.k2prime_per_min, half_life_min=half_life, xp=xp,
                             progress=not args.quiet)
        side = {
            "Sources": [str(args.image), str(args.atlas)],
            "Model": args.model,
            "ReferenceRegion": args.reference,
            "Weights": args.weights,
            "TStarMin": args.tstar_min,
            "K2PrimePerMin": args.k2prime_per_min,
            "HalfLifeMin": half_life,
            "Mask": "none" if mask is None else ("atlas regions " + str(args.mask_regions) if args.mask_regions
                                                 else "all labelled atlas voxels"),
            "Threshold": args.threshold,
        }
        if psf is not None:
            side["PartialVolumeCorrection"] = _pvc_sidecar(
                args, psf, [args.reference] if args.pvc_uncorrected_reference else [])
        written = write_parametric_maps(prefix, pm, pet.affine, side, model=args.model, outputs=outs)
        if args.figure and "bp_nd" in pm.maps:
            from petbind.quant.figures import plot_map_montage

            written.append(outs.write(args.figure, plot_map_montage, _to_host(pm.maps["bp_nd"]).astype(float),
                                      anatomy=pet.data.mean(axis=3), title=f"{args.model.upper()} BP$_{{ND}}$"))
    status = _to_host(pm.status)
    masked_codes = [int(k) for k, v in (pm.status_names or {}).items() if str(v).startswith("masked")]
    n_bad = int(np.sum((status != 0) & ~np.isin(status, masked_codes)))
    if n_bad:
        logger.warning("%d fitted voxel(s) with non-zero status (see %s_status.nii.gz)", n_bad, prefix)
    return written


def _kind(path: str) -> str:
    if path.endswith(".tsv"):
        return "tsv"
    if path.endswith(".nii") or path.endswith(".nii.gz"):
        return "nifti"
    raise InputError(f"{path}: expected a fit result .tsv or a BP_ND map .nii/.nii.gz")


def cmd_compare(args) -> list[Path]:
    from petbind.quant import compare

    if args.study:
        if args.baseline or args.post:
            raise InputError("compare: give either --study DIR or --baseline and --post, not both")
        if args.out_dir is None:
            raise InputError("compare --study needs --out-dir")
        if args.n_permutations < 1:
            raise InputError(f"--n-permutations must be >= 1, got {args.n_permutations}")
        out = compare.run_study(args.study, args.out_dir, args.baseline_session, args.post_session,
                                args.group_column, args.n_permutations, args.seed, voxelwise=args.voxelwise,
                                figures=not args.no_figures, progress=not args.quiet,
                                result_pattern=args.result_pattern, groups=args.groups)
        return list(out.values())
    if not (args.baseline and args.post):
        raise InputError("compare: give --baseline and --post (two sessions), or --study DIR")
    if args.out_prefix is None:
        raise InputError("compare --baseline/--post needs --out-prefix")
    kb, kp = _kind(args.baseline), _kind(args.post)
    if kb != kp:
        raise InputError(f"{args.post}: is a {kp} file but {args.baseline} is a {kb} file; compare like with like")
    from petbind.core.files import sidecar_path_for
    from petbind.quant.outputs import OutputSet

    prefix = str(args.out_prefix)
    with OutputSet() as outs:
        if kb == "tsv":
            outs.stage(prefix + "_change.tsv")
            rows = compare.regional_change(compare.read_bpnd_tsv(args.baseline), compare.read_bpnd_tsv(args.post),
                                           args.baseline, args.post)
            return [outs.write(prefix + "_change.tsv", compare.write_regional_change, rows)]
        figure = None if args.no_figures else prefix + "_delta-bpnd.png"
        for path in (prefix + "_delta-bpnd.nii.gz", prefix + "_pctchange-bpnd.nii.gz", figure):
            if path:
                outs.stage(path)
                outs.stage(sidecar_path_for(path))
        res = compare.change_maps(args.baseline, args.post, prefix, outputs=outs)
        written = [res["delta"], res["percent"]]
        if figure:
            from petbind.quant.figures import plot_change_montage

            written.append(outs.write(figure, plot_change_montage, res["delta_array"],
                                      title="BP$_{ND}$ change (post - baseline)"))
    return written


# --------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------
def _common(suppress: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else False
    p.add_argument("--quiet", action="store_true", default=default,
                   help="no progress bars, no informational messages, no list of written files")
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug messages")
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=MODEL_CHOICES,
                   help="kinetic model: " + "; ".join(f"{name} = {spec.description}" for name, spec in REGISTRY.items()))
    p.add_argument("--weights", default="none", choices=WEIGHT_CHOICES,
                   help="frame weights: none, frame duration, or counts (Mazoyer 1986: w = duration x decay factor / decay-corrected reference activity, i.e. 1/variance of Poisson counts)")
    p.add_argument("--tstar-min", type=float, default=None,
                   help="start of the linear part (min) for mrtm/mrtm2/logan")
    p.add_argument("--k2prime-per-min", type=float, default=None,
                   help="fixed reference efflux k2' (1/min) for srtm2/mrtm2/logan")
    p.add_argument("--half-life-min", type=float, default=None,
                   help=f"radionuclide half-life (min) for counts weights; default from the sidecar's "
                        f"TracerRadionuclide, else {DEFAULT_HALF_LIFE_MIN} (11C)")


def _pvc_options(p: argparse.ArgumentParser, choices) -> None:
    p.add_argument("--pvc", default="none", choices=choices,
                   help="partial-volume correction: gtm = regional geometric transfer matrix (Rousset 1998), "
                        "rbv = region-based voxelwise (Thomas 2011); unlabelled voxels are one more region. "
                        "Default none")
    p.add_argument("--psf-fwhm-mm", type=float, nargs="+", default=None, metavar="F",
                   help="effective image resolution for --pvc: Gaussian FWHM in mm, one value or three (x y z)")


def build_parser() -> argparse.ArgumentParser:
    """Return the ``petbind-quant`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="petbind-quant", parents=[_common(False)],
        description="Regional TACs, reference-tissue kinetic models, parametric maps and baseline vs "
                    "post-dose comparison.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{tacs,fit,map,compare}")
    common = _common(True)

    p = sub.add_parser("tacs", parents=[common], help="4-D PET + atlas -> regional TAC table (_tacs.tsv)",
                       description="Mean activity per atlas region and frame; frame timing from the JSON sidecar.")
    p.add_argument("image", help="4-D PET NIfTI (x, y, z, t) in Bq/mL")
    p.add_argument("--json", default=None, help="PET-BIDS sidecar (default: image name with .json)")
    p.add_argument("--atlas", required=True, help="integer label NIfTI on the PET grid")
    p.add_argument("--labels", required=True, help="label TSV with columns index, name")
    p.add_argument("--regions", nargs="+", default=None, help="only these regions (default all)")
    p.add_argument("--out", required=True, help="output TAC TSV (a JSON sidecar is written next to it)")
    _pvc_options(p, ("none", "gtm", "rbv"))
    p.add_argument("--pvc-uncorrected", nargs="+", default=None, metavar="REGION",
                   help="report these regions (e.g. the reference) without PVC; they are still modelled. "
                        "Default: every region, the reference included, is corrected")
    p.set_defaults(func=cmd_tacs)

    p = sub.add_parser("fit", parents=[common], help="fit a kinetic model to a TAC table",
                       description="Fit a reference-tissue model to every target region of a TAC table. "
                                   "Writes one row per target: " + ", ".join(FIT_COLUMNS) + ", status_name, "
                                   "se_* standard errors, bound_hit, reference.")
    p.add_argument("tacs", help="TAC TSV (frame_start, frame_end in s, one column per region in Bq/mL)")
    p.add_argument("--reference", required=True, help="reference region name (a column of the TAC table)")
    _model_options(p)
    p.add_argument("--regions", nargs="+", default=None, help="target regions (default all but the reference)")
    p.add_argument("--out", required=True, help="result TSV; name it *_bpnd.tsv for compare --study")
    p.add_argument("--figure", default=None, help="optional PNG of data and fitted curves")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("map", parents=[common], help="voxelwise parametric maps",
                       description="Voxelwise fit of a 4-D PET image; the reference TAC is the atlas region "
                                   "mean. Writes <prefix>_bpnd.nii.gz, _r1, _k2, _k2prime, _status with JSON "
                                   "sidecars on the PET affine.")
    p.add_argument("image", help="4-D PET NIfTI (x, y, z, t) in Bq/mL")
    p.add_argument("--json", default=None, help="PET-BIDS sidecar (default: image name with .json)")
    p.add_argument("--atlas", required=True, help="integer label NIfTI on the PET grid")
    p.add_argument("--labels", required=True, help="label TSV with columns index, name")
    p.add_argument("--reference", required=True, help="reference region name in the label TSV")
    _model_options(p)
    p.add_argument("--mask-regions", nargs="+", default=None,
                   help="fit only voxels in these atlas regions (default: all labelled voxels)")
    p.add_argument("--no-atlas-mask", action="store_true", help="do not mask with the atlas (use --threshold)")
    p.add_argument("--threshold", type=float, default=None,
                   help="skip voxels whose mean activity is below this (Bq/mL), passed to the model")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="fit on the CPU (NumPy) or on a CUDA GPU (CuPy); default cpu")
    p.add_argument("--out-prefix", required=True, help="output path prefix")
    p.add_argument("--figure", default=None, help="optional PNG montage of BP_ND over the mean PET image")
    _pvc_options(p, ("none", "rbv"))
    p.add_argument("--pvc-uncorrected-reference", action="store_true",
                   help="take the reference TAC from the uncorrected image (default: from the RBV image, "
                        "corrected like the voxels)")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser(
        "compare", parents=[common], help="baseline vs post-dose change, per subject or per study",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Two sessions: --baseline B --post P --out-prefix X, with B, P both fit TSVs (-> X_change.tsv)\n"
            "or both BP_ND maps (-> X_delta-bpnd.nii.gz, X_pctchange-bpnd.nii.gz + JSON, X_delta-bpnd.png).\n\n"
            "Study: --study DIR --out-dir OUT, with the layout\n"
            "  DIR/participants.tsv                       participant_id, group\n"
            "  DIR/sub-<id>/ses-<baseline>/**/*_bpnd.tsv  fit output, one per subject/session\n"
            "  DIR/sub-<id>/ses-<post>/**/*_bpnd.tsv\n"
            "  DIR/sub-<id>/ses-<session>/**/*_bpnd.nii.gz  BP_ND maps (only for --voxelwise)\n"
            "-> OUT/subject_changes.tsv, within_group.tsv (paired t, Wilcoxon, 95% CI, d_z, g_z, Holm, BH),\n"
            "   group_by_time.tsv (Welch t, permutation p, Hedges g, Holm, BH), region_changes.png;\n"
            "   with --voxelwise group-<g>_stat-{t,meandelta,p,pfdr}_bpndchange.nii.gz per group."
        ))
    p.add_argument("--baseline", default=None, help="baseline fit TSV or BP_ND map")
    p.add_argument("--post", default=None, help="post-dose fit TSV or BP_ND map")
    p.add_argument("--out-prefix", default=None, help="output prefix for two-session mode")
    p.add_argument("--study", default=None, help="study folder (layout above)")
    p.add_argument("--out-dir", default=None, help="output folder for --study")
    p.add_argument("--baseline-session", default="baseline", help="baseline session label (default baseline)")
    p.add_argument("--post-session", default="postdose", help="post-dose session label (default postdose)")
    p.add_argument("--group-column", default="group", help="group column of participants.tsv (default group)")
    p.add_argument("--groups", nargs="+", default=None, metavar="GROUP",
                   help="declare the groups, e.g. --groups drug placebo: every participant must be in one, each "
                        "must have a participant and every sub-* folder must be in participants.tsv (a typo such "
                        "as 'drugg' is then an error, not a third group); tables follow this order")
    p.add_argument("--result-pattern", default="*_bpnd.tsv",
                   help="glob of the fit result in each session folder (default *_bpnd.tsv), "
                        "e.g. '*_model-srtm_bpnd.tsv' when several models were fitted")
    p.add_argument("--n-permutations", type=int, default=10000, help="random relabelings (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="permutation seed (default 0)")
    p.add_argument("--voxelwise", action="store_true", help="also per-group voxelwise paired t-maps")
    p.add_argument("--no-figures", action="store_true", help="skip PNG figures")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv=None) -> int:
    """Run ``petbind-quant``; return the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    try:
        written = args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        # OSError: a file that cannot be read or written (missing, a folder, permissions, disk full).
        if args.verbose:
            logger.exception("details")
        if isinstance(exc, OSError) and exc.filename is not None:
            text = f"{exc.filename}: {exc.strerror or exc}"
        else:
            text = str(exc)
        msg = " ".join(text.split())
        print(f"petbind-quant: error: {msg}", file=sys.stderr)
        return 2
    _emit(args, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
