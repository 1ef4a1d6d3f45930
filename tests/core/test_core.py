"""petbind.core: decay, frames and files, against independent oracles."""

import math
import os
import stat

import numpy as np
import pytest
from scipy import integrate

from petbind.core.decay import (
    C11_HALF_LIFE_S,
    decay_constant_per_s,
    decay_correction_factor,
    decay_integral,
    half_life_s,
    mean_decay_factor,
)
from petbind.core.files import (
    OutputPathError,
    atomic_output,
    format_cell,
    read_table_tsv,
    write_json,
    write_table_tsv,
)
from petbind.core.frames import Frames, validate_frame_times


def test_decay_integral_against_quadrature():
    lam = math.log(2) / 1221.84
    d = decay_integral(300.0, 900.0, lam)
    assert d == pytest.approx(integrate.quad(lambda t: math.exp(-lam * t), 300, 900)[0], rel=1e-12)
    # vectorised, tiny frames keep precision (expm1), no decay is the duration
    d = decay_integral(np.array([0.0, 3600.0]), np.array([1e-6, 3600.0 + 1e-6]), lam)
    assert d == pytest.approx([1e-6, 1e-6 * math.exp(-lam * 3600)], rel=1e-9)
    assert decay_integral(10.0, 70.0, 0.0) == 60.0


def test_decay_correction_is_reciprocal_of_mean_decay():
    lam = decay_constant_per_s(C11_HALF_LIFE_S)
    f = decay_correction_factor(60.0, 120.0, C11_HALF_LIFE_S, scan_start_s=30.0)
    mean = integrate.quad(lambda t: math.exp(-lam * t), 90, 150)[0] / 60.0
    assert f == pytest.approx(1.0 / mean, rel=1e-12)
    assert mean_decay_factor(90.0, 150.0, lam) == pytest.approx(mean, rel=1e-12)


@pytest.mark.parametrize("name", ["C11", "11C", "c-11", "[11C]"[1:-1]])
def test_half_life_names(name):
    assert half_life_s(name) == 1221.84


def test_half_life_unknown_names_the_field():
    with pytest.raises(ValueError, match=r"x.json: field.*unknown radionuclide 'Xx99'"):
        half_life_s("Xx99", "x.json: field 'TracerRadionuclide'")
    with pytest.raises(ValueError, match="positive"):
        decay_constant_per_s(0)


def test_frames_exact_edges_and_single_frame():
    f = Frames.from_string("6x10s,3x20s")
    assert f.end_s[5] == 60.0 and f.start_s[6] == 60.0
    one = f.frame(6)
    assert len(one) == 1 and one.start_s[0] == 60.0 and one.end_s[0] == 80.0
    assert f.frame(-1) == Frames([100.0], [20.0])
    g = Frames.from_edges([0, 10, 30], [10, 30, 60])
    assert g.duration_s.tolist() == [10, 20, 30]
    assert Frames.open_ended(5.0).frame_of(np.array([4999.0, 5000.0, 1e12])).tolist() == [-1, 0, 0]


@pytest.mark.parametrize("start,end,msg", [
    ([0, 10], [10], "2 frame starts but 1 frame ends"),
    ([0, 10], [10, 10], "frame 1 has end"),
    ([0, 5], [10, 15], "overlap"),
    ([10, 0], [20, 5], "not sorted"),
    ([-1], [5], "expected >= 0"),
    ([0, np.nan], [1, 2], "finite"),
])
def test_frame_times_refused_with_source(start, end, msg):
    with pytest.raises(ValueError, match=msg) as err:
        validate_frame_times(start, end, "a.tsv")
    assert str(err.value).startswith("a.tsv:")


def test_format_cell_round_trips_floats():
    for v in (0.1, 1 / 3, 1e-300, 12345.678901234567):
        assert float(format_cell(v)) == v
    assert format_cell(float("nan")) == "n/a" and format_cell(None) == "n/a"
    assert format_cell(True) == "true" and format_cell(np.int64(3)) == "3"


def test_table_round_trip(tmp_path):
    p = write_table_tsv(tmp_path / "t.tsv", ["a", "b"], [["x", 0.1], ["y", float("nan")]])
    header, rows = read_table_tsv(p, required=["a"])
    assert header == ["a", "b"] and rows == [{"a": "x", "b": "0.1"}, {"a": "y", "b": "n/a"}]


def test_atomic_output_leaves_nothing_on_error_and_follows_umask(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.name.endswith(".tmp.nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640


def test_special_destinations_are_never_replaced(tmp_path):
    real = tmp_path / "real.tsv"
    real.write_text("keep\n")
    link = tmp_path / "link.tsv"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.tsv"
    os.mkfifo(fifo)
    (tmp_path / "folder.tsv").mkdir()
    (tmp_path / "afile").write_text("")
    for dest, what in [(link, "symbolic link"), (fifo, "FIFO"), (tmp_path / "folder.tsv", "folder"),
                       (tmp_path / "afile" / "x.tsv", "is a file, not a folder"), ("/dev/full", "device")]:
        with pytest.raises(OutputPathError, match=what):
            write_table_tsv(dest, ["a"], [[1]])
    assert real.read_text() == "keep\n" and link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_scan_length_must_suit_the_half_life():
    from petbind.core.frames import check_scan_length

    check_scan_length(90 * 60.0, 1221.84, "x.json")  # a 90-minute [11C] scan
    with pytest.raises(ValueError, match=r"x.json: the frames end at 90 s.*minutes"):
        check_scan_length(90.0, 1221.84, "x.json", "C11")  # the same scan with times in minutes
    with pytest.raises(ValueError, match="no counts are left"):
        check_scan_length(90 * 3600.0, 1221.84, "x.json")
