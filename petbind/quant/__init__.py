"""petbind.quant: time-activity curves, reference-tissue kinetic models and
baseline vs post-dose comparison.  Never imports ``recon``."""

from petbind import __version__  # noqa: F401  (one version for the distribution)
