"""Quantification of one session through the Python API of :mod:`petbind.quant`.

Regional TACs from the reconstructed 4-D image and the atlas, corrected for
partial volume (GTM by default) with the *measured* effective resolution of
the reconstruction; then the regional kinetic fit and, with ``--maps``,
voxelwise parametric maps (RBV-corrected when ``--pvc rbv``).

Partial-volume correction and the reference region: the reference TAC is
corrected exactly like the targets (it is a row of the same GTM), because
BP_ND compares target and reference uptake; a corrected target against an
uncorrected reference would be biased by the reference's own recovery.
"""

from __future__ import annotations

import logging

import numpy as np

from petbind.core.decay import half_life_s
from petbind.pipeline.options import StudyInputError

__all__ = ["session_regions", "psf_for_pvc", "write_tacs", "write_fit", "write_maps"]

log = logging.getLogger(__name__)


def session_regions(atlas, options):
    """Regions that get a TAC (targets + reference) and the targets fitted.

    Returns
    -------
    regions : list of str
        Every region with voxels that is not excluded (the reference included).
    targets : list of str
    """
    present = set(int(v) for v in np.unique(atlas.labels))
    empty = [n for n in atlas.region_names if atlas.index_of(n) not in present]
    if empty:
        log.warning("%s: regions %s have no voxels on this grid; they get no TAC and no fit", atlas.path, empty)
    if options.regions is not None:
        targets = [n for n in options.regions if n not in empty]
    else:
        targets = [n for n in atlas.region_names
                   if n not in options.exclude_regions and n not in empty and n != options.reference]
    return [*targets, options.reference], targets


def psf_for_pvc(pet_sidecar, options, affine, source):
    """The :class:`~petbind.quant.pvc.GaussianPSF` for PVC: ``--pvc-fwhm-mm``, else the measured resolution."""
    from petbind.quant.pvc import GaussianPSF

    fwhm = options.pvc_fwhm_mm
    if fwhm is None:
        fwhm = pet_sidecar.get("EffectiveResolutionFWHM_mm")
    if fwhm is None:
        raise StudyInputError(f"{source}: field 'EffectiveResolutionFWHM_mm' is missing and no --pvc-fwhm-mm was "
                              "given; partial-volume correction needs the image's resolution")
    return GaussianPSF.from_affine(fwhm if np.ndim(fwhm) else [fwhm] * 3, affine)


def _pvc_record(method, psf, uncorrected=()):
    return {"Method": method,
            "Reference": {"gtm": "Rousset et al. 1998 J Nucl Med 39:904",
                          "rbv": "Thomas et al. 2011 Eur J Nucl Med Mol Imaging 38:1104"}[method],
            "FWHM_mm": list(psf.fwhm_mm), "Background": "unlabelled voxels modelled as one region",
            "ReferenceRegionCorrected": True, "UncorrectedRegions": list(uncorrected)}


def write_tacs(pet, atlas, regions, out_path, options, provenance, progress=False, fractions=None):
    """Regional TACs (PVC as set) to a PET-BIDS TSV plus sidecar; returns the table.

    ``fractions`` (region -> tissue-fraction map) makes the GTM model voxels
    that mix tissues (:func:`petbind.quant.pvc.gtm_matrix`).
    """
    from petbind.quant.results import tacs_sidecar
    from petbind.quant.results import write_tacs as write_table
    from petbind.quant.tacs import tacs_from_image

    pvc = None
    if options.pvc == "none":
        table = tacs_from_image(pet, atlas, regions, progress=progress)
    else:
        # regional TACs: GTM is the regional form of both gtm and rbv
        from petbind.quant.pvc import gtm_matrix, pvc_tacs

        psf = psf_for_pvc(pet.sidecar, options, pet.affine, pet.path)
        gtm = gtm_matrix(atlas.labels, atlas.names, psf, fractions=fractions)
        table = pvc_tacs(pet, atlas, psf, method="gtm", regions=regions, gtm=gtm, progress=progress)
        pvc = _pvc_record("gtm", psf)
        pvc["TissueFractions"] = "tissue-fraction maps (probseg)" if fractions else "atlas labels"
    side = tacs_sidecar(table, atlas, [pet.path, atlas.path], pet_sidecar=pet.sidecar, pvc=pvc)
    side["PipelineProvenance"] = provenance
    write_table(out_path, table, side)
    return table


def _half_life_min(sidecar, source):
    nuc = sidecar.get("TracerRadionuclide")
    if nuc is None:
        raise StudyInputError(f"{source}: field 'TracerRadionuclide' is missing; needed for count weights")
    try:
        return half_life_s(nuc, f"{source}: field 'TracerRadionuclide'") / 60.0
    except ValueError as exc:
        raise StudyInputError(str(exc)) from None


def write_fit(table, tac_sidecar, targets, out_path, options, provenance, source):
    """Regional kinetic fit of a TAC table; writes the result TSV + sidecar and returns the result."""
    from petbind.quant.models import fit_model
    from petbind.quant.results import write_fit_tsv
    from petbind.quant.tacs import split_reference

    ref, names, tac = split_reference(table, options.reference, targets)
    hl = _half_life_min(tac_sidecar, source)
    res = fit_model(options.model, table.frame_start_s, table.frame_end_s, ref, tac, weights=options.weights,
                    half_life_min=hl)
    write_fit_tsv(out_path, res, names, options.reference, {
        "Sources": [str(source)], "Weights": options.weights, "HalfLifeMin": hl,
        "PipelineProvenance": provenance})
    n_bad = int(np.sum(np.asarray(res.status).reshape(-1) != 0))
    if n_bad:
        log.warning("%s: %d of %d region fit(s) with non-zero status", out_path, n_bad, len(names))
    return res, ref, names, tac


def write_maps(pet, atlas, targets, prefix, options, provenance, progress=False):
    """Voxelwise parametric maps (RBV-corrected image with ``--pvc rbv``); returns the BP_ND map path."""
    from petbind.quant.models import parametric_maps
    from petbind.quant.results import write_parametric_maps
    from petbind.quant.tacs import tacs_from_image

    data = pet.data
    ref = tacs_from_image(pet, atlas, [options.reference]).column(options.reference)
    side = {"Sources": [str(pet.path), str(atlas.path)], "Model": options.model,
            "ReferenceRegion": options.reference, "Weights": options.weights,
            "Mask": f"atlas regions {list(targets)}", "PipelineProvenance": provenance}
    if options.pvc == "rbv":
        from petbind.quant.pvc import gtm_matrix, rbv_correct, regional_means

        psf = psf_for_pvc(pet.sidecar, options, pet.affine, pet.path)
        gtm = gtm_matrix(atlas.labels, atlas.names, psf)
        data = rbv_correct(data, atlas.labels, gtm)
        ref = np.asarray(regional_means(data, atlas.labels, [atlas.index_of(options.reference)])[0][0])
        side["PartialVolumeCorrection"] = _pvc_record("rbv", psf)
    hl = _half_life_min(pet.sidecar, pet.path)
    pm = parametric_maps(options.model, pet.frame_start_s, pet.frame_end_s, ref, data, mask=atlas.mask(targets),
                         weights=options.weights, half_life_min=hl, device=options.device, progress=progress)
    written = write_parametric_maps(prefix, pm, pet.affine, side)
    return [p for p in written if str(p).endswith("_bpnd.nii.gz")][0]
