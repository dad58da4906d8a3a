"""Public microscopy data sets as tensorflow-datasets builders, read from the data sets' own
layouts in a manual folder (nothing is downloaded):

    isbi2012                ISBI 2012 EM segmentation (the paper's first data set)
    dsb2018                 Data Science Bowl 2018 nuclei
    ctc2d/PhC-C2DH-U373     Cell Tracking Challenge 2D data sets (paper Table 2), one config each
    ctc2d/DIC-C2DH-HeLa

Importing this package registers them with TFDS:

    import tensorflow_datasets as tfds
    import unetcell.datasets
    builder = tfds.builder("isbi2012", data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="isbi"))

`unetcell.datasets.source` turns a `tfds:NAME[/CONFIG][:SPLIT]` spec into the image/mask pairs
that training and evaluation read, exactly as they read a folder.
"""

from .ctc2d import Ctc2d
from .dsb2018 import Dsb2018
from .isbi2012 import Isbi2012

BUILDERS = {"isbi2012": Isbi2012, "dsb2018": Dsb2018, "ctc2d": Ctc2d}

__all__ = ["BUILDERS", "Ctc2d", "Dsb2018", "Isbi2012"]
