"""What the builders share: the features every one of them yields, the check that a manual
folder holds what a builder expects, and registration that survives a second import.

Every builder yields `image` (H x W x C in the source's dtype), `labels` (H x W uint16 instance
labels, 0 background) and `id` (file-system safe, unique within the data set: it becomes a
file stem in `unetcell convert` and in training reports).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from ..errors import DataError

# An example of a split without annotations (a challenge's test images) carries this: an empty
# label image says "not annotated" where zeros would say "annotated, and no cells".
NO_LABELS = np.zeros((0, 0), np.uint16)


def labels_feature() -> tfds.features.Tensor:
    # zlib keeps instance labels exact at a fraction of their raw size.
    return tfds.features.Tensor(shape=(None, None), dtype=np.uint16, encoding="zlib")


def features(image: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {"image": image, "labels": labels_feature(), "id": tfds.features.Text()}
    )


@contextlib.contextmanager
def register_once(name: str) -> Iterator[None]:
    """Define a builder class inside this block: it registers under `name` the first time and
    is skipped when `name` is taken, so a module imported a second time (reloaded, or loaded
    by file path as `tfds build` does) does not fail with "already registered"."""
    try:
        registered.imported_builder_cls(name)
    except registered.DatasetNotFoundError:
        yield
        return
    with registered.skip_registration():
        yield


def manual_folder(dl_manager: tfds.download.DownloadManager, expected: str) -> Path:
    """The manual folder, or a DataError saying what it should hold (`expected`)."""
    try:
        folder = Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS asserts when the folder is missing or empty
        raise DataError(f"the manual folder is missing or empty; it should hold {expected}") from None
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; it should hold {expected}")
    return folder


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: not found; expected {what} there")
    return path


def as_labels(instances: np.ndarray, source: str) -> np.ndarray:
    """Instance labels as uint16, or a DataError naming `source` when they do not fit."""
    if instances.size and (instances.min() < 0 or instances.max() > np.iinfo(np.uint16).max):
        raise DataError(
            f"{source}: labels must lie in 0..65535 to be stored as uint16. "
            f"Received {instances.min()}..{instances.max()}"
        )
    return instances.astype(np.uint16)


def check_dtype(image: np.ndarray, expected: np.dtype, source: str) -> np.ndarray:
    if image.dtype != expected:
        raise DataError(
            f"{source}: pixel type {image.dtype}, but this data set's images are {np.dtype(expected)}"
        )
    return image
