"""Reference-tissue kinetic models, regional and voxelwise.

Public API::

    from petbind.quant.models import MODELS, KineticResult, fit_model, parametric_maps, ParametricMaps

One module per model family (``srtm`` with ``bfsrtm``, ``srtm2``, ``mrtm``
with ``mrtm2``, ``logan``); :mod:`.registry` lists them (``REGISTRY``: name ->
:class:`ModelSpec`) for the fitting code and the command line.

Times are seconds at this boundary and minutes inside the models; TACs and
images are Bq/mL.  See :func:`fit_model` for the models and references.
"""

from petbind.quant.models._core import STATUS_NAMES, frame_decay_factor, make_weights
from petbind.quant.models.fit import MODELS, KineticResult, fit_model, theta3_grid
from petbind.quant.models.maps import ParametricMaps, parametric_maps
from petbind.quant.models.registry import REGISTRY, ModelSpec, get_model
from petbind.quant.models.srtm import srtm_forward

__all__ = [
    "MODELS",
    "KineticResult",
    "ModelSpec",
    "REGISTRY",
    "ParametricMaps",
    "STATUS_NAMES",
    "fit_model",
    "frame_decay_factor",
    "get_model",
    "make_weights",
    "parametric_maps",
    "srtm_forward",
    "theta3_grid",
]
