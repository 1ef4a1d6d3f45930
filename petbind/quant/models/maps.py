"""Voxelwise parametric maps: the batched regional code applied to every voxel."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from petbind.core.device import array_module, get_cupy, resolve_device, to_namespace, to_numpy
from petbind.quant.models._core import (
    STATUS_MASKED,
    STATUS_NAMES,
    KineticFrames,
    make_weights,
    validate_reference,
    warn_status,
)
from petbind.quant.models.fit import (
    UNITS,
    _check_model,
    _check_options,
    _grid_from_options,
    first_pass_k2prime,
    resolve_k2prime,
    resolve_tstar,
    run_batch,
)
from petbind.quant.models.registry import MODELS, get_model
from petbind.quant.models.srtm import SRTM_LOWER, SRTM_UPPER, fit_srtm_nls

logger = logging.getLogger("petbind.quant.models")

_MAP_OPTIONS = ("chunk_size", "progress", "first_pass_max_voxels")
#: Maps written for every model (NaN where a model gives no value).
MAP_NAMES = ("bp_nd", "r1", "k2_per_min", "k2prime_per_min", "residual")


@dataclasses.dataclass
class ParametricMaps:
    """Voxelwise kinetic parameters.

    Attributes
    ----------
    model : str
    maps : dict of str -> array (x, y, z)
        ``bp_nd``, ``r1``, ``k2_per_min`` (1/min), ``k2prime_per_min``
        (1/min), ``residual`` (root weighted-mean-square residual, Bq/mL;
        Logan: in plot coordinates, min) and model extras (``k2a_per_min``,
        ``dvr``).  NaN outside the mask and for failed voxels.  Same array
        type (NumPy/CuPy) as the input image.
    status : array of int8 (x, y, z)
        Codes in ``status_names`` (4 = masked).
    status_names : dict of int -> str
    info : dict
        ``tstar_min``, ``k2prime_per_min``, ``k2prime_source``,
        ``theta3_grid_per_min``, ``weights``, ``weights_values``,
        ``n_voxels_fitted``, ``device``, ``units``.
    """

    model: str
    maps: dict
    status: object
    status_names: dict
    info: dict

    def to_nifti(self, out_prefix, affine, sidecar=None):
        """Write one NIfTI per map, the status map and a JSON sidecar.

        Parameters
        ----------
        out_prefix : str or os.PathLike
            Files are ``{out_prefix}_{name}.nii.gz``, ``{out_prefix}_status.nii.gz``
            and ``{out_prefix}.json``.  The folder must exist.
        affine : array_like (4, 4)
            Voxel-to-RAS+ mm affine of the dynamic image the maps came from.
        sidecar : dict, optional
            Extra JSON fields, e.g. ``{"reference_region": "cerebellum"}``.

        Returns
        -------
        list of str
            Paths written.

        Raises
        ------
        ValueError
            Bad affine or missing output folder.

        Notes
        -----
        The files are written under temporary names and renamed together
        (:class:`petbind.quant.outputs.OutputSet`): after an error none of
        them is new or changed.  :func:`petbind.quant.results.write_parametric_maps`
        writes the same maps with the ``petbind-quant map`` file names.
        """
        from petbind import __version__  # noqa: PLC0415
        from petbind.core.files import write_json  # noqa: PLC0415
        from petbind.quant.io import save_nifti  # noqa: PLC0415
        from petbind.quant.outputs import OutputSet  # noqa: PLC0415

        A = np.asarray(affine, dtype=np.float64)
        if A.shape != (4, 4) or not np.all(np.isfinite(A)):
            raise ValueError(f"affine: expected a finite 4x4 voxel-to-RAS+ mm matrix; got shape {A.shape}")
        if sidecar is not None and not isinstance(sidecar, dict):
            raise TypeError(f"sidecar: expected a dict of JSON fields; got {type(sidecar).__name__}")
        prefix = os.fspath(out_prefix)
        folder = os.path.dirname(prefix) or "."
        if not os.path.isdir(folder):
            raise ValueError(f"out_prefix: folder {folder!r} does not exist; create it first")
        written = []
        files = {}
        arrays = {name: (to_numpy(m).astype(np.float32), UNITS.get(name, "")) for name, m in self.maps.items()}
        arrays["status"] = (to_numpy(self.status).astype(np.int16), "code")
        meta = dict(sidecar or {})
        meta.update(
            {
                "model": self.model,
                "reference_region": (sidecar or {}).get("reference_region"),
                "tstar_min": self.info.get("tstar_min"),
                "k2prime_per_min": self.info.get("k2prime_per_min"),
                "k2prime_source": self.info.get("k2prime_source"),
                "theta3_grid_per_min": self.info.get("theta3_grid_per_min"),
                "weights": self.info.get("weights"),
                "weights_values": self.info.get("weights_values"),
                "maps": files,
                "status_codes": {str(k): v for k, v in self.status_names.items()},
                "software": "petbind petbind.quant.models",
                "software_version": __version__,
            }
        )
        with OutputSet() as outs:
            for name, (data, unit) in arrays.items():
                path = f"{prefix}_{name}.nii.gz"
                save_nifti(path, data, A, outputs=outs)
                written.append(path)
                files[name] = {"file": os.path.basename(path), "units": unit}
            outs.write(f"{prefix}.json", write_json, meta)
            written.append(f"{prefix}.json")
        return written


def _resolve_xp(xp, image_4d, device=None):
    if device is not None:
        if xp is not None:
            raise ValueError("give xp= or device=, not both")
        return get_cupy() if resolve_device(device) == "gpu" else np
    if xp is None:
        return array_module(image_4d)
    if isinstance(xp, str):
        if xp not in ("numpy", "cupy"):
            raise ValueError(f"xp: expected None, 'numpy', 'cupy' or the module; got {xp!r}")
        if xp == "numpy":
            return np
        return get_cupy()
    name = getattr(xp, "__name__", "")
    if name not in ("numpy", "cupy"):
        raise ValueError(f"xp: expected the numpy or cupy module; got {xp!r}")
    return xp


def parametric_maps(
    model,
    frame_start_s,
    frame_end_s,
    reference_tac,
    image_4d,
    *,
    mask=None,
    threshold=None,
    weights="none",
    tstar_min=None,
    k2prime_per_min=None,
    half_life_min=None,
    xp=None,
    device=None,
    **options,
):
    """Voxelwise parametric maps with the same code as the regional fits.

    Parameters
    ----------
    model : {"bfsrtm", "srtm2", "mrtm", "mrtm2", "logan", "srtm"}
        ``"srtm"`` runs one nonlinear fit per voxel on the host (slow; for
        small images and as a reference); the others are batched.
    frame_start_s, frame_end_s : array_like (n_frames,)
        Frame times in seconds from injection.
    reference_tac : array_like (n_frames,)
        Reference TAC in Bq/mL.
    image_4d : ndarray or cupy.ndarray (x, y, z, n_frames)
        Dynamic image in Bq/mL.
    mask : array_like of bool (x, y, z), optional
        Voxels to fit (default all).
    threshold : float, optional
        Also skip voxels whose duration-weighted mean activity over all
        frames is below this value (Bq/mL).
    weights, tstar_min, k2prime_per_min, half_life_min
        As in :func:`fit_model`.  With ``k2prime_per_min=None`` the BF-SRTM
        first pass runs on up to ``first_pass_max_voxels`` fitted voxels
        taken at a fixed stride (deterministic), median over BP_ND > 0.
    xp : module or {"numpy", "cupy"}, optional
        Array namespace to compute in and return the maps in; default: that
        of ``image_4d``.  A NumPy image with ``xp=cupy`` is copied to the GPU
        once, up front.
    device : {"auto", "cpu", "gpu"}, optional
        Where to compute instead of ``xp`` (``"auto"``: the GPU when one is
        usable, see :func:`petbind.core.device.resolve_device`).  The maps
        and the status then come back in the array type of ``image_4d``
        (NumPy in, NumPy out), copied once at the end.
    **options
        The model options of :func:`fit_model`, plus ``chunk_size`` (voxels
        per batch, default 16384; bounds memory to about
        ``chunk_size x num_basis x 48`` bytes), ``progress`` (tqdm bar,
        default True) and ``first_pass_max_voxels`` (default 20000).

    Returns
    -------
    ParametricMaps

    Raises
    ------
    ValueError
        Bad shapes, frame timing, weights or options (see :func:`fit_model`).
    TypeError
        Unknown option.

    Notes
    -----
    Voxels are processed in chunks; within a chunk every operation is a
    batched array operation (no per-voxel Python loop except for
    ``"srtm"``).  Each voxel's result equals :func:`fit_model` on that
    voxel's TAC.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    _check_model(model)
    _check_options(model, options, _MAP_OPTIONS)
    xp = _resolve_xp(xp, image_4d, device)
    caller = array_module(image_4d) if device is not None else xp
    frames = KineticFrames(frame_start_s, frame_end_s)
    ref = validate_reference(reference_tac, frames)
    if getattr(image_4d, "ndim", None) != 4:
        raise ValueError(
            f"image_4d: expected a 4-D (x, y, z, t) array; got {getattr(image_4d, 'shape', type(image_4d))}"
        )
    if image_4d.shape[3] != frames.n:
        raise ValueError(
            f"image_4d: last axis must have one entry per frame ({frames.n}); got shape {image_4d.shape}"
        )
    spatial = tuple(image_4d.shape[:3])
    n_vox_all = int(np.prod(spatial))
    w = make_weights(weights, frames, ref, half_life_min)
    tstar = resolve_tstar(model, frames, tstar_min, w)
    k2p = resolve_k2prime(model, k2prime_per_min)
    spec = get_model(model)
    grid = _grid_from_options(options) if spec.uses_grid else None
    refine = bool(options.get("refine", True))
    chunk = int(options.get("chunk_size", 16384))
    if chunk < 1:
        raise ValueError(f"chunk_size: expected a positive number of voxels; got {chunk!r}")
    progress = bool(options.get("progress", True))

    img2d = xp.asarray(image_4d).reshape(n_vox_all, frames.n)
    if mask is None:
        sel = xp.ones(n_vox_all, dtype=bool)
    else:
        m = xp.asarray(mask)
        if tuple(m.shape) != spatial:
            raise ValueError(f"mask: expected shape {spatial} (the image's spatial shape); got {tuple(m.shape)}")
        if m.dtype != bool:
            raise TypeError(f"mask: expected a boolean array; got dtype {m.dtype}")
        sel = m.reshape(-1)
    if threshold is not None:
        thr = float(threshold)
        if not np.isfinite(thr):
            raise ValueError(f"threshold: expected a finite activity in Bq/mL; got {threshold!r}")
        dur = xp.asarray(frames.dur_min / frames.dur_min.sum())
        mean_act = img2d @ dur
        # NaN voxels stay selected so they are reported as non-finite input.
        sel = sel & ~(mean_act < thr)
    idx = xp.nonzero(sel)[0]
    n_fit = int(idx.size)
    # Contiguous selection (no mask): slices avoid gather/scatter copies.
    contiguous = n_fit == n_vox_all
    info = {
        "model": model,
        "tstar_min": tstar,
        "k2prime_per_min": k2p,
        "k2prime_source": "given" if k2p is not None else None,
        "theta3_grid_per_min": None if grid is None else grid.tolist(),
        "weights": weights if isinstance(weights, str) else "array",
        "weights_values": w.tolist(),
        "n_voxels_fitted": n_fit,
        "device": "gpu" if xp.__name__ == "cupy" else "cpu",
        "threshold_bq_per_ml": None if threshold is None else float(threshold),
        "units": dict(UNITS),
    }
    if n_fit == 0:
        raise ValueError("mask/threshold: no voxel left to fit")
    if spec.uses_k2prime and k2p is None:
        max_fp = int(options.get("first_pass_max_voxels", 20000))
        stride = max(1, -(-n_fit // max_fp))
        sub = idx[::stride]
        Ysub = img2d[sub].astype(xp.float64)
        k2p, n_fp = first_pass_k2prime(frames, ref, w, Ysub, xp, grid, refine)
        info["k2prime_per_min"] = k2p
        info["k2prime_source"] = (
            f"bfsrtm first pass: median k2/R1 over {n_fp} of {int(sub.size)} voxels (stride {stride}) with BP_ND > 0"
        )
    wt = w if tstar is None else np.where(frames.mid_min >= tstar, w, 0.0)
    info["n_frames_used"] = int(np.count_nonzero(wt > 0))
    wsum = float(wt.sum())

    flat = {}
    status = xp.full(n_vox_all, STATUS_MASKED, dtype=xp.int8)
    for start in tqdm(range(0, n_fit, chunk), desc=f"{model} maps", unit="chunk", disable=not progress):
        ii = slice(start, min(start + chunk, n_fit)) if contiguous else idx[start : start + chunk]
        Y = img2d[ii].astype(xp.float64)
        if spec.batch is None:  # nonlinear SRTM: one host fit per voxel, BF-SRTM start values
            Yh = to_numpy(Y)
            sp = run_batch("bfsrtm", frames, ref, w, Yh, np, None, None, grid, refine)["params"]
            start_p = np.stack([sp["r1"], sp["k2_per_min"], sp["bp_nd"]], axis=1)
            out = fit_srtm_nls(
                frames,
                ref,
                w,
                Yh,
                start_p,
                options.get("lower", SRTM_LOWER),
                options.get("upper", SRTM_UPPER),
                options.get("max_nfev"),
            )
            out = {k: (xp.asarray(v) if k in ("rss", "status") else v) for k, v in out.items()}
            out["params"] = {k: xp.asarray(v) for k, v in out["params"].items()}
        else:
            out = run_batch(model, frames, ref, w, Y, xp, tstar, k2p, grid, refine)
        vals = dict(out["params"])
        vals["residual"] = xp.sqrt(out["rss"] / wsum)
        for name, v in vals.items():
            if name not in flat:
                flat[name] = xp.full(n_vox_all, xp.nan)
            flat[name][ii] = v
        status[ii] = out["status"]
    warn_status(model, status)
    maps = {name: flat[name].reshape(spatial) for name in MAP_NAMES}
    for name in flat:
        if name not in maps:
            maps[name] = flat[name].reshape(spatial)
    if caller is not xp:
        maps = {name: to_namespace(v, caller) for name, v in maps.items()}
        status = to_namespace(status, caller)
    return ParametricMaps(
        model=model, maps=maps, status=status.reshape(spatial), status_names=dict(STATUS_NAMES), info=info
    )


__all__ = ["MAP_NAMES", "MODELS", "ParametricMaps", "parametric_maps"]
