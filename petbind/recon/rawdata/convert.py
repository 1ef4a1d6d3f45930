"""``petbind-convert``: PETSIRD <-> petbind HDF5 listmode, streamed in chunks.

Examples
--------
::

    petbind-convert study.petsird study.h5
    petbind-convert study.h5 study.petsird --time-block-ms 1 --quiet
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from tqdm.auto import tqdm

from petbind.recon.rawdata.hdf5 import ListmodeReader, ListmodeWriter
from petbind.recon.rawdata.petsird_io import PetsirdReader, write_petsird

__all__ = ["main", "convert", "detect_format"]

log = logging.getLogger(__name__)

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FORMATS = ("h5", "petsird")


def detect_format(path):
    """``"h5"`` or ``"petsird"`` from a file's first bytes.

    Raises
    ------
    ValueError
        When the file is neither.
    """
    from petsird._binary import MAGIC_BYTES  # noqa: PLC0415

    with open(path, "rb") as f:
        head = f.read(max(len(_HDF5_SIGNATURE), len(MAGIC_BYTES)))
    if head.startswith(_HDF5_SIGNATURE):
        return "h5"
    if head.startswith(MAGIC_BYTES):
        return "petsird"
    raise ValueError(f"{path}: neither an HDF5 nor a PETSIRD binary file (first bytes {head[:8]!r})")


def _format_from_name(path):
    ext = os.path.splitext(path)[1].lower()
    if ext in (".h5", ".hdf5", ".hdf"):
        return "h5"
    if ext in (".petsird", ".bin", ".yardl"):
        return "petsird"
    return None


def _progress(chunks, total, quiet, desc):
    bar = tqdm(total=total, unit="ev", unit_scale=True, desc=desc, disable=quiet)
    try:
        for chunk in chunks:
            bar.update(len(chunk))
            yield chunk
    finally:
        bar.close()


def convert(src, dst, to=None, chunk_events=1_000_000, time_block_ms=1, quiet=False):
    """Convert a listmode file between PETSIRD and petbind HDF5.

    Parameters
    ----------
    src, dst : str
        Input and output paths.
    to : {"h5", "petsird"}, optional
        Output format; default from the output extension (``.h5`` or
        ``.petsird``/``.bin``), else the other format than the input.
    chunk_events : int
        Events held in memory at a time.
    time_block_ms : int
        PETSIRD time-block length when writing PETSIRD (ms).
    quiet : bool
        No progress bar.

    Returns
    -------
    int
        Number of events converted.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file")
    if os.path.isdir(src):
        raise ValueError(f"{src}: is a folder; expected a PETSIRD or petbind HDF5 listmode file")
    src_fmt = detect_format(src)
    dst_fmt = to or _format_from_name(dst) or ("petsird" if src_fmt == "h5" else "h5")
    if dst_fmt not in _FORMATS:
        raise ValueError(f"output format must be one of {_FORMATS}; got {dst_fmt!r}")
    if src_fmt == dst_fmt:
        raise ValueError(f"{src} is already {src_fmt}; nothing to convert (output {dst} would be {dst_fmt})")
    if src_fmt == "h5":
        reader = ListmodeReader(src, chunk_events=chunk_events)
        chunks = _progress(reader.chunks(), reader.num_events, quiet, "h5 -> petsird")
        n = write_petsird(dst, reader.scanner, chunks, tof=reader.tof, exam=reader.exam,
                          corrections=reader.corrections, time_block_ms=time_block_ms)
    else:
        reader = PetsirdReader(src, chunk_events=chunk_events)
        with ListmodeWriter(dst, reader.scanner, tof=reader.tof, exam=reader.exam, chunk_events=chunk_events) as w:
            for chunk in _progress(reader.chunks(), None, quiet, "petsird -> h5"):
                w.append(chunk.detector_ids, chunk.tof_bin, chunk.time_ms, chunk.is_prompt)
            # singles and dead-time blocks are complete only after the full pass
            w.set_corrections(reader.corrections)
        n = w.num_events
    return int(n)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv=None):
    """Command-line entry point (``petbind-convert``)."""
    parser = argparse.ArgumentParser(
        prog="petbind-convert", description="Convert listmode between PETSIRD and petbind HDF5 (streamed in chunks)."
    )
    parser.add_argument("input", help="PETSIRD binary file or petbind HDF5 listmode file")
    parser.add_argument("output", help="output file (.h5 or .petsird)")
    parser.add_argument("--to", choices=_FORMATS, help="output format (default: from the output extension)")
    parser.add_argument("--chunk-events", type=int, default=1_000_000, help="events per chunk (bounds memory)")
    parser.add_argument("--time-block-ms", type=int, default=1, help="PETSIRD time-block length in ms")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the half-written temporary output is removed
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        n = convert(args.input, args.output, args.to, args.chunk_events, args.time_block_ms, args.quiet)
    except (ValueError, FileNotFoundError, TypeError, OSError) as exc:
        print(f"petbind-convert: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"petbind-convert: interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print(f"converted {n} events: {args.input} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
