"""Shared machinery for the reference-tissue models: input validation, frame
timing, weights, status codes and the frame-integrated convolution operator.

Time inside this module is in minutes; public callers pass seconds and the
conversion happens once, in :func:`validate_frames`.

The continuous-time reference curve
-----------------------------------
Measured TACs are frame means.  Operators that need a continuous curve (the
convolution ``C_R(t) * exp(-b t)`` of SRTM/BF-SRTM and the running integral
``int_0^t C(u) du`` of MRTM/Logan) use one interpolant: ``C(0) = 0`` at
injection, linear through ``(t_mid_i, C_i)``, constant ``C_n`` after the last
frame mid-time.  The operator is evaluated analytically for that piecewise-
linear curve (no time-grid discretisation error) and then averaged over every
frame exactly, so the model output is a frame mean like the data.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict

import numpy as np

from petbind.core.decay import mean_decay_factor
from petbind.core.device import to_numpy
from petbind.core.frames import validate_frame_times

logger = logging.getLogger("petbind.quant.models")

# Status codes shared by regional fits and parametric maps.
STATUS_OK = 0
STATUS_BOUND_HIT = 1
STATUS_FIT_FAILED = 2
STATUS_NONFINITE_INPUT = 3
STATUS_MASKED = 4
STATUS_NONPOSITIVE_DATA = 5
STATUS_NAMES = {
    STATUS_OK: "ok",
    STATUS_BOUND_HIT: "bound_hit (estimate at a parameter bound or at the edge of the theta3 grid; value kept)",
    STATUS_FIT_FAILED: "fit_failed (solver failed, singular design or non-physical estimate; NaN)",
    STATUS_NONFINITE_INPUT: "nonfinite_input (target TAC has NaN/inf; NaN)",
    STATUS_MASKED: "masked (outside mask or below threshold; NaN)",
    STATUS_NONPOSITIVE_DATA: "nonpositive_data (Logan needs C_T > 0 in every frame after t*; NaN)",
}

WEIGHT_SCHEMES = ("none", "duration", "counts")

_CONV_CACHE = OrderedDict()
_CONV_CACHE_SIZE = 8


# ----------------------------------------------------------------- validation
class KineticFrames:
    """Frame timing of a kinetic fit in minutes, plus the interpolation set-up.

    Built from frame edges in seconds, checked by
    :func:`petbind.core.frames.validate_frame_times`.

    Attributes
    ----------
    start_min, end_min, mid_min, dur_min : ndarray (n_frames,)
    knots_min : ndarray (n_knots,)
        0, every frame start, mid and end (sorted, unique).
    interp : ndarray (n_knots, n_frames)
        Value of the piecewise-linear interpolant at each knot as a linear
        map of the frame values.
    start_idx, end_idx : ndarray (n_frames,) of int
        Knot index of each frame start and end.
    """

    def __init__(self, frame_start_s, frame_end_s):
        s = _as_1d_float(frame_start_s, "frame_start_s")
        e = _as_1d_float(frame_end_s, "frame_end_s")
        s, e = validate_frame_times(s, e, "frame_start_s/frame_end_s")
        if s.size < 3:
            raise ValueError(f"frame_start_s: need at least 3 frames for a kinetic fit; got {s.size}")
        self.n = s.size
        self.start_min = s / 60.0
        self.end_min = np.maximum(e / 60.0, self.start_min)
        self.dur_min = self.end_min - self.start_min
        self.mid_min = 0.5 * (self.start_min + self.end_min)
        knots = np.unique(np.concatenate([[0.0], self.start_min, self.mid_min, self.end_min]))
        self.knots_min = knots
        self.start_idx = np.searchsorted(knots, self.start_min)
        self.end_idx = np.searchsorted(knots, self.end_min)
        xs = np.concatenate([[0.0], self.mid_min])
        eye = np.vstack([np.zeros((1, self.n)), np.eye(self.n)])
        # np.interp holds the last value beyond the last mid-time.
        self.interp = np.stack([np.interp(knots, xs, eye[:, j]) for j in range(self.n)], axis=1)
        self._m0 = None

    @property
    def running_integral_matrix(self):
        """(n_frames, n_frames) map from frame values to the frame mean of
        ``int_0^t C(u) du`` (min * Bq/mL)."""
        if self._m0 is None:
            self._m0 = conv_matrices(self, np.array([0.0]))[0]
        return self._m0


def _as_1d_float(a, name):
    try:
        arr = np.asarray(to_numpy(a), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a 1-D array of numbers; got {type(a).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: all values must be finite; NaN/inf at index {int(np.argmin(np.isfinite(arr)))}")
    return arr


def validate_reference(reference_tac, frames):
    """Reference TAC as float64 (n_frames,); finite, length-checked."""
    ref = _as_1d_float(reference_tac, "reference_tac")
    if ref.size != frames.n:
        raise ValueError(f"reference_tac: expected {frames.n} values (one per frame); got {ref.size}")
    if not np.any(ref > 0):
        raise ValueError("reference_tac: all values are <= 0 Bq/mL; expected a reference-region TAC")
    return ref


# --------------------------------------------------------------------- weights
def frame_decay_factor(frames, half_life_min):
    """Frame-mean decay factor ``d_i``: decay-uncorrected activity = ``d_i`` x corrected.

    See :func:`petbind.core.decay.mean_decay_factor`; here in minutes.
    """
    return mean_decay_factor(frames.start_min, frames.end_min, math.log(2.0) / half_life_min)


def make_weights(weights, frames, reference_tac, half_life_min=None):
    """Frame weights (1/variance, relative), scaled to mean 1.

    Parameters
    ----------
    weights : {"none", "duration", "counts"} or array_like (n_frames,)
        ``"none"``: ``w_i = 1``.  ``"duration"``: ``w_i = dt_i``.
        ``"counts"``: ``w_i = dt_i * d_i / C_R,i`` where ``C_R,i`` is the
        decay-corrected reference TAC and ``d_i`` the frame-mean decay factor
        (:func:`frame_decay_factor`); see Notes.  An array is taken as
        relative weights (1/variance) and must be finite, >= 0, not all 0.
    frames : KineticFrames
    reference_tac : ndarray (n_frames,)
        Decay-corrected reference TAC in Bq/mL.
    half_life_min : float, optional
        Isotope half-life in minutes; required for ``"counts"``.

    Returns
    -------
    ndarray (n_frames,)
        Weights scaled so that their mean is 1 (the scale does not change
        any estimate; standard errors use the residual variance).

    Notes
    -----
    Counts weighting follows Mazoyer et al. (1986): the variance of the
    counts ``N_i`` recorded in a frame is ``N_i`` (Poisson), and
    ``N_i ~ C_R,i d_i dt_i`` (decay-uncorrected activity times duration).
    The decay-corrected concentration is ``C_i = N_i / (k d_i dt_i)``, so
    ``var(C_i) ~ C_i / (d_i dt_i)`` and ``w_i = 1/var(C_i) ~ dt_i d_i / C_i``
    ``= dt_i**2 d_i**2 / N_i``.  The reference TAC (a large, low-noise region)
    stands in for the count rate of every target so that every voxel and
    region is fitted with the same weights.

    References
    ----------
    Mazoyer BM, Huesman RH, Budinger TF, Knittel BL. Dynamic PET data
    analysis. J Comput Assist Tomogr. 1986;10(4):645-653.
    """
    if isinstance(weights, str):
        if weights not in WEIGHT_SCHEMES:
            raise ValueError(f"weights: expected one of {WEIGHT_SCHEMES} or an array; got {weights!r}")
        if weights == "none":
            w = np.ones(frames.n)
        elif weights == "duration":
            w = frames.dur_min.copy()
        else:
            if half_life_min is None:
                raise ValueError(
                    "weights='counts' needs half_life_min (isotope half-life in minutes, e.g. 20.364 for C-11) "
                    "to recover decay-uncorrected activity"
                )
            if not (np.isfinite(half_life_min) and half_life_min > 0):
                raise ValueError(f"half_life_min: expected a positive number of minutes; got {half_life_min!r}")
            bad = np.nonzero(reference_tac <= 0)[0]
            if bad.size:
                raise ValueError(
                    "weights='counts': the reference TAC must be > 0 Bq/mL in every frame (counts would be 0, "
                    f"weight infinite); frame {int(bad[0])} has {reference_tac[bad[0]]!r}. "
                    "Pass explicit weights or use weights='duration'"
                )
            d = frame_decay_factor(frames, float(half_life_min))
            w = frames.dur_min * d / reference_tac
    else:
        w = np.asarray(to_numpy(weights), dtype=np.float64)
        if w.shape != (frames.n,):
            raise ValueError(f"weights: expected shape ({frames.n},) (one per frame); got {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights: expected finite values >= 0 (1/variance); got negative or non-finite values")
        if not np.any(w > 0):
            raise ValueError("weights: all weights are 0; at least 3 frames need positive weight")
    return w / w.mean()


# ---------------------------------------------------- frame-integrated operator
def _phi(x, n, xp):
    """``f_n(x) = sum_k (-x)^k / (k+n)!`` for n = 1, 2, 3, i.e.
    ``(1-e^-x)/x``, ``(x-1+e^-x)/x^2``, ``(x^2/2-x+1-e^-x)/x^3``;
    series near 0 where the closed forms cancel."""
    small = x < 0.1
    xs = xp.where(small, 1.0, x)
    em1 = -xp.expm1(-xs)  # 1 - e^-x without cancellation
    if n == 1:
        closed = em1 / xs
    elif n == 2:
        closed = (xs - em1) / xs**2
    else:
        closed = (0.5 * xs**2 - xs + em1) / xs**3
    series = xp.zeros_like(x)
    term = xp.ones_like(x)
    for k in range(8):  # truncation error < 0.1**8/(8+n)! relative
        series = series + term / math.factorial(k + n)
        term = term * (-x)
    return xp.where(small, series, closed)


def _segments(frames, c_frames=None):
    """Knot-segment lengths and, per segment, start value and slope of the
    interpolant (of the identity map when ``c_frames`` is None)."""
    t = frames.knots_min
    h = np.diff(t)
    ck = frames.interp if c_frames is None else frames.interp @ np.asarray(c_frames, dtype=np.float64)
    c0 = ck[:-1]
    m = (ck[1:] - ck[:-1]) / (h if ck.ndim == 1 else h[:, None])
    return h, c0, m


def _frame_means(cum, frames, xp, axis):
    """Frame means from the cumulative integral at the knots along ``axis``."""
    si = xp.asarray(frames.start_idx)
    ei = xp.asarray(frames.end_idx)
    dur = xp.asarray(frames.dur_min)
    diff = xp.take(cum, ei, axis=axis) - xp.take(cum, si, axis=axis)
    shape = [1] * diff.ndim
    shape[axis] = frames.n
    return diff / dur.reshape(shape)


def conv_matrices(frames, b_per_min):
    """Frame means of ``C(t) * exp(-b t)`` as linear maps of the frame values.

    Parameters
    ----------
    frames : KineticFrames
    b_per_min : ndarray (n_b,)
        Decay rates in 1/min, >= 0 (``b = 0`` gives the running integral).

    Returns
    -------
    ndarray (n_b, n_frames, n_frames)
        ``M[j] @ C`` is the frame mean (Bq/mL * min) of the convolution of the
        piecewise-linear interpolant of ``C`` with ``exp(-b_j t)``.

    Notes
    -----
    On a knot segment of length ``h`` with ``C(t_k + s) = c_k + m s`` the
    convolution ``y`` solves ``y' = C - b y`` exactly:
    ``y_{k+1} = y_k e^{-bh} + g_k``, ``g_k = c_k h f1 + m h^2 f2`` and
    ``int_seg y = y_k h f1 + c_k h^2 f2 + m h^3 f3`` with ``f_n(bh)`` from
    :func:`_phi`.  Unrolled, ``y_K = sum_{j<K} g_j exp(-b (t_K - t_{j+1}))``,
    evaluated for all knots at once.  Frame means are differences of the
    cumulative integral at the frame's start and end knots over the duration.
    """
    b = np.asarray(b_per_min, dtype=np.float64).reshape(-1, 1)
    # Memoised: every chunk of a parametric map and every regional fit with
    # the same frames and grid reuses the matrices.
    key = (frames.start_min.tobytes(), frames.end_min.tobytes(), b.tobytes())
    hit = _CONV_CACHE.get(key)
    if hit is not None:
        _CONV_CACHE.move_to_end(key)
        return hit
    t = frames.knots_min
    h, c0, m = _segments(frames)
    x = b * h  # (nb, nseg)
    f1, f2, f3 = _phi(x, 1, np), _phi(x, 2, np), _phi(x, 3, np)
    g = c0[None] * (h * f1)[..., None] + m[None] * (h * h * f2)[..., None]  # (nb, nseg, nf)
    lag = t[:, None] - t[None, 1:]  # t_K - t_{j+1}, (nk, nseg)
    valid = lag >= -1e-12
    L = np.where(valid[None], np.exp(-b[:, :, None] * np.where(valid, lag, 0.0)[None]), 0.0)
    y = L @ g  # (nb, nk, nf): value at every knot
    seg = y[:, :-1] * (h * f1)[..., None] + c0[None] * (h * h * f2)[..., None] + m[None] * (h**3 * f3)[..., None]
    cum = np.concatenate([np.zeros((b.shape[0], 1, frames.n)), np.cumsum(seg, axis=1)], axis=1)
    out = _frame_means(cum, frames, np, axis=1)
    out.setflags(write=False)
    if b.size > 1:  # single rates come from the NLS loop: not worth keeping
        _CONV_CACHE[key] = out
        while len(_CONV_CACHE) > _CONV_CACHE_SIZE:
            _CONV_CACHE.popitem(last=False)
    return out


def conv_per_target(frames, c_frames, b_per_min, xp):
    """Frame means of ``C * exp(-b t)`` for one curve ``C`` and one rate per target.

    Parameters
    ----------
    frames : KineticFrames
    c_frames : ndarray (n_frames,) on host
    b_per_min : xp array (n_targets,)

    Returns
    -------
    xp array (n_targets, n_frames)

    Notes
    -----
    Same recurrence as :func:`conv_matrices` with a per-target ``b``; the
    short loop runs over knots (about 2 x n_frames), never over targets.
    """
    h_np, c0_np, m_np = _segments(frames, c_frames)
    h, c0, m = xp.asarray(h_np), xp.asarray(c0_np), xp.asarray(m_np)
    x = b_per_min[:, None] * h[None, :]
    f1, f2, f3 = _phi(x, 1, xp), _phi(x, 2, xp), _phi(x, 3, xp)
    E = xp.exp(-x)
    g = c0 * h * f1 + m * h * h * f2
    base = c0 * h * h * f2 + m * h**3 * f3
    hf1 = h * f1
    nt, nseg = x.shape
    seg = xp.empty((nt, nseg))
    y = xp.zeros(nt)
    for k in range(nseg):
        seg[:, k] = y * hf1[:, k] + base[:, k]
        y = y * E[:, k] + g[:, k]
    cum = xp.concatenate([xp.zeros((nt, 1)), xp.cumsum(seg, axis=1)], axis=1)
    return _frame_means(cum, frames, xp, axis=1)


def warn_status(model, status):
    """One warning with counts per non-ok status (never one per target)."""
    st = to_numpy(status).ravel()
    parts = []
    for code in (STATUS_BOUND_HIT, STATUS_FIT_FAILED, STATUS_NONFINITE_INPUT, STATUS_NONPOSITIVE_DATA):
        n = int(np.count_nonzero(st == code))
        if n:
            parts.append(f"{n} {STATUS_NAMES[code].split(' ')[0]}")
    if parts:
        n_fit = int(np.count_nonzero(st != STATUS_MASKED))
        msg = f"{model}: {', '.join(parts)} out of {n_fit} fitted targets (see status; failed targets are NaN)"
        logger.info(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
