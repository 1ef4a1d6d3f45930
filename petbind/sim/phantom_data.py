"""Build the digital brain phantom shipped in ``petbind/sim/data/`` (phantom data).

The anatomy is built from smooth analytic shapes (ellipsoids and
superellipsoids, some rotated) combined with distance transforms for shells
(cortex, skull, scalp).  Sizes and positions are patterned on an adult head
(MNI-like proportions: about 150 mm left-right, 190 mm anterior-posterior);
they are meant to be plausible for simulation, not an anatomical atlas.
``scripts/make_phantom.py`` writes the files; :mod:`petbind.sim.phantom`
loads them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from petbind.core.files import atomic_output, write_table_tsv

__all__ = ["LABELS", "VOXEL_MM", "SHAPE", "build_phantom", "write_phantom"]

LOG = logging.getLogger(__name__)

VOXEL_MM = 2.0
SHAPE = (84, 104, 86)
# Grid centred on x = y = 0; z runs from -79 mm (neck) to +91 mm (vertex).
ORIGIN_MM = (-(SHAPE[0] - 1) * VOXEL_MM / 2, -(SHAPE[1] - 1) * VOXEL_MM / 2, -79.0)

#: Label table: index -> name.  Bilateral structures are one label each.
LABELS = {
    0: "background",
    1: "scalp",
    2: "skull",
    3: "csf",
    4: "ventricles",
    5: "white_matter",
    6: "frontal_cortex",
    7: "temporal_cortex",
    8: "parietal_cortex",
    9: "occipital_cortex",
    10: "caudate",
    11: "putamen",
    12: "ventral_striatum",
    13: "pallidum",
    14: "thalamus",
    15: "hippocampus",
    16: "brainstem",
    17: "raphe",
    18: "cerebellum",
    19: "cerebellar_white_matter",
}
IDX = {name: i for i, name in LABELS.items()}

# Linear attenuation coefficients at 511 keV (1/mm), from mass attenuation
# coefficients (NIST XCOM; Hubbell & Seltzer, NISTIR 5632) times density:
# water 0.0960 cm^2/g x 1.00 g/cm^3; ICRU brain 0.0958 x 1.04; ICRU cortical
# bone 0.0903 x 1.92 = 0.173 cm^-1 (the value used for bone in CT-based
# attenuation correction, Kinahan et al. 2003, Semin Nucl Med 33:166-179).
MU_WATER = 0.0096
MU_BRAIN = 0.0099
MU_BONE = 0.0172
MU_BY_LABEL = {
    "background": 0.0,
    "scalp": MU_WATER,
    "skull": MU_BONE,
    "csf": MU_WATER,
    "ventricles": MU_WATER,
}


def _rotation(yaw_deg=0.0, pitch_deg=0.0, roll_deg=0.0):
    """Rotation matrix (about z, then x, then y), degrees."""
    a, b, c = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return ry @ rx @ rz


def superellipsoid(points, centre, semi_axes, exponent=2.0, rotation=None):
    """Boolean mask of ``sum(|R (p - c) / a| ** n) <= 1`` (n = 2: ellipsoid)."""
    d = points - np.asarray(centre, float)
    if rotation is not None:
        d = d @ np.asarray(rotation).T
    return np.sum(np.abs(d / np.asarray(semi_axes, float)) ** exponent, axis=-1) <= 1.0


def bilateral(points, centre, semi_axes, exponent=2.0, yaw_deg=0.0, pitch_deg=0.0, roll_deg=0.0):
    """Union of a structure and its mirror image across the midsagittal plane."""
    cx, cy, cz = centre
    left = superellipsoid(points, (-abs(cx), cy, cz), semi_axes, exponent, _rotation(-yaw_deg, pitch_deg, -roll_deg))
    right = superellipsoid(points, (abs(cx), cy, cz), semi_axes, exponent, _rotation(yaw_deg, pitch_deg, roll_deg))
    return left | right


def build_phantom():
    """Return ``(labels, mu_map_per_mm, affine)`` of the phantom."""
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = ORIGIN_MM
    axes = [ORIGIN_MM[a] + VOXEL_MM * np.arange(SHAPE[a]) for a in range(3)]
    p = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    spacing = (VOXEL_MM,) * 3

    # Cerebrum: one superellipsoid (flattened base) plus the two temporal lobes.
    cerebrum = superellipsoid(p, (0, 2, 14), (62, 80, 58), 2.3)
    temporal_lobes = bilateral(p, (44, 4, -14), (19, 36, 20), 2.0, yaw_deg=-8, pitch_deg=-10)
    cerebrum |= temporal_lobes
    cerebellum_all = bilateral(p, (20, -60, -38), (27, 24, 17), 2.0, yaw_deg=15)
    vermis = superellipsoid(p, (0, -58, -36), (10, 22, 18))
    cerebellum_all |= vermis
    brainstem = superellipsoid(p, (0, -22, -42), (11, 12, 32), 2.4, _rotation(pitch_deg=12))
    # Intracranial space: brain dilated by a few mm of CSF (distance transform
    # keeps the surface smooth).
    brain = cerebrum | cerebellum_all | brainstem
    intracranial = ndimage.distance_transform_edt(~brain, sampling=spacing) <= 3.0
    dist_out = ndimage.distance_transform_edt(~intracranial, sampling=spacing)
    skull = (dist_out > 0) & (dist_out <= 7.0)
    scalp = (dist_out > 7.0) & (dist_out <= 13.0)
    # Neck: soft tissue below the skull base.
    neck = superellipsoid(p, (0, -18, -90), (46, 52, 60), 2.5)
    neck &= ~intracranial & ~skull & (z < -40)

    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[scalp | neck] = IDX["scalp"]
    labels[skull] = IDX["skull"]
    labels[intracranial] = IDX["csf"]

    # Cortex: the outer 9 mm of the cerebrum (thicker than the 2-4 mm of real
    # cortex so that the unfolded shell holds a realistic grey-matter volume); lobes split by smooth planes.
    depth = ndimage.distance_transform_edt(cerebrum, sampling=spacing)
    cortex = cerebrum & (depth <= 9.0)
    labels[cerebrum] = IDX["white_matter"]
    lobe = np.full(SHAPE, IDX["parietal_cortex"], dtype=np.uint8)
    lobe[y + 0.35 * z > 12.0] = IDX["frontal_cortex"]
    lobe[(y - 0.3 * z < -52.0)] = IDX["occipital_cortex"]
    temporal_zone = ndimage.binary_dilation(temporal_lobes, iterations=2) & (z < 2.0) & (np.abs(x) > 30)
    lobe[temporal_zone & (y + 0.35 * z <= 24.0)] = IDX["temporal_cortex"]
    labels[cortex] = lobe[cortex]
    # Interhemispheric fissure: a CSF gap between the hemispheres above the corpus callosum.
    fissure = cerebrum & (np.abs(x) < 2.0) & (z > 26.0)
    labels[fissure] = IDX["csf"]

    # Cerebellum: grey matter shell (the reference region) and white matter core.
    cdepth = ndimage.distance_transform_edt(cerebellum_all, sampling=spacing)
    labels[cerebellum_all] = IDX["cerebellum"]
    labels[cerebellum_all & (cdepth > 7.0) & ~vermis] = IDX["cerebellar_white_matter"]
    labels[brainstem & (z < 0)] = IDX["brainstem"]
    # Dorsal/median raphe: a thin midline column in the upper brainstem.
    labels[superellipsoid(p, (0, -27, -24), (2.5, 3.5, 9.0), 2.0, _rotation(pitch_deg=12))] = IDX["raphe"]

    # Deep grey nuclei (MNI-like centres, mm).
    labels[bilateral(p, (10, -17, 6), (9, 15, 10), 2.0, yaw_deg=10)] = IDX["thalamus"]
    labels[bilateral(p, (27, 2, 0), (7, 16, 11), 2.0, yaw_deg=-10)] = IDX["putamen"]
    labels[bilateral(p, (19, -2, -2), (4, 9, 6), 2.0, yaw_deg=-10)] = IDX["pallidum"]
    labels[bilateral(p, (15, 12, 10), (6, 12, 10), 2.0, yaw_deg=-12)] = IDX["caudate"]
    labels[bilateral(p, (10, 13, -8), (6, 7, 5), 2.0)] = IDX["ventral_striatum"]
    labels[bilateral(p, (28, -20, -14), (7, 20, 7), 2.0, yaw_deg=-12, pitch_deg=-20)] = IDX["hippocampus"]
    # Lateral ventricles (bodies and anterior horns), medial to the caudate,
    # and a thin third ventricle between the thalami.
    labels[bilateral(p, (6, -2, 15), (5, 28, 8), 2.0, yaw_deg=-5)] = IDX["ventricles"]
    labels[superellipsoid(p, (0, -12, 2), (1.5, 14, 7))] = IDX["ventricles"]

    mu = np.full(SHAPE, MU_BRAIN, dtype=np.float32)
    for name, value in MU_BY_LABEL.items():
        mu[labels == IDX[name]] = value
    return labels, mu, affine


def _save_nifti(data, affine, path):
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(img, tmp)


def write_phantom(out_dir):
    """Build the phantom and write its three files into ``out_dir`` (atomically).

    Returns
    -------
    dict
        Region name -> volume (mL).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, mu, affine = build_phantom()
    _save_nifti(labels, affine, out / "brain_phantom_labels.nii.gz")
    _save_nifti(mu, affine, out / "brain_phantom_mumap.nii.gz")
    write_table_tsv(out / "brain_phantom_labels.tsv", ["index", "name"], [[i, n] for i, n in LABELS.items()])
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    return {name: counts[i] * VOXEL_MM**3 / 1000 for i, name in LABELS.items()}
