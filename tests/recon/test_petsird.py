"""PETSIRD reading and writing through the official petsird package."""

import numpy as np
import pytest

petsird = pytest.importorskip("petsird")
from petsird.helpers import expand_detection_bin  # noqa: E402
from petsird.helpers.generator import CylindricalBlocksInfo, get_events, get_scanner_info  # noqa: E402
from petsird.helpers.geometry import get_detecting_box  # noqa: E402

from petbind.recon.rawdata.convert import main as convert_main  # noqa: E402
from petbind.recon.geometry import Scanner, TOFParameters  # noqa: E402
from petbind.recon.rawdata.schema import ExamInfo, ListmodeCorrections
from petbind.recon.rawdata.hdf5 import ListmodeReader, ListmodeWriter
from petbind.recon.rawdata.petsird_io import PetsirdReader, write_petsird  # noqa: E402


def scanner():
    return Scanner.polygon(6, 3, 4.0, 40.0, 4, 4.0, gap_crystals_per_module=1, name="tiny")


def exam():
    return ExamInfo(tracer="[11C]AZ10419369", isotope="C11", half_life_s=1221.84, injection_time="2026-01-01T10:00:00",
                    injected_activity_bq=3.7e8, scan_start_s=12.5, subject_id="sub-07", energy_window_kev=(430.0, 650.0))


def make_h5(path, tof, n=2500, seed=0):
    sc = scanner()
    rng = np.random.default_rng(seed)
    nd = sc.num_detectors
    real = np.flatnonzero(sc.detector_mask())
    corr = ListmodeCorrections(
        crystal_efficiencies=rng.uniform(0.8, 1.2, nd) * sc.detector_mask(),
        singles_block_edges_s=np.array([0.0, 1.0, 2.5]),
        singles_counts=rng.poisson(100, (2, nd)) * sc.detector_mask() * 1.0,
        alive_block_edges_s=np.array([0.0, 2.5]),
        alive_fractions=rng.uniform(0.9, 1.0, (1, nd)),
        calibration_factor=1.5,
    )
    ids = rng.choice(real, (n, 2)).astype(np.int32)
    t = np.sort(rng.integers(0, 2500, n)).astype(float)
    k = rng.integers(0, tof.num_bins, n).astype(np.int16) if tof else None
    with ListmodeWriter(path, sc, tof=tof, exam=exam(), corrections=corr, chunk_events=700) as w:
        w.append(ids, k, t, rng.random(n) < 0.8)
    return corr


def canonical(ids, k, t, p, num_tof):
    """Order-free, orientation-free view of events: (time, prompt, max id, min id, TOF bin in that orientation)."""
    swap = ids[:, 0] < ids[:, 1]
    a = np.where(swap, ids[:, 1], ids[:, 0])
    b = np.where(swap, ids[:, 0], ids[:, 1])
    kk = np.zeros(len(t), int) if k is None else np.where(swap, num_tof - 1 - k, k)
    rows = np.stack([t, p.astype(float), a, b, kk], 1)
    return rows[np.lexsort(rows.T[::-1])]


def all_events(reader):
    ch = list(reader.chunks())
    cat = lambda f: np.concatenate([getattr(c, f) for c in ch])  # noqa: E731
    k = None if reader.tof is None else cat("tof_bin").astype(int)
    return cat("detector_ids").astype(int), k, cat("time_ms"), cat("is_prompt")


@pytest.mark.parametrize("tof", [None, TOFParameters(7, 20.0, 400.0)])
def test_h5_petsird_h5_round_trip(tmp_path, tof):
    src, mid, back = tmp_path / "a.h5", tmp_path / "a.petsird", tmp_path / "b.h5"
    corr = make_h5(src, tof)
    assert convert_main([str(src), str(mid), "--quiet", "--chunk-events", "300"]) == 0
    assert convert_main([str(mid), str(back), "--quiet", "--chunk-events", "400"]) == 0
    r0, r1 = ListmodeReader(src), ListmodeReader(back)
    assert r1.scanner == r0.scanner and r1.scanner.name == "tiny"
    np.testing.assert_array_equal(r1.scanner.crystal_mask, r0.scanner.crystal_mask)
    np.testing.assert_allclose(r1.scanner.crystal_xy_mm, r0.scanner.crystal_xy_mm, atol=1e-4)
    np.testing.assert_allclose(r1.scanner.ring_z_mm, r0.scanner.ring_z_mm, atol=1e-5)
    if tof is None:
        assert r1.tof is None
    else:
        assert r1.tof.num_bins == tof.num_bins and r1.tof.bin_width_mm == pytest.approx(tof.bin_width_mm, rel=1e-6)
        assert r1.tof.fwhm_ps == pytest.approx(tof.fwhm_ps, rel=1e-6)
    assert r1.exam == exam()
    c = r1.corrections
    np.testing.assert_array_equal(c.crystal_efficiencies, corr.crystal_efficiencies.astype(np.float32))
    np.testing.assert_array_equal(c.singles_block_edges_s, corr.singles_block_edges_s)
    np.testing.assert_array_equal(c.singles_counts, corr.singles_counts)
    np.testing.assert_array_equal(c.alive_block_edges_s, corr.alive_block_edges_s)
    np.testing.assert_array_equal(c.alive_fractions, corr.alive_fractions.astype(np.float32))
    assert c.calibration_factor == 1.5
    nt = tof.num_bins if tof else 1
    np.testing.assert_array_equal(canonical(*all_events(r1), nt), canonical(*all_events(r0), nt))
    assert r1.num_events == r0.num_events == 2500


def test_written_geometry_matches_package_helper(tmp_path):
    src, mid = tmp_path / "a.h5", tmp_path / "a.petsird"
    make_h5(src, None, n=50)
    convert_main([str(src), str(mid), "--quiet"])
    r = PetsirdReader(mid)
    pos = scanner().detector_positions_mm()
    info = r.header.scanner
    for b in [0, 1, 5, 23, 24, 50, 95]:
        box = get_detecting_box(info, 0, expand_detection_bin(info, 0, b))
        centre = np.mean([c.c for c in box.corners], axis=0)
        # written so that the PETSIRD detection bin is the petbind detector id
        np.testing.assert_allclose(centre, pos[b], atol=1e-4)


def foreign_file(path, num_energy_bins, module_types=1, seed=3):
    """A PETSIRD file built with the package's own example generator."""
    import random

    random.seed(seed)
    block = CylindricalBlocksInfo(
        crystal_length=(10.0, 2.0, 2.5), num_crystals_per_module=(1, 4, 3), num_modules_along_ring=12,
        num_modules_along_axis=2, radius=150.0, arc=2 * np.pi, start_angle=0.0, module_spacing_along_axis=7.5,
        number_of_tof_bins=5, tof_resolution=60.0, LLD=430.0, ULD=650.0, number_of_event_energy_bins=num_energy_bins,
        energy_resolution=0.1, material_id=1,
    )
    defs = [block] * module_types
    header = petsird.Header(scanner=get_scanner_info(defs), exam=petsird.ExamInformation())
    header.scanner.delayed_event_policy = petsird.CoincidencePolicy.REJECT_HIGHER_MULTIPLES
    blocks = []
    for t in range(4):
        prompts = [[list(get_events(header, petsird.TypeOfModulePair((m0, m1)), 30)) for m1 in range(m0 + 1)] for m0 in range(module_types)]
        delayeds = [[list(get_events(header, petsird.TypeOfModulePair((m0, m1)), 5)) for m1 in range(m0 + 1)] for m0 in range(module_types)]
        blocks.append(petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
            time_interval=petsird.TimeInterval(start=2 * t, stop=2 * t + 2), prompt_events=prompts, delayed_events=delayeds)))
    with petsird.BinaryPETSIRDWriter(str(path)) as w:
        w.write_header(header)
        w.write_time_blocks(blocks)
    return header, blocks


@pytest.mark.parametrize("num_energy_bins", [1, 3])
def test_read_foreign_ring_scanner(tmp_path, num_energy_bins):
    path = tmp_path / "gen.petsird"
    header, blocks = foreign_file(path, num_energy_bins)
    r = PetsirdReader(path, chunk_events=50)
    assert r.scanner.crystals_per_ring == 12 * 4 and r.scanner.num_rings == 2 * 3
    assert r.tof.num_bins == 5 and r.tof.fwhm_ps == pytest.approx(60.0 * 2 / 0.299792458, rel=1e-6)
    assert r.exam.energy_window_kev == (430.0, 650.0)
    assert r.corrections.calibration_factor == 42.0
    ids, k, t, p = all_events(r)
    pos = r.scanner.detector_positions_mm()
    info = header.scanner
    i = 0
    for blk in blocks:
        ev = blk.value.prompt_events[0][0] + blk.value.delayed_events[0][0]
        for j, e in enumerate(ev):
            for end in range(2):
                box = get_detecting_box(info, 0, expand_detection_bin(info, 0, e.detection_bins[end]))
                np.testing.assert_allclose(pos[ids[i, end]], np.mean([c.c for c in box.corners], axis=0), atol=1e-3)
            assert k[i] == e.tof_idx and t[i] == blk.value.time_interval.start
            assert p[i] == (j < len(blk.value.prompt_events[0][0]))
            i += 1
    assert i == len(t) == r.num_events
    # rings are sorted by z, crystals counter-clockwise
    assert np.all(np.diff(r.scanner.ring_z_mm) > 0)
    phi = np.unwrap(np.arctan2(r.scanner.crystal_xy_mm[:, 1], r.scanner.crystal_xy_mm[:, 0]))
    assert np.all(np.diff(phi) > 0)


def test_two_module_types_load_but_ring_apis_refuse_and_corrupt_files(tmp_path, capsys):
    path = tmp_path / "two.petsird"
    foreign_file(path, 1, module_types=2)
    r = PetsirdReader(path)  # any geometry loads
    assert not r.is_ring and r.geometry.num_module_types == 2
    for attempt in (lambda: r.scanner, lambda: r.tof, lambda: next(r.chunks())):
        with pytest.raises(ValueError, match="two.petsird.*replicated_modules.*2 module types"):
            attempt()
    # petbind HDF5 stores a ring scanner: the CLI says why it cannot convert and leaves no file
    assert convert_main([str(path), str(tmp_path / "two.h5"), "--quiet"]) == 2
    assert "2 module types" in capsys.readouterr().err
    assert not (tmp_path / "two.h5").exists()
    src, mid = tmp_path / "a.h5", tmp_path / "a.petsird"
    make_h5(src, None, n=2000)
    convert_main([str(src), str(mid), "--quiet"])
    data = mid.read_bytes()
    trunc = tmp_path / "trunc.petsird"
    trunc.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(ValueError, match="trunc.petsird.*time_blocks"):
        for _ in PetsirdReader(trunc).chunks():
            pass
    junk = tmp_path / "junk.petsird"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="junk.petsird"):
        PetsirdReader(junk)
    # the CLI reports the error and leaves no output
    assert convert_main([str(junk), str(tmp_path / "out.h5"), "--quiet"]) == 2
    assert not (tmp_path / "out.h5").exists()


def test_times_quantised_to_time_blocks(tmp_path):
    sc = scanner()
    path = tmp_path / "q.petsird"
    t = np.array([0.2, 4.9, 5.0, 12.7])
    ids = np.tile(np.array([[1, 13]]), (4, 1))

    class C:
        detector_ids, tof_bin, time_ms, is_prompt = ids, None, t, np.ones(4, bool)

        def __len__(self):
            return 4

    assert write_petsird(path, sc, [C()], time_block_ms=5) == 4
    _, _, tt, _ = all_events(PetsirdReader(path))
    np.testing.assert_array_equal(tt, [0.0, 0.0, 5.0, 10.0])


def test_convert_cli_refuses_same_format(tmp_path, capsys):
    src = tmp_path / "a.h5"
    make_h5(src, None, n=10)
    assert convert_main([str(src), str(tmp_path / "b.h5"), "--quiet"]) == 2
    assert "already h5" in capsys.readouterr().err
    assert not (tmp_path / "b.h5").exists()
    assert convert_main([str(src), str(tmp_path / "b.out"), "--to", "petsird", "--quiet"]) == 0
    assert PetsirdReader(tmp_path / "b.out").scanner == scanner()


def _with_singles_blocks(path, header, blocks, singles_blocks):
    with petsird.BinaryPETSIRDWriter(str(path)) as w:
        w.write_header(header)
        w.write_time_blocks(singles_blocks + blocks)


def test_foreign_singles_per_detection_bin_and_per_module(tmp_path):
    from petsird.helpers import make_detection_bin

    header, blocks = foreign_file(tmp_path / "x.petsird", num_energy_bins=3)
    info = header.scanner
    rep = info.scanner_geometry.replicated_modules[0]
    n_mod, n_el, n_en = len(rep.transforms), len(rep.object.detecting_elements.transforms), 3
    rng = np.random.default_rng(8)
    # level 'all': one count per (module, element, energy) placed with the package's bin encoding
    value = rng.integers(0, 50, (n_mod, n_el, n_en))
    hist = [0] * (n_mod * n_el * n_en)
    for m in range(n_mod):
        for e in range(n_el):
            for en in range(n_en):
                b = make_detection_bin(info, 0, petsird.ExpandedDetectionBin(module_index=m, element_index=e, energy_index=en))
                hist[b] = int(value[m, e, en])
    info.singles_histogram_level = petsird.SinglesHistogramLevelType.ALL
    info.singles_histogram_energy_bin_edges = [info.event_energy_bin_edges[0]]
    sblk = petsird.TimeBlock.SinglesHistogramTimeBlock(petsird.SinglesHistogramTimeBlock(
        time_interval=petsird.TimeInterval(start=0, stop=8), singles_per_detection_bin_histogram=[hist]))
    path = tmp_path / "all.petsird"
    _with_singles_blocks(path, header, blocks, [sblk])
    r = PetsirdReader(path)
    list(r.chunks())
    det = r._bin_to_det
    want = np.zeros(r.scanner.num_detectors)
    for m in range(n_mod):
        for e in range(n_el):
            b = make_detection_bin(info, 0, petsird.ExpandedDetectionBin(module_index=m, element_index=e, energy_index=0))
            want[det[b]] = value[m, e].sum()
    np.testing.assert_array_equal(r.corrections.singles_counts[0], want)
    np.testing.assert_array_equal(r.corrections.singles_block_edges_s, [0.0, 0.008])

    # level 'module': pairs of modules share a singles unit; counts spread evenly over its detectors
    info.singles_histogram_level = petsird.SinglesHistogramLevelType.MODULE
    info.module_singles_unit_idx_lu_ts = [[m // 2 for m in range(n_mod)]]
    units = rng.integers(0, 1000, (n_mod // 2, n_en))
    sblk = petsird.TimeBlock.SinglesHistogramTimeBlock(petsird.SinglesHistogramTimeBlock(
        time_interval=petsird.TimeInterval(start=0, stop=8),
        singles_per_singles_unit_histogram=units.astype(np.uint64).tolist()))
    path = tmp_path / "module.petsird"
    _with_singles_blocks(path, header, blocks, [sblk])
    r = PetsirdReader(path)
    list(r.chunks())
    got = r.corrections.singles_counts[0]
    for u in range(n_mod // 2):
        members = [det[make_detection_bin(info, 0, petsird.ExpandedDetectionBin(module_index=m, element_index=e, energy_index=0))]
                   for m in (2 * u, 2 * u + 1) for e in range(n_el)]
        np.testing.assert_allclose(got[members], units[u].sum() / len(members))
    assert got.sum() == pytest.approx(units.sum())
