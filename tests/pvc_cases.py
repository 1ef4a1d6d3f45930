"""Checks shared by the CPU tests and their GPU twins of ``petbind.quant.pvc``.

Each ``check_*`` takes the array namespace ``xp`` (NumPy or CuPy).  The
oracle is always computed on the host with ``scipy.ndimage`` directly (sigma
worked out here from the FWHM, not through the module): a piecewise-constant
phantom blurred by a known Gaussian.  Because the blur is linear, the GTM
solve must return the phantom's values to float64 round-off and RBV must
return the phantom itself.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage as ndi

from petbind.quant.pvc import (
    STATUS_EMPTY_REGION,
    STATUS_OK,
    GaussianPSF,
    gtm_correct,
    gtm_matrix,
    iterative_yang,
    rbv_correct,
    regional_means,
)

SHAPE = (22, 20, 14)
#: Anisotropic voxels (mm) with a flipped x axis, as in a radiological NIfTI.
AFFINE = np.array([[-2.0, 0, 0, 20.0], [0, 2.5, 0, -25.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1.0]])
VOXEL_MM = (2.0, 2.5, 3.0)
NAMES = {1: "cortex", 2: "striatum", 3: "thalamus", 4: "raphe", 5: "cerebellum"}


def phantom_labels() -> np.ndarray:
    """Touching boxes, a ball and a 2x2x2 region; label 0 around them."""
    lab = np.zeros(SHAPE, dtype=np.int16)
    lab[3:19, 3:17, 2:12] = 1
    lab[6:11, 5:10, 4:9] = 2
    lab[11:15, 5:10, 4:9] = 3
    lab[9:11, 12:14, 6:8] = 4
    x, y, z = np.indices(SHAPE)
    lab[(x - 15) ** 2 + (y - 13) ** 2 + 2 * (z - 8) ** 2 <= 9] = 5
    return lab


def truth_values(n_frames=3, background=True) -> np.ndarray:
    """(6, t) true means, rows label 1..5 then background (label 0), Bq/mL."""
    rng = np.random.default_rng(7)
    vals = rng.uniform(500.0, 20000.0, size=(6, n_frames))
    if not background:
        vals[5] = 0.0
    return vals


def piecewise_image(labels, values) -> np.ndarray:
    """(x, y, z, t) image with ``values[k-1]`` in label k and ``values[5]`` in label 0."""
    table = np.concatenate([values[5:6], values[:5]], axis=0)  # row = label value
    return table[labels]


def sigma_voxels(fwhm_mm, voxel_mm=VOXEL_MM):
    fwhm = np.broadcast_to(np.asarray(fwhm_mm, dtype=float), (3,))
    return tuple(float(f) / (2.0 * math.sqrt(2.0 * math.log(2.0))) / v for f, v in zip(fwhm, voxel_mm))


def blur_oracle(image_4d, fwhm_mm, voxel_mm=VOXEL_MM):
    """Each frame blurred with scipy's Gaussian, zero outside the image."""
    s = sigma_voxels(fwhm_mm, voxel_mm)
    return np.stack([ndi.gaussian_filter(image_4d[..., f], s, mode="constant", truncate=4.0)
                     for f in range(image_4d.shape[3])], axis=3)


def host(a):
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else np.asarray(a)


def _assert_type(xp, a):
    assert isinstance(a, xp.ndarray), f"expected {xp.__name__} output, got {type(a)}"


def check_gtm_matrix_against_slow(xp, fwhm_mm=(5.0, 7.0, 9.0)):
    """Matrix entries equal the obvious full-image computation (no bounding boxes)."""
    lab = phantom_labels()
    psf = GaussianPSF(fwhm_mm, VOXEL_MM)
    g = gtm_matrix(xp.asarray(lab), NAMES, psf)
    _assert_type(xp, g.matrix)
    assert g.region_names == list(NAMES.values()) + ["background"]
    rows = [1, 2, 3, 4, 5, 0]
    s = sigma_voxels(fwhm_mm)
    slow = np.empty((6, 6))
    for j, lj in enumerate(rows):
        w = ndi.gaussian_filter((lab == lj).astype(float), s, mode="constant", truncate=4.0)
        for i, li in enumerate(rows):
            slow[i, j] = w[lab == li].mean()
    np.testing.assert_allclose(host(g.matrix), slow, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(g.n_voxels, [np.sum(lab == k) for k in rows])
    # Spill-over is substantial in this phantom (else recovery would prove little).
    assert host(g.matrix)[3, 3] < 0.5


def check_gtm_recovers_phantom(xp, fwhm_mm=(5.0, 7.0, 9.0), background="region"):
    """GTM values equal the phantom's to float64 precision, every frame at once."""
    lab = phantom_labels()
    truth = truth_values(background=background == "region")
    image = blur_oracle(piecewise_image(lab, truth), fwhm_mm)
    g = gtm_matrix(lab, NAMES, GaussianPSF(fwhm_mm, VOXEL_MM), background=background)
    res = gtm_correct(xp.asarray(image), xp.asarray(lab), g)
    _assert_type(xp, res.values)
    _assert_type(xp, res.observed)
    n = 6 if background == "region" else 5
    assert host(res.values).shape == (n, 3)
    np.testing.assert_allclose(host(res.values), truth[:n], rtol=1e-9)
    # Observed means against the obvious masked mean; PVE is large (> 20 % in raphe).
    rows = [1, 2, 3, 4, 5, 0][:n]
    slow = np.stack([image[lab == k].mean(axis=0) for k in rows])
    np.testing.assert_allclose(host(res.observed), slow, rtol=1e-12)
    assert abs(slow[3, 0] / truth[3, 0] - 1) > 0.2
    np.testing.assert_array_equal(res.status, STATUS_OK)


def check_wrong_psf_is_detected(xp):
    """The same phantom with the anisotropic FWHM given in the wrong axis order is not recovered."""
    lab = phantom_labels()
    truth = truth_values()
    image = blur_oracle(piecewise_image(lab, truth), (4.0, 6.0, 10.0))
    g = gtm_matrix(lab, NAMES, GaussianPSF((10.0, 6.0, 4.0), VOXEL_MM))
    vals = host(gtm_correct(xp.asarray(image), lab, g).values)
    assert np.max(np.abs(vals / truth - 1)) > 1e-2


def check_empty_region(xp):
    """A named region with no voxels: NaN and a status; the others are still exact."""
    lab = phantom_labels()
    truth = truth_values()
    image = blur_oracle(piecewise_image(lab, truth), 6.0)
    names = {**NAMES, 9: "absent"}
    g = gtm_matrix(xp.asarray(lab), names, GaussianPSF(6.0, VOXEL_MM))
    assert g.region_names[5] == "absent"
    assert g.status.tolist() == [0, 0, 0, 0, 0, STATUS_EMPTY_REGION, 0]
    m = host(g.matrix)
    assert np.all(np.isnan(m[5])) and np.all(np.isnan(m[:, 5]))
    res = gtm_correct(xp.asarray(image), lab, g)
    vals = host(res.values)
    assert np.all(np.isnan(vals[5]))
    np.testing.assert_allclose(np.delete(vals, 5, axis=0), truth, rtol=1e-9)
    # RBV ignores the empty region too.
    out = host(rbv_correct(xp.asarray(image), lab, g))
    np.testing.assert_allclose(out, piecewise_image(lab, truth), rtol=1e-9)


def check_rbv_recovers_phantom(xp, background="region", dtype=np.float64):
    """RBV returns the piecewise-constant image (exactly: the regions fill the image)."""
    lab = phantom_labels()
    truth = truth_values(background=background == "region")
    piece = piecewise_image(lab, truth)
    fwhm = (5.0, 7.0, 9.0)
    image = blur_oracle(piece, fwhm).astype(dtype)
    g = gtm_matrix(lab, NAMES, GaussianPSF(fwhm, VOXEL_MM), background=background)
    out, res = rbv_correct(xp.asarray(image), xp.asarray(lab), g, return_gtm=True)
    _assert_type(xp, out)
    assert out.shape == image.shape and out.dtype == dtype
    rtol = 1e-9 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(host(out), piece, rtol=rtol, atol=rtol * piece.max() * 1e-3)
    # 3-D in, 3-D out, same answer as frame 1 of the 4-D call.
    out3 = rbv_correct(xp.asarray(image[..., 1]), lab, g)
    assert out3.shape == SHAPE
    np.testing.assert_allclose(host(out3), host(out)[..., 1], rtol=1e-12)
    # Uncorrected image is far from the phantom near edges.
    assert np.max(np.abs(image - piece)) > 0.2 * piece.max()


def check_iterative_yang_converges(xp):
    """Iterative Yang approaches the phantom; the error falls with iterations."""
    lab = phantom_labels()
    truth = truth_values(n_frames=1)
    piece = piecewise_image(lab, truth)
    image = blur_oracle(piece, 6.0)
    g = gtm_matrix(lab, NAMES, GaussianPSF(6.0, VOXEL_MM))
    errs = []
    for n_iter in (1, 10, 160):
        out = iterative_yang(xp.asarray(image), lab, g, n_iter=n_iter)
        _assert_type(xp, out)
        errs.append(float(np.max(np.abs(host(out) - piece) / piece)))
    assert errs[0] > errs[1] > errs[2]
    # The phantom is the fixed point and convergence is geometric (about 0.89
    # per iteration here, set by the 8-voxel raphe whose recovery is 0.24), so
    # 160 iterations leave ~1e-8; a wrong fixed point would stall far above.
    assert errs[2] < 1e-7, errs


def check_regional_means(xp):
    lab = phantom_labels()
    image = np.random.default_rng(1).random(SHAPE + (2,))
    means, n = regional_means(xp.asarray(image), xp.asarray(lab), [5, 0, 9])
    _assert_type(xp, means)
    m = host(means)
    np.testing.assert_allclose(m[:2], np.stack([image[lab == 5].mean(0), image[lab == 0].mean(0)]), rtol=1e-12)
    assert np.all(np.isnan(m[2])) and n[2] == 0
