"""Fault injection for ``petbind-quant`` (issue 9): every fault is one line, exit 2, nothing written.

For each case: exit status 2; a single line on stderr naming the file; no new
or changed file in the output folder (every name, size, content and mode is
compared before and after, hidden temporary files included).

How faults are made
-------------------
* truncated ``.nii.gz``: the first part of a valid file, cut at a fixed
  fraction (the header survives, the voxels do not) or inside the header;
* full disk: the write path is patched to raise ``OSError(ENOSPC)``, in two
  places: (a) ``os.replace``, the rename that publishes every output, fails
  once on its k-th call (so earlier outputs of the same command were already
  renamed and must be rolled back); (b) the writers themselves
  (``pathlib.Path.write_text`` for TSV/JSON, ``nibabel.save`` for NIfTI,
  ``Figure.savefig`` for PNG) write the first half of the file and then raise,
  as a real full disk does;
* output path whose parent is a file: ``--out FILE/x.tsv``;
* a failing ``--figure`` after the table was computed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from petbind.quant.cli import main
from tests.quant_helpers import FRAME_START_S, atlas_labels, srtm_tacs, write_atlas, write_pet


# ------------------------------------------------------------------------------------------ helpers
def snapshot(folder: Path) -> dict:
    """Every entry below ``folder`` (hidden ones too): kind, mode, size and content hash."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(folder))] = (st.st_mode, st.st_size, digest)
    return out


def assert_refused(rc, err, names, before, after):
    """Exit 2, one stderr line naming every string in ``names``, nothing new or changed."""
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("petbind-quant: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in err, (name, err)
    assert after == before


def run(argv, capsys):
    capsys.readouterr()
    rc = main(argv + ["--quiet"])
    return rc, capsys.readouterr().err


def _image():
    ref, tg = srtm_tacs([1.0, 2.0], r1=1.0, k2_per_min=0.25)
    lab = atlas_labels()
    img = np.zeros((*lab.shape, FRAME_START_S.size), dtype=np.float32)
    for k, tac in ((1, ref), (2, tg[:, 0]), (3, tg[:, 1])):
        img[lab == k] = tac
    return img


@pytest.fixture
def study(tmp_path):
    """Inputs in ``in/``, an output folder ``out/`` holding an unrelated file, and a plain file ``afile``."""
    inp = tmp_path / "in"
    inp.mkdir()
    atlas, labels = write_atlas(inp)
    pet = write_pet(inp, _image())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result\n")
    (tmp_path / "afile").write_text("not a folder\n")
    return {"atlas": atlas, "labels": labels, "pet": pet, "out": out, "afile": tmp_path / "afile",
            "tmp": tmp_path}


def tacs_args(s, out):
    return ["tacs", str(s["pet"]), "--atlas", str(s["atlas"]), "--labels", str(s["labels"]), "--out", str(out)]


def map_args(s, prefix):
    return ["map", str(s["pet"]), "--atlas", str(s["atlas"]), "--labels", str(s["labels"]), "--reference",
            "cerebellum", "--model", "bfsrtm", "--mask-regions", "putamen", "caudate", "--out-prefix", str(prefix)]


def fit_args(tacs, out):
    return ["fit", str(tacs), "--reference", "cerebellum", "--model", "bfsrtm", "--out", str(out)]


def make_tacs(s, capsys):
    tacs = s["tmp"] / "in" / "x_tacs.tsv"
    assert run(tacs_args(s, tacs), capsys)[0] == 0
    return tacs


def _cut(path: Path, fraction: float | None = None, nbytes: int | None = None):
    data = path.read_bytes()
    path.write_bytes(data[: nbytes if nbytes is not None else int(len(data) * fraction)])


# -------------------------------------------------------------------------------- truncated NIfTI
@pytest.mark.parametrize("command", ["tacs", "map"])
@pytest.mark.parametrize("which", ["pet", "atlas"])
@pytest.mark.parametrize("cut", [0.5, 0.97, 120])
def test_truncated_nifti(study, capsys, command, which, cut):
    _cut(study[which], fraction=cut if cut < 1 else None, nbytes=cut if cut >= 1 else None)
    before = snapshot(study["out"])
    argv = tacs_args(study, study["out"] / "x_tacs.tsv") if command == "tacs" else map_args(study, study["out"] / "m")
    rc, err = run(argv, capsys)
    assert_refused(rc, err, [study[which]], before, snapshot(study["out"]))


def test_truncated_bpnd_map_in_compare(study, capsys):
    import nibabel as nib

    lab = atlas_labels().astype(np.float32)
    for name in ("b", "p"):
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(study["tmp"] / "in" / f"{name}_bpnd.nii.gz"))
    post = study["tmp"] / "in" / "p_bpnd.nii.gz"
    _cut(post, fraction=0.6)
    before = snapshot(study["out"])
    rc, err = run(["compare", "--baseline", str(study["tmp"] / "in" / "b_bpnd.nii.gz"), "--post", str(post),
                   "--out-prefix", str(study["out"] / "c")], capsys)
    assert_refused(rc, err, [post], before, snapshot(study["out"]))


# ------------------------------------------------------------------------------------- full disk
def _enospc(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path is not None else []))


def _replace_fails_on_call(monkeypatch, k):
    """``os.replace`` raises ENOSPC on its k-th call only (then the disk has room again)."""
    real = os.replace
    calls = {"n": 0}

    def fake(src, dst, *a, **kw):
        calls["n"] += 1
        if calls["n"] == k:
            raise _enospc(dst)
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", fake)
    return calls


def _writers_fill_disk(monkeypatch, suffix):
    """Writers of files whose (temporary) name contains ``suffix`` write half the bytes, then raise ENOSPC."""
    import matplotlib.figure
    import nibabel

    real_text, real_save, real_savefig = Path.write_text, nibabel.save, matplotlib.figure.Figure.savefig

    def half(path):
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise _enospc(path)

    def write_text(self, data, *a, **kw):
        n = real_text(self, data, *a, **kw)
        if suffix in str(self):
            half(self)
        return n

    def save(img, filename, *a, **kw):
        real_save(img, filename, *a, **kw)
        if suffix in str(filename):
            half(filename)

    def savefig(self, fname, *a, **kw):
        real_savefig(self, fname, *a, **kw)
        if suffix in str(fname):
            half(fname)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(nibabel, "save", save)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


@pytest.mark.parametrize("k", [1, 2])
def test_disk_full_on_rename_tacs(study, capsys, monkeypatch, k):
    out = study["out"] / "x_tacs.tsv"
    before = snapshot(study["out"])
    calls = _replace_fails_on_call(monkeypatch, k)
    rc, err = run(tacs_args(study, out), capsys)
    assert calls["n"] >= k
    assert "No space left on device" in err
    assert_refused(rc, err, [study["out"]], before, snapshot(study["out"]))


@pytest.mark.parametrize("k", [1, 4, 9])
def test_disk_full_on_rename_map_rerun_keeps_old_files(study, capsys, monkeypatch, k):
    """A rerun over existing maps: the failure leaves the earlier maps exactly as they were."""
    prefix = study["out"] / "m"
    assert run(map_args(study, prefix), capsys)[0] == 0
    before = snapshot(study["out"])
    _replace_fails_on_call(monkeypatch, k)
    rc, err = run(map_args(study, prefix) + ["--weights", "duration"], capsys)
    assert "No space left on device" in err
    assert_refused(rc, err, [prefix], before, snapshot(study["out"]))


@pytest.mark.parametrize("suffix,command", [("x_tacs.tsv", "tacs"), ("x_tacs.json", "tacs"),
                                            ("_r1.nii.gz", "map"), ("_status.json", "map"), (".png", "map")])
def test_disk_full_while_writing(study, capsys, monkeypatch, suffix, command):
    """The writer itself fails half-way; the message names the output being written."""
    if command == "tacs":
        argv, named = tacs_args(study, study["out"] / "x_tacs.tsv"), study["out"] / suffix
    else:
        argv = map_args(study, study["out"] / "m") + ["--figure", str(study["out"] / "m.png")]
        named = study["out"] / ("m.png" if suffix == ".png" else "m" + suffix)
    before = snapshot(study["out"])
    # the staged temporary name ends like the final one, so the patch hits it
    _writers_fill_disk(monkeypatch, suffix if suffix != "x_tacs.tsv" else ".tsv")
    rc, err = run(argv, capsys)
    assert "No space left on device" in err
    assert_refused(rc, err, [named], before, snapshot(study["out"]))


def test_disk_full_fit_and_compare_study(study, capsys, monkeypatch):
    tacs = make_tacs(study, capsys)
    before = snapshot(study["out"])
    _replace_fails_on_call(monkeypatch, 2)
    rc, err = run(fit_args(tacs, study["out"] / "r_bpnd.tsv") + ["--figure", str(study["out"] / "r.png")], capsys)
    assert_refused(rc, err, [study["out"]], before, snapshot(study["out"]))


# ------------------------------------------------------------------------ output path is not usable
@pytest.mark.parametrize("command", ["tacs", "fit", "map", "compare"])
def test_output_parent_is_a_file(study, capsys, command):
    afile = study["afile"]
    tacs = make_tacs(study, capsys) if command in ("fit", "compare") else None
    if command == "tacs":
        argv = tacs_args(study, afile / "x_tacs.tsv")
    elif command == "fit":
        argv = fit_args(tacs, afile / "sub" / "r_bpnd.tsv")
    elif command == "map":
        argv = map_args(study, afile / "m")
    else:
        argv = ["compare", "--baseline", str(tacs), "--post", str(tacs), "--out-prefix", str(afile / "c")]
    before = snapshot(study["tmp"])
    rc, err = run(argv, capsys)
    assert "is a file, not a folder" in err
    assert_refused(rc, err, [afile], before, snapshot(study["tmp"]))


def test_compare_study_out_dir_under_a_file(study, capsys):
    from tests.quant.test_quant_compare import make_study

    make_study(study["tmp"] / "s", np.random.default_rng(1))
    before = snapshot(study["tmp"])
    rc, err = run(["compare", "--study", str(study["tmp"] / "s"), "--out-dir", str(study["afile"] / "g"),
                   "--n-permutations", "50"], capsys)
    assert_refused(rc, err, [study["afile"]], before, snapshot(study["tmp"]))


# --------------------------------------------------------------------------------- failing figure
@pytest.mark.parametrize("command", ["fit", "map"])
def test_figure_under_a_file_writes_nothing(study, capsys, command):
    """The figure path is refused before any work: the table/maps are not written either."""
    tacs = make_tacs(study, capsys) if command == "fit" else None
    fig = study["afile"] / "f.png"
    argv = (fit_args(tacs, study["out"] / "r_bpnd.tsv") if command == "fit" else map_args(study, study["out"] / "m"))
    before = snapshot(study["out"])
    rc, err = run(argv + ["--figure", str(fig)], capsys)
    assert_refused(rc, err, [fig], before, snapshot(study["out"]))


@pytest.mark.parametrize("command", ["fit", "map"])
def test_figure_failing_late_writes_nothing(study, capsys, monkeypatch, command):
    """The figure fails after the table was computed and staged: nothing is published."""
    import matplotlib.figure

    def broken(self, fname, *a, **kw):
        raise _enospc(fname)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    tacs = make_tacs(study, capsys) if command == "fit" else None
    fig = study["out"] / "f.png"
    argv = (fit_args(tacs, study["out"] / "r_bpnd.tsv") if command == "fit" else map_args(study, study["out"] / "m"))
    before = snapshot(study["out"])
    rc, err = run(argv + ["--figure", str(fig)], capsys)
    assert_refused(rc, err, [fig], before, snapshot(study["out"]))


def test_no_fault_control(study, capsys):
    """The same commands without a fault succeed and write exactly their files (the checks above can pass)."""
    tacs = make_tacs(study, capsys)
    assert run(fit_args(tacs, study["out"] / "r_bpnd.tsv") + ["--figure", str(study["out"] / "r.png")],
               capsys)[0] == 0
    assert run(map_args(study, study["out"] / "m"), capsys)[0] == 0
    names = sorted(os.listdir(study["out"]))
    assert names == sorted(["keep.txt", "r_bpnd.tsv", "r_bpnd.json", "r.png"]
                           + [f"m_{s}.{e}" for s in ("bpnd", "r1", "k2", "k2prime", "residual", "k2a_per_min",
                                                      "status") for e in ("nii.gz", "json")])
    assert json.loads((study["out"] / "m_bpnd.json").read_text())["Model"] == "bfsrtm"


# ----------------------------------------------------------------------------- silent wrong results
def test_tac_table_in_minutes_is_refused(study, capsys):
    """Frame times in minutes read as seconds make a 36-min scan a 36-s one: refused, not fitted."""
    tacs = make_tacs(study, capsys)
    lines = tacs.read_text().splitlines()
    out_lines = [lines[0]]
    for ln in lines[1:]:
        cells = ln.split("\t")
        cells[0], cells[1] = repr(float(cells[0]) / 60), repr(float(cells[1]) / 60)
        out_lines.append("\t".join(cells))
    tacs.write_text("\n".join(out_lines) + "\n")
    before = snapshot(study["out"])
    rc, err = run(fit_args(tacs, study["out"] / "fit.tsv"), capsys)
    assert_refused(rc, err, [tacs.name, "minutes"], before, snapshot(study["out"]))


def test_sidecar_in_minutes_is_refused(study, capsys):
    side = study["pet"].with_name(study["pet"].name.replace(".nii.gz", ".json"))
    d = json.loads(side.read_text())
    d["FrameTimesStart"] = [v / 60 for v in d["FrameTimesStart"]]
    d["FrameDuration"] = [v / 60 for v in d["FrameDuration"]]
    side.write_text(json.dumps(d))
    before = snapshot(study["out"])
    rc, err = run(map_args(study, study["out"] / "m"), capsys)
    assert_refused(rc, err, ["minutes"], before, snapshot(study["out"]))


def test_reference_among_the_targets_is_refused(study, capsys):
    tacs = make_tacs(study, capsys)
    before = snapshot(study["out"])
    rc, err = run(fit_args(tacs, study["out"] / "fit.tsv") + ["--regions", "putamen", "cerebellum"], capsys)
    assert_refused(rc, err, ["cerebellum", "fitted against itself"], before, snapshot(study["out"]))
