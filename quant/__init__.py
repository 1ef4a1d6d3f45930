"""petbind.quant: time-activity curves, reference-tissue kinetic models and
baseline vs post-dose comparison.  Never imports ``recon``."""

__version__ = "0.1.0"
