"""The list of kinetic models: one entry per model, used by :func:`fit_model`,
:func:`parametric_maps` and the command line.

Adding a model means writing its batched fit (``fn(frames, ref, w, Y, xp,
**settings)``, see :mod:`petbind.quant.models._batch`) in its own module and
one :class:`ModelSpec` here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from petbind.quant.models import logan, mrtm, srtm, srtm2

__all__ = ["ModelSpec", "REGISTRY", "MODELS", "get_model"]

#: Options of the basis-function grid (``theta3`` = ``k2a``), see :func:`theta3_grid`.
GRID_OPTIONS = ("theta3_min_per_min", "theta3_max_per_min", "num_basis", "refine")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the shared fitting code needs to know about one model.

    Attributes
    ----------
    name : str
    description : str
        One line with the reference.
    uses_tstar : bool
        Fits only frames with mid-time >= t* (``tstar_min``).
    uses_k2prime : bool
        Takes a fixed reference efflux ``k2'`` (given, or from a BF-SRTM first pass).
    uses_grid : bool
        Needs the ``theta3`` basis grid: for its own fit, for SRTM's start
        values (BF-SRTM) or for the BF-SRTM first pass that estimates ``k2'``.
    basis_functions : bool
        Its batched fit itself takes the grid (``theta3``, ``refine``).
    n_params : int
        Free parameters (for t* frame counts and standard errors).
    default_tstar_fraction : float
        Default t* as a fraction of the scan length (``uses_tstar`` models).
    jacobian_se : bool
        Standard errors from the SRTM Jacobian at the estimate (see ``fit_model``).
    options : tuple of str
        Extra keyword options accepted by ``fit_model``/``parametric_maps``.
    batch : callable or None
        Batched fit ``batch(frames, ref, w, Y, xp, **settings)``, where the
        settings are ``theta3``/``refine`` (``basis_functions``), ``tstar_min``
        (``uses_tstar``) and ``k2prime`` (``uses_k2prime``).  ``None`` for the
        nonlinear SRTM, which runs one host fit per target.
    """

    name: str
    description: str
    uses_tstar: bool
    uses_k2prime: bool
    uses_grid: bool
    basis_functions: bool
    n_params: int
    jacobian_se: bool
    options: tuple
    batch: Callable | None
    default_tstar_fraction: float = 0.0

    def settings(self, *, theta3=None, refine=True, tstar_min=None, k2prime=None) -> dict:
        """The keyword arguments of :attr:`batch` for this model."""
        kw = {}
        if self.basis_functions:
            kw.update(theta3=theta3, refine=refine)
        if self.uses_tstar:
            kw["tstar_min"] = tstar_min
        if self.uses_k2prime:
            kw["k2prime"] = k2prime
        return kw


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("srtm", "simplified reference tissue model, weighted nonlinear least squares "
                  "(Lammertsma & Hume 1996)", uses_tstar=False, uses_k2prime=False, uses_grid=True,
                  basis_functions=False, n_params=3, jacobian_se=False,
                  options=GRID_OPTIONS + ("lower", "upper", "max_nfev"), batch=None),
        ModelSpec("bfsrtm", "basis-function SRTM (Gunn et al. 1997)", uses_tstar=False, uses_k2prime=False,
                  uses_grid=True, basis_functions=True, n_params=3, jacobian_se=True, options=GRID_OPTIONS,
                  batch=srtm.bfsrtm),
        ModelSpec("srtm2", "SRTM with k2' fixed, basis functions (Wu & Carson 2002)", uses_tstar=False,
                  uses_k2prime=True, uses_grid=True, basis_functions=True, n_params=2, jacobian_se=True,
                  options=GRID_OPTIONS, batch=srtm2.srtm2),
        ModelSpec("mrtm", "multilinear reference tissue model (Ichise et al. 2003)", uses_tstar=True,
                  uses_k2prime=False, uses_grid=False, basis_functions=False, n_params=3, jacobian_se=True, options=(),
                  batch=mrtm.mrtm),
        ModelSpec("mrtm2", "MRTM with k2' fixed (Ichise et al. 2003)", uses_tstar=True, uses_k2prime=True,
                  uses_grid=True, basis_functions=False, n_params=2, jacobian_se=True, options=GRID_OPTIONS,
                  batch=mrtm.mrtm2),
        ModelSpec("logan", "Logan reference-region graphical analysis (Logan et al. 1996)", uses_tstar=True,
                  uses_k2prime=True, uses_grid=True, basis_functions=False, n_params=2, jacobian_se=False,
                  options=GRID_OPTIONS, batch=logan.logan, default_tstar_fraction=1.0 / 3.0),
    )
}

#: Model names, in the order shown to users.
MODELS = tuple(REGISTRY)


def get_model(name) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; ``ValueError`` listing the models otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"model: expected one of {MODELS}; got {name!r}") from None
