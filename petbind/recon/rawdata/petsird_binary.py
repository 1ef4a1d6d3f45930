"""Bulk codec for PETSIRD event time blocks: whole blocks of events as NumPy arrays.

The ``petsird`` package (yardl-generated) reads and writes one Python object
per coincidence event, which caps it near 2e5 events/s.  Every field of an
``EventTimeBlock`` is an unsigned LEB128 varint in yardl's binary encoding
(``uint32`` values, vector lengths, the union tag byte and the stream's
batch counts), so a run of event time blocks is a run of varints.  This
module decodes such a run with a few vectorised NumPy passes, walks the
block structure (a handful of values per block) in Python, and gathers the
coincidence events of all blocks with one fancy index.  Writing is the
reverse: the structure tokens of many blocks and their events are laid out
in one token array and varint-encoded at once.

Only ``EventTimeBlock`` is handled here; the other ``TimeBlock`` cases hold
float32 and are left to the ``petsird`` package's serializers (the caller
stops at their tag, see :class:`BlockWalk`).

Layout of the part of the stream this module reads and writes (yardl binary
format version 1, petsird 0.12 schema; :func:`schema_supported` checks that
the installed package uses exactly these definitions)::

    stream      := (count item{count})* 0          count: varint > 0
    item        := tag:byte payload                 tag 0 = EventTimeBlock
    EventTimeBlock := start stop singles prompts delayeds triples quadruples
    singles     := n (m (bin offset){m}){n}
    prompts, delayeds := n (m (c (bin1 bin2 tof){c}){m}){n}   (lower-triangular by module type)
    triples     := n1 (n2 (n3 (c (b b b k k){c}){n3}){n2}){n1}
    quadruples  := n1 (n2 (n3 (n4 (c (b b b k k){c}){n4}){n3}){n2}){n1}

(``ListOfQuadrupleEvents`` is a vector of ``TripleEvent`` in the 0.12
schema, so quadruples take five values each, like triples.)
"""

from __future__ import annotations

import json

import numpy as np

__all__ = [
    "decode_varints",
    "encode_varints",
    "schema_supported",
    "BlockWalk",
    "walk_blocks",
    "gather_events",
    "encode_event_blocks",
    "PROMPT",
    "DELAYED",
]

#: ``kind`` of an event list: prompt or delayed coincidences.
PROMPT, DELAYED = 0, 1

#: Union tag of ``TimeBlock.EventTimeBlock`` and the number of ``TimeBlock`` cases.
EVENT_TAG = 0
NUM_TAGS = 6

#: Schema definitions the decoder hard-codes (from the petsird 0.12 schema).
_EXPECTED_TYPES = {
    "CoincidenceEvent": {"name": "CoincidenceEvent", "fields": [
        {"name": "detectionBins", "type": {"vector": {"items": "PETSIRD.DetectionBin", "length": 2}}},
        {"name": "tofIdx", "type": "uint32"}]},
    "DetectionBin": {"name": "DetectionBin", "type": "uint32"},
    "SingleEvent": {"name": "SingleEvent", "fields": [
        {"name": "detectionBin", "type": "PETSIRD.DetectionBin"},
        {"name": "timeOffsetInTimeBlock", "type": "uint32"}]},
    "TripleEvent": {"name": "TripleEvent", "fields": [
        {"name": "detectionBins", "type": {"vector": {"items": "PETSIRD.DetectionBin", "length": 3}}},
        {"name": "tofIndices", "type": {"vector": {"items": "uint32", "length": 2}}}]},
    "TimeInterval": {"name": "TimeInterval", "fields": [
        {"name": "start", "type": "uint32"}, {"name": "stop", "type": "uint32"}]},
    "ListOfCoincidenceEvents": {"name": "ListOfCoincidenceEvents", "type": {"vector": {"items": "PETSIRD.CoincidenceEvent"}}},
    "ListOfSingleEvents": {"name": "ListOfSingleEvents", "type": {"vector": {"items": "PETSIRD.SingleEvent"}}},
    "ListOfTripleEvents": {"name": "ListOfTripleEvents", "type": {"vector": {"items": "PETSIRD.TripleEvent"}}},
    "ListOfQuadrupleEvents": {"name": "ListOfQuadrupleEvents", "type": {"vector": {"items": "PETSIRD.TripleEvent"}}},
    "LowerTriangularMatrix": {"name": "LowerTriangularMatrix", "typeParameters": ["T"],
                              "type": {"vector": {"items": {"vector": {"items": "T"}}}}},
    "EventTimeBlock": {"name": "EventTimeBlock", "fields": [
        {"name": "timeInterval", "type": "PETSIRD.TimeInterval"},
        {"name": "singleEvents", "type": {"vector": {"items": "PETSIRD.ListOfSingleEvents"}}},
        {"name": "promptEvents", "type": {"name": "PETSIRD.LowerTriangularMatrix", "typeArguments": ["PETSIRD.ListOfCoincidenceEvents"]}},
        {"name": "delayedEvents", "type": {"name": "PETSIRD.LowerTriangularMatrix", "typeArguments": ["PETSIRD.ListOfCoincidenceEvents"]}},
        {"name": "tripleEvents", "type": {"vector": {"items": {"vector": {"items": {"vector": {"items": "PETSIRD.ListOfTripleEvents"}}}}}}},
        {"name": "quadrupleEvents", "type": {"vector": {"items": {"vector": {"items": {"vector": {"items": {
            "vector": {"items": "PETSIRD.ListOfQuadrupleEvents"}}}}}}}}}]},
}


def schema_supported(schema):
    """Whether a PETSIRD schema (JSON text) lays out event time blocks as this module expects.

    Parameters
    ----------
    schema : str
        The protocol schema, e.g. ``petsird.PETSIRDWriterBase.schema``.

    Returns
    -------
    bool
        ``True`` when the ``TimeBlock`` union starts with ``EventTimeBlock``,
        has six cases, and every type the decoder hard-codes is defined
        exactly as in petsird 0.12.
    """
    try:
        doc = json.loads(schema)
    except ValueError:
        return False
    types = {t.get("name"): t for t in doc.get("types", [])}
    for name, expected in _EXPECTED_TYPES.items():
        if types.get(name) != expected:
            return False
    tb = types.get("TimeBlock", {}).get("type")
    seq = doc.get("protocol", {}).get("sequence", [])
    return (
        isinstance(tb, list) and len(tb) == NUM_TAGS and tb[0].get("type") == "PETSIRD.EventTimeBlock"
        and len(seq) == 2 and seq[1].get("type") == {"stream": {"items": "PETSIRD.TimeBlock"}}
    )


# ------------------------------------------------------------------------------------------------
# varints
# ------------------------------------------------------------------------------------------------
_MASK4 = np.array([0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFF], dtype=np.uint32)
_MASK8 = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [0xFFFFFFFFFFFFFFFF], dtype=np.uint64)

#: Bytes after the data that :func:`decode_varints` may read (they are masked off).
PADDING = 8


def decode_varints(buf, nbytes):
    """Decode all complete unsigned LEB128 varints in ``buf[:nbytes]``.

    Parameters
    ----------
    buf : ndarray of uint8
        At least ``nbytes + PADDING`` bytes long (the padding is read, never used).
    nbytes : int
        Number of data bytes.

    Returns
    -------
    values : ndarray of uint32 (uint64 when a varint is longer than 4 bytes)
    ends : ndarray of int64
        Index of the last byte of every varint.  Bytes after ``ends[-1]``
        belong to a varint cut by the end of the data.

    Notes
    -----
    A varint ends at the first byte below 0x80.  Each value is read as one
    unaligned little-endian word at its first byte, masked to its length,
    and the 7-bit groups are shifted together, so the work is a few passes
    over the values rather than a loop over bytes.
    """
    if buf.size < nbytes + PADDING:
        raise ValueError(f"decode_varints needs {PADDING} padding bytes after the data")
    ends = np.flatnonzero(buf[:nbytes] < 0x80)
    if ends.size == 0:
        return np.zeros(0, np.uint32), ends
    starts = np.empty_like(ends)
    starts[0] = 0
    np.add(ends[:-1], 1, out=starts[1:])
    length = ends - starts + 1
    lmax = int(length.max())
    if lmax <= 4:
        words = np.ndarray(shape=(buf.size - 3,), dtype="<u4", buffer=buf, strides=(1,))
        x = words[starts] & _MASK4[length]  # drop the bytes of the following varints
        v = x & np.uint32(0x7F)
        for k in range(1, lmax):
            v |= (x >> np.uint32(k)) & np.uint32(0x7F << (7 * k))
        return v, ends
    if lmax > 8:
        # 9- and 10-byte varints only hold 64-bit values; PETSIRD's event fields are 32-bit
        bad = int(np.flatnonzero(length > 8)[0])
        raise ValueError(f"varint of {int(length[bad])} bytes at byte {int(starts[bad])}: not a PETSIRD event field")
    words = np.ndarray(shape=(buf.size - 7,), dtype="<u8", buffer=buf, strides=(1,))
    x = words[starts] & _MASK8[length]
    v = x & np.uint64(0x7F)
    for k in range(1, lmax):
        v |= (x >> np.uint64(k)) & np.uint64(0x7F << (7 * k))
    return v, ends


def encode_varints(values, piece=1 << 18):
    """Encode non-negative integers as unsigned LEB128 varints.

    Parameters
    ----------
    values : array of unsigned or non-negative int, shape (n,)
    piece : int
        Values encoded per pass (pieces that fit in cache are faster).

    Returns
    -------
    ndarray of uint8
        The varints back to back (yardl's and protobuf's encoding).
    """
    v = np.asarray(values).reshape(-1)
    if v.dtype.kind not in "iu":
        raise TypeError(f"encode_varints needs integers; got dtype {v.dtype}")
    if v.size == 0:
        return np.zeros(0, np.uint8)
    if v.dtype.kind == "i" and int(v.min()) < 0:
        raise ValueError("encode_varints: negative value")
    wide = int(v.max()) > 0xFFFFFFFF
    v = v.astype(np.uint64 if wide else np.uint32, copy=False)
    if v.size <= piece:
        return _encode_piece(v)
    return np.concatenate([_encode_piece(v[i:i + piece]) for i in range(0, v.size, piece)])


def _encode_piece(v):
    t = v.dtype.type
    length = np.ones(v.shape, dtype=np.uint8)
    for k in range(1, 10 if v.dtype.itemsize > 4 else 5):
        more = v >= t(1 << (7 * k))
        if k > 1 and not more.any():
            break
        length += more.view(np.uint8)
    offsets = np.cumsum(length, dtype=np.int64)
    total = int(offsets[-1])
    offsets -= length
    out = np.empty(total + 1, dtype=np.uint8)  # the last byte takes the writes of varints shorter than k
    lmax = int(length.max())
    for k in range(lmax):
        byte = ((v >> t(7 * k)) & t(0x7F)).astype(np.uint8)
        if k + 1 < lmax:
            byte |= (length > k + 1).view(np.uint8) << np.uint8(7)
        out[offsets + k if k == 0 else np.where(length > k, offsets + k, total)] = byte
    return out[:total]


# ------------------------------------------------------------------------------------------------
# walking the block structure
# ------------------------------------------------------------------------------------------------
class CorruptStream(ValueError):
    """The token stream does not follow the EventTimeBlock layout (message says where)."""


class BlockWalk:
    """Result of :func:`walk_blocks` over one window of tokens.

    Attributes
    ----------
    lists : list of tuple
        ``(kind, type_1, type_2, first_token, count, start_ms, stop_ms)`` for
        every event list of every complete block, in file order.
    position : int
        Token index after the last complete item (a block or a stream count).
    remaining : int
        Items left in the current stream batch at ``position``.
    stop : {"incomplete", "other", "end"}
        Why the walk stopped: the window ends inside an item; a block that is
        not an ``EventTimeBlock`` starts at ``position`` (its tag is
        ``tag``); or the stream's closing 0 was read (``position`` is after it).
    tag : int or None
    num_blocks : int
        Complete event time blocks walked.
    ignored : dict
        Counts of events the caller does not use: ``singles``, ``triples``,
        ``quadruples`` and ``extra_rows`` (coincidences in lists outside the
        lower-triangular module-type matrix).
    """

    __slots__ = ("lists", "position", "remaining", "stop", "tag", "num_blocks", "ignored")

    def __init__(self):
        self.lists = []
        self.position = 0
        self.remaining = 0
        self.stop = "incomplete"
        self.tag = None
        self.num_blocks = 0
        self.ignored = {"singles": 0, "triples": 0, "quadruples": 0, "extra_rows": 0}


#: More module types than this in a block's list matrix means a corrupt stream.
MAX_MODULE_TYPES = 1024


def walk_blocks(tokens, position, remaining, num_types, max_count):
    """Walk complete stream items of event time blocks.

    Parameters
    ----------
    tokens : ndarray
        Decoded varints of the window (:func:`decode_varints`).
    position : int
        Token index of a stream count (``remaining == 0``) or of an item's tag.
    remaining : int
        Items left in the current stream batch.
    num_types : int
        Number of module types; lists in rows ``>= num_types`` (or columns
        beyond the row index) are counted in ``ignored["extra_rows"]``.
    max_count : int
        Largest plausible list length or stream count (e.g. the bytes left in
        the file); larger values mean a corrupt stream.

    Returns
    -------
    BlockWalk

    Raises
    ------
    CorruptStream
        For an unknown union tag or an implausible length, naming the token.
    """
    res = BlockWalk()
    res.position, res.remaining = position, remaining
    item = tokens.item
    n = tokens.shape[0]
    lists = res.lists
    ignored = res.ignored
    p = position
    try:
        while True:
            if remaining == 0:
                c = item(p)
                if c > max_count:
                    raise CorruptStream(f"token {p}: stream batch of {c} items exceeds what the rest of the file can hold")
                p += 1
                if c == 0:
                    res.position, res.remaining, res.stop = p, 0, "end"
                    return res
                remaining = c
                res.position, res.remaining = p, remaining
            tag = item(p)
            if tag != EVENT_TAG:
                if tag >= NUM_TAGS:
                    raise CorruptStream(f"token {p}: time block tag {tag}; expected 0..{NUM_TAGS - 1}")
                res.position, res.remaining, res.stop, res.tag = p, remaining, "other", tag
                return res
            start, stop = item(p + 1), item(p + 2)
            q = p + 3
            new = []
            singles = extra = 0
            rows = item(q)  # lists of singles, one per module type
            q += 1
            if rows:
                if rows > MAX_MODULE_TYPES:
                    raise CorruptStream(f"token {q - 1}: {rows} lists of single events")
                for _ in range(rows):
                    c = item(q)
                    if c > max_count:
                        raise CorruptStream(f"token {q}: list of {c} single events exceeds what the rest of the file can hold")
                    singles += c
                    q += 1 + 2 * c
            for kind in (PROMPT, DELAYED):
                rows = item(q)
                if rows > MAX_MODULE_TYPES:
                    raise CorruptStream(f"token {q}: {rows} rows of coincidence lists")
                q += 1
                for i in range(rows):
                    cols = item(q)
                    if cols > MAX_MODULE_TYPES:
                        raise CorruptStream(f"token {q}: {cols} coincidence lists in a row")
                    q += 1
                    for j in range(cols):
                        c = item(q)
                        if c > max_count:
                            raise CorruptStream(f"token {q}: list of {c} coincidences exceeds what the rest of the file can hold")
                        if i < num_types and j <= i:
                            new.append((kind, i, j, q + 1, c, start, stop))
                        else:
                            extra += c
                        q += 1 + 3 * c
            triples = quadruples = 0
            if item(q):
                q, triples = _skip_nested(item, q, 3, max_count)
            else:
                q += 1
            if item(q):
                q, quadruples = _skip_nested(item, q, 4, max_count)
            else:
                q += 1
            if q > n:
                raise IndexError
            lists.extend(new)
            if singles or extra or triples or quadruples:
                ignored["singles"] += singles
                ignored["extra_rows"] += extra
                ignored["triples"] += triples
                ignored["quadruples"] += quadruples
            remaining -= 1
            res.num_blocks += 1
            p = q
            res.position, res.remaining = p, remaining
    except IndexError:
        res.stop = "incomplete"
        return res


def _skip_nested(item, q, depth, max_count):
    """Skip ``depth`` nested vectors of 5-value events; return the position after them and the event count."""
    n = item(q)
    if n > (max_count if depth == 1 else MAX_MODULE_TYPES):
        raise CorruptStream(f"token {q}: vector of {n} entries is implausible")
    q += 1
    total = 0
    for _ in range(n):
        if depth == 1:
            c = item(q)
            if c > max_count:
                raise CorruptStream(f"token {q}: list of {c} events exceeds what the rest of the file can hold")
            total += c
            q += 1 + 5 * c
        else:
            q, c = _skip_nested(item, q, depth - 1, max_count)
            total += c
    return q, total


def gather_events(tokens, lists):
    """Coincidence events of the walked lists as arrays.

    Parameters
    ----------
    tokens : ndarray
    lists : ndarray of int64, shape (num_lists, 7)
        Rows of :attr:`BlockWalk.lists`.

    Returns
    -------
    dict of ndarray
        ``module_types`` (n, 2) uint8, ``detection_bins`` (n, 2) uint32,
        ``tof_idx`` (n,) uint32, ``time_ms`` and ``stop_ms`` (n,) uint32
        (the block's interval), ``is_prompt`` (n,) bool.
    """
    counts = lists[:, 4]
    total = int(counts.sum())
    before = np.cumsum(counts) - counts
    base = np.repeat(lists[:, 3] - 3 * before, counts) + 3 * np.arange(total, dtype=np.int64)
    ev = np.empty((total, 3), dtype=tokens.dtype)
    ev[:, 0] = tokens[base]
    ev[:, 1] = tokens[base + 1]
    ev[:, 2] = tokens[base + 2]
    if ev.dtype != np.uint32:
        if total and int(ev.max()) > 0xFFFFFFFF:
            raise CorruptStream("an event field exceeds uint32")
        ev = ev.astype(np.uint32)
    types = np.empty((total, 2), dtype=np.uint8)
    types[:, 0] = np.repeat(lists[:, 1], counts)
    types[:, 1] = np.repeat(lists[:, 2], counts)
    return {
        "module_types": types,
        "detection_bins": ev[:, :2],
        "tof_idx": ev[:, 2],
        "time_ms": np.repeat(lists[:, 5], counts).astype(np.uint32),
        "stop_ms": np.repeat(lists[:, 6], counts).astype(np.uint32),
        "is_prompt": np.repeat(lists[:, 0] == PROMPT, counts),
    }


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def block_template(num_types, prompts=True, delayeds=True):
    """Structure tokens of one event time block and the positions of its list lengths.

    Returns
    -------
    template : ndarray of uint32
        ``tag start stop singles prompts... delayeds... triples quadruples``
        with 0 for start, stop and every list length.
    slots : ndarray of int64
        Index in ``template`` of each list length, prompts (row-major over the
        lower-triangular module-type pairs) first, then delayeds.
    pairs : list of (int, int, int)
        ``(kind, type_1, type_2)`` of each slot.
    """
    tmpl = [EVENT_TAG, 0, 0, 0]
    slots, pairs = [], []
    for kind, present in ((PROMPT, prompts), (DELAYED, delayeds)):
        if not present:
            tmpl.append(0)
            continue
        tmpl.append(num_types)
        for i in range(num_types):
            tmpl.append(i + 1)
            for j in range(i + 1):
                slots.append(len(tmpl))
                pairs.append((kind, i, j))
                tmpl.append(0)
    tmpl += [0, 0]
    return np.array(tmpl, dtype=np.uint32), np.array(slots, dtype=np.int64), pairs


def encode_event_blocks(template, slots, start_ms, stop_ms, counts, event_tokens):
    """Bytes of one stream batch of event time blocks.

    Parameters
    ----------
    template, slots
        From :func:`block_template`.
    start_ms, stop_ms : array of int, shape (num_blocks,)
    counts : array of int, shape (num_blocks, len(slots))
        Events in each list of each block.
    event_tokens : array of uint32, shape (3 * counts.sum(),)
        ``bin1 bin2 tof`` of every event, ordered by block, then list (slot
        order), then event.

    Returns
    -------
    ndarray of uint8
        ``num_blocks`` as the batch count, then the blocks (tag included).
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(len(start_ms), len(slots))
    nb, lt = counts.shape[0], template.size
    per_block = counts.sum(axis=1)
    n_tokens = 1 + nb * lt + 3 * int(per_block.sum())
    if event_tokens.size != n_tokens - 1 - nb * lt:
        raise ValueError(f"encode_event_blocks: {event_tokens.size} event tokens for {int(per_block.sum())} events")
    tmpl = np.tile(template, (nb, 1))
    tmpl[:, 1] = start_ms
    tmpl[:, 2] = stop_ms
    tmpl[:, slots] = counts
    # events of the lists before template token j of a block push it by 3 tokens each
    cum = np.zeros((nb, slots.size + 1), dtype=np.int64)
    np.cumsum(counts, axis=1, out=cum[:, 1:])
    lists_before = np.searchsorted(slots, np.arange(lt), side="left")
    block_first = 1 + lt * np.arange(nb) + 3 * (np.cumsum(per_block) - per_block)
    pos = block_first[:, None] + np.arange(lt)[None, :] + 3 * cum[:, lists_before]
    tokens = np.empty(n_tokens, dtype=np.uint32)
    is_event = np.ones(n_tokens, dtype=bool)
    is_event[0] = False
    is_event[pos.ravel()] = False
    tokens[0] = nb
    tokens[pos.ravel()] = tmpl.ravel()
    tokens[is_event] = event_tokens
    return encode_varints(tokens)


# ------------------------------------------------------------------------------------------------
# header: float32 vectors in one piece
# ------------------------------------------------------------------------------------------------
_HEADER_SERIALIZER = None


def header_serializer():
    """The package's ``Header`` serializer with every ``vector<float32>`` read and written in one piece.

    Efficiencies make PETSIRD headers large (the package's example file
    holds 9 million module-pair efficiencies, 45 MB) and the package reads
    them one ``struct.unpack`` at a time (13 s for that file).  Here those
    vectors are read with one ``np.frombuffer(...).tolist()`` and written
    with one ``tobytes()``: the same Python floats and the same bytes.

    Returns
    -------
    petsird.binary.HeaderSerializer
        Or the package's own one, unchanged, when its internals are not the
        expected ones.
    """
    global _HEADER_SERIALIZER
    if _HEADER_SERIALIZER is None:
        from petsird import _binary, binary  # noqa: PLC0415

        ser = binary.HeaderSerializer()
        try:
            _swap_float32_vectors(ser, _binary, _float32_vector_class(_binary)(), set())
        except (AttributeError, TypeError):
            ser = binary.HeaderSerializer()
        _HEADER_SERIALIZER = ser
    return _HEADER_SERIALIZER


def _float32_vector_class(_binary):
    class Float32Vector(_binary.VectorSerializer):
        def __init__(self):
            super().__init__(_binary.float32_serializer)

        def read(self, stream):
            n = stream.read_unsigned_varint()
            return np.frombuffer(stream.read_view(4 * n), dtype="<f4").tolist()

        def write(self, stream, value):
            data = np.asarray(value, dtype="<f4").reshape(-1)
            stream.write_unsigned_varint(data.size)
            stream.write_bytes(data.tobytes())

    return Float32Vector


def _swap_float32_vectors(obj, _binary, fast, seen):
    """Replace, in place, every plain ``VectorSerializer(float32)`` reachable from ``obj`` by ``fast``."""
    if id(obj) in seen:
        return
    seen.add(id(obj))

    def swap(value):
        if (type(value) is _binary.VectorSerializer
                and isinstance(getattr(value, "_element_serializer", None), _binary.Float32Serializer)):
            return fast
        if isinstance(value, _binary.TypeSerializer):
            _swap_float32_vectors(value, _binary, fast, seen)
        return value

    for attr, value in list(vars(obj).items()):
        if isinstance(value, _binary.TypeSerializer):
            setattr(obj, attr, swap(value))
        elif isinstance(value, list):
            for i, entry in enumerate(value):
                if isinstance(entry, tuple):
                    value[i] = tuple(swap(x) for x in entry)
                elif isinstance(entry, _binary.TypeSerializer):
                    value[i] = swap(entry)
