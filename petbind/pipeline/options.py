"""Settings of a study run and the provenance recorded in every derived file.

Each stage of a session (reconstruction, TACs, regional fit, parametric maps)
and the group stage has a *key*: a digest of the settings that change its
output, the checksums of its input files and the key of the stage it reads
from.  The key and the full record (settings, inputs, software versions) go
into the JSON sidecar of every file the stage writes.  A rerun recomputes
the keys and redoes exactly the stages whose key changed, or whose outputs
are missing or unreadable; nothing stale survives a change of settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from petbind import __version__
from petbind.quant.models import MODELS
from petbind.recon.corrections import SCATTER_FWHM_MM

__all__ = [
    "DEFAULT_EXCLUDED_REGIONS",
    "DEVICE_CHOICES",
    "PVC_CHOICES",
    "PipelineOptions",
    "StudyInputError",
    "file_checksum",
    "stage_key",
    "provenance",
    "PIPELINE_VERSION",
]

DEVICE_CHOICES = ("auto", "cpu", "gpu")
#: Partial-volume correction of the regional TACs (see :mod:`petbind.quant.pvc`).
PVC_CHOICES = ("none", "gtm", "rbv")
#: Atlas regions not fitted by default: outside the brain, or fluid without receptors.
DEFAULT_EXCLUDED_REGIONS = ("scalp", "skull", "csf", "ventricles")
#: Bump when a stage's output changes for the same settings (invalidates every key).
PIPELINE_VERSION = 3


class StudyInputError(ValueError):
    """Bad input to a study run (reported as one line, exit status 2)."""


@dataclass
class PipelineOptions:
    """Settings of a study run (the ``petbind-study`` options).

    Parameters
    ----------
    model : str
        Kinetic model, one of :data:`petbind.quant.models.MODELS`.
    reference : str
        Reference region name in the atlas.
    iterations, subsets : int
        OSEM iterations and view subsets (at most the layout's views).  The
        defaults, 4 x 24, converge regional means of regions of a few mL
        after GTM on the demo scanner at the cost of 4 passes over the data
        (``benchmarks/fidelity.py``).
    psf_fwhm_mm : float or None
        Resolution model in OSEM (FWHM, mm); ``0`` switches it off.
        ``None``: the scanner preset's PSF with ``pvc="none"``, none with
        PVC (see :func:`petbind.pipeline.reconstruct.psf_for`).
    pvc : {"none", "gtm", "rbv"}
        Partial-volume correction of the regional TACs (GTM; RBV also for
        maps) using the measured effective resolution of the reconstruction.
    pvc_fwhm_mm : float or None
        Effective resolution (FWHM, mm) for PVC; ``None``: measured by
        reconstructing point sources with the same settings.
    device : {"auto", "cpu", "gpu"}
    frames : str or None
        Frame definition overriding the sidecars (``"6x10s,3x20s"``).
    maps : bool
        Also voxelwise parametric maps (and voxelwise group maps).
    quiet, force : bool
    sensitivity_cps_per_kbq : float or None
        Compute κ from this point-source sensitivity instead of reading the
        file's calibration factor.
    num_radial, max_ring_difference : int or None
        Sinogram layout for listmode input; ``None``: the range of the events.
    weights : {"none", "duration", "counts"}
        Frame weights of the regional fits.
    regions : tuple of str or None
        Target regions (default: every atlas region not excluded).
    exclude_regions : tuple of str
        Atlas regions neither fitted nor compared.
    baseline_session, post_session : str
    groups : tuple of str
        The declared groups of ``participants.tsv`` (exactly these, each
        with at least one subject).
    n_permutations : int
        Random relabelings of the group × time permutation test.
    tof : bool
        Keep TOF bins of TOF files (False sums them).
    scatter_fwhm_mm : float
        Blur width of the scatter model (mm).
    acq, run : str or None
        BIDS entities selecting one raw file where a session holds several.
    workers : int or None
        Start a local Dask cluster with this many worker processes.
    scheduler : str or None
        Address of an existing ``dask.distributed`` scheduler to join.
    listmode_osem : {"auto", "always", "never"}
        Listmode input: reconstruct a frame from its events instead of its
        sinogram; ``auto`` does so for frames with fewer than 0.1 prompts per
        sinogram bin (the short early frames; the crossover measured by
        ``benchmarks/listmode_crossover.py``).  Span-1 layouts only.
    """

    model: str = "srtm"
    reference: str = "cerebellum"
    iterations: int = 4
    subsets: int = 24
    psf_fwhm_mm: float | None = None
    pvc: str = "gtm"
    pvc_fwhm_mm: float | None = None
    device: str = "auto"
    frames: str | None = None
    maps: bool = False
    quiet: bool = False
    force: bool = False
    sensitivity_cps_per_kbq: float | None = None
    num_radial: int | None = None
    max_ring_difference: int | None = None
    weights: str = "duration"
    regions: tuple | None = None
    exclude_regions: tuple = DEFAULT_EXCLUDED_REGIONS
    baseline_session: str = "baseline"
    post_session: str = "postdose"
    groups: tuple = ("drug", "placebo")
    n_permutations: int = 10000
    tof: bool = True
    scatter_fwhm_mm: float = SCATTER_FWHM_MM
    acq: str | None = None
    run: str | None = None
    workers: int | None = None
    scheduler: str | None = None
    listmode_osem: str = "auto"

    def validate(self):
        """Refuse impossible settings with one line naming the option."""
        if self.model not in MODELS:
            raise StudyInputError(f"--model {self.model!r} is unknown; choose one of {list(MODELS)}")
        if self.device not in DEVICE_CHOICES:
            raise StudyInputError(f"--device {self.device!r} is unknown; choose one of {list(DEVICE_CHOICES)}")
        if self.pvc not in PVC_CHOICES:
            raise StudyInputError(f"--pvc {self.pvc!r} is unknown; choose one of {list(PVC_CHOICES)}")
        if int(self.iterations) < 1 or int(self.subsets) < 1:
            raise StudyInputError(f"--iterations and --subsets must be >= 1; got {self.iterations}, {self.subsets}")
        for name in ("psf_fwhm_mm", "pvc_fwhm_mm"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise StudyInputError(f"--{name.replace('_', '-')} must be a finite number >= 0; got {v}")
        if self.sensitivity_cps_per_kbq is not None and not (
            math.isfinite(self.sensitivity_cps_per_kbq) and self.sensitivity_cps_per_kbq > 0
        ):
            raise StudyInputError(f"--sensitivity-cps-per-kbq must be positive; got {self.sensitivity_cps_per_kbq}")
        if not (math.isfinite(self.scatter_fwhm_mm) and self.scatter_fwhm_mm > 0):
            raise StudyInputError(f"--scatter-fwhm-mm must be positive; got {self.scatter_fwhm_mm}")
        if self.weights not in ("none", "duration", "counts"):
            raise StudyInputError(f"--weights {self.weights!r} is unknown; choose none, duration or counts")
        if self.regions is not None and self.reference in self.regions:
            raise StudyInputError(f"--regions: the reference region '{self.reference}' cannot also be a target "
                                  "(it would be fitted against itself)")
        if self.reference in self.exclude_regions:
            raise StudyInputError(f"--exclude-regions: the reference region '{self.reference}' cannot be excluded")
        if len(self.groups) != len(set(self.groups)) or len(self.groups) < 1:
            raise StudyInputError(f"--groups must name distinct groups; got {list(self.groups)}")
        if self.baseline_session == self.post_session:
            raise StudyInputError("--baseline-session and --post-session must differ")
        if self.workers is not None and int(self.workers) < 1:
            raise StudyInputError(f"--workers must be >= 1; got {self.workers}")
        if self.workers is not None and self.scheduler is not None:
            raise StudyInputError("--workers starts a local cluster and --scheduler joins one; give only one")
        if self.listmode_osem not in ("auto", "always", "never"):
            raise StudyInputError(f"--listmode-osem must be auto, always or never; got {self.listmode_osem!r}")
        if int(self.n_permutations) < 1:
            raise StudyInputError(f"--n-permutations must be >= 1; got {self.n_permutations}")

    # settings that change each stage's output (never quiet/force/workers/device choice of scheduling)
    def stage_settings(self, stage):
        """The settings that change the output of ``stage``.

        Parameters
        ----------
        stage : {"recon", "tacs", "fit", "maps", "group"}
        """
        names = {
            "recon": ("iterations", "subsets", "psf_fwhm_mm", "frames", "sensitivity_cps_per_kbq", "num_radial",
                      "max_ring_difference", "tof", "scatter_fwhm_mm", "acq", "run", "listmode_osem"),
            "tacs": ("pvc", "pvc_fwhm_mm", "regions", "exclude_regions", "reference"),
            "fit": ("model", "reference", "weights"),
            "maps": ("model", "reference", "weights", "pvc", "pvc_fwhm_mm", "regions", "exclude_regions"),
            "group": ("model", "baseline_session", "post_session", "groups", "n_permutations", "maps"),
        }[stage]
        out = {n: _jsonable(getattr(self, n)) for n in names}
        if stage == "recon":
            # what the defaults resolve to (psf_for, and the resolution measured for PVC)
            out["psf_model"] = ("scanner" if self.pvc == "none" else "none") if self.psf_fwhm_mm is None \
                else float(self.psf_fwhm_mm)
            out["measure_resolution"] = self.pvc != "none" and self.pvc_fwhm_mm is None
        return out

    def to_dict(self):
        return {k: _jsonable(v) for k, v in asdict(self).items()}

    @classmethod
    def field_names(cls):
        return [f.name for f in dataclasses.fields(cls)]


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


_CHECKSUMS = {}


def file_checksum(path):
    """SHA-256 of a file (hex), memoised by (path, size, mtime) within a process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKSUMS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _CHECKSUMS[key] = h.hexdigest()
    return _CHECKSUMS[key]


def stage_key(stage, settings, inputs=(), upstream=None):
    """Digest of a stage's settings, input checksums and upstream key.

    Parameters
    ----------
    stage : str
    settings : dict
        JSON-serialisable settings of the stage.
    inputs : sequence of path
        Files the stage reads (checksummed).
    upstream : str or None
        Key of the stage whose output this one reads.

    Returns
    -------
    key : str
        16 hex digits.
    record : dict
        What went into the key (for the sidecar).
    """
    record = {
        "Stage": stage,
        "PipelineVersion": PIPELINE_VERSION,
        "Settings": settings,
        # by file name, not path: a study folder that is moved or copied keeps its keys
        "Inputs": {Path(p).name: file_checksum(p) for p in inputs},
        "Upstream": upstream,
    }
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return key, record


def provenance(key, record):
    """The ``PipelineProvenance`` sidecar entry: the key, what made it, software versions."""
    import numpy
    import scipy

    return {"Key": key, **record, "Software": {"petbind": __version__, "numpy": numpy.__version__,
                                                "scipy": scipy.__version__, "python": platform.python_version()},
            "Host": os.uname().nodename if hasattr(os, "uname") else "n/a"}
