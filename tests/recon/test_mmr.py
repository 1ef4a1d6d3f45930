"""Siemens mMR listmode (PETLINK 32-bit) against STIR's lm_to_projdata and hand-built streams."""

import numpy as np
import pytest

from petbind.recon.geometry import SinogramLayout
from petbind.recon.listmode import histogram_listmode
from petbind.recon.rawdata.mmr import MMRListmode, is_mmr_listmode_header
from petbind.recon.rawdata.stir import StirProjData, StirSegment
from stir_helpers import LOCAL, stage

N, R, NV, NT = 504, 64, 252, 344
NUM_SINO_SPAN1 = 64 + 2 * sum(64 - d for d in range(1, 61))  # 4084


# ------------------------------------------------------------------------------------------------
# an independent decoder written from the documented format (slow, obvious NumPy)
# ------------------------------------------------------------------------------------------------
def _span1_sinogram_table():
    """(ring1, ring2) STIR rings of each span-1 sinogram of the stream: segments 0,-1,+1,..., axial ascending."""
    rows = []
    for rd in [0] + [s for d in range(1, 61) for s in (-d, d)]:
        for ax in range(R - abs(rd)):
            lo = max(0, -rd)  # ring1 of the first axial position
            rows.append((lo + ax, lo + ax + rd))
    return np.array(rows)


def _oracle_decode(words):
    """STIR (ring1, ring2, view, tang, prompt, time_ms) of every event, loop-free but independent of the package."""
    w = np.asarray(words, dtype=np.uint64)
    is_time = (w >> 29) == 4
    tcount = np.cumsum(is_time)
    tval = np.concatenate([[0], (w[is_time] & 0x1FFFFFFF)])
    ev = (w >> 31) == 0
    a = (w[ev] & 0x3FFFFFFF).astype(np.int64)
    tang, rest = a % NT, a // NT
    view, sino = rest % NV, rest // NV
    rings = _span1_sinogram_table()[sino]
    return rings[:, 0], rings[:, 1], view, tang - NT // 2, ((w[ev] >> 30) & 1) == 1, tval[tcount[ev]]


def _stir_detectors(view, t):
    return (view + np.floor_divide(t, 2)) % N, (view - np.floor_divide(t + 1, 2) + N // 2) % N


def _petbind_ids(r1, r2, view, t):
    """The documented remap: crystal c = d + 126, ring 63 - r."""
    d1, d2 = _stir_detectors(view, t)
    return np.stack([(R - 1 - r1) * N + (d1 + 126) % N, (R - 1 - r2) * N + (d2 + 126) % N], axis=1)


def _address(ring1, ring2, view, t):
    table = _span1_sinogram_table()
    sino = np.flatnonzero((table[:, 0] == ring1) & (table[:, 1] == ring2))[0]
    return (sino * NV + view) * NT + t + NT // 2


def _header(tmp_path, name="x.l", **changes):
    text = (LOCAL / "PET_ACQ_small.l.hdr.STIR").read_text().replace("small_listmode_file.l", name)
    for key, value in changes.items():
        lines = [ln for ln in text.splitlines() if not ln.lower().lstrip("!%").startswith(key.lstrip("%"))]
        if value is not None:
            lines.insert(3, f"{key}:={value}")
        text = "\n".join(lines) + "\n"
    path = tmp_path / (name + ".hdr")
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# the real file against STIR
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    folder = stage(tmp_path_factory.mktemp("mmr"), ["PET_ACQ_small.l.hdr.STIR", "small_listmode_file.l",
                                                   "stir_lm_to_projdata_span11.s.gz"])
    return folder


def test_real_file_events_match_an_independent_decoder(real):
    lm = MMRListmode(real / "PET_ACQ_small.l.hdr.STIR", chunk_words=50_000)  # several chunks
    words = np.fromfile(real / "small_listmode_file.l", "<u4")
    r1, r2, view, t, prompt, time_ms = _oracle_decode(words)
    chunks = list(lm.chunks())
    assert len(chunks) > 3
    ids = np.concatenate([c.detector_ids for c in chunks])
    np.testing.assert_array_equal(ids, _petbind_ids(r1, r2, view, t))
    np.testing.assert_array_equal(np.concatenate([c.is_prompt for c in chunks]), prompt)
    np.testing.assert_array_equal(np.concatenate([c.time_ms for c in chunks]), time_ms)
    s = lm.scan()
    assert (s.num_prompts, s.num_delayeds) == (218_881, 35_320)  # the README's count of prompts
    assert s.tags["time"] == 613 and (s.first_time_ms, s.last_time_ms) == (0, 612)
    assert s.tags["gantry"] == 0 and s.tags["singles"] == 1 and s.tags["control"] == 1
    assert lm.exam.half_life_s == 6586.2 and lm.exam.isotope == "F18" and lm.exam.tracer == "FDG"
    assert lm.exam.scan_start_s == 53 * 60 + 35  # study 17:00:35, injection 16:07:00
    assert lm.exam.energy_window_kev == (430.0, 610.0)


def _stir_span11_oracle(real):
    """STIR's lm_to_projdata output in STIR's own index space: SegmentByView, segments -1, 0, +1."""
    raw = np.fromfile(real / "stir_lm_to_projdata_span11.s", "<f4")
    blocks, pos = [], 0
    for n in (115, 127, 115):
        blocks.append(raw[pos:pos + n * NV * NT].reshape(NV, n, NT).transpose(1, 0, 2))
        pos += n * NV * NT
    assert pos == raw.size
    return blocks


def test_independent_decoder_reproduces_stir_bin_for_bin(real):
    """Checks the oracle decoder itself against STIR, in STIR's index space (no petbind conventions)."""
    r1, r2, view, t, prompt, time_ms = _oracle_decode(np.fromfile(real / "small_listmode_file.l", "<u4"))
    rd = r2 - r1
    seg = np.where(rd > 5, 1, np.where(rd < -5, -1, 0))
    keep = prompt & (np.abs(rd) <= 16) & (time_ms < 10_000)
    num_axial = np.array([115, 127, 115])[seg + 1]
    # span-11 segment: ring1 + ring2 = axial - (n_axial - 1) / 2 + (R - 1)
    axial = r1 + r2 - (R - 1) + (num_axial - 1) // 2
    mine = [np.zeros((n, NV, NT), np.float32) for n in (115, 127, 115)]
    for s in (-1, 0, 1):
        k = keep & (seg == s)
        np.add.at(mine[s + 1], (axial[k], view[k], t[k] + NT // 2), 1)
    stir = _stir_span11_oracle(real)
    assert sum(float(b.sum()) for b in stir) == 85_180
    for a, b in zip(mine, stir):
        np.testing.assert_array_equal(a, b)


def test_histogram_equals_stir_lm_to_projdata_in_petbind_layout(real):
    """All 85,180 prompts of STIR's span-11 sinogram land in the same LORs after the documented remap."""
    lm = MMRListmode(real / "PET_ACQ_small.l.hdr.STIR")
    layout = SinogramLayout(lm.scanner, 345, 16, 11)
    h = histogram_listmode(lm, layout, frames="1x10s", progress=False)
    segs = [StirSegment(-1, -16, -6, 115), StirSegment(0, -5, 5, 127), StirSegment(1, 6, 16, 115)]
    pd = StirProjData(N, R, 335.0, 4.0625, 0.0, segs, NV, NT, gap_period=9, gap_detectors=(0,))
    out = np.zeros(layout.num_bins, np.float32)
    for i, block in enumerate(_stir_span11_oracle(real)):
        bins, _ = pd.petbind_bins(layout, i)
        assert block[bins < 0].sum() == 0  # every STIR count has a petbind bin
        ok = bins >= 0
        assert np.bincount(bins[ok]).max() == 1  # the remap is one-to-one
        out[bins[ok]] += block[ok]
    assert out.sum() == 85_180 and h.prompts[0].sum() == 85_180
    np.testing.assert_array_equal(h.prompts[0], out.reshape(layout.shape))
    assert h.num_prompts[0] == 218_881


def test_no_event_on_a_gap_crystal(real):
    """The mMR's virtual crystals (STIR detector d % 9 == 0) never fire: the scanner model masks them."""
    lm = MMRListmode(real / "PET_ACQ_small.l.hdr.STIR")
    ids = np.concatenate([c.detector_ids for c in lm.chunks()])
    assert lm.scanner.crystal_mask[ids % N].all()
    assert (~lm.scanner.crystal_mask).sum() == 56


# ------------------------------------------------------------------------------------------------
# hand-built streams (run everywhere)
# ------------------------------------------------------------------------------------------------
def _stream(tmp_path, words, **changes):
    np.asarray(words, dtype="<u4").tofile(tmp_path / "x.l")
    return _header(tmp_path, **changes)


def test_hand_built_stream_prompts_delayeds_times_and_tags(tmp_path):
    lor = [(3, 40, 0, 0), (40, 3, 251, -172), (10, 10, 125, 171), (63, 3, 7, -1)]
    ev = [_address(*x) for x in lor]
    words = [
        ev[0] | 0x40000000,          # prompt before any time tag: time 0
        0x80000000 | 5,              # time tag 5 ms
        ev[1],                       # delayed
        0xA0000000 | (17 << 19) | 3,  # singles of bucket 17 (3 x scale 8)
        0xC0001234,                  # gantry / bed tag
        0xE0000001,                  # patient monitoring
        0x80000000 | 9,
        ev[2] | 0x40000000,
        0xF0000000,                  # control
        ev[3] | 0x40000000,
    ]
    hdr = _stream(tmp_path, words)
    assert is_mmr_listmode_header(hdr)
    lm = MMRListmode(hdr, chunk_words=3)
    chunks = list(lm.chunks())
    ids = np.concatenate([c.detector_ids for c in chunks])
    want = _petbind_ids(*(np.array(c) for c in zip(*lor)))
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(np.concatenate([c.time_ms for c in chunks]), [0, 5, 9, 9])
    np.testing.assert_array_equal(np.concatenate([c.is_prompt for c in chunks]), [True, False, True, True])
    # frame selection [5, 9) ms
    sel = list(lm.chunks(5, 9))
    assert [len(c) for c in sel] == [1] and not sel[0].is_prompt[0]
    s = lm.scan()
    assert s.tags == {"time": 2, "singles": 1, "gantry": 1, "patient": 1, "control": 1}
    assert s.gantry_words.tolist() == [0xC0001234]
    assert s.singles_per_bucket[17] == 24
    assert (s.num_prompts, s.num_delayeds) == (3, 1)


def test_known_lor_lands_on_the_right_crystals(tmp_path):
    """View 0, t = 0 in STIR is the vertical LOR through detectors 0 and 252: petbind crystals 126 and 378,
    i.e. the points (0, +R) and (0, -R) in petbind's frame (STIR's y points down)."""
    hdr = _stream(tmp_path, [_address(5, 5, 0, 0) | 0x40000000])
    lm = MMRListmode(hdr)
    ids = next(lm.chunks()).detector_ids[0]
    xy = lm.scanner.crystal_xy_mm[ids % N]
    np.testing.assert_allclose(xy, [[0.0, 335.0], [0.0, -335.0]], atol=1e-9)
    assert (ids // N).tolist() == [58, 58]  # STIR ring 5 -> petbind ring 63 - 5


def test_chunk_size_does_not_change_anything(tmp_path):
    rng = np.random.default_rng(3)
    n_bins = NUM_SINO_SPAN1 * NV * NT
    ev = rng.integers(0, n_bins, 500).astype(np.uint32) | np.where(rng.random(500) < 0.7, 0x40000000, 0).astype(np.uint32)
    words = np.insert(ev, np.arange(0, 500, 37), 0x80000000 | np.arange(len(range(0, 500, 37))).astype(np.uint32))
    hdr = _stream(tmp_path, words)
    a = [np.concatenate(x) for x in zip(*[(c.detector_ids, c.time_ms) for c in MMRListmode(hdr, 7).chunks()])]
    b = [np.concatenate(x) for x in zip(*[(c.detector_ids, c.time_ms) for c in MMRListmode(hdr, 10_000).chunks()])]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (500, 2)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"originating system": "ECAT 962"}, "originating system"),
        ({"%axial compression": 11}, "axial compression"),
        ({"%lm event and tag words format (bits)": 64}, "32-bit"),
        ({"%number of tof time bins": 5}, "TOF"),
        ({"%number of views": 126}, "number of views"),
    ],
)
def test_bad_headers_are_refused_naming_the_field(tmp_path, changes, match):
    hdr = _stream(tmp_path, [0x80000000], **changes)
    with pytest.raises(ValueError, match=f"x.l.hdr.*{match}"):
        MMRListmode(hdr)


def test_bad_address_and_missing_data_file(tmp_path):
    hdr = _stream(tmp_path, [NUM_SINO_SPAN1 * NV * NT + 5])
    with pytest.raises(ValueError, match="x.l.hdr: word 0 has bin address"):
        next(MMRListmode(hdr).chunks())
    (tmp_path / "x.l").unlink()
    with pytest.raises(ValueError, match="name of data file"):
        MMRListmode(hdr)


def test_siemens_header_with_a_windows_path_or_no_data_file_name(tmp_path):
    """Siemens' own .l.hdr names the data file with the acquisition computer's path, or not at all."""
    _stream(tmp_path, [0x80000000 | 3, _address(1, 2, 3, 4) | 0x40000000])
    text = (tmp_path / "x.l.hdr").read_text()
    (tmp_path / "x.l.hdr").write_text(text.replace("name of data file := x.l", "name of data file:=C:\\\\Service\\\\x.l"))
    assert MMRListmode(tmp_path / "x.l.hdr").data_path == str(tmp_path / "x.l")
    (tmp_path / "x.l.hdr").write_text("\n".join(ln for ln in text.splitlines() if "name of data file" not in ln))
    lm = MMRListmode(tmp_path / "x.l.hdr")
    assert lm.data_path == str(tmp_path / "x.l") and len(next(lm.chunks())) == 1
