"""Framing and histogramming of listmode data; per-frame decay and dead-time factors.

Frames are half-open time intervals ``[start, end)`` in seconds after scan
start: an event at exactly ``end`` belongs to the next frame.  Event times are
milliseconds (``time_ms``), frame edges are converted to ms once
(``edge_ms = edge_s * 1000``, computed from exact decimal fractions so that
frame definitions such as ``30x0.1s`` have no accumulated rounding).

Histogramming consumes :class:`petbind.recon.rawdata.schema.ListmodeChunk` objects one at a time,
so memory stays bounded by the chunk size plus the sinograms.  The same code
runs on the GPU: with ``device="gpu"`` each chunk is copied to the device once
and binned with CuPy's ``bincount``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from petbind.core.device import array_module, get_cupy, resolve_device, to_numpy
from petbind.core.frames import Frames, exact_seconds, parse_frames
from petbind.recon.geometry import SinogramLayout

__all__ = [
    "Frames",
    "parse_frames",
    "select_frame",
    "Histogram",
    "histogram_events",
    "histogram_listmode",
]

log = logging.getLogger(__name__)


def select_frame(chunk, start_s, end_s):
    """Boolean mask of a chunk's events inside ``[start_s, end_s)``.

    Parameters
    ----------
    chunk : ListmodeChunk or array of float
        A chunk, or event times in ms.
    start_s, end_s : float
        Frame edges (s after scan start).
    """
    t = chunk.time_ms if hasattr(chunk, "time_ms") else chunk
    lo = float(exact_seconds(start_s, "start_s") * 1000)
    hi = float(exact_seconds(end_s, "end_s") * 1000)
    return (t >= lo) & (t < hi)


# ------------------------------------------------------------------------------------------------
# histogramming
# ------------------------------------------------------------------------------------------------
@dataclass
class Histogram:
    """Sinograms histogrammed from listmode.

    Attributes
    ----------
    prompts, delayeds : ndarray of float32
        Shape ``(num_frames,) + layout.shape`` (``+ (num_tof_bins,)`` for TOF).
    frames : Frames
    num_prompts, num_delayeds : ndarray of int64, shape (num_frames,)
        Events in each frame (inside and outside the layout).
    num_outside_layout : ndarray of int64, shape (num_frames, 2)
        Prompts and delayeds of the frame whose detector pair has no bin in
        the layout (radial range, ring difference, gap or same crystal).
    """

    prompts: np.ndarray
    delayeds: np.ndarray
    frames: "Frames"
    num_prompts: np.ndarray
    num_delayeds: np.ndarray
    num_outside_layout: np.ndarray


def histogram_events(layout, detector_ids, is_prompt, tof_bin=None, num_tof_bins=None, frame_index=None, num_frames=1, out=None):
    """Histogram one block of events (NumPy or CuPy) into flat counts.

    Parameters
    ----------
    layout : SinogramLayout
    detector_ids : array of int, shape (n, 2)
    is_prompt : array of bool, shape (n,)
    tof_bin : array of int, shape (n,), optional
        TOF bins (with ``num_tof_bins``); ``None`` for a non-TOF histogram
        (TOF bins of the events, if any, are summed).
    num_tof_bins : int, optional
    frame_index : array of int, shape (n,), optional
        Frame of each event; ``-1`` events are ignored.  ``None``: all frame 0.
    num_frames : int
    out : array, shape (2, num_frames, layout.num_bins * T), optional
        Accumulator (any integer dtype) to add the counts to, in place.

    Returns
    -------
    counts : array, shape (2, num_frames, layout.num_bins * T)
        ``counts[0]`` prompts, ``counts[1]`` delayeds; ``T = num_tof_bins`` or 1
        (``out`` when given, else a new int64 array).

    Notes
    -----
    When a block has far fewer events than bins, the counts are added through
    ``unique`` (memory of the order of the events) instead of a full-size
    ``bincount`` temporary.
    outside : array of int64, shape (2, num_frames)
        Events of each kind and frame that fall outside the layout.
    """
    xp = array_module(detector_ids)
    bins, swapped = layout.bin_indices(detector_ids, return_swapped=True)
    t_bins = 1
    if tof_bin is not None:
        t_bins = int(num_tof_bins)
        k = xp.asarray(tof_bin).astype(xp.int64)
        # a pair stored in the bin's opposite orientation sees the TOF axis reversed
        k = xp.where(swapped, t_bins - 1 - k, k)
        bins = xp.where(bins >= 0, bins * t_bins + k, -1)
    kind = xp.where(xp.asarray(is_prompt), 0, 1).astype(xp.int64)
    fr = xp.zeros_like(kind) if frame_index is None else xp.asarray(frame_index).astype(xp.int64)
    in_frame = fr >= 0
    size = layout.num_bins * t_bins
    good = in_frame & (bins >= 0)
    flat = (kind * num_frames + fr) * size + bins
    if out is None:
        out = xp.zeros((2, num_frames, size), dtype=xp.int64)
    elif tuple(out.shape) != (2, num_frames, size):
        raise ValueError(f"out must have shape {(2, num_frames, size)}; got {tuple(out.shape)}")
    idx = flat[good]
    flat_out = out.reshape(-1)
    if 8 * idx.size < flat_out.size:
        uniq, cnt = xp.unique(idx, return_counts=True)
        flat_out[uniq] += cnt.astype(out.dtype)  # indices unique: no lost updates
    else:
        flat_out += xp.bincount(idx, minlength=flat_out.size).astype(out.dtype, copy=False)
    counts = out
    bad = in_frame & (bins < 0)
    outside = xp.bincount((kind * num_frames + fr)[bad], minlength=2 * num_frames).reshape(2, num_frames)
    return counts, outside


def histogram_listmode(reader, layout, frames=None, tof=True, device="cpu", progress=True):
    """Histogram a listmode file into prompt and delayed sinograms per frame.

    Parameters
    ----------
    reader : ListmodeReader or iterable of ListmodeChunk
        Source of events; read once, chunk by chunk.  A plain iterable must
        also give ``frames`` and, for TOF, ``tof`` as a :class:`TOFParameters`.
    layout : SinogramLayout
    frames : Frames, str or None
        Frames to histogram; ``None`` puts every event into one frame covering
        ``[0, inf)``.
    tof : bool or TOFParameters
        ``True`` keeps the file's TOF bins (when it has them), ``False`` sums
        them.
    device : {"cpu", "gpu", "auto"}
    progress : bool
        Show a tqdm progress bar over chunks.

    Returns
    -------
    Histogram
        Counts are float32 (exact for counts below 2**24 per bin).

    Notes
    -----
    Events whose detector pair has no bin in ``layout`` are counted in
    ``num_outside_layout`` and logged, never silently lost.
    """
    if not isinstance(layout, SinogramLayout):
        raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
    file_tof = getattr(reader, "tof", None)
    if tof is True:
        tof_params = file_tof
    elif tof is False or tof is None:
        tof_params = None
    else:
        tof_params = tof
        if file_tof is not None and file_tof.num_bins != tof_params.num_bins:
            raise ValueError(f"tof has {tof_params.num_bins} bins but the file's events use {file_tof.num_bins}")
    if hasattr(reader, "scanner") and reader.scanner != layout.scanner:
        raise ValueError(f"{getattr(reader, 'path', 'listmode')}: scanner {reader.scanner} differs from the layout's {layout.scanner}")
    if frames is None:
        frames_obj = None
        num_frames = 1
    else:
        frames_obj = parse_frames(frames)
        num_frames = len(frames_obj)
    device = resolve_device(device)
    xp = get_cupy() if device == "gpu" else np
    t_bins = tof_params.num_bins if tof_params is not None else 1
    size = layout.num_bins * t_bins
    # uint32 accumulators: exact up to 4.29e9 counts per bin at half the memory of int64
    counts = xp.zeros((2, num_frames, size), dtype=xp.uint32)
    outside = xp.zeros((2, num_frames), dtype=xp.int64)
    totals = xp.zeros((2, num_frames), dtype=xp.int64)
    if hasattr(reader, "chunks"):
        window = (None, None) if frames_obj is None else (frames_obj.start_ms[0], frames_obj.end_ms[-1])
        source = reader.chunks(*window)
        total = getattr(reader, "num_events", None)
    else:
        source, total = reader, None
    bar = tqdm(total=total, unit="ev", unit_scale=True, desc="histogram", disable=not progress)
    for chunk in source:
        ids = xp.asarray(chunk.detector_ids)
        prompt = xp.asarray(chunk.is_prompt)
        fr = None if frames_obj is None else frames_obj.frame_of(xp.asarray(chunk.time_ms))
        k = None
        if tof_params is not None:
            if chunk.tof_bin is None:
                raise ValueError("TOF histogram requested but the events have no tof_bin")
            k = xp.asarray(chunk.tof_bin)
        _, o = histogram_events(layout, ids, prompt, k, t_bins, fr, num_frames, out=counts)
        outside += o
        kind = xp.where(prompt, 0, 1)
        frc = xp.zeros_like(kind) if fr is None else fr
        sel = frc >= 0
        totals += xp.bincount((kind * num_frames + frc)[sel], minlength=2 * num_frames).reshape(2, num_frames)
        bar.update(len(chunk))
    bar.close()
    peak = int(counts.max()) if counts.size else 0
    if peak >= 2**24:
        raise ValueError(
            f"a sinogram bin holds {peak} counts, more than float32 represents exactly (2**24); "
            "histogram shorter frames or a coarser layout"
        )
    counts = to_numpy(counts)
    outside = to_numpy(outside)
    totals = to_numpy(totals)
    if outside.sum():
        log.info(
            "%d prompts and %d delayeds fall outside %s (radial range, ring difference, gaps)",
            int(outside[0].sum()), int(outside[1].sum()), layout,
        )
    shape = (num_frames,) + layout.shape + ((t_bins,) if tof_params is not None else ())
    if frames_obj is None:
        frames_obj = Frames.open_ended()
    return Histogram(
        prompts=counts[0].reshape(shape).astype(np.float32),
        delayeds=counts[1].reshape(shape).astype(np.float32),
        frames=frames_obj,
        num_prompts=totals[0],
        num_delayeds=totals[1],
        num_outside_layout=outside.T.copy(),
    )


# ------------------------------------------------------------------------------------------------
# decay, singles and dead time
# ------------------------------------------------------------------------------------------------
