"""Radioactive decay: half-lives and the decay integral, written once.

Every stage that needs decay uses these functions: the simulator (counts of a
frame), the pipeline (the OSEM multiplicative factor and decay correction),
listmode framing and the kinetic models' count-based weights.  The functions
do not care about the time unit as long as times and the decay constant use
the same one; the names say seconds because that is the unit in files.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "HALF_LIFE_S",
    "C11_HALF_LIFE_S",
    "half_life_s",
    "decay_constant_per_s",
    "decay_integral",
    "mean_decay_factor",
    "decay_correction_factor",
]

#: Physical half-lives (s) of PET radionuclides (DDEP/NUDAT recommended
#: values), keyed by PET-BIDS ``TracerRadionuclide`` spelling.
HALF_LIFE_S = {
    "C11": 1221.84,
    "F18": 6586.2,
    "O15": 122.24,
    "N13": 597.9,
    "Ga68": 4062.6,
    "Rb82": 76.38,
    "Cu64": 45720.0,
    "Zr89": 282276.0,
}

C11_HALF_LIFE_S = HALF_LIFE_S["C11"]

_BY_KEY = {k.lower(): v for k, v in HALF_LIFE_S.items()}


def half_life_s(radionuclide, where="radionuclide"):
    """Half-life (s) of a radionuclide named as in PET-BIDS (``C11``, ``11C``, ``F-18``...).

    Parameters
    ----------
    radionuclide : str
        Name; case, hyphens and the order of mass number and symbol are ignored.
    where : str
        File and field for the error message.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    key = str(radionuclide).strip().lower().replace("-", "").replace("^", "").replace(" ", "")
    if key and key[0].isdigit():  # "11c" -> "c11"
        digits = "".join(ch for ch in key if ch.isdigit())
        key = key[len(digits):] + digits
    if key not in _BY_KEY:
        raise ValueError(f"{where}: unknown radionuclide {radionuclide!r}; expected one of {sorted(HALF_LIFE_S)}")
    return _BY_KEY[key]


def decay_constant_per_s(half_life_s):
    """``λ = ln 2 / T½`` (1/s); refuses a half-life that is not positive and finite."""
    t = float(half_life_s)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"half-life must be a positive number of seconds; got {half_life_s!r}")
    return math.log(2.0) / t


def decay_integral(start_s, end_s, decay_constant_per_s):
    """``∫_start^end exp(-λ t) dt``: the decay-weighted exposure of a frame (s).

    Parameters
    ----------
    start_s, end_s : float or array
        Frame edges, in time after the reference (injection) time.
    decay_constant_per_s : float
        ``λ`` in the reciprocal of the time unit (0: no decay).

    Returns
    -------
    float or ndarray
        A source of initial activity ``A0`` gives ``A0 × decay_integral``
        decays in the frame.  Computed with ``expm1`` so that short frames
        keep full precision.
    """
    start = np.asarray(start_s, dtype=float)
    end = np.asarray(end_s, dtype=float)
    lam = float(decay_constant_per_s)
    out = end - start if lam == 0 else np.exp(-lam * start) * -np.expm1(-lam * (end - start)) / lam
    return float(out) if out.ndim == 0 else out


def mean_decay_factor(start_s, end_s, decay_constant_per_s):
    """Frame mean of ``exp(-λ t)``: decay-uncorrected = factor × decay-corrected."""
    start = np.asarray(start_s, dtype=float)
    end = np.asarray(end_s, dtype=float)
    if np.any(end <= start):
        raise ValueError("frame end must be after frame start")
    return decay_integral(start, end, decay_constant_per_s) / (end - start)


def decay_correction_factor(frame_start_s, frame_end_s, half_life_s, scan_start_s=0.0):
    """Factor that corrects the mean count rate of a frame to activity at injection.

    Parameters
    ----------
    frame_start_s, frame_end_s : float or array
        Frame edges (s after scan start).
    half_life_s : float
        Physical half-life (s).
    scan_start_s : float
        Scan start after injection (s).

    Returns
    -------
    float or ndarray
        ``Δt / ∫ exp(-λ t) dt`` over the frame, times measured from injection:
        the reciprocal of :func:`mean_decay_factor`.
    """
    lam = decay_constant_per_s(half_life_s)
    t0 = np.asarray(frame_start_s, dtype=float) + float(scan_start_s)
    t1 = np.asarray(frame_end_s, dtype=float) + float(scan_start_s)
    if np.any(t1 <= t0):
        raise ValueError("frame_end_s must be greater than frame_start_s")
    out = 1.0 / mean_decay_factor(t0, t1, lam)
    return float(out) if np.ndim(out) == 0 else out
