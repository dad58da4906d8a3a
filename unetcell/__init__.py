"""unetcell: the U-Net of Ronneberger, Fischer & Brox (MICCAI 2015) for cells in microscopy.

The modules follow the data flow, each importing only those before it: errors, files, config
-> io, normalize, mirror -> synth -> targets -> augment -> model (and its size arithmetic) ->
data -> losses -> train -> tiling -> postprocess -> predict -> evaluate -> export; the CLI is a
thin layer over them.
"""

__version__ = "0.1.0"
