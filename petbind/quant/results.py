"""Result files of quantification: one writer each for the CLI and the study pipeline.

* TAC tables with their sidecar (:func:`tacs_sidecar`, :func:`write_tacs`);
* regional fit tables (:func:`fit_table`, :func:`write_fit_tsv`).  The
  columns are a contract relied on by other tools: ``region``, ``model``,
  ``bp_nd``, ``r1``, ``k2_per_min``, ``k2prime_per_min``, ``status`` first,
  then ``status_name``, standard errors, ``bound_hit`` and ``reference``;
* parametric maps, one NIfTI + JSON per map (:func:`write_parametric_maps`).

Every writer takes ``outputs=``, an :class:`petbind.quant.outputs.OutputSet`,
to join a larger set of files that appear together or not at all (a table
and its figure); without it the files of one call appear together.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from petbind.core.device import to_numpy
from petbind.core.files import sidecar_path_for, write_json, write_table_tsv
from petbind.quant.outputs import output_set

__all__ = ["FIT_COLUMNS", "FIT_PARAMETERS", "MAP_SUFFIX", "fit_table", "write_fit_tsv", "tacs_sidecar",
           "write_tacs", "map_paths", "write_parametric_maps"]

#: File name suffix of each parametric map (``<prefix>_<suffix>.nii.gz``); other maps keep their name.
MAP_SUFFIX = {"bp_nd": "bpnd", "r1": "r1", "k2_per_min": "k2", "k2prime_per_min": "k2prime"}

#: Sidecar fields of a PET image carried over to its TAC table.
_PET_FIELDS_KEPT = ("TracerRadionuclide", "TracerName", "InjectedRadioactivity", "InjectedRadioactivityUnits")

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


def write_fit_tsv(path, result, names, reference, sidecar=None, outputs=None):
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
    outputs : petbind.quant.outputs.OutputSet, optional
        Stage the files in this set (the caller commits).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    columns, rows = fit_table(result, names, reference)
    side = {"Description": f"{result.model} fit", "Model": result.model, "ReferenceRegion": reference,
            "Info": getattr(result, "info", {}), **(sidecar or {})}
    with output_set(outputs) as outs:
        outs.write(path, write_table_tsv, columns, rows)
        outs.write(sidecar_path_for(path), write_json, side)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# TAC tables
# ------------------------------------------------------------------------------------------------
def tacs_sidecar(table, atlas, sources, pet_sidecar=None, pvc=None) -> dict:
    """The JSON sidecar of a regional TAC table.

    Parameters
    ----------
    table : petbind.quant.io.TACTable
    atlas : petbind.quant.io.Atlas
        Atlas the regions come from (voxel counts).
    sources : sequence of str
        Input files (image, atlas, labels).
    pet_sidecar : dict, optional
        Sidecar of the PET image: the tracer and injected activity are kept.
    pvc : dict, optional
        Partial-volume correction settings (``Method`` first), if applied.

    Returns
    -------
    dict
    """
    side = {
        "Description": "regional mean time-activity curves"
                       + ("" if pvc is None else f", partial-volume corrected ({pvc.get('Method')})"),
        "Sources": [str(s) for s in sources],
        "Units": "Bq/mL",
        "frame_start": {"Description": "frame start from injection", "Units": "s"},
        "frame_end": {"Description": "frame end from injection", "Units": "s"},
        "VoxelCount": {name: int(np.sum(atlas.labels == atlas.index_of(name))) for name in table.region_names},
    }
    if pvc is not None:
        side["PartialVolumeCorrection"] = dict(pvc)
    for key in _PET_FIELDS_KEPT:
        if key in (pet_sidecar or {}):
            side[key] = pet_sidecar[key]
    return side


def write_tacs(path, table, sidecar, outputs=None):
    """Write a TAC table (PET-BIDS TSV) and its JSON sidecar.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ``_tacs.tsv``.
    table : petbind.quant.io.TACTable
    sidecar : dict
        E.g. from :func:`tacs_sidecar`.
    outputs : petbind.quant.outputs.OutputSet, optional
        Stage the files in this set (the caller commits).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from petbind.quant.io import write_tacs_tsv

    with output_set(outputs) as outs:
        outs.write(path, write_tacs_tsv, table)
        outs.write(sidecar_path_for(path), write_json, sidecar)
    return Path(path)


# ------------------------------------------------------------------------------------------------
# parametric maps
# ------------------------------------------------------------------------------------------------
def map_paths(prefix, names=("bp_nd", "r1", "k2_per_min", "k2prime_per_min", "residual", "status")) -> list:
    """File names ``<prefix>_<suffix>.nii.gz`` and their sidecars for the maps ``names``."""
    out = []
    for name in names:
        nii = Path(f"{prefix}_{MAP_SUFFIX.get(name, name)}.nii.gz")
        out += [nii, sidecar_path_for(nii)]
    return out


def _map_units(name, model):
    if name.endswith("per_min"):
        return "1/min"
    if name == "residual":
        return "min (Logan plot)" if model == "logan" else "Bq/mL"
    return "unitless"


def write_parametric_maps(prefix, pm, affine, sidecar=None, model=None, outputs=None) -> list:
    """Write every map of a :class:`~petbind.quant.models.ParametricMaps` as NIfTI + JSON.

    Parameters
    ----------
    prefix : str or os.PathLike
        Output prefix; maps go to ``{prefix}_{bpnd,r1,k2,...}.nii.gz``
        (suffixes in :data:`MAP_SUFFIX`, other maps by name) and the fit
        status to ``{prefix}_status.nii.gz`` (int16 codes, 0 ok).
    pm : petbind.quant.models.ParametricMaps
        Maps on NumPy or CuPy (copied to the host here).
    affine : array_like, shape (4, 4)
        Affine of the image the maps came from (mm).
    sidecar : dict, optional
        Fields shared by every map's sidecar (settings, sources, provenance).
    model : str, optional
        Model name for descriptions and units (default ``sidecar["Model"]``,
        else ``pm.model``).
    outputs : petbind.quant.outputs.OutputSet, optional
        Stage the files in this set (the caller commits); default: all files
        of this call appear together or not at all.

    Returns
    -------
    list of pathlib.Path
        The NIfTI files written (maps, then status); each has a JSON sidecar.
    """
    from petbind.quant.io import save_nifti

    side = dict(sidecar or {})
    model = model or side.get("Model") or getattr(pm, "model", "")
    written = []
    with output_set(outputs) as outs:
        for name, arr in pm.maps.items():
            written.append(save_nifti(
                f"{prefix}_{MAP_SUFFIX.get(name, name)}.nii.gz", to_numpy(arr).astype(np.float32), affine,
                {**side, "Description": f"{model} parametric map {name}", "Units": _map_units(name, model)},
                outputs=outs))
        names = getattr(pm, "status_names", None) or {}
        written.append(save_nifti(
            f"{prefix}_status.nii.gz", to_numpy(pm.status).astype(np.int16), affine,
            {**side, "Description": "fit status per voxel (0 ok)", "StatusCodes": {str(k): v for k, v in names.items()},
             "Info": getattr(pm, "info", {})}, outputs=outs))
    return written
