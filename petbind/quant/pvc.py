"""Partial-volume correction (PVC): regional GTM, voxelwise RBV and iterative Yang.

The image is modelled as a piecewise-constant activity distribution blurred
by a shift-invariant Gaussian point-spread function (PSF) :math:`h`:

.. math:: I = h \\ast \\sum_j T_j \\, \\chi_j

with :math:`\\chi_j` the indicator of region :math:`j` and :math:`T_j` its
true mean activity (Bq/mL).  The observed regional mean of region :math:`i`
is then linear in the true means,

.. math:: t_i = \\frac{1}{|R_i|} \\sum_{v \\in R_i} I(v)
        = \\sum_j \\mathrm{GTM}_{ij} T_j, \\qquad
   \\mathrm{GTM}_{ij} = \\frac{1}{|R_i|} \\sum_{v \\in R_i} (h \\ast \\chi_j)(v),

the geometric transfer matrix of Rousset, Ma & Evans (1998).  ``GTM[i, j]``
is the fraction of region ``j``'s activity that appears in the mean of
region ``i`` (its diagonal is the recovery coefficient).  Solving
``GTM T = t`` gives the corrected regional means; one matrix serves every
frame, and every session on the same atlas and PSF.

Region-based voxelwise correction (RBV, Thomas et al. 2011) builds the
synthetic image :math:`S = \\sum_j T_j \\chi_j` from the GTM values and
corrects each voxel by :math:`I \\cdot S / (h \\ast S)`.  Iterative Yang
(Erlandsson et al. 2012) is the same correction with the regional means
re-estimated from the corrected image instead of from the GTM.

Background
----------
Voxels with label 0 (unlabelled) contain activity too (the rest of the brain,
scalp, ...), and their activity spills into the atlas regions.  By default
(``background="region"``) they form one more region, named ``background``,
whose true mean is estimated with the others, so spill-in from outside the
atlas is modelled (as in Rousset et al., where every tissue class is a
region).  ``background="zero"`` assumes no activity in unlabelled voxels
instead; use it only when that is true (e.g. a phantom in air).  Outside
the image the activity is taken as zero (``mode="constant"`` of the blur);
a reconstructed FOV that contains all the activity satisfies this.

Regions of zero volume
----------------------
A named region with no voxels cannot be corrected: its GTM row and column
are NaN, its value is NaN and its status is :data:`STATUS_EMPTY_REGION`;
the other regions are solved without it (an empty region contributes no
activity), and a warning names it.

Reference region
----------------
PVC is applied to the reference region exactly as to the targets: it is a
row of the same GTM and its TAC is corrected the same way.  This is the
default because BP_ND is a ratio of target and reference uptake and mixing
corrected targets with an uncorrected reference biases it.  The GTM always
models every region (so the reference's spill-over into targets is removed
either way); :func:`pvc_tacs` can report chosen regions, e.g. the
reference, uncorrected (``uncorrected=[...]``).

Arrays
------
Every public function accepts NumPy or CuPy arrays and returns the input's
type; the blur is ``scipy.ndimage.gaussian_filter`` on the CPU and
``cupyx.scipy.ndimage.gaussian_filter`` on the GPU.  GTM matrices and
regional values are computed in float64.

References
----------
Rousset OG, Ma Y, Evans AC (1998). Correction for partial volume effects in
PET: principle and validation. J Nucl Med 39:904-911.

Thomas BA, Erlandsson K, Modat M, et al. (2011). The importance of
appropriate partial volume correction for PET quantification in Alzheimer's
disease. Eur J Nucl Med Mol Imaging 38:1104-1119.

Erlandsson K, Buvat I, Pretorius PH, Thomas BA, Hutton BF (2012). A review of
partial volume correction techniques for emission tomography and their
applications in neurology, cardiology and oncology. Phys Med Biol
57:R119-R159.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.ndimage import find_objects
from tqdm import tqdm

from petbind.core.device import array_module, to_numpy

logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND_CHOICES",
    "METHODS",
    "STATUS_EMPTY_REGION",
    "STATUS_NAMES",
    "STATUS_OK",
    "GaussianPSF",
    "GTM",
    "GTMResult",
    "voxel_size_from_affine",
    "regional_means",
    "gtm_matrix",
    "gtm_correct",
    "rbv_correct",
    "iterative_yang",
    "pvc_tacs",
]

#: ``2 sqrt(2 ln 2)``: FWHM = this x sigma for a Gaussian.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
BACKGROUND_CHOICES = ("region", "zero")
METHODS = ("gtm", "rbv", "iy")
BLUR_MODES = ("constant", "nearest", "reflect", "mirror", "wrap")
STATUS_OK = 0
STATUS_EMPTY_REGION = 1
STATUS_NAMES = {
    STATUS_OK: "ok",
    STATUS_EMPTY_REGION: "empty_region (no voxels in the label image; NaN)",
}
#: GTM condition number above which a warning is logged (noise amplification).
COND_WARN = 1e6


def _on(xp, a):
    """``a`` on the device of namespace ``xp`` (one copy at most; never inside a loop)."""
    return to_numpy(a) if xp is np else xp.asarray(a)


def _ndimage(xp):
    if xp is np:
        import scipy.ndimage as nd  # noqa: PLC0415
    else:
        import cupyx.scipy.ndimage as nd  # noqa: PLC0415
    return nd


def voxel_size_from_affine(affine) -> tuple:
    """Voxel spacing (mm) along the array axes of a NIfTI affine.

    Parameters
    ----------
    affine : array_like, shape (4, 4)
        Voxel-to-world affine in mm.

    Returns
    -------
    tuple of 3 float
        Norms of the first three columns of ``affine[:3, :3]`` (mm).
    """
    a = np.asarray(to_numpy(affine), dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 array (mm), got shape {a.shape}")
    size = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(size <= 0):
        raise ValueError(f"affine has a zero-length voxel axis (voxel sizes {size.tolist()} mm)")
    return tuple(float(s) for s in size)


def _triple(value, what) -> tuple:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3:
        raise ValueError(f"{what} must be one number or three (x, y, z), got {np.asarray(value).tolist()}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class GaussianPSF:
    """A shift-invariant Gaussian point-spread function on an image grid.

    Parameters
    ----------
    fwhm_mm : float or sequence of 3 float
        Full width at half maximum along the image's array axes x, y, z (mm);
        one number for an isotropic PSF.  0 leaves an axis unblurred.
    voxel_size_mm : float or sequence of 3 float
        Voxel spacing along x, y, z (mm); see :func:`voxel_size_from_affine`.
    truncate : float
        Kernel half-width in standard deviations (scipy's ``truncate``).
    mode : str
        Boundary mode of the blur; ``"constant"`` (zero activity outside the
        image, the default) or another ``scipy.ndimage`` mode.

    Notes
    -----
    ``sigma_voxels = fwhm_mm / (2 sqrt(2 ln 2)) / voxel_size_mm`` per axis.
    For an oblique affine the FWHM is still taken along the array axes.
    """

    fwhm_mm: tuple
    voxel_size_mm: tuple
    truncate: float = 4.0
    mode: str = "constant"

    def __post_init__(self):
        fwhm = _triple(self.fwhm_mm, "fwhm_mm")
        vox = _triple(self.voxel_size_mm, "voxel_size_mm")
        if not all(math.isfinite(f) and f >= 0 for f in fwhm):
            raise ValueError(f"fwhm_mm must be finite and >= 0 (mm), got {list(fwhm)}")
        if not all(math.isfinite(v) and v > 0 for v in vox):
            raise ValueError(f"voxel_size_mm must be finite and > 0 (mm), got {list(vox)}")
        if not (math.isfinite(self.truncate) and self.truncate > 0):
            raise ValueError(f"truncate must be a positive number of standard deviations, got {self.truncate}")
        if self.mode not in BLUR_MODES:
            raise ValueError(f"mode must be one of {BLUR_MODES}, got {self.mode!r}")
        object.__setattr__(self, "fwhm_mm", fwhm)
        object.__setattr__(self, "voxel_size_mm", vox)
        object.__setattr__(self, "truncate", float(self.truncate))

    @classmethod
    def from_affine(cls, fwhm_mm, affine, **kwargs) -> "GaussianPSF":
        """PSF with the voxel size taken from a NIfTI ``affine`` (mm)."""
        return cls(fwhm_mm, voxel_size_from_affine(affine), **kwargs)

    @property
    def sigma_voxels(self) -> tuple:
        """Standard deviation per axis in voxels."""
        return tuple(f / FWHM_PER_SIGMA / v for f, v in zip(self.fwhm_mm, self.voxel_size_mm))

    @property
    def radius_voxels(self) -> tuple:
        """Kernel half-width per axis in voxels (as scipy computes it)."""
        return tuple(int(self.truncate * s + 0.5) for s in self.sigma_voxels)

    def apply(self, image, out_dtype=None):
        """Blur a 3-D image, or each frame of a 4-D image (never across time).

        Parameters
        ----------
        image : ndarray or cupy.ndarray, shape (x, y, z) or (x, y, z, t)
            Activity (Bq/mL).
        out_dtype : dtype, optional
            Output dtype; default the image's float type (float64 for ints).

        Returns
        -------
        Same array type and shape as ``image``.
        """
        xp = array_module(image)
        if image.ndim not in (3, 4):
            raise ValueError(f"expected a 3-D or 4-D image, got shape {image.shape}")
        if out_dtype is None:
            out_dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else xp.float64
        image = image.astype(out_dtype, copy=False)
        sigma = self.sigma_voxels + ((0.0,) if image.ndim == 4 else ())
        return _ndimage(xp).gaussian_filter(image, sigma, mode=self.mode, cval=0.0, truncate=self.truncate)

    def _blur3(self, nd, volume):
        return nd.gaussian_filter(volume, self.sigma_voxels, mode=self.mode, cval=0.0, truncate=self.truncate)


@dataclass
class GTM:
    """A geometric transfer matrix for one atlas on one grid with one PSF.

    Attributes
    ----------
    matrix : ndarray or cupy.ndarray, shape (n, n), float64
        ``matrix[i, j]``: mean over region ``i`` of the blurred indicator of
        region ``j`` (unitless).  NaN rows/columns for empty regions.
    region_names : list of str
        Row/column names: the named regions in increasing label order, then
        ``background`` when ``background == "region"`` and unlabelled voxels
        exist.
    label_values : ndarray of int, shape (n,)
        Label of each row (0 for the background row).
    n_voxels : ndarray of int, shape (n,)
        Voxels per region.
    status : ndarray of int8, shape (n,)
        :data:`STATUS_OK` or :data:`STATUS_EMPTY_REGION`.
    psf : GaussianPSF
    background : str
        ``"region"`` or ``"zero"`` (see the module notes).
    labels_shape : tuple
        Grid shape the matrix was built on.
    condition_number : float
        2-norm condition number of the non-empty block (noise amplification
        bound of the solve).
    label_histogram : ndarray of int
        Voxels per label value of the label image (checked on reuse, to
        catch a matrix applied to another atlas).
    """

    matrix: object
    region_names: list
    label_values: np.ndarray
    n_voxels: np.ndarray
    status: np.ndarray
    psf: GaussianPSF
    background: str
    labels_shape: tuple
    condition_number: float
    label_histogram: np.ndarray = field(default=None, repr=False)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of non-empty regions."""
        return self.status == STATUS_OK

    def __repr__(self) -> str:
        return (f"GTM(n_regions={len(self.region_names)}, background={self.background!r}, "
                f"fwhm_mm={self.psf.fwhm_mm}, voxel_size_mm={self.psf.voxel_size_mm}, "
                f"condition_number={self.condition_number:.3g})")


@dataclass
class GTMResult:
    """Regional means before and after GTM correction.

    Attributes
    ----------
    values : ndarray or cupy.ndarray, shape (n_regions, n_frames), float64
        Corrected (true) regional means (Bq/mL); NaN for empty regions.
    observed : same type and shape
        Uncorrected regional means (Bq/mL); NaN for empty regions.
    region_names : list of str
    status : ndarray of int8, shape (n_regions,)
    gtm : GTM
    """

    values: object
    observed: object
    region_names: list
    status: np.ndarray
    gtm: GTM


def _label_table(labels_host, names, background):
    """Row labels and names, with checks on the label image."""
    if background not in BACKGROUND_CHOICES:
        raise ValueError(f"background must be one of {BACKGROUND_CHOICES}, got {background!r}")
    if not names:
        raise ValueError("names: no regions given (expected a dict label -> region name)")
    keys = sorted(int(k) for k in names)
    if keys[0] <= 0:
        raise ValueError(f"names: label values must be > 0 (0 is background), got {keys[0]}")
    if not np.issubdtype(labels_host.dtype, np.integer):
        raise ValueError(f"labels: expected an integer label image, got dtype {labels_host.dtype}")
    present = np.unique(labels_host)
    if present.size and present[0] < 0:
        raise ValueError(f"labels: negative label {int(present[0])}; expected labels >= 0 (0 = background)")
    unnamed = [int(v) for v in present if v != 0 and v not in set(keys)]
    if unnamed:
        raise ValueError(f"labels: label value(s) {unnamed[:10]} have no region name; add them to names "
                         "(every labelled voxel must belong to a modelled region)")
    row_labels = list(keys)
    row_names = [str(names[k]) for k in keys]
    if background == "region" and (present == 0).any():
        bg = "background"
        while bg in row_names:
            bg += "_"
        row_labels.append(0)
        row_names.append(bg)
    return np.asarray(row_labels, dtype=np.int64), row_names, int(present[-1]) if present.size else 0


def _compact_index(labels, row_labels, max_label, xp):
    """Per voxel: row index of its region, or ``n`` (ignored) for unmodelled background."""
    n = row_labels.size
    lut = np.full(max(max_label, int(row_labels.max())) + 1, n, dtype=np.int64)
    lut[row_labels] = np.arange(n)
    return xp.asarray(lut)[labels]


def regional_means(image, labels, label_values):
    """Mean of every frame over each label, all regions at once.

    Parameters
    ----------
    image : ndarray or cupy.ndarray, shape (x, y, z) or (x, y, z, t)
        Activity (Bq/mL).
    labels : integer array, shape (x, y, z)
        Label image (NumPy or CuPy; moved to the image's device once).
    label_values : sequence of int
        Labels to average, in output order (0 allowed: unlabelled voxels).

    Returns
    -------
    means : array of the image's type, shape (n_labels, t), float64
        Bq/mL; NaN for a label with no voxels (t = 1 for a 3-D image).
    n_voxels : ndarray of int, shape (n_labels,)
    """
    xp = array_module(image)
    labels = _on(xp, labels)
    if image.ndim not in (3, 4) or labels.shape != image.shape[:3]:
        raise ValueError(f"labels grid {labels.shape} does not match image shape {image.shape}")
    row_labels = np.asarray(label_values, dtype=np.int64).reshape(-1)
    max_label = int(labels.max()) if labels.size else 0
    idx = _compact_index(labels, row_labels, max_label, xp).reshape(-1)
    sums, counts = _sums(image, idx, row_labels.size, xp)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / xp.where(counts == 0, xp.nan, counts)[:, None]
    return means, to_numpy(counts).astype(np.int64)


def _sums(image, idx, n, xp):
    """Per-row sums (n, t) and voxel counts (n,) from a compact index (``n`` = ignored)."""
    frames = image.reshape(idx.size, -1)
    counts = xp.bincount(idx, minlength=n + 1)[:n]
    sums = xp.empty((n, frames.shape[1]), dtype=xp.float64)
    for f in range(frames.shape[1]):
        sums[:, f] = xp.bincount(idx, weights=frames[:, f].astype(xp.float64), minlength=n + 1)[:n]
    return sums, counts


def gtm_matrix(labels, names, psf: GaussianPSF, background: str = "region", progress: bool = False,
               fractions=None) -> GTM:
    """Build the geometric transfer matrix of an atlas (Rousset et al. 1998).

    Parameters
    ----------
    labels : integer ndarray or cupy.ndarray, shape (x, y, z)
        Label image, 0 = unlabelled.  The matrix lives on the same device.
    names : dict[int, str]
        Label -> region name (e.g. ``Atlas.names``).  Every non-zero label in
        ``labels`` must be named; a named label without voxels is an empty
        region (NaN, status :data:`STATUS_EMPTY_REGION`).
    psf : GaussianPSF
        Image resolution (FWHM in mm per axis) and voxel size.
    background : {"region", "zero"}
        Unlabelled voxels are one more region (default) or hold no activity.
    progress : bool
        tqdm bar over regions.
    fractions : dict[str, array], optional
        Tissue fraction of each named region in every voxel (0..1, shape of
        ``labels``), e.g. a probabilistic segmentation resampled from MRI
        resolution.  The activity model is then ``Σ_j T_j f_j`` instead of
        ``Σ_j T_j χ_j``: column ``j`` is the blur of ``f_j`` (and the
        background's fraction is what the regions leave, ``1 - Σ_j f_j``),
        so voxels that mix tissues are modelled too.  Regional means (rows)
        stay means over the labelled voxels.

    Returns
    -------
    GTM
        ``matrix`` is float64, NumPy or CuPy like ``labels``.

    Raises
    ------
    ValueError
        Non-integer or negative labels, unnamed labels, bad ``background``.

    Notes
    -----
    Column ``j`` is the regional mean of :math:`h \\ast \\chi_j` over every
    region; each indicator is blurred once, inside its bounding box padded
    by the kernel radius (exact for ``mode="constant"``: the blur is zero
    beyond the radius).  Cost: one 3-D blur per region.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.zeros((8, 8, 8), int); lab[2:6, 2:6, 2:6] = 1
    >>> g = gtm_matrix(lab, {1: "cube"}, GaussianPSF(4.0, 2.0))
    >>> g.region_names
    ['cube', 'background']
    >>> bool(0 < g.matrix[0, 0] < 1)
    True
    """
    if not isinstance(psf, GaussianPSF):
        raise TypeError(f"psf must be a GaussianPSF, got {type(psf).__name__}")
    xp = array_module(labels)
    labels_host = to_numpy(labels)
    if labels_host.ndim != 3:
        raise ValueError(f"labels: expected a 3-D label image (x, y, z), got shape {labels_host.shape}")
    row_labels, row_names, max_label = _label_table(labels_host, names, background)
    n = row_labels.size
    labels = xp.asarray(labels)
    idx = _compact_index(labels, row_labels, max_label, xp)
    idx_host = to_numpy(idx)
    histogram = np.bincount(labels_host.reshape(-1).astype(np.int64))
    counts = np.bincount(idx_host.reshape(-1), minlength=n + 1)[:n].astype(np.int64)
    status = np.where(counts > 0, STATUS_OK, STATUS_EMPTY_REGION).astype(np.int8)
    # Bounding boxes on the host once; find_objects is 1-based and skips 0.
    boxes = find_objects(idx_host + 1, max_label=n)
    nd = _ndimage(xp)
    radius = psf.radius_voxels
    shape = labels_host.shape
    local = psf.mode == "constant"
    matrix = xp.full((n, n), xp.nan, dtype=xp.float64)
    counts_x = xp.asarray(np.where(counts > 0, counts, 1).astype(np.float64))
    sources = None
    if fractions is not None:
        sources = _fraction_sources(fractions, row_names, row_labels, shape, xp)
        boxes = [find_objects((to_numpy(s) > 0).astype(np.int8))[0] if s is not None else None for s in sources]
    for j in tqdm(range(n), desc="GTM", unit="region", disable=not progress):
        if counts[j] == 0:
            continue
        if local and boxes[j] is not None:
            box = tuple(slice(max(s.start - r, 0), min(s.stop + r, m)) for s, r, m in zip(boxes[j], radius, shape))
        else:
            box = (slice(None),) * 3
        sub = idx[box]
        source = (sub == j).astype(xp.float64) if sources is None else sources[j][box]
        blurred = psf._blur3(nd, source)
        sums = xp.bincount(sub.reshape(-1), weights=blurred.reshape(-1), minlength=n + 1)[:n]
        matrix[:, j] = sums / counts_x
    ok = counts > 0
    matrix[xp.asarray(np.flatnonzero(~ok))] = xp.nan
    block = to_numpy(matrix)[np.ix_(ok, ok)]
    cond = float(np.linalg.cond(block)) if block.size else math.nan
    empty = [row_names[i] for i in np.flatnonzero(~ok)]
    if empty:
        logger.warning("PVC: %d region(s) with no voxels get NaN: %s", len(empty), empty)
    if cond > COND_WARN:
        logger.warning("PVC: GTM condition number %.3g; corrected values amplify noise strongly", cond)
    logger.debug("GTM %d regions, sigma %s voxels, cond %.3g", n, psf.sigma_voxels, cond)
    return GTM(matrix, row_names, row_labels, counts, status, psf, background, tuple(shape), cond, histogram)


def _fraction_sources(fractions, row_names, row_labels, shape, xp):
    """Per GTM row, the fraction map (float64 on ``xp``); the background takes what is left."""
    unknown = sorted(set(fractions) - set(row_names))
    if unknown:
        raise ValueError(f"fractions: regions {unknown} are not in the atlas")
    out, total = [], xp.zeros(shape, dtype=xp.float64)
    for name, lab in zip(row_names, row_labels):
        if lab == 0:
            out.append(None)
            continue
        if name not in fractions:
            raise ValueError(f"fractions: region {name!r} has no fraction map; give one for every region")
        f = xp.asarray(fractions[name], dtype=xp.float64)
        if f.shape != tuple(shape):
            raise ValueError(f"fractions: map of {name!r} has shape {f.shape}, labels {tuple(shape)}")
        if bool(xp.any(f < 0)) or bool(xp.any(~xp.isfinite(f))):
            raise ValueError(f"fractions: map of {name!r} must be finite and >= 0")
        out.append(f)
        total += f
    if bool(xp.any(total > 1 + 1e-4)):
        raise ValueError("fractions: the region fractions of a voxel sum to more than 1")
    out = [xp.clip(1.0 - total, 0.0, None) if s is None else s for s in out]
    return out


def _solve(gtm: GTM, observed, xp):
    """Corrected values (n, t) from observed means, NaN rows for empty regions."""
    rows = np.flatnonzero(gtm.ok)
    values = xp.full(observed.shape, xp.nan, dtype=xp.float64)
    if rows.size:
        r = xp.asarray(rows)
        m = _on(xp, gtm.matrix)[r[:, None], r[None, :]]
        values[r] = xp.linalg.solve(m, observed[r])
    return values


def _check_gtm(gtm, labels_shape):
    if not isinstance(gtm, GTM):
        raise TypeError(f"gtm must be a GTM from gtm_matrix(), got {type(gtm).__name__}")
    if tuple(labels_shape) != gtm.labels_shape:
        raise ValueError(f"labels grid {tuple(labels_shape)} differs from the grid {gtm.labels_shape} "
                         "the GTM was built on; rebuild it with gtm_matrix()")


def _prepare(image, labels, gtm):
    """Namespace and per-voxel row index, after checking image, labels and GTM agree."""
    xp = array_module(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D or 4-D image (x, y, z[, t]), got shape {image.shape}")
    labels = _on(xp, labels)
    if labels.shape != image.shape[:3]:
        raise ValueError(f"labels grid {labels.shape} differs from image grid {image.shape[:3]}")
    _check_gtm(gtm, labels.shape)
    if labels.size and int(labels.min()) < 0:
        raise ValueError("labels: negative label; expected labels >= 0 (0 = background)")
    hist = to_numpy(xp.bincount(labels.reshape(-1).astype(xp.int64)))
    if not np.array_equal(hist, gtm.label_histogram):
        raise ValueError("labels: voxels per label differ from the label image the GTM was built on "
                         "(another atlas?); rebuild it with gtm_matrix()")
    idx = _compact_index(labels, gtm.label_values, hist.size - 1, xp)
    return xp, idx


def gtm_correct(image, labels, gtm: GTM) -> GTMResult:
    """GTM-corrected regional means of every frame.

    Parameters
    ----------
    image : ndarray or cupy.ndarray, shape (x, y, z) or (x, y, z, t)
        Activity (Bq/mL).
    labels : integer array, shape (x, y, z)
        The label image ``gtm`` was built from.
    gtm : GTM
        From :func:`gtm_matrix`; reuse it for every image on the same atlas.

    Returns
    -------
    GTMResult
        ``values`` and ``observed`` of shape (n_regions, t), float64, the
        image's array type.

    Raises
    ------
    ValueError
        Grid mismatch, or labels whose voxels per label differ from the
        GTM's (a different atlas).

    Examples
    --------
    >>> import numpy as np, scipy.ndimage as ndi
    >>> lab = np.ones((12, 12, 12), int); lab[4:8, 4:8, 4:8] = 2
    >>> psf = GaussianPSF(5.0, 2.0)
    >>> truth = np.where(lab == 2, 4.0, 1.0)
    >>> img = ndi.gaussian_filter(truth, psf.sigma_voxels, mode="constant")
    >>> res = gtm_correct(img, lab, gtm_matrix(lab, {1: "bg", 2: "hot"}, psf))
    >>> np.round(res.values[:, 0], 6).tolist()
    [1.0, 4.0]
    """
    xp, idx = _prepare(image, labels, gtm)
    return _gtm_values(image, idx, gtm, xp)


def _gtm_values(image, idx, gtm, xp):
    sums, counts = _sums(image, idx.reshape(-1), len(gtm.region_names), xp)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = sums / xp.where(counts == 0, xp.nan, counts)[:, None]
    return GTMResult(_solve(gtm, observed, xp), observed, list(gtm.region_names), gtm.status.copy(), gtm)


def _synthetic_ratio(values_f, idx, gtm, nd, xp):
    """``S / (h * S)`` for one frame's regional values (0 where S = h*S = 0)."""
    table = xp.concatenate([xp.where(xp.isnan(values_f), 0.0, values_f), xp.zeros(1, dtype=xp.float64)])
    synthetic = table[idx]  # unmodelled background (index n) -> 0
    blurred = gtm.psf._blur3(nd, synthetic)
    zero = blurred == 0
    ratio = synthetic / xp.where(zero, 1.0, blurred)
    return xp.where(zero & (synthetic != 0), xp.nan, ratio)


def _apply_ratio(image, values, idx, gtm, xp, progress, desc):
    nd = _ndimage(xp)
    out_dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else xp.float64
    frames = image[..., None] if image.ndim == 3 else image
    out = xp.empty(frames.shape, dtype=out_dtype)
    for f in tqdm(range(frames.shape[3]), desc=desc, unit="frame", disable=not progress):
        out[..., f] = frames[..., f] * _synthetic_ratio(values[:, f], idx, gtm, nd, xp)
    return out[..., 0] if image.ndim == 3 else out


def rbv_correct(image, labels, gtm: GTM, progress: bool = False, return_gtm: bool = False):
    """Region-based voxelwise PVC (RBV; Thomas et al. 2011).

    Parameters
    ----------
    image : ndarray or cupy.ndarray, shape (x, y, z) or (x, y, z, t)
        Activity (Bq/mL); 4-D images are corrected frame by frame.
    labels : integer array, shape (x, y, z)
    gtm : GTM
        From :func:`gtm_matrix` (atlas, PSF and background treatment).
    progress : bool
        tqdm bar over frames.
    return_gtm : bool
        Also return the :class:`GTMResult` used for the synthetic image.

    Returns
    -------
    corrected : same type and shape as ``image``
        Bq/mL, the image's float dtype (float64 for integer input).  With
        ``background="zero"`` unlabelled voxels become 0 (their synthetic
        value is 0).  NaN where ``h * S`` is exactly 0 but ``S`` is not.
    result : GTMResult
        Only with ``return_gtm``.

    Notes
    -----
    Per frame, with :math:`T_j` the GTM-corrected regional means,

    .. math:: S = \\sum_j T_j \\chi_j, \\qquad
              I_{\\mathrm{RBV}} = I \\cdot \\frac{S}{h \\ast S}.

    For an image that is exactly :math:`h \\ast S` the correction returns
    :math:`S`.  Empty regions have no voxels and do not enter :math:`S`.
    """
    xp, idx = _prepare(image, labels, gtm)
    res = _gtm_values(image, idx, gtm, xp)
    out = _apply_ratio(image, res.values, idx, gtm, xp, progress, "RBV")
    return (out, res) if return_gtm else out


def iterative_yang(image, labels, gtm: GTM, n_iter: int = 10, progress: bool = False):
    """Iterative Yang voxelwise PVC (Erlandsson et al. 2012).

    Parameters
    ----------
    image : ndarray or cupy.ndarray, shape (x, y, z) or (x, y, z, t)
        Activity (Bq/mL).
    labels : integer array, shape (x, y, z)
    gtm : GTM
        Supplies the regions, PSF and background treatment (its matrix is not
        used: the regional means come from the current estimate).
    n_iter : int
        Number of iterations (>= 1).
    progress : bool
        tqdm bar over iterations.

    Returns
    -------
    Same type and shape as ``image`` (Bq/mL).

    Notes
    -----
    Starting from :math:`f_0 = I`, iteration :math:`k` takes the regional
    means :math:`T^k` of :math:`f_k`, builds :math:`S^k = \\sum_j T^k_j
    \\chi_j` and sets :math:`f_{k+1} = I \\cdot S^k / (h \\ast S^k)`.  A
    piecewise-constant :math:`S` with :math:`I = h \\ast S` is a fixed
    point.  Unlike RBV it needs no matrix inverse, but converges only
    geometrically (no solve amplifies noise in small regions).
    """
    if not (isinstance(n_iter, (int, np.integer)) and n_iter >= 1):
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    xp, idx = _prepare(image, labels, gtm)
    n = len(gtm.region_names)
    flat = idx.reshape(-1)
    counts = xp.bincount(flat, minlength=n + 1)[:n]
    denom = xp.where(counts == 0, xp.nan, counts)[:, None]
    est = image
    for _ in tqdm(range(n_iter), desc="iterative Yang", unit="iter", disable=not progress):
        sums, _c = _sums(est, flat, n, xp)
        est = _apply_ratio(image, sums / denom, idx, gtm, xp, False, "")
    return est


def pvc_tacs(pet, atlas, psf: GaussianPSF, method: str = "gtm", regions: Sequence[str] | None = None,
             uncorrected: Sequence[str] = (), background: str = "region", gtm: GTM | None = None,
             n_iter: int = 10, progress: bool = False):
    """Partial-volume-corrected regional TACs of a loaded PET image.

    Parameters
    ----------
    pet : petbind.quant.io.PETImage
        4-D image (Bq/mL) and frame timing.  ``pet.data`` may be NumPy or CuPy.
    atlas : petbind.quant.io.Atlas
        Labels on the PET grid (checked) and region names.
    psf : GaussianPSF
        Effective resolution of the image (FWHM per axis, mm).
    method : {"gtm", "rbv", "iy"}
        ``gtm``: GTM-corrected regional means.  ``rbv``/``iy``: regional
        means of the RBV / iterative-Yang corrected image.
    regions : sequence of str, optional
        Output columns (default all atlas regions, label order).  The GTM
        always models every region, whatever is reported.
    uncorrected : sequence of str
        Regions reported without correction (their plain regional mean),
        e.g. ``[reference]`` to leave the reference region uncorrected.  By
        default every region, the reference included, is corrected.
    background : {"region", "zero"}
        Treatment of unlabelled voxels (module notes).
    gtm : GTM, optional
        A matrix from :func:`gtm_matrix` for this atlas and PSF (reuse
        across sessions); built when omitted.
    n_iter : int
        Iterations of ``iy``.
    progress : bool
        Progress bars.

    Returns
    -------
    TACTable
        Bq/mL, one column per region; its ``source`` names the method.

    Raises
    ------
    ValueError
        Unknown method or region (message lists the choices), a requested
        region with no voxels, grid mismatch.
    """
    from petbind.quant.io import TACTable, check_same_grid  # noqa: PLC0415

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_same_grid(pet.data.shape, pet.affine, pet.path, atlas.labels.shape, atlas.affine, atlas.path)
    available = atlas.region_names
    regions = available if regions is None else list(regions)
    bad = [r for r in list(regions) + list(uncorrected) if r not in available]
    if bad:
        raise ValueError(f"{atlas.path}: region(s) {bad} not in atlas; available regions: {available}")
    if gtm is None:
        gtm = gtm_matrix(atlas.labels, atlas.names, psf, background=background, progress=progress)
    elif gtm.psf != psf or gtm.background != background:
        raise ValueError(f"gtm was built with {gtm.psf} and background={gtm.background!r}, "
                         f"not {psf} and background={background!r}")
    data = pet.data if pet.data.ndim == 4 else pet.data[..., None]
    if method == "gtm":
        res = gtm_correct(data, atlas.labels, gtm)
        corrected, observed = res.values, res.observed
    else:
        if method == "rbv":
            img = rbv_correct(data, atlas.labels, gtm, progress=progress)
        else:
            img = iterative_yang(data, atlas.labels, gtm, n_iter=n_iter, progress=progress)
        corrected, _n = regional_means(img, atlas.labels, gtm.label_values)
        observed, _n = regional_means(data, atlas.labels, gtm.label_values)
    corrected, observed = to_numpy(corrected), to_numpy(observed)
    rows = [gtm.region_names.index(r) for r in regions]
    empty = [r for r, i in zip(regions, rows) if gtm.status[i] != STATUS_OK]
    if empty:
        raise ValueError(f"{atlas.path}: region(s) {empty} have no voxels in the label image")
    values = np.stack([(observed if r in uncorrected else corrected)[i] for r, i in zip(regions, rows)], axis=1)
    note = f" uncorrected: {list(uncorrected)}" if uncorrected else ""
    return TACTable(pet.frame_start_s, pet.frame_end_s, regions, values,
                    source=f"PVC-{method} TACs of {pet.path}{note}")
