"""Siemens Biograph mMR listmode (PETLINK 32-bit bin-address format).

A listmode file (``.l``) is a stream of little-endian 32-bit words, described by
an Interfile header: Siemens' ``.l.hdr`` or the copy STIR reads, ``.l.hdr.STIR``
(same keys).  Word layout, from the most significant bit:

=============  ==========================================================
bits 31..29    meaning
=============  ==========================================================
``0..``        coincidence event: bit 30 is 1 for a prompt and 0 for a
               delayed coincidence, bits 29..0 the *bin address*
``100``        time tag: bits 28..0 are ms since the acquisition start
``101``        singles / dead-time tag (bucket in bits 28..19, singles
               count / ``%singles scale factor`` in bits 18..0)
``110``        gantry / bed position and motion tag
``1110``       patient monitoring (gating) tag
``1111``       control / acquisition flag tag
=============  ==========================================================

The bin address is an offset into a span-1 sinogram of the header's
``%number of projections`` (344) tangential positions, ``%number of views``
(252) views and all ring pairs up to ``%maximum ring difference`` (60):
``address = ((sinogram * views) + view) * projections + tangential``, with
sinograms stored segment by segment in the order 0, -1, +1, -2, +2, ...
(segment = ring difference here) and by increasing axial position inside a
segment.  A (segment, axial position, view, tangential) bin is STIR's
(:mod:`petbind.recon.rawdata.stir`), whose detector pair is renumbered to
petbind's scanner (crystal ``c = d + 126``, ring ``63 - r``): the reader
yields petbind detector ids, so the existing histogramming
(:func:`petbind.recon.listmode.histogram_listmode`) and listmode OSEM work
unchanged, into any :class:`~petbind.recon.geometry.SinogramLayout` (span 1,
span 11, ...) of :attr:`MMRListmode.scanner`.

Each event gets the time of the last time tag before it (ms); events before
the first tag get time 0, as in STIR.  The file is read in chunks of a
fixed number of words, so memory does not grow with the file
(``benchmarks/rawdata.py`` measures the speed).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from petbind.recon.rawdata.schema import ExamInfo, ListmodeChunk
from petbind.recon.rawdata.interfile import read_interfile_header
from petbind.recon.rawdata.stir import StirProjData, StirSegment, find_stir_scanner

__all__ = ["MMRListmode", "MMRTagSummary", "is_mmr_listmode_header", "TAG_KINDS"]

log = logging.getLogger(__name__)

#: Kinds of tag words counted by :meth:`MMRListmode.scan`.
TAG_KINDS = ("time", "singles", "gantry", "patient", "control")

_TIME_MASK = np.uint32(0x1FFFFFFF)
_ADDRESS_MASK = np.uint32(0x3FFFFFFF)


def _key(header, name, default=None):
    """Header value for ``name`` with or without Siemens' leading ``%``."""
    for k in (name, "%" + name):
        if k in header:
            return header[k]
    return default


def is_mmr_listmode_header(path):
    """``True`` for an Interfile header of PETLINK 32-bit listmode (``.l.hdr``/``.l.hdr.STIR``)."""
    try:
        h = read_interfile_header(path)
    except (ValueError, OSError, UnicodeDecodeError):
        return False
    fmt = str(_key(h, "data format", "")).lower()
    space = str(_key(h, "sms-mi header name space", "")).lower()
    return fmt == "coincidencelist" or "petlink" in space


@dataclass
class MMRTagSummary:
    """What a full pass over a listmode file found.

    Attributes
    ----------
    num_prompts, num_delayeds : int
    tags : dict
        Number of tag words of each kind in :data:`TAG_KINDS`.
    first_time_ms, last_time_ms : int
        First and last time tag (ms); -1 without time tags.
    gantry_words : ndarray of uint32
        The raw gantry/bed tag words (their payload is vendor specific and not
        decoded; any such word means the bed or gantry reported a position or
        motion, which petbind does not correct for).
    singles_per_bucket : ndarray of int64
        Sum of the singles reports of each bucket (counts times the header's
        ``singles scale factor``), indexed by bucket number.
    """

    num_prompts: int = 0
    num_delayeds: int = 0
    tags: dict = field(default_factory=lambda: {k: 0 for k in TAG_KINDS})
    first_time_ms: int = -1
    last_time_ms: int = -1
    gantry_words: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    singles_per_bucket: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class MMRListmode:
    """Stream a Siemens mMR listmode file as petbind listmode chunks.

    Parameters
    ----------
    header_path : str or os.PathLike
        ``.l.hdr`` or ``.l.hdr.STIR``.
    chunk_words : int
        Words read per chunk (4 bytes each); bounds the memory.

    Attributes
    ----------
    scanner : Scanner
        petbind's model of STIR's "Siemens mMR" (504 crystals per ring on a
        335 mm cylinder, gaps at STIR detectors ``d % 9 == 0``, 64 rings).
    projdata : StirProjData
        The span-1 bin-address geometry.
    tof : None
        The mMR has no time of flight.
    exam : ExamInfo
    header : dict
    data_path : str
    num_words : int

    Raises
    ------
    ValueError
        Naming the file and the field for a header that is not PETLINK 32-bit
        mMR listmode, or a data file that is missing or not whole words.
    """

    def __init__(self, header_path, chunk_words=1 << 22):
        self.path = os.fspath(header_path)
        self.chunk_words = int(chunk_words)
        if self.chunk_words < 1:
            raise ValueError(f"chunk_words must be >= 1; got {chunk_words}")
        h = read_interfile_header(self.path)
        self.header = h
        self._check_header(h)
        self.data_path = self._find_data(h)
        size = os.path.getsize(self.data_path)
        offset = int(_key(h, "data offset in bytes", 0) or 0)
        if (size - offset) % 4:
            raise ValueError(f"{self.path}: field 'name of data file' {self.data_path} holds {size} bytes, not whole 32-bit words")
        self._offset = offset
        self.num_words = (size - offset) // 4
        self.exam = self._exam(h)
        self.tof = None
        self._build_tables()

    def __repr__(self):
        return f"MMRListmode({self.path!r}, num_words={self.num_words}, scanner={self.scanner.name!r})"

    # -- header -----------------------------------------------------------------------------------
    def _get_int(self, h, name, default=None):
        value = _key(h, name, default)
        if value is None:
            raise ValueError(f"{self.path}: field '%{name}' is missing")
        try:
            return int(str(value).strip())
        except ValueError:
            raise ValueError(f"{self.path}: field '%{name}' is {value!r}; expected an integer") from None

    def _check_header(self, h):
        p = self.path
        system = str(_key(h, "originating system", ""))
        info = find_stir_scanner(system)
        if info is None or info.name != "Siemens mMR":
            raise ValueError(f"{p}: field '!originating system' is {system!r}; expected the Siemens mMR (2008)")
        self.info = info
        bits = self._get_int(h, "lm event and tag words format (bits)", 32)
        if bits != 32:
            raise ValueError(f"{p}: field '%LM event and tag words format (bits)' is {bits}; only 32-bit PETLINK is read")
        fmt = str(_key(h, "data format", "CoincidenceList"))
        if fmt.lower() != "coincidencelist":
            raise ValueError(f"{p}: field 'data format' is {fmt!r}; expected CoincidenceList")
        tof = self._get_int(h, "number of tof time bins", 1)
        if tof > 1:
            raise ValueError(f"{p}: field '%number of TOF time bins' is {tof}; the mMR listmode reader is non-TOF")
        span = self._get_int(h, "axial compression", 1)
        if span != 1:
            raise ValueError(f"{p}: field '%axial compression' is {span}; PETLINK bin addresses are span 1")
        rings = self._get_int(h, "number of rings", info.num_rings)
        if rings != info.num_rings:
            raise ValueError(f"{p}: field 'number of rings' is {rings}; the mMR has {info.num_rings}")
        self.max_ring_difference = self._get_int(h, "maximum ring difference", rings - 1)
        if not 0 <= self.max_ring_difference < rings:
            raise ValueError(f"{p}: field '%maximum ring difference' is {self.max_ring_difference}; expected 0..{rings - 1}")
        self.num_views = self._get_int(h, "number of views", info.num_detectors_per_ring // 2)
        self.num_tangential = self._get_int(h, "number of projections", info.max_num_non_arccorrected_bins)
        if self.num_views != info.num_detectors_per_ring // 2:
            raise ValueError(f"{p}: field '%number of views' is {self.num_views}; expected {info.num_detectors_per_ring // 2} (no view mashing)")
        if not 1 <= self.num_tangential < info.num_detectors_per_ring:
            raise ValueError(f"{p}: field '%number of projections' is {self.num_tangential}; expected 1..{info.num_detectors_per_ring - 1}")

    def _find_data(self, h):
        name = str(_key(h, "name of data file", "") or "")
        folder = os.path.dirname(os.path.abspath(self.path))
        candidates = []
        if name:
            # Siemens headers may carry the acquisition computer's Windows path
            base = name.replace("\\", "/").split("/")[-1]
            candidates += [name if os.path.isabs(name) else os.path.join(folder, name), os.path.join(folder, base)]
        stem = self.path
        for suffix in (".STIR", ".hdr"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        candidates.append(stem)
        for c in candidates:
            if os.path.isfile(c) and not c.endswith((".hdr", ".STIR")):
                return c
        raise ValueError(f"{self.path}: field 'name of data file' ({name!r}) names no existing file; tried {candidates}")

    def _exam(self, h):
        def get(name, cast, default):
            v = _key(h, name)
            try:
                return cast(v) if v not in (None, "") else default
            except ValueError:
                log.warning("%s: field '%s' = %r is not understood; ignored", self.path, name, v)
                return default

        def when(date_key, time_key):
            d, t = _key(h, date_key), _key(h, time_key)
            if not d or not t:
                return None
            try:
                return _dt.datetime.strptime(f"{d} {t}", "%Y:%m:%d %H:%M:%S")
            except ValueError:
                log.warning("%s: fields '%s' / '%s' = %r %r are not yyyy:mm:dd hh:mm:ss; ignored", self.path, date_key, time_key, d, t)
                return None

        injection = when("tracer injection date (yyyy:mm:dd)", "tracer injection time (hh:mm:ss gmt+00:00)")
        study = when("study date (yyyy:mm:dd)", "study time (hh:mm:ss gmt+00:00)")
        scan_start = (study - injection).total_seconds() if injection and study else 0.0
        lo = get("energy window lower level (kev)[1]", float, 425.0)
        hi = get("energy window upper level (kev)[1]", float, 650.0)
        if not lo < hi:
            lo, hi = 425.0, 650.0
        return ExamInfo(
            tracer=str(_key(h, "radiopharmaceutical", "") or ""),
            isotope=str(_key(h, "isotope name", "") or "").replace("-", ""),
            half_life_s=get("isotope gamma halflife (sec)", float, float("nan")),
            injection_time=injection.isoformat() if injection else "",
            injected_activity_bq=get("tracer activity at time of injection (bq)", float, float("nan")),
            scan_start_s=scan_start,
            energy_window_kev=(lo, hi),
            description=f"Siemens mMR listmode {os.path.basename(self.data_path)}",
        )

    # -- lookup tables ----------------------------------------------------------------------------
    def _build_tables(self):
        info = self.info
        n, r = info.num_detectors_per_ring, info.num_rings
        mrd = self.max_ring_difference
        # segment order of the stream: 0, -1, +1, -2, +2, ...
        order = [0] + [s for d in range(1, mrd + 1) for s in (-d, d)]
        segs = [StirSegment(s, s, s, r - abs(s)) for s in order]
        self.projdata = StirProjData(n, r, info.effective_radius_mm, info.ring_spacing_mm, 0.0, segs,
                                     self.num_views, self.num_tangential, gap_period=info.gap_period,
                                     gap_detectors=info.gap_detectors, name=info.name)
        self.scanner = self.projdata.scanner()
        rings = np.concatenate([np.concatenate(self.projdata.ring_pairs(s)) for s in segs])
        pr = self.projdata.to_petbind_ring(rings).astype(np.int32)
        #: petbind ring * crystals_per_ring of both ends, per span-1 sinogram of the stream
        self._sino_base = (pr * n).astype(np.int32)
        self.num_sinograms = int(pr.shape[0])
        dp = self.projdata.detector_pairs().reshape(-1, 2)
        #: petbind crystal of both ends per (view, tangential)
        self._vt_crystal = self.projdata.to_petbind_crystal(dp).astype(np.int32)
        self._num_vt = self.num_views * self.num_tangential

    # -- reading ----------------------------------------------------------------------------------
    def _words(self):
        """Yield ``(first_word_index, words)`` chunks of the data file."""
        with open(self.data_path, "rb") as f:
            f.seek(self._offset)
            start = 0
            while start < self.num_words:
                count = min(self.chunk_words, self.num_words - start)
                w = np.fromfile(f, dtype="<u4", count=count)
                if w.size != count:
                    raise ValueError(f"{self.path}: field 'name of data file' {self.data_path} ended early at word {start + w.size}")
                yield start, w
                start += count

    def decode(self, words, first_word=0):
        """Decode the events of a block of words into petbind detector ids.

        Parameters
        ----------
        words : ndarray of uint32
        first_word : int
            Index of ``words[0]`` in the file (for error messages).

        Returns
        -------
        detector_ids : ndarray of int32, shape (n, 2)
        is_prompt : ndarray of bool, shape (n,)
        event_index : ndarray of int64, shape (n,)
            Position of each event in ``words``.

        Raises
        ------
        ValueError
            For a bin address beyond the span-1 sinogram of the header.
        """
        w = np.asarray(words, dtype=np.uint32)
        event_index = np.flatnonzero(w < 0x80000000)
        ev = w[event_index]
        address = ev & _ADDRESS_MASK
        sino = (address // np.uint32(self._num_vt)).astype(np.intp)
        vt = address.astype(np.intp) - sino * self._num_vt
        if sino.size and int(sino.max()) >= self.num_sinograms:
            bad = int(np.argmax(sino >= self.num_sinograms))
            raise ValueError(
                f"{self.path}: word {first_word + int(event_index[bad])} has bin address {int(address[bad])}, beyond the "
                f"{self.num_sinograms} span-1 sinograms x {self.num_views} views x {self.num_tangential} projections "
                "of the header (TOF data or a wrong '%maximum ring difference')"
            )
        # np.take with intp indices is several times faster than fancy indexing here
        ids = np.take(self._sino_base, sino, axis=0)
        ids += np.take(self._vt_crystal, vt, axis=0)
        is_prompt = (ev & np.uint32(0x40000000)) != 0
        return ids, is_prompt, event_index

    def chunks(self, start_ms=None, stop_ms=None):
        """Iterate over the events with ``start_ms <= time_ms < stop_ms``.

        Yields
        ------
        ListmodeChunk
            ``detector_ids`` on :attr:`scanner`, ``time_ms`` of the last time
            tag, ``tof_bin`` None; ``first_event`` counts events from the file
            start.
        """
        lo = -np.inf if start_ms is None else float(start_ms)
        hi = np.inf if stop_ms is None else float(stop_ms)
        current = 0
        done = 0
        for first, w in self._words():
            ids, prompt, idx = self.decode(w, first)
            tag_idx = np.flatnonzero((w >> np.uint32(29)) == 4)
            tag_ms = (w[tag_idx] & _TIME_MASK).astype(np.int64)
            # events between two time tags get the earlier one; events before the first tag of the
            # chunk keep the last tag of the previous chunk
            before = np.searchsorted(idx, tag_idx)
            counts = np.diff(np.concatenate([[0], before, [idx.size]]))
            t = np.repeat(np.concatenate([[current], tag_ms]), counts).astype(np.float64)
            if tag_ms.size:
                if np.any(np.diff(tag_ms) < 0) or tag_ms[0] < current:
                    raise ValueError(f"{self.path}: time tags decrease inside words {first}..{first + w.size}; the file is corrupt")
                current = int(tag_ms[-1])
            first_event = done
            done += idx.size
            if lo > -np.inf or hi < np.inf:
                keep = (t >= lo) & (t < hi)
                if not keep.all():
                    # the kept events are contiguous (times do not decrease): report the first one's index
                    first_event += int(np.argmax(keep)) if keep.any() else 0
                    ids, prompt, t = ids[keep], prompt[keep], t[keep]
            if t.size:
                yield ListmodeChunk(ids, None, t, prompt, first_event)
            if current >= hi:
                return

    def scan(self):
        """One pass over the file counting events and tags.

        Returns
        -------
        MMRTagSummary
        """
        out = MMRTagSummary()
        scale = int(_key(self.header, "singles scale factor", 1) or 1)
        gantry = []
        singles = np.zeros(1024, dtype=np.int64)
        for _, w in self._words():
            top3 = w >> np.uint32(29)
            ev = w < 0x80000000
            prompt = ev & ((w & np.uint32(0x40000000)) != 0)
            out.num_prompts += int(prompt.sum())
            out.num_delayeds += int((ev & ~prompt).sum())
            time = top3 == 4
            out.tags["time"] += int(time.sum())
            if time.any():
                t = w[time] & _TIME_MASK
                if out.first_time_ms < 0:
                    out.first_time_ms = int(t[0])
                out.last_time_ms = int(t[-1])
            sg = top3 == 5
            out.tags["singles"] += int(sg.sum())
            if sg.any():
                word = w[sg]
                np.add.at(singles, ((word & _TIME_MASK) >> np.uint32(19)).astype(np.int64), (word & np.uint32(0x7FFFF)).astype(np.int64) * scale)
            g = top3 == 6
            out.tags["gantry"] += int(g.sum())
            if g.any():
                gantry.append(w[g])
            top4 = w >> np.uint32(28)
            out.tags["patient"] += int((top4 == 14).sum())
            out.tags["control"] += int((top4 == 15).sum())
        out.gantry_words = np.concatenate(gantry) if gantry else np.zeros(0, np.uint32)
        out.singles_per_bucket = singles
        if out.tags["gantry"]:
            log.warning("%s: %d gantry/bed tags found; bed or gantry motion is not corrected", self.path, out.tags["gantry"])
        return out
