"""petbind: raw PET data to binding-potential maps.

Layers, each importing only those below it (see ``docs/architecture.md``)::

    petbind.pipeline   a study, end to end (petbind-study)
    petbind.sim        phantom, kinetics, acquisition, study simulator
    petbind.recon      raw data -> 4-D image          petbind.quant   image -> BP_ND
    petbind.core       frames, decay, files, array namespace
"""

__version__ = "0.2.0"
