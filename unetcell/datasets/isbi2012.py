"""The ISBI 2012 EM segmentation challenge (the paper's first data set, section 4): serial
section TEM of the Drosophila ventral nerve cord, 512 x 512 uint8 slices.

The challenge's files: `train-volume.tif` (a stack of slices), `train-labels.tif` (255 inside
cells, 0 on membranes) and, optionally, `test-volume.tif` (no labels). Cells are the
4-connected components of the 255 pixels, so two cells meeting at a membrane corner stay two.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
import tifffile

from ..errors import DataError
from .common import NO_LABELS, as_labels, check_dtype, features, manual_folder, register_once, require_file

EXPECTED = "the ISBI 2012 challenge's train-volume.tif and train-labels.tif (and optionally test-volume.tif)"


def read_volume(path: Path) -> np.ndarray:
    """A stack of 2D slices as Z x H x W (a single page is one slice)."""
    try:
        volume = tifffile.imread(path)
    except Exception as e:  # tifffile raises several types for a damaged file
        raise DataError(f"{path}: cannot be read as a TIFF stack ({type(e).__name__}: {e})") from None
    if volume.ndim == 2:
        volume = volume[None]
    if volume.ndim != 3:
        raise DataError(f"{path}: expected a stack of 2D gray slices. Received shape {volume.shape}")
    return check_dtype(volume, np.uint8, str(path))


def cells(membranes: np.ndarray, source: str) -> np.ndarray:
    """Instance labels of one label slice: 4-connected components of its 255 pixels."""
    from skimage.measure import label

    values = np.unique(membranes)
    if not set(values.tolist()) <= {0, 255}:
        raise DataError(
            f"{source}: labels must be 0 (membrane) or 255 (cell). Received values {values[:8].tolist()}"
        )
    return as_labels(label(membranes == 255, connectivity=1), source)


with register_once("isbi2012"):

    class Isbi2012(tfds.core.GeneratorBasedBuilder):
        """ISBI 2012 EM segmentation: slices with cell instance labels."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release: train (labelled) and test (unlabelled) slices."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Register at https://imagej.net/events/isbi-2012-segmentation-challenge, download "
            "train-volume.tif and train-labels.tif (and test-volume.tif) and put them in the "
            "manual folder."
        )

        def _info(self) -> tfds.core.DatasetInfo:
            return self.dataset_info_from_configs(
                description=__doc__,
                features=features(tfds.features.Image(shape=(None, None, 1), dtype=np.uint8)),
                homepage="https://imagej.net/events/isbi-2012-segmentation-challenge",
                disable_shuffling=True,  # slice order is meaningful: train[:15] is slices 0-14
            )

        def _split_generators(self, dl_manager):
            folder = manual_folder(dl_manager, EXPECTED)
            volume_path = require_file(folder / "train-volume.tif", "the training slices")
            labels_path = require_file(folder / "train-labels.tif", "the training labels (255 cell, 0 membrane)")
            volume, labels = read_volume(volume_path), read_volume(labels_path)
            if volume.shape != labels.shape:
                raise DataError(
                    f"{labels_path}: shape {labels.shape} (slices, height, width) differs from "
                    f"{volume_path.name}'s {volume.shape}"
                )
            splits = {"train": self._generate_examples(volume, labels, labels_path)}
            if (folder / "test-volume.tif").is_file():
                splits["test"] = self._generate_examples(read_volume(folder / "test-volume.tif"), None, None)
            return splits

        def _generate_examples(self, volume, labels, labels_path):
            for z, section in enumerate(volume):
                instances = NO_LABELS if labels is None else cells(labels[z], f"{labels_path} slice {z}")
                yield z, {"image": section[..., None], "labels": instances, "id": f"slice_{z:02d}"}
