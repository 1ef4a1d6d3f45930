"""petbind.recon: PET raw data, geometry, projectors and reconstruction.

``import recon`` never needs CuPy; CuPy is imported only when a GPU is used.
"""

__version__ = "0.1.0"
