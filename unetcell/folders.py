"""The dataset folder format: image/mask pairs matched by file stem.

    FOLDER/images/a.tif   8- or 16-bit, grayscale or multi-channel
    FOLDER/masks/a.tif    same stem, same height and width; instance labels or binary

No TensorFlow here: evaluation and other tools find pairs without loading it. A
`tfds:NAME[/CONFIG][:SPLIT]` source (`unetcell.datasets.source`) gives pairs with the same
interface, and only it loads TensorFlow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .io import is_image_file, read_image, read_mask


@dataclass(frozen=True)
class Pair:
    """An image and its mask, matched by file stem."""

    stem: str
    image: Path
    mask: Path | None

    def load_image(self):
        """The image as H x W x C in its stored dtype."""
        return read_image(self.image)

    def load_mask(self):
        """The mask as H x W int32 (binary masks as stored, split into cells later)."""
        return read_mask(self.mask)


def files_by_stem(folder: Path) -> dict[str, Path]:
    """The image files of a folder by stem; two files with one stem is an error naming both."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if not is_image_file(path):
            continue
        if path.stem in files:
            raise DataError(
                f"{folder}: two files share the stem {path.stem!r} "
                f"({files[path.stem].name}, {path.name}); keep one"
            )
        files[path.stem] = path
    return files


def discover_pairs(folder: str | os.PathLike, require_masks: bool = True,
                   unpaired: list[str] | None = None) -> list[Pair]:
    """The image/mask pairs of a dataset folder, sorted by stem.

    Raises DataError for a missing images/ or masks/ folder, an empty folder, an image without
    a mask or a mask without an image (usually a misspelt name). Given an `unpaired` list, the
    last two are appended to it instead while other pairs exist, so that the caller reports
    them together with what reading those pairs finds (one message for the whole folder).
    """
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    if not any(folder.iterdir()):
        raise DataError(f"{folder}: the folder is empty; expected images/ and masks/ in it "
                        "(see data/README.md for the format)")
    if not images_dir.is_dir():
        raise DataError(f"{folder}: expected an images/ folder (see data/README.md for the format)")
    images = files_by_stem(images_dir)
    if not images:
        raise DataError(f"{images_dir}: the folder is empty, no images (.tif, .tiff, .png, .jpg)")
    if not require_masks and not masks_dir.is_dir():
        return [Pair(stem, path, None) for stem, path in images.items()]
    if not masks_dir.is_dir():
        raise DataError(f"{folder}: expected a masks/ folder beside images/")
    masks = files_by_stem(masks_dir)
    problems = [
        f"{images[stem]}: no mask with the stem {stem!r} in {masks_dir}"
        for stem in sorted(set(images) - set(masks))
    ] + [
        f"{masks[stem]}: a mask without an image of the same stem in {images_dir}"
        for stem in sorted(set(masks) - set(images))
    ]
    pairs = [Pair(stem, images[stem], masks[stem]) for stem in sorted(images) if stem in masks]
    if problems and (unpaired is None or not pairs):
        raise DataError.collect(problems, str(folder))
    if problems:
        unpaired.extend(problems)
    return pairs


def find_pairs(data: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
               require_masks: bool = True, unpaired: list[str] | None = None) -> list:
    """The pairs of a dataset folder, or of a `tfds:NAME[/CONFIG][:SPLIT]` data set prepared
    from `manual_dir` (only that one takes a manual folder); `unpaired` as in `discover_pairs`."""
    if str(data).startswith("tfds:"):
        from .datasets.source import tfds_pairs

        return tfds_pairs(str(data), manual_dir, require_masks=require_masks)
    if manual_dir is not None:
        raise DataError(f"{data}: --manual-dir is for tfds: data sets; a folder is read as it is")
    return discover_pairs(data, require_masks=require_masks, unpaired=unpaired)
