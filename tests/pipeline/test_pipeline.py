"""End-to-end tests of petbind-study on a tiny simulated study.

One subject (drug group) with a baseline and a post-dose session is simulated
once per module with :func:`petbind.sim.study.simulate_study` on the demo
scanner preset (``demo-small``: 96 crystals x 14 rings of 10 mm, its 6.5 mm
PSF, 6 mm voxels) with 9 frames over 60 min, as multi-frame sinograms and as
listmode, with the noise-free activity images written next to them.  Those
images are the simulator's *input*, so they are an independent oracle for
the reconstructed Bq/mL; the BP_ND oracle is ``ground_truth.tsv``.
"""

import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from petbind.pipeline import cli as study
from petbind.pipeline import discover, reconstruct
from petbind.pipeline.run import run_pipeline
from petbind.sim.study import StudyConfig, simulate_study

REPO = Path(__file__).resolve().parents[2]
FRAMES_S = (60.0, 60.0, 120.0, 120.0, 300.0, 300.0, 600.0, 600.0, 900.0)
#: Large regions used for the checks.
LARGE_REGIONS = ("frontal_cortex", "temporal_cortex", "parietal_cortex", "occipital_cortex")
#: The simulated change in the drug group (fraction of baseline BP_ND).
EFFECT = {"frontal_cortex": 0.3, "occipital_cortex": 0.3}


def _config(num_subjects=1, **kw):
    return StudyConfig(num_subjects=num_subjects, scanner="demo-small", frame_durations_s=FRAMES_S, quiet=True,
                       device="cpu", seed=3, drug_effect=EFFECT, write_listmode=True, **kw)


def _args(study_dir, out, *extra):
    return [str(study_dir), "--out", str(out), "--device", "cpu", "--n-permutations", "100", "--groups", "drug",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    raw = root / "raw"
    simulate_study(raw, _config(write_images="true"))
    out = root / "deriv"
    rc = study.main(_args(raw, out))
    assert rc == 0
    return raw, out


def _read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _recon(out, ses):
    p = out / "sub-01" / f"ses-{ses}" / "pet" / f"sub-01_ses-{ses}_rec-osem_pet.nii.gz"
    return nib.load(str(p)), json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())


def test_outputs_and_sidecar(tiny):
    raw, out = tiny
    img, side = _recon(out, "baseline")
    atlas = nib.load(str(raw / "sub-01" / "anat" / "sub-01_atlas.nii.gz"))
    assert img.shape == atlas.shape + (len(FRAMES_S),)
    np.testing.assert_allclose(img.affine, atlas.affine)
    assert side["Units"] == "Bq/mL" and side["ReconMethodName"] == "OSEM"
    assert side["ReconMethodParameterValues"] == [4, 24]  # the defaults
    assert side["Sources"][0].endswith("_pet-sinograms.h5")  # binned data preferred over listmode
    assert len(side["EffectiveResolutionFWHM_mm"]) == 3
    np.testing.assert_allclose(side["FrameDuration"], FRAMES_S)
    np.testing.assert_allclose(side["FrameTimesStart"], np.concatenate([[0.0], np.cumsum(FRAMES_S)[:-1]]))
    # the fit table is the petbind-quant fit format
    rows = _read_tsv(out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_desc-srtm_bpnd.tsv")
    from petbind.quant.results import FIT_COLUMNS

    assert list(rows[0])[: len(FIT_COLUMNS)] == FIT_COLUMNS
    assert {r["region"] for r in rows} >= set(LARGE_REGIONS)
    assert "cerebellum" not in {r["region"] for r in rows} and "scalp" not in {r["region"] for r in rows}
    assert (out / "group" / "subject_changes.tsv").exists() and (out / "group" / "within_group.tsv").exists()
    assert (out / "participants.tsv").exists()
    assert not (out / "sub-01" / "ses-baseline" / "pet" / ".frames").exists()  # cache removed when done


def test_quantitation_against_true_activity(tiny):
    """Reconstructed Bq/mL vs the simulator's input image.

    Whole-brain mean (all labelled brain voxels) of each frame from 5 min on:
    a sum over ~1000 voxels is insensitive to resolution and OSEM
    convergence, and the frames hold >= 1e5 prompts (noise < 1 %), so what
    is left is the correction chain: calibration κ, decay integral,
    normalisation, attenuation, randoms and the scatter model (scatter is
    35 % of the net counts; a 15 % error of the scatter estimate moves the
    image by ~8 %).  Tolerance 10 % (measured: 0.96-0.98).
    """
    raw, out = tiny
    img, side = _recon(out, "baseline")
    true = nib.load(str(raw / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_pet.nii.gz")).get_fdata()
    labels = np.asarray(nib.load(str(raw / "sub-01" / "anat" / "sub-01_atlas.nii.gz")).dataobj)
    brain = labels > 2  # not background, scalp, skull
    rec = img.get_fdata()
    late = np.asarray(side["FrameTimesStart"]) >= 300
    ratios = [rec[..., k][brain].mean() / true[..., k][brain].mean() for k in np.flatnonzero(late)]
    np.testing.assert_allclose(ratios, 1.0, rtol=0.10)


def _truth(raw):
    return {(r["session"], r["region"]): float(r["bp_nd"]) for r in _read_tsv(raw / "ground_truth.tsv")}


def test_bpnd_recovery(tiny):
    """Regional BP_ND and its change vs ground_truth.tsv, at the pipeline's defaults.

    Tolerance from benchmarks/fidelity.py at this size (demo-small scanner,
    6 mm voxels, OSEM 4 x 24, GTM with tissue fractions at the measured
    resolution): its pipeline row recovers cortical BP_ND at 0.96-1.04 of the
    truth, and one subject's session-to-session error is 2-5 % of BP_ND in
    the cortex (fidelity noise rows).  With 9 frames instead of 12, +-12 %
    per region and session holds that bias plus three standard deviations of
    noise.  The simulated +30 % change in two regions must be detected with
    the right sign and within 40 % of its size; the unchanged regions must
    not move by more than 15 % of their BP_ND (three SD of the 3-5 % error of
    one subject's change measured with the demo's sessions).
    """
    raw, out = tiny
    truth = _truth(raw)
    est = {}
    for ses in ("baseline", "postdose"):
        for r in _read_tsv(out / "sub-01" / f"ses-{ses}" / "pet" / f"sub-01_ses-{ses}_desc-srtm_bpnd.tsv"):
            est[(f"ses-{ses}", r["region"])] = float(r["bp_nd"])
    for ses in ("ses-baseline", "ses-postdose"):
        for region in LARGE_REGIONS:
            rel = est[(ses, region)] / truth[(ses, region)] - 1
            assert abs(rel) <= 0.12, (ses, region, est[(ses, region)], truth[(ses, region)])
    for region in LARGE_REGIONS:
        d_true = truth[("ses-postdose", region)] - truth[("ses-baseline", region)]
        d_est = est[("ses-postdose", region)] - est[("ses-baseline", region)]
        if region in EFFECT:
            assert d_est > 0 and abs(d_est - d_true) <= 0.4 * abs(d_true), (region, d_est, d_true)
        else:
            assert abs(d_est - d_true) <= 0.15 * truth[("ses-baseline", region)], (region, d_est, d_true)


def test_listmode_input_gives_the_same_images(tiny, tmp_path):
    """The same acquisition as listmode (histogrammed by the pipeline) and as sinograms: identical images."""
    import shutil

    raw, out = tiny
    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    for p in src.glob("sub-*/ses-*/pet/*_pet-sinograms.h5"):
        p.unlink()
    # one session is enough here (and halves the histogramming): no participants.tsv, no group stage
    shutil.rmtree(src / "sub-01" / "ses-postdose")
    (src / "participants.tsv").unlink()
    lm_out = tmp_path / "deriv"
    assert study.main(_args(src, lm_out, "--num-radial", "40", "--max-ring-difference", "6",
                            "--listmode-osem", "never")) == 0
    for ses in ("baseline",):
        a, side = _recon(lm_out, ses)
        b, _ = _recon(out, ses)
        assert side["Sources"][0].endswith("_pet-listmode.h5")
        np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), rtol=1e-5, atol=1e-5 * b.get_fdata().max())
    # frames by listmode OSEM from their events: the same model, other subsets (events, not views), so the
    # brain means agree to within the difference of two OSEM subset orders, not bit for bit.  Two short
    # frames keep the event path cheap; the same frames through the sinogram path are the reference.
    for mode in ("always", "never"):
        assert study.main(_args(src, tmp_path / mode, "--num-radial", "40", "--max-ring-difference", "6",
                                "--frames", "300s,60s", "--listmode-osem", mode, "--pvc", "none",
                                "--regions", *LARGE_REGIONS)) in (0, 1)  # 2 frames are too few for a kinetic fit: the images are what is compared
    a, side = _recon(tmp_path / "always", "baseline")
    b, side_b = _recon(tmp_path / "never", "baseline")
    assert {s["method"] for s in side["FrameStatistics"]} == {"listmode OSEM"}
    assert {s["method"] for s in side_b["FrameStatistics"]} == {"sinogram OSEM"}
    labels = np.asarray(nib.load(str(raw / "sub-01" / "anat" / "sub-01_atlas.nii.gz")).dataobj)
    for k in range(2):
        ra = a.get_fdata()[..., k][labels > 4].mean()
        rb = b.get_fdata()[..., k][labels > 4].mean()
        assert ra == pytest.approx(rb, rel=0.03), k


def test_resume_skips_and_force_redoes(tiny, caplog, tmp_path):
    import shutil

    raw, done = tiny
    out = tmp_path / "deriv"
    shutil.copytree(done, out)  # the module's results stay as the serial reference of the Dask test
    fit = out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_desc-srtm_bpnd.tsv"
    pet = out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_rec-osem_pet.nii.gz"
    before = (fit.stat().st_mtime_ns, pet.stat().st_mtime_ns)
    opts = study.options_from_args(study.build_parser().parse_args(_args(raw, out)))
    with caplog.at_level(logging.INFO, logger="petbind.pipeline"):
        res = run_pipeline(raw, out, opts)
    assert [o.status for o in res.sessions] == ["reused", "reused"]
    assert any("reuse sub-01 ses-baseline" in m for m in caplog.messages)
    assert (fit.stat().st_mtime_ns, pet.stat().st_mtime_ns) == before
    # --force on a different model: recon redone too (force), fit written for the new model
    opts.force = True
    opts.model = "mrtm"
    res = run_pipeline(raw, out, opts)
    assert [o.status for o in res.sessions] == ["done", "done"]
    assert pet.stat().st_mtime_ns > before[1]
    assert fit.with_name("sub-01_ses-baseline_desc-mrtm_bpnd.tsv").exists()


def test_interrupted_session_resumes_from_frame_cache(tiny, tmp_path, monkeypatch):
    """Frames cached before an interruption are not reconstructed again."""
    raw, _ = tiny
    out = tmp_path / "deriv"
    opts = study.options_from_args(study.build_parser().parse_args(_args(raw, out)))
    sessions = discover.find_sessions(raw)
    atlas = discover.load_atlas(sessions[0])
    calls = []
    real = reconstruct.estimate_scatter

    class Interrupted(Exception):
        pass

    armed = [True]

    def counting(*a, **kw):
        calls.append(1)
        if armed[0] and len(calls) == 4:
            raise Interrupted
        return real(*a, **kw)

    monkeypatch.setattr(reconstruct, "estimate_scatter", counting)
    pet = sessions[0].out_dir(out) / "x_pet.nii.gz"
    pet.parent.mkdir(parents=True)
    with pytest.raises(Interrupted):
        reconstruct.reconstruct_session(sessions[0], pet, opts, atlas, regions=["cerebellum", *LARGE_REGIONS],
                                        progress=False)
    assert len(list((pet.parent / ".frames").glob("frame-*.npz"))) == 3
    assert not pet.exists()
    calls.clear()
    armed[0] = False
    reconstruct.reconstruct_session(sessions[0], pet, opts, atlas, regions=["cerebellum", *LARGE_REGIONS],
                                        progress=False)
    assert len(calls) == len(FRAMES_S) - 3
    assert pet.exists()


def _copy_study(raw, dst):
    import shutil

    shutil.copytree(raw, dst)
    return dst


@pytest.mark.parametrize("case", ["sidecar", "sidecar_field", "atlas", "mumap", "model"])
def test_bad_input_exit_2(tiny, tmp_path, capsys, case):
    raw, _ = tiny
    src = _copy_study(raw, tmp_path / "raw")
    pet = src / "sub-01" / "ses-baseline" / "pet"
    extra = []
    if case == "sidecar":
        (pet / "sub-01_ses-baseline_pet.json").unlink()
        expect = ["sub-01_ses-baseline_pet.json", "FrameTimesStart"]
    elif case == "sidecar_field":
        p = pet / "sub-01_ses-baseline_pet.json"
        d = json.loads(p.read_text())
        del d["FrameDuration"]
        p.write_text(json.dumps(d))
        expect = ["sub-01_ses-baseline_pet.json", "FrameDuration"]
    elif case == "atlas":
        (src / "sub-01" / "anat" / "sub-01_atlas.nii.gz").unlink()
        expect = ["sub-01_atlas.nii.gz", "atlas"]
    elif case == "mumap":
        import h5py

        with h5py.File(pet / "sub-01_ses-baseline_pet-sinograms.h5", "a") as f:
            del f["corrections/mu_map_per_mm"]
            del f["corrections/mu_map_affine"]
        expect = ["sub-01_ses-baseline_pet-sinograms.h5", "mu_map_per_mm"]
    else:
        extra = ["--model", "nonsense"]
        expect = ["--model", "nonsense"]
    with pytest.raises(SystemExit) if case == "model" else _no_raise() as exc:
        rc = study.main(_args(src, tmp_path / "out", *extra))
    if case == "model":
        rc = exc.value.code
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert all(e in err for e in expect), err
    if case != "model":
        assert len(lines) == 1 and lines[0].startswith("petbind-study: error:")


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_kappa_oracle():
    """κ against the simulator's own definition."""
    from petbind.recon.geometry import ImageGrid, Scanner, SinogramLayout
    from petbind.recon.rawdata.schema import ListmodeCorrections
    from petbind.sim.acquisition import ListmodeSimulator

    sc = Scanner.cylindrical(100.0, 48, 4, 8.0)
    lay = SinogramLayout(sc, 21)
    grid = ImageGrid((12, 12, 4), 8.0)
    sim = ListmodeSimulator(lay, grid, sensitivity_cps_per_kbq=2.5, device="cpu", quiet=True)
    k, _ = reconstruct.calibration_kappa(lay, grid, ListmodeCorrections(), 2.5, "cpu")
    assert k == pytest.approx(sim.kappa, rel=1e-6)
    k2, src = reconstruct.calibration_kappa(lay, grid, ListmodeCorrections(calibration_factor=4.0), None, "cpu")
    assert k2 == 0.25 and "calibration_factor" in src


def test_mu_map_resampling_reproduces_linear_field():
    """Trilinear resampling is exact for a linear field (interior voxels); same grid is a no-op."""
    from petbind.recon.geometry import ImageGrid

    src = ImageGrid((20, 22, 18), 2.0, origin_mm=(-19.0, -21.0, -17.0))
    dst = ImageGrid((7, 9, 7), (5.0, 4.5, 4.0), origin_mm=(-15.0, -17.0, -12.0))

    def field(grid):
        c = [grid.origin_mm[a] + np.arange(grid.shape[a]) * grid.voxel_size_mm[a] for a in range(3)]
        x, y, z = np.meshgrid(*c, indexing="ij")
        return 0.01 + 1e-4 * x - 2e-4 * y + 3e-4 * z

    out = reconstruct.resample_to_grid(field(src), src.affine, dst)
    np.testing.assert_allclose(out, field(dst), rtol=1e-5, atol=1e-7)
    same = reconstruct.resample_to_grid(field(dst), dst.affine, dst)
    np.testing.assert_array_equal(same, field(dst).astype(np.float32))


def test_report_is_self_contained(tiny):
    """report.html parses, embeds every image it shows and lists every session."""
    from html.parser import HTMLParser

    raw, out = tiny
    text = (out / "report.html").read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.srcs, self.ids, self.stack = [], [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.srcs.append(a.get("src", ""))
            if "id" in a:
                self.ids.append(a["id"])
            if tag in ("html", "body", "table", "details"):
                self.stack.append(tag)

        def handle_endtag(self, tag):
            if tag in ("html", "body", "table", "details"):
                assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    c = Collect()
    c.feed(text)
    c.close()
    assert c.stack == []
    assert c.srcs and all(s.startswith("data:image/png;base64,") for s in c.srcs)
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert set(c.ids) >= {"sub-01_ses-baseline", "sub-01_ses-postdose"}
    for needed in ("Quality control", "Provenance", "Estimated vs true", "sha256"):
        assert needed in text


def test_dask_cluster_equals_serial(tiny, tmp_path):
    """Sessions on a 2-process local Dask cluster give byte-identical results to the serial run."""
    import hashlib

    raw, serial = tiny
    out = tmp_path / "dask"
    assert study.main(_args(raw, out, "--workers", "2")) == 0

    def digests(root):
        d = {}
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in (".tsv", ".gz") and "group" not in p.parts:
                d[p.relative_to(root)] = hashlib.sha256(p.read_bytes()).hexdigest()
        return d

    a, b = digests(serial), digests(out)
    assert a.keys() == b.keys() and len(a) >= 6
    assert a == b
    for name in ("subject_changes.tsv", "within_group.tsv"):
        assert (serial / "group" / name).read_text() == (out / "group" / name).read_text()


def test_failed_session_is_reported_and_others_finish(tiny, tmp_path, capsys, monkeypatch):
    """A session failing mid-run: the other finishes, exit status 1 lists the failure with its file."""
    raw, _ = tiny
    src = _copy_study(raw, tmp_path / "raw")
    from petbind.pipeline import run as run_mod

    real = run_mod.reconstruct_session

    def flaky(session, *a, **kw):
        if session.session == "ses-postdose":
            raise RuntimeError("simulated scanner fault in frame 3")
        return real(session, *a, **kw)

    monkeypatch.setattr(run_mod, "reconstruct_session", flaky)
    out = tmp_path / "out"
    rc = study.main(_args(src, out))
    err = capsys.readouterr().err
    assert rc == 1
    assert "sub-01 ses-postdose" in err and "simulated scanner fault in frame 3" in err
    assert "sub-01_ses-postdose_pet-sinograms.h5" in err
    assert (out / "sub-01" / "ses-baseline" / "pet" / "sub-01_ses-baseline_desc-srtm_bpnd.tsv").exists()
    assert not (out / "group" / "within_group.tsv").exists()
