"""PETSIRD for any scanner: several module types, detector positions, TOF/energy per pair, bulk I/O, listmode OSEM."""

import io
import logging
import random
import re
import subprocess
import sys

import numpy as np
import pytest

petsird = pytest.importorskip("petsird")
from petsird.helpers import get_detection_efficiency, make_detection_bin  # noqa: E402
from petsird.helpers import generator as gen  # noqa: E402
from petsird.helpers.geometry import get_detecting_box  # noqa: E402

from petbind.core.device import to_numpy  # noqa: E402
from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout  # noqa: E402
from petbind.recon.kernels.reference import back_reference  # noqa: E402
from petbind.recon.listmode import histogram_listmode  # noqa: E402
from petbind.recon.rawdata import petsird_binary as pb  # noqa: E402
from petbind.recon.rawdata.petsird_io import PetsirdEvents, PetsirdReader, write_petsird_events  # noqa: E402
from petbind.recon.rawdata.petsird_recon import PetsirdListmodeOSEM, sensitivity_image  # noqa: E402

# Two module types in the style of the package's example generator, small enough for tests:
# type 0 a full ring with 2 energy bins and 3 TOF bins, type 1 a half ring (arc = pi) outside it.
TYPE0 = gen.CylindricalBlocksInfo(
    crystal_length=(10.0, 4.0, 4.0), num_crystals_per_module=(1, 3, 2), num_modules_along_ring=6, num_modules_along_axis=1,
    radius=60.0, arc=2 * np.pi, start_angle=0.0, module_spacing_along_axis=0.0, number_of_tof_bins=3, tof_resolution=40.0,
    LLD=430.0, ULD=650.0, number_of_event_energy_bins=2, energy_resolution=0.1, material_id=1,
)
TYPE1 = gen.CylindricalBlocksInfo(
    crystal_length=(6.0, 3.0, 3.0), num_crystals_per_module=(2, 2, 2), num_modules_along_ring=4, num_modules_along_axis=1,
    radius=80.0, arc=np.pi, start_angle=0.3, module_spacing_along_axis=0.0, number_of_tof_bins=5, tof_resolution=25.0,
    LLD=440.0, ULD=620.0, number_of_event_energy_bins=1, energy_resolution=0.1, material_id=1,
)


def small_header(defs=(TYPE0, TYPE1)):
    random.seed(0)
    header = petsird.Header(scanner=gen.get_scanner_info(list(defs)), exam=petsird.ExamInformation())
    header.scanner.delayed_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    return header


def num_bins(info, t):
    rep = info.scanner_geometry.replicated_modules[t]
    return len(rep.transforms) * len(rep.object.detecting_elements.transforms) * info.event_energy_bin_edges[t].number_of_bins()


def random_events(info, rng, t1, t2, n):
    """Events of module types (t1 >= t2) in PETSIRD's order, each with its own bins (package objects)."""
    b1 = rng.integers(0, num_bins(info, t1), n)
    b2 = rng.integers(0, num_bins(info, t2), n)
    if t1 == t2:
        b1, b2 = np.maximum(b1, b2), np.minimum(b1, b2)
    ntof = info.tof_bin_edges[t1][t2].number_of_bins()
    k = rng.integers(0, ntof, n)
    return [petsird.CoincidenceEvent(detection_bins=[int(x), int(y)], tof_idx=int(z)) for x, y, z in zip(b1, b2, k)]


def write_with_package(path, header, blocks):
    with petsird.BinaryPETSIRDWriter(str(path)) as w:
        w.write_header(header)
        w.write_time_blocks(blocks)


def random_file(path, seed=0, num_blocks=7, with_other=True):
    """A 2-module-type file written by the package, with singles and dead-time blocks between event blocks."""
    rng = np.random.default_rng(seed)
    header = small_header()
    info = header.scanner
    blocks = []
    for b in range(num_blocks):
        value = petsird.EventTimeBlock(time_interval=petsird.TimeInterval(start=3 * b, stop=3 * b + 3))
        value.prompt_events = [[random_events(info, rng, i, j, int(rng.integers(0, 40))) for j in range(i + 1)] for i in range(2)]
        value.delayed_events = [[random_events(info, rng, i, j, int(rng.integers(0, 6))) for j in range(i + 1)] for i in range(2)]
        blocks.append(petsird.TimeBlock.EventTimeBlock(value))
        if with_other and b in (2, 5):
            hist = [rng.integers(0, 9, num_bins(info, t)).astype(np.uint64).tolist() for t in range(2)]
            blocks.append(petsird.TimeBlock.SinglesHistogramTimeBlock(petsird.SinglesHistogramTimeBlock(
                time_interval=petsird.TimeInterval(start=3 * b, stop=3 * b + 3), singles_per_detection_bin_histogram=hist)))
            fr = [rng.uniform(0.9, 1, num_bins(info, t)).astype(np.float32) for t in range(2)]
            blocks.append(petsird.TimeBlock.DeadTimeTimeBlock(petsird.DeadTimeTimeBlock(
                time_interval=petsird.TimeInterval(start=3 * b, stop=3 * b + 3),
                alive_time_fractions=petsird.AliveTimeFractions(singles_alive_time_fractions=fr))))
    write_with_package(path, header, blocks)
    return header, blocks


def flatten(blocks, num_types=2):
    """Oracle: the package's event objects flattened in file order (lists outside the type matrix skipped)."""
    rows = []
    for blk in blocks:
        if not isinstance(blk, petsird.TimeBlock.EventTimeBlock):
            continue
        v = blk.value
        for prompt, matrix in ((True, v.prompt_events), (False, v.delayed_events)):
            for i, row in enumerate(matrix[:num_types]):
                for j, events in enumerate(row[: i + 1]):
                    for e in events:
                        rows.append((i, j, *e.detection_bins, e.tof_idx, v.time_interval.start, v.time_interval.stop, prompt))
    a = np.array(rows, dtype=np.int64).reshape(-1, 8)
    return PetsirdEvents(a[:, 0:2].astype(np.uint8), a[:, 2:4].astype(np.uint32), a[:, 4].astype(np.uint32),
                         a[:, 5].astype(np.uint32), a[:, 6].astype(np.uint32), a[:, 7].astype(bool))


def read_all(path, **kw):
    r = PetsirdReader(path, **kw)
    return r, PetsirdEvents.concatenate(list(r.events()))


# ------------------------------------------------------------------------------------------------
# the bulk codec
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("longest", [1, 2, 3, 4, 5])
def test_varints_match_the_package_encoding(longest):
    """Values whose longest varint has 1..5 bytes (the decoder has a path per length)."""
    from petsird._binary import CodedOutputStream

    rng = np.random.default_rng(longest)
    hi = 2 ** (7 * longest) if longest < 5 else 2**32
    edges = [x for x in (0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**32 - 1) if x < hi]
    v = np.concatenate([edges, [hi - 1], rng.integers(0, hi, 5000)]).astype(np.uint64)
    bio = io.BytesIO()
    stream = CodedOutputStream(bio)
    for x in v.tolist():
        stream.write_unsigned_varint(x)
    stream.flush()
    ref = np.frombuffer(bio.getvalue(), np.uint8)
    enc = pb.encode_varints(v, piece=1000)  # several pieces
    np.testing.assert_array_equal(enc, ref)
    buf = np.concatenate([enc, np.zeros(pb.PADDING, np.uint8)])
    dec, ends = pb.decode_varints(buf, enc.size)
    np.testing.assert_array_equal(dec, v)
    # a varint cut by the end of the data is not returned
    dec, ends = pb.decode_varints(buf, enc.size - 1)
    assert dec.size == v.size - 1 and ends[-1] < enc.size - 1


def test_schema_check_accepts_installed_and_refuses_a_changed_layout():
    schema = petsird.PETSIRDWriterBase.schema
    assert pb.schema_supported(schema)
    changed = schema.replace('{"name":"tofIdx","type":"uint32"}', '{"name":"tofIdx","type":"uint16"}')
    assert changed != schema and not pb.schema_supported(changed)


# ------------------------------------------------------------------------------------------------
# several module types
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_generator_file(tmp_path, monkeypatch):
    """The package's example generator run unchanged except for smaller module definitions."""
    monkeypatch.setattr(gen, "mtype0_def", TYPE0)
    monkeypatch.setattr(gen, "mtype1_def", TYPE1)
    monkeypatch.setattr(gen, "NUMBER_OF_TIME_BLOCKS", 4)
    monkeypatch.setattr(gen, "COUNT_RATE", 30.0)
    random.seed(4)
    path = tmp_path / "generator.petsird"
    with open(path, "wb") as f:
        monkeypatch.setattr(sys, "stdout", type("Out", (), {"buffer": f})())
        gen.generate()
    return path


def test_generator_file_loads_with_two_module_types(small_generator_file, caplog):
    r = petsird.BinaryPETSIRDReader(str(small_generator_file))
    header = r.read_header()
    blocks = list(r.read_time_blocks())
    r.close()
    # the generator writes 3 rows of prompt lists for 2 module types (its row 1 twice)
    assert [len(b.value.prompt_events) for b in blocks] == [3] * 4
    extra = sum(len(lst) for b in blocks for lst in b.value.prompt_events[2])
    with caplog.at_level(logging.WARNING):
        reader, ev = read_all(small_generator_file)
    assert reader.header == header  # float32 vectors read in one piece: the package's values
    assert reader.geometry.num_module_types == 2 and not reader.is_ring
    assert reader.geometry.num_detectors == 6 * 6 + 4 * 8
    assert ev.equals(flatten(blocks)) and reader.num_events == len(ev) > 0
    assert reader.ignored == {"extra_rows": extra}
    assert f"{extra} coincidences in lists outside" in caplog.text
    assert set(map(tuple, ev.module_types.tolist())) == {(0, 0), (1, 0), (1, 1)}


def test_detector_positions_from_module_and_element_transforms():
    header = small_header()
    info = header.scanner
    from petbind.recon.rawdata.petsird_io import PetsirdGeometry

    geo = PetsirdGeometry(info)
    pos = geo.detector_positions_mm()
    want = []
    for t in range(2):
        rep = info.scanner_geometry.replicated_modules[t]
        n_el, n_en = len(rep.object.detecting_elements.transforms), info.event_energy_bin_edges[t].number_of_bins()
        for m in range(len(rep.transforms)):
            for e in range(n_el):
                box = get_detecting_box(info, t, petsird.ExpandedDetectionBin(module_index=m, element_index=e, energy_index=0))
                want.append(np.mean([c.c for c in box.corners], axis=0))
                # the detector id of every energy bin of this element is the same row
                bins = [make_detection_bin(info, t, petsird.ExpandedDetectionBin(module_index=m, element_index=e, energy_index=k))
                        for k in range(n_en)]
                assert set(geo.detector_ids([t] * n_en, bins).tolist()) == {len(want) - 1}
    np.testing.assert_allclose(pos, np.array(want), atol=1e-4)
    # no ring is assumed: type 1 is a half ring, so its detectors leave half the circle empty
    phi = np.sort(np.mod(np.arctan2(pos[36:, 1], pos[36:, 0]), 2 * np.pi))
    assert np.max(np.diff(np.append(phi, phi[0] + 2 * np.pi))) > np.pi / 2
    with pytest.raises(ValueError, match="2 module types"):
        geo.ring_scanner()


def test_tof_bins_and_energy_windows_per_module_type_pair(tmp_path):
    header = small_header()
    from petbind.recon.rawdata.petsird_io import PetsirdGeometry

    geo = PetsirdGeometry(header.scanner, "x.petsird")
    c = 0.299792458
    # same-type pairs: the type's TOF bins over [-(r0 + r1), r0 + r1] (the generator's window); mixed pair: 1 bin
    tof00, tof11 = geo.tof_parameters(0, 0), geo.tof_parameters(1, 1)
    assert tof00.num_bins == 3 and tof00.bin_width_mm == pytest.approx(2 * 120.0 / 3, rel=1e-6)
    assert tof00.fwhm_ps == pytest.approx(40.0 * 2 / c, rel=1e-6)
    assert tof11.num_bins == 5 and tof11.bin_width_mm == pytest.approx(2 * 160.0 / 5, rel=1e-6)
    assert tof11.fwhm_ps == pytest.approx(25.0 * 2 / c, rel=1e-6)
    assert geo.tof_parameters(1, 0) is None and geo.tof_parameters(0, 1) is None
    np.testing.assert_array_equal(geo.num_tof_bins, [[3, 1], [1, 5]])
    np.testing.assert_allclose(geo.energy_bin_edges_kev(0), [430.0, 540.0, 650.0])
    np.testing.assert_allclose(geo.energy_bin_edges_kev(1), [440.0, 620.0])
    # energy bin of a detection bin follows the package's encoding
    b = make_detection_bin(header.scanner, 0, petsird.ExpandedDetectionBin(module_index=4, element_index=5, energy_index=1))
    assert geo.energy_indices([0], [b])[0] == 1 and geo.detector_ids([0], [b])[0] == 4 * 6 + 5
    # TOF indices are checked against the bins of the event's own pair
    ev = lambda b1, b2, k: petsird.CoincidenceEvent(detection_bins=[b1, b2], tof_idx=k)  # noqa: E731
    good = petsird.EventTimeBlock(time_interval=petsird.TimeInterval(start=0, stop=1),
                                  prompt_events=[[[ev(3, 1, 2)]], [[ev(5, 0, 0)], [ev(7, 2, 4)]]])
    write_with_package(tmp_path / "ok.petsird", header, [petsird.TimeBlock.EventTimeBlock(good)])
    _, got = read_all(tmp_path / "ok.petsird")
    np.testing.assert_array_equal(got.tof_idx, [2, 0, 4])
    for bad_pair, bad in (("(1, 0)", [[[ev(3, 1, 0)]], [[ev(5, 0, 1)], []]]), ("(0, 0)", [[[ev(3, 1, 3)]], [[], []]])):
        blk = petsird.EventTimeBlock(time_interval=petsird.TimeInterval(start=0, stop=1), prompt_events=bad)
        write_with_package(tmp_path / "bad.petsird", header, [petsird.TimeBlock.EventTimeBlock(blk)])
        for bulk in (True, False):
            with pytest.raises(ValueError, match=rf"bad.petsird.*tof_idx.*module types {re.escape(bad_pair)}"):
                read_all(tmp_path / "bad.petsird", bulk=bulk)


def test_pair_efficiencies_match_the_package_helper():
    header = small_header()
    info = header.scanner
    from petbind.recon.rawdata.petsird_io import PetsirdGeometry

    geo = PetsirdGeometry(info)
    rng = np.random.default_rng(3)
    d1 = rng.integers(0, geo.num_detectors, 300)
    d2 = rng.integers(0, geo.num_detectors, 300)
    got = geo.pair_efficiencies(d1, d2)
    want = np.zeros(300)
    for i, (a, b) in enumerate(zip(d1.tolist(), d2.tolist())):
        if a == b:
            continue
        ta, tb = int(geo.type_of_detector[a]), int(geo.type_of_detector[b])
        if (ta, a) < (tb, b):
            a, b, ta, tb = b, a, tb, ta
        la, lb = a - int(geo.detector_offset[ta]), b - int(geo.detector_offset[tb])
        na, nb = int(geo.num_energy_bins[ta]), int(geo.num_energy_bins[tb])
        for ea in range(na):
            for eb in range(nb):
                want[i] += get_detection_efficiency(info, (ta, tb), la * na + ea, lb * nb + eb, with_calibration_factor=False)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.any(want == 0) and np.any(want > 1)  # modules at one angle are not in coincidence; SGID values > 1


# ------------------------------------------------------------------------------------------------
# bulk reading and writing
# ------------------------------------------------------------------------------------------------
def test_bulk_reader_equals_per_event_reader(tmp_path):
    path = tmp_path / "r.petsird"
    header, blocks = random_file(path)
    want = flatten(blocks)
    outs = {}
    for kw in ({"bulk": False}, {"bulk": True}, {"bulk": True, "window_bytes": 1024, "chunk_events": 37}):
        r, ev = read_all(path, **kw)
        assert ev.equals(want), kw
        assert r.num_events == len(want)
        assert [type(b).__name__.split(".")[-1] for _, b in r.other_blocks] == ["SinglesHistogramTimeBlock", "DeadTimeTimeBlock"] * 2
        outs[str(kw)] = r.other_blocks
    a, b = list(outs.values())[:2]
    assert all(x[0] == y[0] and x[1].value == y[1].value for x, y in zip(a, b))
    # time selection by block start
    r = PetsirdReader(path)
    sel = PetsirdEvents.concatenate(list(r.events(start_ms=6, stop_ms=15)))
    assert sel.equals(want.select((want.time_ms >= 6) & (want.time_ms < 15)))


def test_truncated_and_corrupt_streams_are_refused(tmp_path):
    path = tmp_path / "r.petsird"
    random_file(path, with_other=False)
    data = path.read_bytes()
    r = PetsirdReader(path)
    start = r._events_offset
    rng = np.random.default_rng(5)
    for cut in sorted(rng.integers(start, len(data) - 1, 12).tolist()) + [len(data) - 1]:
        trunc = tmp_path / "trunc.petsird"
        trunc.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="trunc.petsird.*time_blocks"):
            read_all(trunc, window_bytes=1024)
    bad = bytearray(data)
    bad[start + 1] = 9  # the first block's union tag
    (tmp_path / "tag.petsird").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="tag.petsird.*time_blocks.*tag 9"):
        read_all(tmp_path / "tag.petsird")


def test_round_trip_event_for_event(tmp_path, small_generator_file):
    random_file(tmp_path / "r.petsird")
    for src in (small_generator_file, tmp_path / "r.petsird"):
        r, ev = read_all(src)
        out = tmp_path / "out.petsird"
        assert write_petsird_events(out, r.header, [ev.select(slice(0, 50)), ev.select(slice(50, None))], r.other_blocks) == len(ev)
        r2, ev2 = read_all(out)
        assert ev2.equals(ev)
        assert r2.header == r.header
        assert [(s, b.value) for s, b in r2.other_blocks] == [(s, b.value) for s, b in r.other_blocks]
        _, ev3 = read_all(out, bulk=False)
        assert ev3.equals(ev)
        # the bulk encoder (and the one-piece float32 header vectors) write exactly the package's bytes for
        # the same pieces (a time block cut by a piece boundary is written as two blocks either way; the
        # generator's file is random, so such a cut happens in some runs)
        ref = tmp_path / "ref.petsird"
        write_petsird_events(ref, r.header, [ev.select(slice(0, 50)), ev.select(slice(50, None))], r.other_blocks,
                             bulk=False)
        assert ref.read_bytes() == out.read_bytes()


def test_writer_puts_pairs_in_petsird_order(tmp_path):
    header = small_header()
    # (type 0, type 1) must become (1, 0); (0, 0) with bin1 < bin2 is swapped; TOF bins are mirrored
    ev = PetsirdEvents(np.array([[0, 1], [0, 0], [1, 1]], np.uint8), np.array([[4, 2], [3, 9], [7, 2]], np.uint32),
                       np.array([0, 2, 1], np.uint32), np.zeros(3, np.uint32), np.ones(3, np.uint32), np.ones(3, bool))
    write_petsird_events(tmp_path / "o.petsird", header, [ev])
    _, got = read_all(tmp_path / "o.petsird")
    rows = sorted(zip(map(tuple, got.module_types.tolist()), map(tuple, got.detection_bins.tolist()), got.tof_idx.tolist()))
    assert rows == [((0, 0), (9, 3), 0), ((1, 0), (2, 4), 0), ((1, 1), (7, 2), 1)]


def test_sinograms_and_hdf5_need_a_ring(tmp_path):
    path = tmp_path / "r.petsird"
    random_file(path)
    r = PetsirdReader(path)
    layout = SinogramLayout(Scanner.cylindrical(60.0, 36, 2, 4.0), 9)
    with pytest.raises(ValueError, match="r.petsird.*2 module types.*events\\(\\)"):
        histogram_listmode(r, layout, progress=False)


# ------------------------------------------------------------------------------------------------
# listmode OSEM on a geometry that is not a ring
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_listmode_osem_on_two_module_types_matches_dense_oracle(tmp_path, device):
    header = small_header()
    info = header.scanner
    from petbind.recon.rawdata.petsird_io import PetsirdGeometry

    geo = PetsirdGeometry(info)
    grid = ImageGrid((8, 8, 2), (10.0, 10.0, 4.0))
    # independent geometry: detector centres from the package's helper, efficiencies from its helper
    centres, where = [], []
    for t in range(2):
        rep = info.scanner_geometry.replicated_modules[t]
        for m in range(len(rep.transforms)):
            for e in range(len(rep.object.detecting_elements.transforms)):
                box = get_detecting_box(info, t, petsird.ExpandedDetectionBin(module_index=m, element_index=e, energy_index=0))
                centres.append(np.mean([c.c for c in box.corners], axis=0))
                where.append((t, m * len(rep.object.detecting_elements.transforms) + e))
    centres = np.array(centres, dtype=np.float64)
    n_en = [info.event_energy_bin_edges[t].number_of_bins() for t in range(2)]
    tofs = {(0, 0): geo.tof_parameters(0, 0), (1, 1): geo.tof_parameters(1, 1)}  # (1, 0) has one bin: non-TOF
    # every unordered pair in PETSIRD's order (higher type first, then higher element)
    pairs, weights = [], []
    for a in range(len(centres)):
        for b in range(a):
            (ta, la), (tb, lb) = where[a], where[b]
            w = sum(get_detection_efficiency(info, (ta, tb), la * n_en[ta] + i, lb * n_en[tb] + j, with_calibration_factor=False)
                    for i in range(n_en[ta]) for j in range(n_en[tb]))
            pairs.append((a, b))
            weights.append(w)
    pairs, weights = np.array(pairs), np.array(weights)
    rows = {}  # (pair index, tof bin or -1) -> system matrix row (image)

    def row(p, k):
        if (p, k) not in rows:
            a, b = pairs[p]
            tof = tofs[(where[a][0], where[b][0])] if k >= 0 else None
            rows[(p, k)] = back_reference(np.ones(1), centres[a:a + 1], centres[b:b + 1], grid, tof, [k]).ravel()
        return rows[(p, k)]

    sens = sum(w * row(p, -1) for p, w in enumerate(weights) if w > 0)
    # events: a hot rod phantom, counts drawn from the non-TOF expectations, TOF bins from the TOF split
    rng = np.random.default_rng(11)
    xc, yc, _ = np.meshgrid(*grid.axis_centres_mm(), indexing="ij")
    truth = np.where(np.hypot(xc, yc) < 36.0, 1.0, 0.0)
    truth[2:5, 3:6, :] = 4.0
    truth[5, 5, 1] = 9.0
    means = np.array([weights[p] * row(p, -1) @ truth.ravel() if weights[p] > 0 else 0.0 for p in range(len(pairs))])
    means *= 2500 / means.sum()
    ev_rows = []
    for p in np.flatnonzero(means > 0):
        a, b = pairs[p]
        mean = means[p]
        for _ in range(rng.poisson(mean)):
            (ta, la), (tb, lb) = where[a], where[b]
            if ta == tb:
                probs = np.array([row(p, k) @ truth.ravel() for k in range(tofs[(ta, tb)].num_bins)])
                k = int(rng.choice(probs.size, p=probs / probs.sum()))
            else:
                k = -1
            ea, eb = rng.integers(0, n_en[ta]), rng.integers(0, n_en[tb])
            ev_rows.append((p, k, ta, tb, la * n_en[ta] + ea, lb * n_en[tb] + eb))
    ev_rows = np.array(ev_rows)
    rng.shuffle(ev_rows)
    # one time block: the file holds the events list by list, type pairs (0, 0), (1, 0), (1, 1)
    ev_rows = ev_rows[np.argsort(ev_rows[:, 2] * 2 + ev_rows[:, 3], kind="stable")]
    assert len(ev_rows) > 300 and {(0, 0), (1, 0), (1, 1)} <= set(map(tuple, ev_rows[:, 2:4].tolist()))
    n = len(ev_rows)
    events = PetsirdEvents(ev_rows[:, 2:4].astype(np.uint8), ev_rows[:, 4:6].astype(np.uint32),
                           np.maximum(ev_rows[:, 1], 0).astype(np.uint32), np.zeros(n, np.uint32), np.ones(n, np.uint32),
                           np.ones(n, bool))
    path = tmp_path / "lm.petsird"
    write_petsird_events(path, header, [events])
    reader, read_back = read_all(path)
    assert read_back.equals(events)

    # oracle: listmode MLEM/OSEM with dense rows, float64, same interleaved subsets
    A = np.stack([weights[p] * row(p, k) for p, k in ev_rows[:, :2]])
    subsets = 2
    x = np.ones(grid.num_voxels)
    for _ in range(3):
        for s in range(subsets):
            As = A[s::subsets]
            x = np.where(sens > 0, x / np.where(sens > 0, sens / subsets, 1) * (As.T @ (1.0 / (As @ x))), 0.0)
    rec = PetsirdListmodeOSEM(reader.geometry, grid, read_back, num_subsets=subsets, device=device)
    np.testing.assert_allclose(to_numpy(sensitivity_image(reader.geometry, grid, device=device)).ravel(), sens, rtol=2e-5,
                               atol=1e-5 * sens.max())
    img = to_numpy(rec.reconstruct(3, progress=False))
    np.testing.assert_allclose(img.ravel(), x, rtol=1e-4, atol=1e-5 * x.max())
    # and it reconstructs the rods: more activity inside than outside
    assert img[2:5, 3:6].mean() > 3 * img[0:2].mean()


# ------------------------------------------------------------------------------------------------
# the package's own example file, as the generator writes it
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_package_example_file_loads_and_round_trips(tmp_path):
    path = tmp_path / "example.petsird"
    with open(path, "wb") as f:
        subprocess.run([sys.executable, "-m", "petsird.helpers.generator"], stdout=f, check=True)
    r, ev = read_all(path)
    assert r.geometry.num_module_types == 2 and r.geometry.num_detectors == 40 * 56 + 15 * 90
    assert len(ev) == r.num_events > 0 and set(map(tuple, ev.module_types.tolist())) == {(0, 0), (1, 0), (1, 1)}
    out = tmp_path / "again.petsird"
    write_petsird_events(out, r.header, [ev], r.other_blocks)
    _, ev2 = read_all(out)
    assert ev2.equals(ev)
