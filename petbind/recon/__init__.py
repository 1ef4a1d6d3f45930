"""petbind.recon: PET raw data, geometry, projectors and reconstruction.

``import recon`` never needs CuPy; CuPy is imported only when a GPU is used.
"""

from petbind import __version__  # noqa: F401  (one version for the distribution)
