"""Augmented TFRecords (official/vision's TF Example format) of one DSB 2018 nuclei image, for
the Mask R-CNN of `tf-models-official` (run in its own environment: README.md here).

    python prepare.py DATA 1d4a5e72 train-a.tfrecord 200 1

Each example is a 512 x 512 canvas at the image's own pixel scale: an image smaller than that
(1d4a5e72, 256 x 256) becomes a 2 x 2 mosaic of independently flipped and rotated copies, a
larger one (212b858a, 520 x 696) is flipped and rotated, then cropped at random. Intensities
are stretched between the image's 1st and 99.8th percentiles to uint8 and the gray copied to
three channels; each nucleus is a 0/1 PNG mask, class 1.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from official.vision.data import tfrecord_lib
from PIL import Image

CANVAS = 512


def sample_folder(data: Path, prefix: str) -> Path:
    """The DSB 2018 sample whose id starts with `prefix`."""
    found = sorted((data / "dsb2018" / "stage1_train").glob(prefix + "*"))
    if len(found) != 1:
        raise SystemExit(f"{data}: expected one DSB 2018 sample starting {prefix!r}, found {len(found)}")
    return found[0]


def stretch(gray: np.ndarray) -> np.ndarray:
    low, high = np.percentile(gray, (1, 99.8))
    return (np.clip((gray - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def load_image(data: Path, prefix: str) -> tuple[np.ndarray, Path]:
    """(uint8 gray image, its sample folder)."""
    folder = sample_folder(data, prefix)
    rgb = np.asarray(Image.open(folder / "images" / f"{folder.name}.png"))[..., :3].astype(np.float32)
    return stretch(rgb.mean(-1)), folder


def load_labels(folder: Path, shape: tuple[int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for index, path in enumerate(sorted((folder / "masks").glob("*.png")), 1):
        labels[np.asarray(Image.open(path)) > 0] = index
    return labels


def dihedral(rng, image, labels):
    turns = rng.integers(4)
    image, labels = np.rot90(image, turns), np.rot90(labels, turns)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return image, labels


def canvas(rng, image, labels):
    height, width = image.shape
    if height >= CANVAS and width >= CANVAS:
        image, labels = dihedral(rng, image, labels)
        y = rng.integers(image.shape[0] - CANVAS + 1)
        x = rng.integers(image.shape[1] - CANVAS + 1)
        return (np.ascontiguousarray(image[y:y + CANVAS, x:x + CANVAS]),
                np.ascontiguousarray(labels[y:y + CANVAS, x:x + CANVAS]))
    out_image = np.zeros((CANVAS, CANVAS), np.uint8)
    out_labels = np.zeros((CANVAS, CANVAS), np.int32)
    half = CANVAS // 2
    for k, (y, x) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        a, b = dihedral(rng, image, labels)
        a, b = a[:half, :half], b[:half, :half]
        out_image[y:y + a.shape[0], x:x + a.shape[1]] = a
        out_labels[y:y + a.shape[0], x:x + a.shape[1]] = np.where(b > 0, b + k * labels.max(), 0)
    return out_image, out_labels


def to_example(image: np.ndarray, labels: np.ndarray, source_id: int) -> tuple[tf.train.Example, int]:
    encoded = io.BytesIO()
    Image.fromarray(np.repeat(image[..., None], 3, -1)).save(encoded, format="PNG")
    height, width = image.shape
    boxes, areas, masks = [], [], []
    for index in np.unique(labels[labels > 0]):
        mask = labels == index
        ys, xs = np.nonzero(mask)
        if len(ys) < 4:  # slivers cut by the canvas edge
            continue
        boxes.append((ys.min() / height, xs.min() / width, (ys.max() + 1) / height, (xs.max() + 1) / width))
        areas.append(float(mask.sum()))
        masks.append(tfrecord_lib.encode_mask_as_png(mask.astype(np.uint8)))
    n = len(areas)
    box = np.array(boxes, np.float32).reshape(-1, 4)
    feature = tfrecord_lib.convert_to_feature
    features = {
        "image/encoded": feature(encoded.getvalue()),
        "image/format": feature(b"png"),
        "image/height": feature(height),
        "image/width": feature(width),
        "image/source_id": feature(str(source_id).encode()),
        "image/object/bbox/ymin": feature(box[:, 0].tolist(), "float_list"),
        "image/object/bbox/xmin": feature(box[:, 1].tolist(), "float_list"),
        "image/object/bbox/ymax": feature(box[:, 2].tolist(), "float_list"),
        "image/object/bbox/xmax": feature(box[:, 3].tolist(), "float_list"),
        "image/object/class/label": feature([1] * n, "int64_list"),
        "image/object/class/text": feature([b"nucleus"] * n, "bytes_list"),
        "image/object/is_crowd": feature([0] * n, "int64_list"),
        "image/object/area": feature(areas, "float_list"),
        "image/object/mask": feature(masks, "bytes_list"),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)), n


def main(argv: list[str]) -> None:
    data, prefix, out, count = Path(argv[0]), argv[1], argv[2], int(argv[3])
    rng = np.random.default_rng(int(argv[4]) if len(argv) > 4 else 0)
    image, folder = load_image(data, prefix)
    labels = load_labels(folder, image.shape)
    counts = []
    with tf.io.TFRecordWriter(out) as writer:
        for k in range(count):
            example, n = to_example(*canvas(rng, image, labels), k)
            counts.append(n)
            writer.write(example.SerializeToString())
    print(f"{prefix}: {image.shape}, {labels.max()} nuclei -> {count} examples, "
          f"{min(counts)}-{max(counts)} nuclei each")


if __name__ == "__main__":
    main(sys.argv[1:])
