"""petbind HDF5 listmode and sinogram files: round trips, validation, atomic writes."""

import os

import h5py
import numpy as np
import pytest

from petbind.recon.geometry import Scanner, SinogramLayout, TOFParameters
from petbind.recon.rawdata.schema import FORMAT_VERSION, ExamInfo, ListmodeCorrections
from petbind.recon.rawdata.hdf5 import ListmodeReader, ListmodeWriter
from petbind.recon.rawdata.sinograms import SinogramReader, SinogramWriter, read_sinograms_h5, write_sinograms_h5


def small_scanner():
    return Scanner.polygon(6, 3, 4.0, 40.0, 4, 4.0, gap_crystals_per_module=1, name="tiny")


def exam():
    return ExamInfo(
        tracer="[11C]AZ10419369", isotope="C11", half_life_s=1221.84, injection_time="2026-01-01T10:00:00",
        injected_activity_bq=3.7e8, scan_start_s=12.5, subject_id="sub-01",
    )


def random_events(scanner, n, rng, tof_bins=None, t0=0.0, t1=1000.0):
    real = np.flatnonzero(scanner.detector_mask())
    ids = rng.choice(real, size=(n, 2)).astype(np.int32)
    t = np.sort(rng.uniform(t0, t1, n))
    k = None if tof_bins is None else rng.integers(0, tof_bins, n).astype(np.int16)
    return ids, k, t, rng.random(n) < 0.8


def corrections(scanner, rng):
    nd = scanner.num_detectors
    eff = rng.uniform(0.8, 1.2, nd) * scanner.detector_mask()
    return ListmodeCorrections(
        crystal_efficiencies=eff,
        singles_block_edges_s=np.arange(0.0, 3.0),
        singles_counts=rng.poisson(1000, (2, nd)).astype(np.float64) * scanner.detector_mask(),
        alive_block_edges_s=np.array([0.0, 2.0]),
        alive_fractions=rng.uniform(0.9, 1.0, (1, nd)),
        mu_map_per_mm=rng.uniform(0, 0.0096, (5, 4, 3)).astype(np.float32),
        mu_map_affine=np.diag([2.0, 2.0, 3.0, 1.0]),
        calibration_factor=1.7,
    )


def write_file(path, scanner, tof, events_blocks, corr=None, chunk_events=1000):
    with ListmodeWriter(path, scanner, tof=tof, exam=exam(), corrections=corr, chunk_events=chunk_events) as w:
        for ev in events_blocks:
            w.append(*ev)


@pytest.mark.parametrize("tof", [None, TOFParameters(7, 15.0, 300.0)])
def test_listmode_round_trip_every_field(tmp_path, tof):
    rng = np.random.default_rng(1)
    sc = small_scanner()
    blocks = [random_events(sc, n, rng, None if tof is None else tof.num_bins, 100.0 * i, 100.0 * (i + 1)) for i, n in enumerate([5, 1200, 0, 333])]
    corr = corrections(sc, rng)
    path = tmp_path / "lm.h5"
    write_file(path, sc, tof, blocks, corr, chunk_events=500)
    r = ListmodeReader(path, chunk_events=256)
    assert r.scanner == sc and r.scanner.name == "tiny"
    assert r.tof == tof
    assert r.exam == exam()
    assert r.corrections.equals(corr)
    assert r.num_events == sum(len(b[2]) for b in blocks)
    chunks = list(r.chunks())
    assert all(len(c) <= 256 for c in chunks)
    cat = lambda i: np.concatenate([b[i] for b in blocks])  # noqa: E731
    np.testing.assert_array_equal(np.concatenate([c.detector_ids for c in chunks]), cat(0))
    np.testing.assert_array_equal(np.concatenate([c.time_ms for c in chunks]), cat(2))
    np.testing.assert_array_equal(np.concatenate([c.is_prompt for c in chunks]), cat(3))
    if tof is None:
        assert all(c.tof_bin is None for c in chunks)
    else:
        np.testing.assert_array_equal(np.concatenate([c.tof_bin for c in chunks]), cat(1))
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f["listmode/detector_ids"].dtype == np.int32


def test_chunks_time_window_is_half_open(tmp_path):
    sc = small_scanner()
    t = np.repeat(np.arange(0.0, 10.0), 3)  # 3 events at each integer ms
    ids = np.tile(np.array([[0, 9]], np.int32), (t.size, 1))
    path = tmp_path / "lm.h5"
    write_file(path, sc, None, [(ids, None, t, np.ones(t.size, bool))])
    r = ListmodeReader(path, chunk_events=4)
    got = np.concatenate([c.time_ms for c in r.chunks(2.0, 5.0)])
    np.testing.assert_array_equal(got, t[(t >= 2.0) & (t < 5.0)])
    assert sum(len(c) for c in r.chunks(9.5, None)) == 0
    assert sum(len(c) for c in r.chunks(None, 0.0)) == 0


def test_writer_refuses_bad_events_and_leaves_no_file(tmp_path):
    sc = small_scanner()
    path = tmp_path / "lm.h5"
    ids = np.array([[0, 9], [1, 10]], np.int32)
    cases = [
        (dict(detector_ids=np.array([[0, sc.num_detectors]])), ValueError, "detector_ids"),
        (dict(detector_ids=np.array([[3, 9]])), ValueError, "gap crystal"),  # crystal 3 is a gap
        (dict(time_ms=np.array([5.0, 4.0])), ValueError, "time_ms"),
        (dict(is_prompt=np.array([1, 0])), TypeError, "is_prompt"),
        (dict(tof_bin=np.array([0, 1])), ValueError, "tof_bin"),
        (dict(detector_ids=np.array([[0.0, 9.0], [1.0, 10.0]])), TypeError, "detector_ids"),
    ]
    for override, exc, word in cases:
        ev = dict(detector_ids=ids, tof_bin=None, time_ms=np.array([1.0, 2.0]), is_prompt=np.array([True, False]))
        ev.update({k: v for k, v in override.items()})
        if ev["detector_ids"].shape[0] != 2:
            ev.update(time_ms=np.array([1.0]), is_prompt=np.array([True]))
        with pytest.raises(exc, match=word) as info:
            with ListmodeWriter(path, sc) as w:
                w.append(**ev)
        assert str(path) in str(info.value)
        assert os.listdir(tmp_path) == [], f"temporary file left behind after {word}"


def test_time_must_be_monotonic_across_appends(tmp_path):
    sc = small_scanner()
    path = tmp_path / "lm.h5"
    with pytest.raises(ValueError, match="time_ms.*monotonic"):
        with ListmodeWriter(path, sc) as w:
            w.append(np.array([[0, 9]]), None, np.array([5.0]), np.array([True]))
            w.append(np.array([[0, 9]]), None, np.array([4.0]), np.array([True]))
    assert not path.exists()


def _good_file(tmp_path, tof=None):
    sc = small_scanner()
    rng = np.random.default_rng(3)
    path = tmp_path / "lm.h5"
    write_file(path, sc, tof, [random_events(sc, 300, rng, None if tof is None else tof.num_bins)], chunk_events=100)
    return path


def _expect_error(path, field, **kw):
    with pytest.raises(ValueError) as info:
        r = ListmodeReader(path, **kw)
        for _ in r.chunks():
            pass
    msg = str(info.value)
    assert str(path) in msg, msg
    assert field in msg, msg
    return msg


def test_reader_errors_name_file_and_field(tmp_path):
    path = _good_file(tmp_path)
    mutations = {
        "format_version": lambda f: f.attrs.__setitem__("format_version", "9.0"),
        "listmode/time_ms": lambda f: (f["listmode"].__delitem__("time_ms")),
        "listmode/is_prompt": lambda f: (f["listmode"].__delitem__("is_prompt"), f["listmode"].create_dataset("is_prompt", data=np.ones(300, np.float32))),
        "scanner/crystal_xy_mm": lambda f: (f["scanner"].__delitem__("crystal_xy_mm"), f["scanner"].create_dataset("crystal_xy_mm", data=np.zeros((24, 3)))),
        "listmode/num_events": lambda f: f["listmode"].attrs.__setitem__("num_events", 7),
        "corrections/crystal_efficiencies": lambda f: f.create_group("corrections").create_dataset("crystal_efficiencies", data=np.ones(5)),
        "tof": lambda f: f.create_group("tof").attrs.__setitem__("num_bins", 3),
    }
    for field, mutate in mutations.items():
        bad = tmp_path / f"bad_{field.replace('/', '_')}.h5"
        bad.write_bytes(path.read_bytes())
        with h5py.File(bad, "r+") as f:
            mutate(f)
        _expect_error(bad, field)


def test_reader_checks_values_per_chunk(tmp_path):
    path = _good_file(tmp_path)
    bad = tmp_path / "ids.h5"
    bad.write_bytes(path.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["listmode/detector_ids"][250, 1] = 10_000
    msg = _expect_error(bad, "detector_ids", chunk_events=100)
    assert "events 200..300" in msg
    bad = tmp_path / "time.h5"
    bad.write_bytes(path.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["listmode/time_ms"][100] = -1.0 + f["listmode/time_ms"][99]  # breaks order across a chunk edge
    _expect_error(bad, "time_ms", chunk_events=100)


def test_truncated_and_foreign_files(tmp_path):
    path = _good_file(tmp_path)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.h5") as info:
        r = ListmodeReader(trunc)
        for _ in r.chunks():
            pass
    assert "truncated" in str(info.value)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match="notes.h5.*HDF5"):
        ListmodeReader(text)
    with pytest.raises(FileNotFoundError):
        ListmodeReader(tmp_path / "missing.h5")


def test_sinogram_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    sc = small_scanner()
    sc.resolution_fwhm_mm = 4.5
    layout = SinogramLayout(sc, 11, 2, 1)
    tof = TOFParameters(5, 20.0, 350.0)
    fs, fe = np.array([0.0, 10.0, 30.0]), np.array([10.0, 30.0, 60.0])
    kw = dict(
        prompts=rng.poisson(3, (3,) + layout.shape + (5,)).astype(np.uint16),
        delayeds=rng.poisson(1, (3,) + layout.shape + (5,)).astype(np.float32),
        normalisation=rng.uniform(0.5, 2, layout.shape).astype(np.float32),
        attenuation=rng.uniform(0.1, 1, layout.shape).astype(np.float32),
        scatter=rng.uniform(0, 1, (3,) + layout.shape + (5,)),
    )
    corr = corrections(sc, rng)
    path = tmp_path / "sino.h5"
    write_sinograms_h5(path, layout, fs, fe, tof=tof, exam=exam(), corrections=corr, **kw)
    s = read_sinograms_h5(path)
    assert s.layout.shape == layout.shape and s.layout.span == 1 and s.layout.max_ring_difference == 2
    assert s.layout.scanner == sc and s.layout.scanner.resolution_fwhm_mm == 4.5
    assert s.tof == tof and s.exam == exam() and s.corrections.equals(corr)
    np.testing.assert_array_equal(s.frame_start_s, fs)
    np.testing.assert_array_equal(s.frame_duration_s, fe - fs)
    assert s.frames().end_s.tolist() == fe.tolist()
    for name, arr in kw.items():
        np.testing.assert_array_equal(getattr(s, name), arr)
        assert getattr(s, name).dtype == arr.dtype
    r = SinogramReader(path)
    np.testing.assert_array_equal(r.prompts(1), kw["prompts"][1])
    np.testing.assert_array_equal(r.delayeds(-1), kw["delayeds"][2])
    with pytest.raises(ValueError, match="prompts"):  # TOF axis missing
        write_sinograms_h5(tmp_path / "x.h5", layout, fs, fe, tof=tof, prompts=np.zeros((3,) + layout.shape))
    with pytest.raises(ValueError, match="prompts"):  # frame axis missing
        write_sinograms_h5(tmp_path / "x.h5", layout, fs, fe, prompts=np.zeros(layout.shape))
    with pytest.raises(ValueError, match="overlap"):
        write_sinograms_h5(tmp_path / "x.h5", layout, [0.0, 5.0], [10.0, 20.0], prompts=np.zeros((2,) + layout.shape))
    assert not (tmp_path / "x.h5").exists()
    with h5py.File(path, "r+") as f:
        del f["sinograms/normalisation"]
        f["sinograms"].create_dataset("normalisation", data=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="sino.h5.*sinograms/normalisation"):
        read_sinograms_h5(path)


def test_sinogram_writer_blocks_and_validation(tmp_path):
    sc = small_scanner()
    layout = SinogramLayout(sc, 11)
    path = tmp_path / "s.h5"
    full = np.arange(2 * layout.num_bins, dtype=np.int64).reshape((2,) + layout.shape) % 7
    with SinogramWriter(path, layout, [0.0, 60.0], [60.0, 120.0], sinograms={"prompts": np.uint16},
                        chunk_planes=5) as w:
        for p0 in range(0, layout.num_planes, 5):
            sl = slice(p0, min(p0 + 5, layout.num_planes))
            w.write("prompts", full[:, sl], planes=sl)
        with pytest.raises(ValueError, match="do not fit"):
            w.write("prompts", full[:, :5] - 1, planes=slice(0, 5))
    np.testing.assert_array_equal(read_sinograms_h5(path).prompts, full)
    # a block never written: nothing is left behind
    with pytest.raises(ValueError, match="incomplete: frame 1"):
        with SinogramWriter(tmp_path / "t.h5", layout, [0.0, 60.0], [60.0, 120.0], sinograms={"prompts": np.uint16}) as w:
            w.write("prompts", full[:1], frames=0)
    assert not (tmp_path / "t.h5").exists() and not list(tmp_path.glob(".*tmp*"))
    # values are checked when a frame is read
    with h5py.File(path, "r+") as f:
        del f["sinograms/prompts"]
        f["sinograms"].create_dataset("prompts", data=-full.astype(np.float32))
    with pytest.raises(ValueError, match="s.h5: field 'sinograms/prompts' holds negative"):
        SinogramReader(path).prompts(1)
    with h5py.File(path, "r+") as f:
        del f["frames/frame_end_s"]
    with pytest.raises(ValueError, match="s.h5: field 'frames/frame_end_s' is missing"):
        SinogramReader(path)


def test_sinogram_format_1_0_is_read_as_one_frame(tmp_path):
    # A file as petbind 1.0 wrote it: no frame axis, timing in /frame.
    from petbind.recon.rawdata.schema import write_scanner

    sc = small_scanner()
    layout = SinogramLayout(sc, 11)
    prompts = np.ones(layout.shape, np.float32)
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = "1.0"
        f.attrs["petbind_kind"] = "sinograms"
        write_scanner(f.create_group("scanner"), sc)
        g = f.create_group("layout")
        for k, v in (("num_radial", 11), ("max_ring_difference", layout.max_ring_difference), ("span", 1)):
            g.attrs[k] = v
        f.create_group("frame").attrs.update({"start_s": 10.0, "duration_s": 20.0})
        f.create_group("sinograms").create_dataset("prompts", data=prompts)
    s = read_sinograms_h5(path)
    assert s.prompts.shape == (1,) + layout.shape and s.frame_end_s.tolist() == [30.0]


def test_exam_defaults_round_trip_and_validation(tmp_path):
    sc = small_scanner()
    path = tmp_path / "lm.h5"
    with ListmodeWriter(path, sc):
        pass
    r = ListmodeReader(path)
    assert r.exam == ExamInfo() and r.num_events == 0 and r.corrections is None
    assert list(r.chunks()) == []
    with pytest.raises(ValueError, match="injection_time"):
        ExamInfo(injection_time="1 Jan 2026")
    with pytest.raises(ValueError, match="half_life_s"):
        ExamInfo(half_life_s=-1)
