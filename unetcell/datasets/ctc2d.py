"""The Cell Tracking Challenge's 2D data sets (http://celltrackingchallenge.net), one builder
config each; the paper's are PhC-C2DH-U373 (glioblastoma cells, phase contrast) and
DIC-C2DH-HeLa (HeLa cells, DIC), both 8-bit.

The challenge's training archive unpacked into the manual folder: `<config>/<seq>/tNNN.tif`
frames and `<config>/<seq>_GT/SEG/man_segNNN.tif` uint16 instance labels for the frames
that were annotated for segmentation. Only those frames become examples, with id
`<seq>_tNNN`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from ..errors import DataError
from ..io import read_image, read_mask
from .common import as_labels, check_dtype, features, manual_folder, register_once

SEGMENTATION = re.compile(r"man_seg(\d+)\.tif")
FRAME = re.compile(r"t(\d+)\.tif")


@dataclasses.dataclass(eq=False)
class Ctc2dConfig(tfds.core.BuilderConfig):
    """One Cell Tracking Challenge 2D data set; `dtype` is its frames' pixel type."""

    dtype: str = "uint8"


def annotated_frames(root: Path, dtype: str) -> list[tuple[str, Path, Path]]:
    """(id, frame, segmentation) of every annotated frame under a data set's folder, by
    sequence and frame number. A segmentation without its frame is an error naming both."""
    found = []
    sequences = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    for sequence in sequences:
        annotations = sequence.parent / f"{sequence.name}_GT" / "SEG"
        if not annotations.is_dir():
            continue  # a sequence without segmentation truth contributes nothing
        frames = {int(m.group(1)): p for p in sequence.iterdir() if (m := FRAME.fullmatch(p.name))}
        for path in sorted(annotations.iterdir()):
            match = SEGMENTATION.fullmatch(path.name)
            if not match:
                continue
            t = int(match.group(1))
            if t not in frames:
                raise DataError(
                    f"{path}: annotates frame {t}, but {sequence} has no t{match.group(1)}.tif"
                )
            found.append((f"{sequence.name}_t{match.group(1)}", frames[t], path))
    if not found:
        raise DataError(
            f"{root}: no annotated frames; expected sequence folders such as {root / '01'}/t000.tif "
            f"with segmentations in {root / '01_GT' / 'SEG'}/man_seg000.tif"
        )
    return found


with register_once("ctc2d"):

    class Ctc2d(tfds.core.GeneratorBasedBuilder):
        """Cell Tracking Challenge 2D: annotated frames with their instance labels."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First release: the annotated frames of the training sequences."}
        BUILDER_CONFIGS = [
            Ctc2dConfig(name="PhC-C2DH-U373", description="Glioblastoma-astrocytoma U373 cells on "
                        "a polyacrylamide substrate, phase contrast (paper Table 2)."),
            Ctc2dConfig(name="DIC-C2DH-HeLa", description="HeLa cells on a flat glass, "
                        "differential interference contrast (paper Table 2)."),
        ]
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Download a data set's training archive (e.g. PhC-C2DH-U373.zip) from "
            "http://celltrackingchallenge.net/2d-datasets/ and unpack it into the manual folder, "
            "so that it holds PhC-C2DH-U373/01/t000.tif and PhC-C2DH-U373/01_GT/SEG/."
        )

        def _info(self) -> tfds.core.DatasetInfo:
            dtype = np.dtype(self.builder_config.dtype)
            return self.dataset_info_from_configs(
                description=__doc__,
                features=features(tfds.features.Image(shape=(None, None, 1), dtype=dtype)),
                homepage="http://celltrackingchallenge.net/2d-datasets/",
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            name = self.builder_config.name
            folder = manual_folder(dl_manager, f"the Cell Tracking Challenge folder {name}/")
            root = folder / name
            if not root.is_dir():
                raise DataError(
                    f"{folder}: no {name}/ folder; expected the challenge's training archive "
                    f"unpacked there ({name}/01/t000.tif, {name}/01_GT/SEG/man_seg000.tif)"
                )
            return {"train": self._generate_examples(annotated_frames(root, self.builder_config.dtype))}

        def _generate_examples(self, found):
            dtype = np.dtype(self.builder_config.dtype)
            for example_id, frame_path, segmentation_path in found:
                image = check_dtype(read_image(frame_path), dtype, str(frame_path))
                if image.shape[2] != 1:
                    raise DataError(f"{frame_path}: expected a gray frame. Received {image.shape[2]} channels")
                labels = read_mask(segmentation_path)
                if labels.shape != image.shape[:2]:
                    raise DataError(
                        f"{segmentation_path}: is {labels.shape[0]} x {labels.shape[1]} but its frame "
                        f"{frame_path.name} is {image.shape[0]} x {image.shape[1]}"
                    )
                yield example_id, {"image": image, "labels": as_labels(labels, str(segmentation_path)),
                                   "id": example_id}
