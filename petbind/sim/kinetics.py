"""Ground-truth tracer kinetics for simulation: input function, compartment
models, SRTM, framing and frame averaging.

Times are minutes inside the models (``t_min``, rate constants per minute)
and seconds at the boundaries where frames are described
(``frame_start_s``, ``frame_duration_s``), as in PET-BIDS.  Concentrations
are decay-corrected (kinetics ignore physical decay; the simulator applies
decay when it turns activity into counts).

This module is for *generating* data; fitting lives in ``quant`` (which
``recon`` never imports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = [
    "FengInput",
    "RegionKinetics",
    "ReferenceKinetics",
    "DEFAULT_FRAME_DURATIONS_S",
    "AZ10419369_REGIONS",
    "AZ10419369_REFERENCE",
    "frame_times_s",
    "two_tissue_tac",
    "one_tissue_tac",
    "convolve_exponential",
    "srtm_tac",
    "frame_average",
    "RegionalTACs",
    "simulate_regional_tacs",
]

#: [11C] framing (s): 6x10, 3x20, 6x30, 5x60, 5x120, 8x300, 3x600 = 90 min.
DEFAULT_FRAME_DURATIONS_S = tuple([10.0] * 6 + [20.0] * 3 + [30.0] * 6 + [60.0] * 5 + [120.0] * 5 + [300.0] * 8 + [600.0] * 3)


def frame_times_s(frame_durations_s=DEFAULT_FRAME_DURATIONS_S, scan_start_s=0.0):
    """Contiguous frames from their durations.

    Parameters
    ----------
    frame_durations_s : sequence of float
        Frame durations (s), all positive.
    scan_start_s : float
        Start of the first frame (s after injection).

    Returns
    -------
    frame_start_s, frame_end_s : ndarray of float64
    """
    d = np.asarray(frame_durations_s, dtype=float).reshape(-1)
    if d.size == 0 or np.any(~np.isfinite(d)) or np.any(d <= 0):
        raise ValueError(f"frame_durations_s must be positive and finite; got {d.tolist()}")
    end = scan_start_s + np.cumsum(d)
    return end - d, end


def _phi1(alpha, beta, t):
    """``∫_0^t e^{λ s} e^{-α (t-s)} ds`` with ``β = λ + α`` (stable near ``β t = 0``)."""
    z = beta * t
    small = np.abs(z) < 1e-2
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        direct = (np.exp((beta - alpha) * t) - np.exp(-alpha * t)) / np.where(small, 1.0, beta)
    series = np.exp(-alpha * t) * t * (1 + z / 2 + z**2 / 6 + z**3 / 24 + z**4 / 120)
    return np.where(small, series, direct)


def _phi2(alpha, beta, t):
    """``∫_0^t s e^{λ s} e^{-α (t-s)} ds`` with ``β = λ + α``."""
    z = beta * t
    small = np.abs(z) < 1e-2
    lam = beta - alpha
    b = np.where(small, 1.0, beta)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        direct = t * np.exp(lam * t) / b - (np.exp(lam * t) - np.exp(-alpha * t)) / b**2
    series = np.exp(-alpha * t) * t**2 * (0.5 + z / 3 + z**2 / 8 + z**3 / 30 + z**4 / 144)
    return np.where(small, series, direct)


@dataclass(frozen=True)
class FengInput:
    """Feng plasma input function (tri-exponential with a linear first term).

    ``Cp(t) = (A1 (t-τ) - A2 - A3) e^{λ1 (t-τ)} + A2 e^{λ2 (t-τ)} + A3 e^{λ3 (t-τ)}``
    for ``t >= τ``, 0 before.

    Parameters
    ----------
    a1_per_min, a2, a3 : float
        Amplitudes (Bq/mL/min, Bq/mL, Bq/mL).
    l1_per_min, l2_per_min, l3_per_min : float
        Exponents (1/min, negative).
    delay_min : float
        Arrival delay τ (min).

    Notes
    -----
    The defaults keep Feng's FDG shape (A1 = 851.1225, A2 = 21.8798,
    A3 = 20.8113, λ1 = -4.1339, λ3 = -0.1191 /min) but raise the slowest
    exponent from 0.0104 to 0.020 /min, mimicking the fall of the parent
    fraction of an [11C] radioligand by metabolism, and scale the amplitudes
    (x 150 Bq/mL per Feng unit) so that, for about 400 MBq injected, the
    cerebellar TAC peaks near 10 kBq/mL as in [11C]AZ10419369 scans.

    References
    ----------
    Feng D, Huang SC, Wang X. Models for computer simulation studies of input
    functions for tracer kinetic modeling with positron emission tomography.
    Int J Biomed Comput 1993;32:95-110.
    """

    a1_per_min: float = 851.1225 * 150.0
    a2: float = 21.8798 * 150.0
    a3: float = 20.8113 * 150.0
    l1_per_min: float = -4.133859
    l2_per_min: float = -0.020
    l3_per_min: float = -0.1190996
    delay_min: float = 0.25

    def scaled(self, factor):
        """A copy with all amplitudes multiplied by ``factor`` (e.g. injected dose ratio)."""
        return FengInput(
            self.a1_per_min * factor, self.a2 * factor, self.a3 * factor,
            self.l1_per_min, self.l2_per_min, self.l3_per_min, self.delay_min,
        )

    def _terms(self):
        # (n, amplitude, lambda): Cp = sum amplitude * s^n e^{lambda s}, s = t - delay.
        return [
            (1, self.a1_per_min, self.l1_per_min),
            (0, -self.a2 - self.a3, self.l1_per_min),
            (0, self.a2, self.l2_per_min),
            (0, self.a3, self.l3_per_min),
        ]

    def __call__(self, t_min):
        """Plasma concentration (Bq/mL) at ``t_min`` (minutes after injection)."""
        s = np.asarray(t_min, dtype=float) - self.delay_min
        pos = s > 0
        sp = np.where(pos, s, 0.0)
        out = sum(a * sp**n * np.exp(lam * sp) for n, a, lam in self._terms())
        return np.where(pos, out, 0.0)

    def convolve_exponential(self, t_min, alpha_per_min):
        """Closed form of ``(Cp ⊗ e^{-α t})(t) = ∫_0^t Cp(s) e^{-α (t-s)} ds``."""
        s = np.asarray(t_min, dtype=float) - self.delay_min
        pos = s > 0
        sp = np.where(pos, s, 0.0)
        out = np.zeros_like(sp)
        for n, a, lam in self._terms():
            f = _phi2 if n == 1 else _phi1
            out += a * f(alpha_per_min, lam + alpha_per_min, sp)
        return np.where(pos, out, 0.0)


def convolve_exponential(t_min, values, rate_per_min):
    """``∫_0^t C(s) e^{-k (t - s)} ds`` for a sampled curve, exact for its
    piecewise-linear interpolant.

    Parameters
    ----------
    t_min : ndarray, shape (n,)
        Increasing sample times (min); the curve is taken as 0 at ``t = 0``
        when ``t_min[0] > 0``.
    values : ndarray, shape (n,) or (n, m)
        Curve samples.
    rate_per_min : float
        ``k`` (1/min), non-negative.

    Returns
    -------
    ndarray like ``values``

    Notes
    -----
    Recursion over samples: ``I_{j+1} = E I_j + C_j (1 - E)/k + (C_{j+1} - C_j)/Δ (Δ/k - (1 - E)/k²)``
    with ``E = e^{-k Δ}``, which is the exact integral of the linear segment.
    """
    t = np.asarray(t_min, dtype=float)
    c = np.asarray(values, dtype=float)
    if t.ndim != 1 or c.shape[0] != t.shape[0]:
        raise ValueError(f"t_min (shape {t.shape}) and values (shape {c.shape}) must share the first axis")
    if np.any(np.diff(t) <= 0) or t[0] < 0:
        raise ValueError("t_min must be non-negative and strictly increasing")
    k = float(rate_per_min)
    if k < 0:
        raise ValueError(f"rate_per_min must be >= 0; got {k}")
    t0 = np.concatenate([[0.0], t]) if t[0] > 0 else t
    c0 = np.concatenate([np.zeros((1,) + c.shape[1:]), c]) if t[0] > 0 else c
    dt = np.diff(t0)
    kd = k * dt
    e = np.exp(-kd)
    # Stable coefficients: w0 = ∫ (1 - u/Δ) e^{-k(Δ-u)} du, w1 = ∫ (u/Δ) e^{-k(Δ-u)} du.
    with np.errstate(invalid="ignore", divide="ignore"):
        g1 = np.where(kd > 1e-6, -np.expm1(-kd) / np.where(kd > 0, k, 1.0), dt * (1 - kd / 2))
        w1 = np.where(kd > 1e-6, (dt - g1) / np.where(kd > 0, k * dt, 1.0), dt * (0.5 - kd / 6))
    w0 = g1 - w1
    out = np.empty_like(c0)
    out[0] = 0.0
    acc = np.zeros(c.shape[1:])
    for j in range(dt.size):
        acc = e[j] * acc + w0[j] * c0[j] + w1[j] * c0[j + 1]
        out[j + 1] = acc
    return out[1:] if t[0] > 0 else out


def two_tissue_tac(t_min, plasma, k1, k2_per_min, k3_per_min, k4_per_min, blood_volume_fraction=0.0):
    """Two-tissue compartment model tissue curve (analytic, Feng input).

    Parameters
    ----------
    t_min : ndarray
        Times (min).
    plasma : FengInput
    k1 : float
        K1 (mL/cm³/min).
    k2_per_min, k3_per_min, k4_per_min : float
        Rate constants (1/min).
    blood_volume_fraction : float
        vB; whole-blood activity is taken equal to plasma.

    Returns
    -------
    ndarray
        ``C_T = (1 - vB)(C1 + C2) + vB Cp`` (Bq/mL).

    Notes
    -----
    ``dC1/dt = K1 Cp - (k2 + k3) C1 + k4 C2``, ``dC2/dt = k3 C1 - k4 C2``.
    ``C1 + C2 = K1/(α2 - α1) [(k3 + k4 - α1) e^{-α1 t} + (α2 - k3 - k4) e^{-α2 t}] ⊗ Cp``,
    ``α1,2 = (k2 + k3 + k4 ∓ sqrt((k2 + k3 + k4)² - 4 k2 k4)) / 2``.

    References
    ----------
    Gunn RN, Gunn SR, Cunningham VJ. Positron emission tomography
    compartmental models. J Cereb Blood Flow Metab 2001;21:635-652.
    """
    s = k2_per_min + k3_per_min + k4_per_min
    disc = math.sqrt(max(s * s - 4 * k2_per_min * k4_per_min, 0.0))
    a1, a2 = (s - disc) / 2, (s + disc) / 2
    if disc == 0.0:
        raise ValueError("two_tissue_tac: degenerate rate constants (alpha1 == alpha2); perturb k2..k4")
    c1 = k1 / (a2 - a1) * (k3_per_min + k4_per_min - a1)
    c2 = k1 / (a2 - a1) * (a2 - k3_per_min - k4_per_min)
    tissue = c1 * plasma.convolve_exponential(t_min, a1) + c2 * plasma.convolve_exponential(t_min, a2)
    return (1 - blood_volume_fraction) * tissue + blood_volume_fraction * plasma(t_min)


def one_tissue_tac(t_min, plasma, k1, k2_per_min, blood_volume_fraction=0.0):
    """One-tissue compartment model: ``C_T = K1 Cp ⊗ e^{-k2 t}`` (plus vB Cp)."""
    tissue = k1 * plasma.convolve_exponential(t_min, k2_per_min)
    return (1 - blood_volume_fraction) * tissue + blood_volume_fraction * plasma(t_min)


def srtm_tac(t_min, reference, r1, k2_per_min, bp_nd):
    """Target tissue curve from the simplified reference tissue model.

    Parameters
    ----------
    t_min : ndarray, shape (n,)
        Increasing sample times (min), fine enough for the piecewise-linear
        convolution (e.g. 0.05 min).
    reference : ndarray, shape (n,)
        Reference-region TAC at ``t_min`` (Bq/mL).
    r1 : float
        R1 = K1 / K1'.
    k2_per_min : float
        k2 of the target (1/min).
    bp_nd : float
        Binding potential BP_ND.

    Returns
    -------
    ndarray, shape (n,)

    Notes
    -----
    ``C_T(t) = R1 C_R(t) + (k2 - R1 k2 / (1 + BP_ND)) C_R(t) ⊗ e^{-k2 t / (1 + BP_ND)}``.

    References
    ----------
    Lammertsma AA, Hume SP. Simplified reference tissue model for PET
    receptor studies. NeuroImage 1996;4:153-158.
    """
    if bp_nd <= -1:
        raise ValueError(f"bp_nd must be > -1; got {bp_nd}")
    k2a = k2_per_min / (1 + bp_nd)
    ref = np.asarray(reference, dtype=float)
    return r1 * ref + (k2_per_min - r1 * k2a) * convolve_exponential(t_min, ref, k2a)


def frame_average(t_min, values, frame_start_s, frame_end_s):
    """Mean of a sampled curve over each frame (exact for its linear interpolant).

    Parameters
    ----------
    t_min : ndarray, shape (n,)
        Increasing sample times (min) covering all frames.
    values : ndarray, shape (n,) or (n, m)
    frame_start_s, frame_end_s : ndarray, shape (f,)
        Frame boundaries (s).

    Returns
    -------
    ndarray, shape (f,) or (f, m)
    """
    t = np.asarray(t_min, dtype=float)
    v = np.asarray(values, dtype=float)
    fs = np.asarray(frame_start_s, dtype=float) / 60.0
    fe = np.asarray(frame_end_s, dtype=float) / 60.0
    if np.any(fe <= fs):
        raise ValueError("every frame must end after it starts")
    if fs.min() < t[0] - 1e-12 or fe.max() > t[-1] + 1e-12:
        raise ValueError(f"samples cover {t[0]:g}-{t[-1]:g} min but frames span {fs.min():g}-{fe.max():g} min")
    # Cumulative integral of the piecewise-linear curve, evaluated at the boundaries.
    cum = np.concatenate([np.zeros((1,) + v.shape[1:]), np.cumsum(0.5 * np.diff(t)[:, None] * (v[1:] + v[:-1]).reshape(len(t) - 1, -1), axis=0).reshape((len(t) - 1,) + v.shape[1:])])

    def integral_to(x):
        j = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 2)
        h = (x - t[j])
        slope = (v[j + 1] - v[j]) / (t[j + 1] - t[j]).reshape((-1,) + (1,) * (v.ndim - 1))
        hh = h.reshape((-1,) + (1,) * (v.ndim - 1))
        return cum[j] + v[j] * hh + 0.5 * slope * hh**2

    return (integral_to(fe) - integral_to(fs)) / (fe - fs).reshape((-1,) + (1,) * (v.ndim - 1))


@dataclass(frozen=True)
class ReferenceKinetics:
    """Reference region (no specific binding): one-tissue model.

    Parameters
    ----------
    k1 : float
        K1' (mL/cm³/min).
    k2_per_min : float
        k2' (1/min).
    k4_per_min : float
        Dissociation rate used for every target region's two-tissue model
        (1/min); ``k3 = BP_ND k4``.
    blood_volume_fraction : float
        vB applied to every region.
    """

    k1: float = 0.30
    k2_per_min: float = 0.12
    k4_per_min: float = 0.06
    blood_volume_fraction: float = 0.04


@dataclass(frozen=True)
class RegionKinetics:
    """Target region parameters relative to the reference.

    Parameters
    ----------
    r1 : float
        K1 / K1'.
    bp_nd : float
        BP_ND = k3 / k4 (2TCM) or the SRTM BP_ND.
    k2_per_min : float, optional
        k2 of the region (1/min).  ``None`` (default) uses ``R1 k2'``, which
        keeps the non-displaceable distribution volume ``K1/k2`` equal to the
        reference's (the SRTM assumption); another value breaks that
        assumption on purpose (e.g. to test the bias of reference models).
    """

    r1: float
    bp_nd: float
    k2_per_min: Optional[float] = None

    def __post_init__(self):
        if not (np.isfinite(self.r1) and self.r1 > 0):
            raise ValueError(f"RegionKinetics.r1 must be positive; got {self.r1}")
        if not (np.isfinite(self.bp_nd) and self.bp_nd >= 0):
            raise ValueError(f"RegionKinetics.bp_nd must be >= 0; got {self.bp_nd}")
        if self.k2_per_min is not None and not (np.isfinite(self.k2_per_min) and self.k2_per_min > 0):
            raise ValueError(f"RegionKinetics.k2_per_min must be positive or None; got {self.k2_per_min}")

    def target_k2_per_min(self, reference):
        """k2 (1/min): the explicit value, or ``R1 k2'``."""
        return self.r1 * reference.k2_per_min if self.k2_per_min is None else float(self.k2_per_min)


#: Reference region parameters patterned on [11C]AZ10419369 (see AZ10419369_REGIONS).
AZ10419369_REFERENCE = ReferenceKinetics()

#: Regional R1 and BP_ND patterned on [11C]AZ10419369 (5-HT1B receptor).
#: Reference: cerebellar grey matter (negligible 5-HT1B density).  The
#: highest BP_ND are in the pallidum and occipital cortex (about 1.5-2), the
#: ventral striatum is high, the rest of the neocortex and the dorsal
#: striatum intermediate (about 1), and thalamus and hippocampus low (about
#: 0.6), following the regional pattern reported by Varnäs et al. (J Cereb
#: Blood Flow Metab 2011;31:113-123) and the 5-HT1B autoradiography of the
#: human brain (Varnäs et al. Hum Brain Mapp 2004;22:246-260).  The values
#: are rounded, plausible numbers for simulation, not a fit to those data.
#: Non-brain tissue gets R1 < 1, no specific binding and a smaller
#: distribution volume than brain (explicit k2); CSF and ventricles carry no
#: activity.
AZ10419369_REGIONS = {
    "frontal_cortex": RegionKinetics(1.10, 1.10),
    "temporal_cortex": RegionKinetics(1.05, 0.95),
    "parietal_cortex": RegionKinetics(1.10, 1.05),
    "occipital_cortex": RegionKinetics(1.20, 1.60),
    "caudate": RegionKinetics(0.90, 0.90),
    "putamen": RegionKinetics(1.00, 1.00),
    "ventral_striatum": RegionKinetics(1.00, 1.50),
    "pallidum": RegionKinetics(0.90, 1.80),
    "thalamus": RegionKinetics(1.00, 0.60),
    "hippocampus": RegionKinetics(0.80, 0.60),
    "brainstem": RegionKinetics(0.80, 0.30),
    "raphe": RegionKinetics(0.80, 0.70),
    "white_matter": RegionKinetics(0.50, 0.10),
    "cerebellar_white_matter": RegionKinetics(0.50, 0.05),
    "cerebellum": RegionKinetics(1.00, 0.00),
    "scalp": RegionKinetics(0.30, 0.00, k2_per_min=0.10),
    "skull": RegionKinetics(0.05, 0.00, k2_per_min=0.05),
}


@dataclass
class RegionalTACs:
    """Frame-averaged regional TACs (decay-corrected Bq/mL).

    Attributes
    ----------
    frame_start_s, frame_end_s : ndarray, shape (f,)
    tacs : dict of str to ndarray (f,)
    bp_nd : dict of str to float
        True BP_ND per region.
    t_min : ndarray
        Fine time grid (min) of ``fine``.
    fine : dict of str to ndarray
        Curves on the fine grid.
    """

    frame_start_s: np.ndarray
    frame_end_s: np.ndarray
    tacs: dict
    bp_nd: dict
    t_min: np.ndarray = field(repr=False)
    fine: dict = field(repr=False)

    def to_table(self):
        """``(columns, rows)`` in the PET-BIDS TAC layout (``frame_start``, ``frame_end``, regions)."""
        names = list(self.tacs)
        cols = ["frame_start", "frame_end"] + names
        rows = np.column_stack([self.frame_start_s, self.frame_end_s] + [self.tacs[n] for n in names])
        return cols, rows


def simulate_regional_tacs(
    regions=None,
    frame_start_s=None,
    frame_end_s=None,
    model="2tcm",
    plasma=None,
    reference=None,
    reference_region="cerebellum",
    fine_step_min=0.02,
):
    """Regional TACs from a two-tissue model with a plasma input, or from SRTM.

    Parameters
    ----------
    regions : dict of str to RegionKinetics, optional
        Default :data:`AZ10419369_REGIONS`.
    frame_start_s, frame_end_s : ndarray, optional
        Framing (s); default :data:`DEFAULT_FRAME_DURATIONS_S` from 0.
    model : {"2tcm", "srtm"}
        ``"2tcm"``: each region ``K1 = R1 K1'``, ``k2 = R1 k2'``,
        ``k3 = BP_ND k4``, ``k4`` from ``reference``, driven by ``plasma``;
        the reference region (BP_ND = 0) is a one-tissue model.
        ``"srtm"``: the reference TAC is the one-tissue curve and every target
        is :func:`srtm_tac` of it (so SRTM recovers BP_ND exactly).
    plasma : FengInput, optional
    reference : ReferenceKinetics, optional
    reference_region : str
        Name of the region with the reference parameters (its ``RegionKinetics``
        must have ``r1 == 1`` and ``bp_nd == 0`` when present).
    fine_step_min : float
        Step (min) of the fine grid the curves are computed on before frame
        averaging.

    Returns
    -------
    RegionalTACs
    """
    regions = dict(AZ10419369_REGIONS if regions is None else regions)
    plasma = FengInput() if plasma is None else plasma
    reference = AZ10419369_REFERENCE if reference is None else reference
    if model not in ("2tcm", "srtm"):
        raise ValueError(f"model must be '2tcm' or 'srtm'; got {model!r}")
    if frame_start_s is None or frame_end_s is None:
        frame_start_s, frame_end_s = frame_times_s()
    frame_start_s = np.asarray(frame_start_s, dtype=float)
    frame_end_s = np.asarray(frame_end_s, dtype=float)
    ref_params = regions.get(reference_region)
    if ref_params is not None and (ref_params.r1 != 1.0 or ref_params.bp_nd != 0.0 or ref_params.k2_per_min not in (None, reference.k2_per_min)):
        raise ValueError(f"reference region {reference_region!r} must have r1=1 and bp_nd=0; got {ref_params}")
    t_end = frame_end_s.max() / 60.0
    n = int(math.ceil(t_end / fine_step_min))
    t = np.linspace(0.0, n * fine_step_min, n + 1)
    # Frame boundaries on the grid keep frame averages exact for the interpolant.
    t = np.union1d(t, np.concatenate([frame_start_s, frame_end_s]) / 60.0)
    vb = reference.blood_volume_fraction
    ref_tac = one_tissue_tac(t, plasma, reference.k1, reference.k2_per_min, vb)
    fine = {}
    for name, rk in regions.items():
        if not isinstance(rk, RegionKinetics):
            raise TypeError(f"regions[{name!r}] must be a RegionKinetics; got {type(rk).__name__}")
        k2 = rk.target_k2_per_min(reference)
        if model == "srtm" or rk.bp_nd == 0.0:
            if model == "srtm":
                # SRTM on the tissue part; vB is added back from the plasma so that
                # every curve includes the same blood contribution.
                ref_tissue = one_tissue_tac(t, plasma, reference.k1, reference.k2_per_min, 0.0)
                tissue = srtm_tac(t, ref_tissue, rk.r1, k2, rk.bp_nd)
            else:
                tissue = one_tissue_tac(t, plasma, rk.r1 * reference.k1, k2, 0.0)
            fine[name] = (1 - vb) * tissue + vb * plasma(t)
        else:
            k4 = reference.k4_per_min
            fine[name] = two_tissue_tac(t, plasma, rk.r1 * reference.k1, k2, rk.bp_nd * k4, k4, vb)
    if reference_region not in fine:
        fine[reference_region] = ref_tac
    tacs = {name: frame_average(t, curve, frame_start_s, frame_end_s) for name, curve in fine.items()}
    bp = {name: regions[name].bp_nd if name in regions else 0.0 for name in fine}
    return RegionalTACs(frame_start_s, frame_end_s, tacs, bp, t, fine)
