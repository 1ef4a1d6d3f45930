"""Frames of a dynamic acquisition, in seconds, written once for every stage.

Frame edges are kept as exact fractions, so that ``"6x10s,3x20s"`` has edges
at exactly 60 s and an event at 60.000 s falls in frame 6, never in both or
neither; floats are derived from them.  Frames are half-open ``[start, end)``
and may leave gaps but never overlap.  Times are seconds after scan start
(listmode) or after injection (images and TACs); kinetic models convert to
minutes at their boundary.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np

from petbind.core.decay import decay_correction_factor
from petbind.core.device import array_module

__all__ = ["Frames", "parse_frames", "validate_frame_times", "exact_seconds", "check_scan_length", "FRAME_TOLERANCE",
           "MIN_SCAN_HALF_LIVES", "MAX_SCAN_HALF_LIVES"]

#: Relative tolerance (of a frame's duration, at least 1 s) for gaps/overlaps
#: that stem from rounding frame times stored as text.
FRAME_TOLERANCE = 1e-6

#: A dynamic scan shorter than this many half-lives cannot be a receptor
#: study; it is what frame times in minutes look like when read as seconds.
MIN_SCAN_HALF_LIVES = 0.25
#: ... and one longer than this many half-lives has no counts left to image.
MAX_SCAN_HALF_LIVES = 20.0

_UNIT_S = {"s": Fraction(1), "m": Fraction(60), "min": Fraction(60), "h": Fraction(3600)}


def exact_seconds(value, what="time"):
    """``value`` (s, a number or its text) as an exact :class:`~fractions.Fraction`."""
    try:
        frac = Fraction(str(value)) if not isinstance(value, Fraction) else value
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what}: {value!r} is not a number") from None
    return frac


class Frames:
    """Time frames of a dynamic acquisition (s after scan start).

    Parameters
    ----------
    start_s : sequence of float
        Frame starts (s), strictly increasing.
    duration_s : sequence of float
        Frame durations (s), positive.  Frames may leave gaps but must not
        overlap.

    Attributes
    ----------
    start_s, end_s, duration_s, mid_s : ndarray of float64, shape (num_frames,)

    Examples
    --------
    >>> f = Frames.from_string("2x10s,1x1m")
    >>> f.start_s.tolist(), f.end_s.tolist()
    ([0.0, 10.0, 20.0], [10.0, 20.0, 80.0])
    """

    def __init__(self, start_s, duration_s):
        starts = [exact_seconds(v, "frame start_s") for v in np.atleast_1d(np.asarray(start_s, dtype=object)).tolist()]
        durs = [exact_seconds(v, "frame duration_s") for v in np.atleast_1d(np.asarray(duration_s, dtype=object)).tolist()]
        self._init_exact(starts, durs)

    def _init_exact(self, starts, durs):
        if len(starts) != len(durs) or not starts:
            raise ValueError(f"frames need as many starts as durations (at least one); got {len(starts)} and {len(durs)}")
        if any(d <= 0 for d in durs):
            raise ValueError(f"frame durations must be positive; got {[float(d) for d in durs]}")
        if any(s < 0 for s in starts):
            raise ValueError(f"frame starts must be >= 0 s; got {[float(s) for s in starts]}")
        ends = [s + d for s, d in zip(starts, durs)]
        for i in range(1, len(starts)):
            if starts[i] < ends[i - 1]:
                raise ValueError(
                    f"frames must be in time order without overlap: frame {i} starts at {float(starts[i])} s "
                    f"before frame {i - 1} ends at {float(ends[i - 1])} s"
                )
        self._starts, self._ends = starts, ends
        self.start_s = np.array([float(s) for s in starts])
        self.end_s = np.array([float(e) for e in ends])
        self.duration_s = np.array([float(d) for d in durs])
        self.mid_s = np.array([float((s + e) / 2) for s, e in zip(starts, ends)])
        #: frame edges in ms, used for event selection
        self.start_ms = np.array([float(s * 1000) for s in starts])
        self.end_ms = np.array([float(e * 1000) for e in ends])

    @classmethod
    def from_string(cls, text, start_s=0.0):
        """Parse ``"6x10s,3x20s,6x30s,5x60s"`` (units ``s``, ``m``/``min``, ``h``).

        Parameters
        ----------
        text : str
            Comma-separated ``COUNTxDURATIONUNIT`` items; ``COUNTx`` may be
            omitted for a single frame.  Frames follow each other without gaps.
        start_s : float
            Start of the first frame (s after scan start).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"frame definition must be a non-empty string like '6x10s,3x20s'; got {text!r}")
        durs = []
        for item in text.replace(" ", "").split(","):
            m = re.fullmatch(r"(?:(\d+)[x*])?(\d+(?:\.\d*)?|\.\d+)(s|m|min|h)", item)
            if not m:
                raise ValueError(
                    f"frame definition item {item!r} in {text!r} not understood; expected COUNTxDURATION with unit "
                    "s, m/min or h, e.g. '6x10s' or '5x1m'"
                )
            count = int(m.group(1)) if m.group(1) else 1
            if count < 1:
                raise ValueError(f"frame count must be >= 1 in {item!r}")
            durs += [Fraction(m.group(2)) * _UNIT_S[m.group(3)]] * count
        t = exact_seconds(start_s, "frame start_s")
        starts = []
        for d in durs:
            starts.append(t)
            t += d
        obj = cls.__new__(cls)
        obj._init_exact(starts, durs)
        return obj

    @classmethod
    def from_bids(cls, frame_times_start, frame_duration):
        """From PET-BIDS ``FrameTimesStart`` and ``FrameDuration`` (s).

        Notes
        -----
        PET-BIDS times are relative to ``TimeZero``; here they are taken as
        relative to the scan start of the listmode file.
        """
        return cls(frame_times_start, frame_duration)

    @classmethod
    def from_edges(cls, start_s, end_s, source="frames"):
        """From frame starts and ends (s), validated by :func:`validate_frame_times`."""
        start, end = validate_frame_times(start_s, end_s, source)
        return cls(start, end - start)

    @classmethod
    def open_ended(cls, start_s=0.0):
        """A single frame ``[start_s, inf)``: every event from ``start_s`` on."""
        return _open_frame(start_s)

    def frame(self, k):
        """Frame ``k`` alone, as a :class:`Frames` with exactly the same edges."""
        k = range(len(self))[k]
        obj = type(self).__new__(type(self))
        obj._init_exact([self._starts[k]], [self._ends[k] - self._starts[k]])
        return obj

    def to_bids(self):
        """``{"FrameTimesStart": [...], "FrameDuration": [...]}`` (s)."""
        return {"FrameTimesStart": self.start_s.tolist(), "FrameDuration": self.duration_s.tolist()}

    def __len__(self):
        return len(self._starts)

    def __iter__(self):
        return iter(zip(self.start_s, self.end_s))

    def __eq__(self, other):
        return isinstance(other, Frames) and self._starts == other._starts and self._ends == other._ends

    def __repr__(self):
        return f"Frames(num_frames={len(self)}, first_start_s={self.start_s[0]:g}, last_end_s={self.end_s[-1]:g})"

    def decay_correction(self, exam):
        """Decay-correction factor of every frame to injection time.

        Parameters
        ----------
        exam : object
            Supplies ``half_life_s`` and ``scan_start_s`` (s), e.g. an
            :class:`~petbind.recon.rawdata.schema.ExamInfo`.

        Returns
        -------
        ndarray, shape (num_frames,)
            See :func:`petbind.core.decay.decay_correction_factor`.
        """
        if not exam.half_life_s > 0:
            raise ValueError(f"exam.half_life_s must be known and positive for decay correction; got {exam.half_life_s}")
        return decay_correction_factor(self.start_s, self.end_s, exam.half_life_s, exam.scan_start_s)

    def frame_of(self, time_ms):
        """Frame index of each event time (ms), ``-1`` outside every frame.

        Parameters
        ----------
        time_ms : array of float
            Event times (ms after scan start), NumPy or CuPy.
        """
        xp = array_module(time_ms)
        t = xp.asarray(time_ms)
        # frame edges go to the device once, not once per chunk
        cache = self.__dict__.setdefault("_edges_cache", {})
        if xp.__name__ not in cache:
            cache[xp.__name__] = (xp.asarray(self.start_ms), xp.asarray(self.end_ms))
        start_ms, end_ms = cache[xp.__name__]
        # edges sorted because frames do not overlap; side="right" makes [start, end)
        idx = xp.searchsorted(start_ms, t, side="right") - 1
        safe = xp.clip(idx, 0, len(self) - 1)
        inside = (idx >= 0) & (t < end_ms[safe])
        return xp.where(inside, idx, -1)


def parse_frames(definition, frame_duration=None, start_s=0.0):
    """Frames from a string (``"6x10s,3x20s"``) or PET-BIDS lists.

    Parameters
    ----------
    definition : str, Frames or sequence of float
        A frame string, an existing :class:`Frames`, or ``FrameTimesStart`` (s)
        when ``frame_duration`` is given.
    frame_duration : sequence of float, optional
        PET-BIDS ``FrameDuration`` (s).
    start_s : float
        Start of the first frame for string definitions.

    Returns
    -------
    Frames
    """
    if isinstance(definition, Frames):
        return definition
    if isinstance(definition, str):
        if frame_duration is not None:
            raise ValueError("frame_duration is only used with a FrameTimesStart list, not with a frame string")
        return Frames.from_string(definition, start_s)
    if frame_duration is None:
        raise ValueError("a list of frame starts needs frame_duration (PET-BIDS FrameDuration)")
    return Frames.from_bids(definition, frame_duration)


def _open_frame(start_s=0.0):
    # an infinite end has no exact fraction, so this bypasses _init_exact
    obj = Frames.__new__(Frames)
    start = exact_seconds(start_s, "frame start_s")
    obj._starts, obj._ends = [start], [None]
    obj.start_s = np.array([float(start)])
    obj.end_s = np.array([math.inf])
    obj.duration_s = np.array([math.inf])
    obj.mid_s = np.array([math.inf])
    obj.start_ms = np.array([float(start * 1000)])
    obj.end_ms = np.array([math.inf])
    return obj


def validate_frame_times(frame_start_s, frame_end_s, source="frames"):
    """Check frame timing and return it as float64 arrays.

    Frames must be finite, non-negative, have positive duration, be sorted by
    start time and must not overlap (gaps are allowed).  Overlaps up to
    :data:`FRAME_TOLERANCE` of a frame's duration (at least 1 s) are taken as
    rounding of times stored as text.

    Parameters
    ----------
    frame_start_s, frame_end_s : array_like, shape (n_frames,)
        Frame start and end times (s).
    source : str
        File and field for error messages.

    Returns
    -------
    frame_start_s, frame_end_s : ndarray of float64

    Raises
    ------
    ValueError
        Naming ``source`` and the first offending frame.
    """
    try:
        start = np.asarray(frame_start_s, dtype=np.float64).reshape(-1)
        end = np.asarray(frame_end_s, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: frame times must be numbers") from None
    if start.shape != end.shape:
        raise ValueError(f"{source}: {start.size} frame starts but {end.size} frame ends")
    if start.size == 0:
        raise ValueError(f"{source}: no frames")
    if not (np.all(np.isfinite(start)) and np.all(np.isfinite(end))):
        raise ValueError(f"{source}: frame times must be finite numbers (found NaN/inf)")
    if np.any(start < 0):
        i = int(np.flatnonzero(start < 0)[0])
        raise ValueError(f"{source}: frame {i} starts at {start[i]} s, expected >= 0 s")
    dur = end - start
    if np.any(dur <= 0):
        i = int(np.flatnonzero(dur <= 0)[0])
        raise ValueError(f"{source}: frame {i} has end {end[i]} s <= start {start[i]} s; expected a positive duration")
    if np.any(np.diff(start) <= 0):
        i = int(np.flatnonzero(np.diff(start) <= 0)[0])
        raise ValueError(
            f"{source}: frames not sorted by start time (frame {i + 1} starts at {start[i + 1]} s, "
            f"frame {i} at {start[i]} s); expected strictly increasing frame starts"
        )
    overlap = start[1:] < end[:-1] - FRAME_TOLERANCE * np.maximum(1.0, dur[:-1])
    if np.any(overlap):
        i = int(np.flatnonzero(overlap)[0])
        raise ValueError(
            f"{source}: frames {i} and {i + 1} overlap (frame {i} ends at {end[i]} s, "
            f"frame {i + 1} starts at {start[i + 1]} s); expected frame_start[i+1] >= frame_end[i]"
        )
    return start, end


def check_scan_length(scan_end_s, half_life_s, source, radionuclide="the radionuclide"):
    """Refuse a scan length that is impossible for the tracer's half-life.

    Frame times given in minutes but read as seconds make a 60-minute scan a
    60-second one; fitted, it gives numbers that look plausible.  A dynamic
    receptor scan lasts between :data:`MIN_SCAN_HALF_LIVES` and
    :data:`MAX_SCAN_HALF_LIVES` half-lives.

    Parameters
    ----------
    scan_end_s : float
        End of the last frame (s after injection).
    half_life_s : float
        The radionuclide's half-life (s).
    source : str
        File and field for the message.
    radionuclide : str
        Its name, for the message.

    Raises
    ------
    ValueError
        Naming ``source``, the scan length and the likely cause.
    """
    length = float(scan_end_s)
    half_life = float(half_life_s)
    n = length / half_life
    if n < MIN_SCAN_HALF_LIVES:
        raise ValueError(
            f"{source}: the frames end at {length:g} s, {n:.3g} half-lives of {radionuclide} "
            f"({half_life:g} s); a dynamic scan lasts at least {MIN_SCAN_HALF_LIVES:g} half-lives. "
            "Frame times must be in seconds (were they given in minutes?)"
        )
    if n > MAX_SCAN_HALF_LIVES:
        raise ValueError(
            f"{source}: the frames end at {length:g} s, {n:.3g} half-lives of {radionuclide}; "
            "no counts are left that late. Frame times must be in seconds"
        )
