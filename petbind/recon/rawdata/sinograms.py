"""petbind HDF5 sinogram files (prompts, delayeds and correction sinograms).

Layout (field by field in ``docs/formats.md``): the common groups of
:mod:`petbind.recon.rawdata.schema` plus ``/sinograms`` with the layout
attributes and one dataset per sinogram.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import h5py
import numpy as np

from petbind.core.files import atomic_output
from petbind.recon.geometry import SinogramLayout, TOFParameters
from petbind.recon.rawdata.schema import (
    FORMAT_VERSION,
    ExamInfo,
    check_version,
    field_error,
    h5_attr,
    h5_dataset,
    open_h5,
    read_array,
    read_scanner,
    read_tof,
    write_scanner,
    write_tof,
)

__all__ = ["SinogramData", "write_sinograms_h5", "read_sinograms_h5"]

log = logging.getLogger(__name__)

#: Sinograms a file may hold, and those with a TOF axis when the data are TOF.
SINOGRAM_NAMES = ("prompts", "delayeds", "normalisation", "attenuation", "scatter")
TOF_SINOGRAMS = ("prompts", "delayeds", "scatter")


# ------------------------------------------------------------------------------------------------
# sinograms
# ------------------------------------------------------------------------------------------------
@dataclass
class SinogramData:
    """Sinograms of one frame with their layout.

    Attributes
    ----------
    layout : SinogramLayout
    tof : TOFParameters or None
    prompts, delayeds, scatter : ndarray or None
        Shape ``layout.shape`` (+ ``(tof.num_bins,)`` when TOF), counts.
    normalisation, attenuation : ndarray or None
        Shape ``layout.shape``; multiplicative factors (non-TOF).
    exam : ExamInfo or None
    frame_start_s, frame_duration_s : float
        Frame timing after scan start (s); NaN when unknown.
    """

    layout: SinogramLayout
    tof: Optional[TOFParameters] = None
    prompts: Optional[np.ndarray] = None
    delayeds: Optional[np.ndarray] = None
    normalisation: Optional[np.ndarray] = None
    attenuation: Optional[np.ndarray] = None
    scatter: Optional[np.ndarray] = None
    exam: Optional[ExamInfo] = None
    frame_start_s: float = float("nan")
    frame_duration_s: float = float("nan")


def _expected_sino_shape(layout, tof, name):
    return layout.shape + ((tof.num_bins,) if tof is not None and name in TOF_SINOGRAMS else ())


def write_sinograms_h5(
    path,
    layout,
    prompts=None,
    delayeds=None,
    normalisation=None,
    attenuation=None,
    scatter=None,
    tof=None,
    exam=None,
    frame_start_s=float("nan"),
    frame_duration_s=float("nan"),
    compression="gzip",
):
    """Write sinograms and their layout to a petbind HDF5 file.

    Parameters
    ----------
    path : str or os.PathLike
    layout : SinogramLayout
    prompts, delayeds, scatter : ndarray, optional
        Shape ``layout.shape`` (+ ``(tof.num_bins,)`` for TOF), counts.
    normalisation, attenuation : ndarray, optional
        Shape ``layout.shape``.
    tof : TOFParameters, optional
    exam : ExamInfo, optional
    frame_start_s, frame_duration_s : float
        Frame timing (s after scan start).

    Raises
    ------
    ValueError
        When a sinogram's shape does not match the layout.
    """
    if not isinstance(layout, SinogramLayout):
        raise TypeError(f"layout must be a SinogramLayout; got {type(layout).__name__}")
    arrays = dict(prompts=prompts, delayeds=delayeds, normalisation=normalisation, attenuation=attenuation, scatter=scatter)
    for name, arr in arrays.items():
        if arr is None:
            continue
        want = _expected_sino_shape(layout, tof, name)
        if np.shape(arr) != want:
            raise ValueError(f"{os.fspath(path)}: field '{name}' has shape {np.shape(arr)}; expected {want} for {layout}")
    opts = dict(compression=compression, shuffle=compression is not None)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["petbind_kind"] = "sinograms"
            write_scanner(f.create_group("scanner"), layout.scanner)
            g = f.create_group("layout")
            g.attrs["num_radial"] = layout.num_radial
            g.attrs["max_ring_difference"] = layout.max_ring_difference
            g.attrs["span"] = layout.span
            g.attrs["axis_names"] = ",".join(layout.axis_names)
            write_tof(f, tof)
            if exam is not None:
                exam._write(f.create_group("exam"))
            fr = f.create_group("frame")
            fr.attrs["start_s"] = float(frame_start_s)
            fr.attrs["duration_s"] = float(frame_duration_s)
            s = f.create_group("sinograms")
            for name, arr in arrays.items():
                if arr is not None:
                    s.create_dataset(name, data=np.asarray(arr), **opts)


def read_sinograms_h5(path):
    """Read a file written by :func:`write_sinograms_h5`.

    Returns
    -------
    SinogramData

    Raises
    ------
    ValueError
        Naming the file and the field for a wrong version, missing field or
        a shape that does not match the stored layout.
    """
    path = os.fspath(path)
    with open_h5(path) as f:
        check_version(f, path, "sinograms")
        scanner = read_scanner(f, path)
        if "layout" not in f:
            raise field_error(path, "layout", "(group) is missing")
        try:
            layout = SinogramLayout(
                scanner,
                h5_attr(f, path, "layout", "num_radial", int),
                h5_attr(f, path, "layout", "max_ring_difference", int),
                h5_attr(f, path, "layout", "span", int),
            )
        except ValueError as exc:
            raise field_error(path, "layout", str(exc)) from exc
        tof = read_tof(f, path)
        exam = ExamInfo._read(f, path) if "exam" in f else None
        out = SinogramData(layout=layout, tof=tof, exam=exam)
        if "frame" in f:
            out.frame_start_s = h5_attr(f, path, "frame", "start_s", float, float("nan"), required=False)
            out.frame_duration_s = h5_attr(f, path, "frame", "duration_s", float, float("nan"), required=False)
        if "sinograms" not in f:
            raise field_error(path, "sinograms", "(group) is missing")
        for name in f["sinograms"]:
            if name not in SINOGRAM_NAMES:
                raise field_error(path, f"sinograms/{name}", f"is unknown; expected one of {SINOGRAM_NAMES}")
            want = _expected_sino_shape(layout, tof, name)
            ds = h5_dataset(f, path, f"sinograms/{name}", "fiu", len(want), want)
            setattr(out, name, read_array(path, ds))
        return out
