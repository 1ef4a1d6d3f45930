"""Property test (issue 9): random frame definitions and random truncation points of the inputs
of ``petbind-quant`` never produce a traceback, only exit 0 or exit 2 with one error line.

Inputs are drawn by hypothesis (derandomized, so CI always runs the same
examples): frame definitions that are valid, in minutes instead of seconds,
or arbitrary numbers (negative, zero, NaN, inf, overlapping, a length that
does not match the image); each input file (TAC TSV, JSON sidecar, NIfTI
image, atlas) may be cut at any byte.  ``main`` is called in-process: an
exception other than the handled ones would escape it and fail the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from petbind.quant.cli import main  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

ODD = st.sampled_from([0.0, -0.0, -1.0, -60.0, float("nan"), float("inf"), -float("inf"), 1e300, 1e-300])


@st.composite
def frames(draw, n=None):
    """(starts, durations) in seconds: valid, valid-but-in-minutes, or arbitrary."""
    kind = draw(st.sampled_from(["valid", "minutes", "arbitrary"]))
    if n is None:
        n = draw(st.integers(1, 9) if kind == "arbitrary" else st.integers(3, 9))
    if kind == "arbitrary":
        num = st.one_of(st.floats(-1e4, 1e5, allow_nan=False), ODD)
        starts = draw(st.lists(num, min_size=max(1, n - 1), max_size=n + 1))
        durs = draw(st.lists(num, min_size=max(1, n - 1), max_size=n + 1))
        return starts, durs
    scale = 60.0 if kind == "valid" else 1.0
    durs = draw(st.lists(st.floats(0.5, 10.0), min_size=n, max_size=n))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.0, 0.0, 1.0, 5.0]), min_size=n, max_size=n))
    t, starts = draw(st.sampled_from([0.0, 0.0, 30.0])), []
    for d, g in zip(durs, gaps):
        t += g * scale
        starts.append(t)
        t += d * scale
    return starts, [d * scale for d in durs]


def _cut_one(folder: Path, names, data: st.DataObject) -> None:
    """Cut at most one of the files ``names`` at a drawn byte (one fault per example)."""
    victim = data.draw(st.sampled_from([None, None, *names]), label="file to cut")
    if victim is not None:
        raw = (folder / victim).read_bytes()
        (folder / victim).write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut at")])


def _run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv + ["--quiet"])
    return rc, err.getvalue()


def _check(rc, err):
    event(f"exit {rc}")  # pytest --hypothesis-show-statistics shows how many examples got through
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("petbind-quant: error:")]
    assert len(errors) == (1 if rc == 2 else 0), err


def _cell(v: float) -> str:
    return "n/a" if math.isnan(v) else repr(float(v))


@SETTINGS
@given(fr=frames(), data=st.data(), model=st.sampled_from(["bfsrtm", "srtm2", "mrtm", "mrtm2", "logan"]),
       weights=st.sampled_from(["none", "duration", "counts"]))
def test_fit_never_tracebacks(fr, data, model, weights):
    starts, durs = fr
    n = min(len(starts), len(durs))
    rng = np.random.default_rng(len(starts) * 31 + len(durs))
    values = rng.uniform(10.0, 1000.0, (n, 3))
    with tempfile.TemporaryDirectory() as d:
        tacs = Path(d) / "x_tacs.tsv"
        lines = ["frame_start\tframe_end\tcerebellum\tputamen\tcaudate"]
        for i in range(n):
            lines.append("\t".join(_cell(v) for v in (starts[i], starts[i] + durs[i], *values[i])))
        tacs.write_text("\n".join(lines) + "\n")
        (Path(d) / "x_tacs.json").write_text(json.dumps({"TracerRadionuclide": "C11"}))
        _cut_one(Path(d), ["x_tacs.tsv", "x_tacs.json"], data)
        rc, err = _run(["fit", str(tacs), "--reference", "cerebellum", "--model", model, "--weights", weights,
                        "--out", str(Path(d) / "out" / "r_bpnd.tsv")])
        _check(rc, err)
        written = sorted(p.name for p in (Path(d) / "out").glob("*")) if (Path(d) / "out").exists() else []
        assert written == (["r_bpnd.json", "r_bpnd.tsv"] if rc == 0 else [])


def _labels():
    # big enough (36 KB with 8 frames) that a cut can fall after the part nibabel reads for the header
    lab = np.zeros((12, 12, 8), dtype=np.int16)
    lab[1:5, 1:5, 1:3], lab[6:10, 2:6, 2:5], lab[2:6, 7:11, 4:7] = 1, 2, 3
    return lab


LABELS = _labels()


@SETTINGS
@given(data=st.data(), command=st.sampled_from(["tacs", "map"]))
def test_image_commands_never_traceback(data, command):
    n_img = data.draw(st.integers(3, 8), label="image frames")
    starts, durs = data.draw(frames(n_img), label="sidecar frames")  # "arbitrary" may not match n_img
    rng = np.random.default_rng(n_img)
    img = rng.uniform(10.0, 1000.0, (*LABELS.shape, n_img)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(d / "pet.nii.gz"))
        side = {"FrameTimesStart": starts, "FrameDuration": durs, "Units": "Bq/mL", "TracerRadionuclide": "C11"}
        (d / "pet.json").write_text(json.dumps(side))  # NaN/inf become the non-standard JSON tokens
        nib.save(nib.Nifti1Image(LABELS, np.eye(4)), str(d / "atlas.nii.gz"))
        (d / "atlas.tsv").write_text("index\tname\n1\tcerebellum\n2\tputamen\n3\tcaudate\n")
        _cut_one(d, ["pet.nii.gz", "pet.json", "atlas.nii.gz", "atlas.tsv"], data)
        out = d / "out"
        base = [str(d / "pet.nii.gz"), "--atlas", str(d / "atlas.nii.gz"), "--labels", str(d / "atlas.tsv")]
        if command == "tacs":
            argv = ["tacs", *base, "--out", str(out / "x_tacs.tsv")]
        else:
            argv = ["map", *base, "--reference", "cerebellum", "--model", "bfsrtm", "--mask-regions", "putamen",
                    "caudate", "--out-prefix", str(out / "m")]
        rc, err = _run(argv)
        _check(rc, err)
        if rc == 2:
            assert not out.exists() or not any(out.iterdir())
