"""The 2018 Data Science Bowl nuclei (BBBC038, CC0): fluorescence, brightfield and stained
tissue images of many sizes, one binary mask per nucleus.

The competition's layout: `stage1_train/<id>/images/<id>.png` (RGBA) with
`stage1_train/<id>/masks/*.png`, and optionally `stage1_test/<id>/images/<id>.png` without
masks. The alpha channel is dropped and an image whose three colour channels are equal keeps
one, so fluorescence images come out with 1 channel and stained tissue with 3. The channel
count varies between examples, which TFDS's Image feature cannot hold, so `image` is a
zlib-compressed uint8 tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ..errors import DataError
from ..io import read_image, read_mask
from .common import NO_LABELS, as_labels, check_dtype, features, manual_folder, register_once, require_file

EXPECTED = "the Data Science Bowl 2018 folder stage1_train/<id>/images/<id>.png with stage1_train/<id>/masks/*.png"


def read_dsb_image(path: Path) -> np.ndarray:
    """H x W x 1 when the colour channels are equal (alpha dropped), H x W x 3 otherwise."""
    image = check_dtype(read_image(path), np.uint8, str(path))
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 1]) \
            and np.array_equal(image[..., 0], image[..., 2]):
        image = image[..., :1]
    if image.shape[2] not in (1, 3):
        raise DataError(f"{path}: expected a gray, RGB or RGBA image. Received {image.shape[2]} channels")
    return image


def merged_masks(folder: Path, shape: tuple[int, int]) -> np.ndarray:
    """One label image from one binary mask per nucleus (label k+1 for the k-th file by name)."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not paths:
        raise DataError(f"{folder}: no masks (one binary .png per nucleus expected)")
    labels = np.zeros(shape, np.int32)
    for k, path in enumerate(paths, start=1):
        mask = read_mask(path)
        if mask.shape != shape:
            raise DataError(
                f"{path}: mask is {mask.shape[0]} x {mask.shape[1]} but its image is {shape[0]} x {shape[1]}"
            )
        inside = mask > 0
        overlap = np.unique(labels[inside & (labels > 0)])
        if overlap.size:
            raise DataError(f"{path}: overlaps the nucleus of {paths[overlap[0] - 1].name}; masks must not overlap")
        labels[inside] = k
    return as_labels(labels, str(folder))


def samples(stage: Path) -> list[tuple[str, Path]]:
    """(id, image path) of every sample folder of a stage, sorted by id."""
    found = []
    for sample in sorted(p for p in stage.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.append((sample.name, require_file(sample / "images" / f"{sample.name}.png", "the sample's image")))
    if not found:
        raise DataError(f"{stage}: no sample folders; expected {EXPECTED}")
    return found


with register_once("dsb2018"):

    class Dsb2018(tfds.core.GeneratorBasedBuilder):
        """Data Science Bowl 2018 nuclei with merged instance labels."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release: stage1_train (labelled) and stage1_test (unlabelled)."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Download stage1_train.zip (and stage1_test.zip) from "
            "https://www.kaggle.com/c/data-science-bowl-2018/data or BBBC038 "
            "(https://bbbc.broadinstitute.org/BBBC038) and unpack them into the manual folder as "
            "stage1_train/ and stage1_test/."
        )

        def _info(self) -> tfds.core.DatasetInfo:
            return self.dataset_info_from_configs(
                description=__doc__,
                features=features(tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding="zlib")),
                homepage="https://bbbc.broadinstitute.org/BBBC038",
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            folder = manual_folder(dl_manager, EXPECTED)
            stage = folder / "stage1_train"
            if not stage.is_dir():
                raise DataError(f"{folder}: no stage1_train/ folder; expected {EXPECTED}")
            splits = {"train": self._generate_examples(samples(stage), labelled=True)}
            if (folder / "stage1_test").is_dir():
                splits["test"] = self._generate_examples(samples(folder / "stage1_test"), labelled=False)
            return splits

        def _generate_examples(self, found, labelled):
            for sample_id, image_path in found:
                image = read_dsb_image(image_path)
                masks = image_path.parent.parent / "masks"
                if labelled and not masks.is_dir():
                    raise DataError(f"{image_path.parent.parent}: no masks/ folder beside images/")
                labels = merged_masks(masks, image.shape[:2]) if labelled else NO_LABELS
                yield sample_id, {"image": image, "labels": labels, "id": sample_id}
