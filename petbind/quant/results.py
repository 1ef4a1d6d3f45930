"""Result tables of regional fits: one writer for the CLI and the study pipeline.

The columns are a contract relied on by other tools: ``region``, ``model``,
``bp_nd``, ``r1``, ``k2_per_min``, ``k2prime_per_min``, ``status`` first, then
``status_name``, standard errors, ``bound_hit`` and ``reference``.
"""

from __future__ import annotations

import math

import numpy as np

from petbind.core.files import sidecar_path_for, write_json, write_table_tsv

__all__ = ["FIT_COLUMNS", "FIT_PARAMETERS", "MAP_SUFFIX", "fit_table", "write_fit_tsv", "write_parametric_maps"]

#: Columns that every fit result TSV starts with (the CLI contract).
FIT_COLUMNS = ["region", "model", "bp_nd", "r1", "k2_per_min", "k2prime_per_min", "status"]
#: Parameters reported per region (with a ``se_`` column each).
FIT_PARAMETERS = ["bp_nd", "r1", "k2_per_min", "k2prime_per_min"]


def _per_target(value, n, default=math.nan):
    """Broadcast a result field (scalar or (n,)) to shape (n,)."""
    if value is None:
        return np.full(n, default)
    arr = np.asarray(value)
    if arr.ndim == 0:
        return np.full(n, arr.item())
    return arr.reshape(-1)[:n] if arr.size == n else np.full(n, default)


def _status_name(status_names, code):
    """Short status name (first word of the model's description)."""
    name = None
    if isinstance(status_names, dict):
        name = status_names.get(code, status_names.get(str(code)))
    elif status_names is not None and 0 <= code < len(status_names):
        name = status_names[code]
    if name is None:
        return "ok" if code == 0 else str(code)
    return str(name).split(" ")[0] or str(code)


def fit_table(result, names, reference):
    """Columns and rows of a regional fit result.

    Parameters
    ----------
    result : petbind.quant.models.KineticResult
        Fit of ``len(names)`` target regions.
    names : sequence of str
        Target region names, in the order of the fit.
    reference : str
        Reference region name.

    Returns
    -------
    columns : list of str
    rows : list of list
        One row per region.
    """
    n = len(names)
    params = {k: _per_target(result.parameters.get(k), n) for k in FIT_PARAMETERS}
    ses = {k: _per_target((result.standard_errors or {}).get(k), n) for k in FIT_PARAMETERS}
    status = _per_target(result.status, n, default=-1).astype(int)
    bound = _per_target(getattr(result, "bound_hit", None), n, default=False).astype(bool)
    columns = FIT_COLUMNS + ["status_name"] + [f"se_{k}" for k in FIT_PARAMETERS] + ["bound_hit", "reference"]
    rows = []
    for i, name in enumerate(names):
        rows.append([name, result.model, *(params[k][i] for k in FIT_PARAMETERS), int(status[i]),
                     _status_name(getattr(result, "status_names", None), int(status[i])),
                     *(ses[k][i] for k in FIT_PARAMETERS), bool(bound[i]), reference])
    return columns, rows


def write_fit_tsv(path, result, names, reference, sidecar=None):
    """Write a regional fit as TSV plus JSON sidecar (both atomically).

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``.tsv``.
    result : petbind.quant.models.KineticResult
    names : sequence of str
        Target regions of the fit.
    reference : str
        Reference region.
    sidecar : dict, optional
        Extra sidecar fields (settings, sources, provenance).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    columns, rows = fit_table(result, names, reference)
    out = write_table_tsv(path, columns, rows)
    write_json(sidecar_path_for(out), {"Description": f"{result.model} fit", "Model": result.model,
                                       "ReferenceRegion": reference, "Info": getattr(result, "info", {}),
                                       **(sidecar or {})})
    return out


#: File name suffix of each parametric map.
MAP_SUFFIX = {"bp_nd": "bpnd", "r1": "r1", "k2_per_min": "k2", "k2prime_per_min": "k2prime"}


def _map_units(name, model):
    if name.endswith("per_min"):
        return "1/min"
    if name == "residual":
        return "min (Logan plot)" if model == "logan" else "Bq/mL"
    return "unitless"


def write_parametric_maps(prefix, pm, affine, sidecar=None, model=None):
    """Write every map of a :class:`~petbind.quant.models.ParametricMaps` as NIfTI + JSON.

    Parameters
    ----------
    prefix : str or os.PathLike
        Output prefix; maps go to ``{prefix}_{bpnd,r1,k2,...}.nii.gz`` and the
        fit status to ``{prefix}_status.nii.gz``.
    pm : ParametricMaps
        Maps on NumPy or CuPy (copied to the host here).
    affine : ndarray, shape (4, 4)
    sidecar : dict, optional
        Fields shared by every map's sidecar (settings, sources, provenance).
    model : str, optional
        Model name for units (default ``sidecar["Model"]``).

    Returns
    -------
    list of pathlib.Path
        Every file written (maps, then status).
    """
    from petbind.core.device import to_numpy
    from petbind.quant.io import save_nifti

    side = dict(sidecar or {})
    model = model or side.get("Model", "")
    written = []
    for name, arr in pm.maps.items():
        written.append(save_nifti(f"{prefix}_{MAP_SUFFIX.get(name, name)}.nii.gz",
                                  to_numpy(arr).astype(np.float32), affine,
                                  {**side, "Description": f"{model} parametric map {name}",
                                   "Units": _map_units(name, model)}))
    status = to_numpy(pm.status)
    names = getattr(pm, "status_names", None) or {}
    written.append(save_nifti(f"{prefix}_status.nii.gz", status.astype(np.int16), affine,
                              {**side, "Description": "fit status per voxel (0 ok)",
                               "StatusCodes": {str(k): v for k, v in names.items()},
                               "Info": getattr(pm, "info", {})}))
    return written
