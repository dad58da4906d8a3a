"""Pictures of a segmentation: cell contours drawn on the image, to see where a model is wrong.

True cells are outlined in green, predicted cells in magenta; where both outlines fall on the
same pixel it turns white, so a good prediction reads as white rings. Optionally, predicted
cells that match no true cell (false positives) are filled translucent red and true cells that
no prediction matches (misses) translucent blue: the errors that the instance scores count.

Pure numpy and scikit-image, so training callbacks, `predict --overlay` and `evaluate
--overlay` can all draw without TensorFlow. Large slides are shown on an integer stride so the
picture stays a few megapixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from .io import write_png
from .normalize import subsample_stride

TRUTH_COLOUR = (0, 255, 0)  # green
PREDICTED_COLOUR = (255, 0, 255)  # magenta
BOTH_COLOUR = (255, 255, 255)  # white: a predicted contour on a true one
FALSE_POSITIVE_COLOUR = (255, 0, 0)  # red fill
MISS_COLOUR = (0, 96, 255)  # blue fill
FILL_ALPHA = 0.4

# The display stretch: the same percentiles as the default normalisation, so a picture looks
# like what the network is shown.
_LOW_PERCENTILE, _HIGH_PERCENTILE = 1.0, 99.8
# Percentiles of a large image come from a strided sample of about this many pixels.
_SAMPLE_PIXELS = 1_000_000


def display_stride(height: int, width: int, max_edge: int = 2048) -> int:
    """The integer stride that brings the longer edge of an image to at most `max_edge`."""
    return max(1, -(-max(height, width) // max(int(max_edge), 1)))


def _stretch(channel: np.ndarray) -> np.ndarray:
    """One channel contrast-stretched to 0..255 by its 1st / 99.8th percentiles."""
    channel = channel.astype(np.float32, copy=False)
    step = subsample_stride(channel.shape[0], channel.shape[1], _SAMPLE_PIXELS)
    sample = channel[::step, ::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(channel.shape, np.uint8)
    low, high = np.percentile(sample, [_LOW_PERCENTILE, _HIGH_PERCENTILE])
    if high <= low:  # a flat channel: shown black rather than dividing by zero
        high = low + 1.0
    scaled = (channel - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).astype(np.uint8)


def to_display(image: np.ndarray) -> np.ndarray:
    """An image as H x W x 3 uint8 for a picture.

    `image` is H x W or H x W x C, raw (any dtype) or normalised. One channel is shown as gray,
    three or more as RGB from the first three (RGBA keeps its colours, the alpha is dropped),
    two as gray from the first. Each channel is stretched by its own 1st / 99.8th percentiles,
    so a dim 16-bit fluorescence image is as readable as an 8-bit one.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"Expected an H x W or H x W x C image. Received shape {image.shape}")
    channels = [0, 1, 2] if image.shape[2] >= 3 else [0, 0, 0]
    stretched = {c: _stretch(image[..., c]) for c in set(channels)}
    return np.stack([stretched[c] for c in channels], axis=-1)


def _fill(rgb: np.ndarray, where: np.ndarray, colour: tuple[int, int, int]) -> None:
    blended = (1 - FILL_ALPHA) * rgb[where] + FILL_ALPHA * np.asarray(colour, np.float32)
    rgb[where] = blended.astype(np.uint8)


def contour_overlay(
    image: np.ndarray | None,
    predicted: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    max_edge: int = 2048,
    false_positives: Iterable[int] | None = None,
    misses: Iterable[int] | None = None,
) -> np.ndarray:
    """Contours of predicted (magenta) and true (green) cells on the image, as uint8 RGB.

    `predicted` and `truth` are H x W instance label images (0 background); either may be
    None. `image` is H x W or H x W x C (see `to_display`), or None for a black background.
    `false_positives` lists predicted labels and `misses` true labels to fill translucent red
    and blue. Contours are each cell's inner boundary (`find_boundaries(mode="inner")`), one
    pixel wide, so touching cells keep separate outlines.

    An image with an edge longer than `max_edge` is shown on an integer stride; the label
    images are strided the same way (never interpolated, which would invent labels at cell
    borders), and contours are found after striding so they stay visible at the picture's size.
    """
    layers = [a for a in (image, predicted, truth) if a is not None]
    if not layers:
        raise ValueError("contour_overlay needs an image or a label image")
    height, width = np.shape(layers[0])[:2]
    for name, labels in (("predicted", predicted), ("truth", truth)):
        if labels is not None and np.shape(labels) != (height, width):
            raise ValueError(
                f"{name} labels must be {height} x {width} like the image. "
                f"Received shape {np.shape(labels)}"
            )
    if image is not None and np.shape(image)[:2] != (height, width):
        raise ValueError(f"image must be {height} x {width}. Received shape {np.shape(image)}")

    step = display_stride(height, width, max_edge)
    if image is None:
        rgb = np.zeros(((height + step - 1) // step, (width + step - 1) // step, 3), np.uint8)
    else:
        rgb = to_display(np.asarray(image)[::step, ::step])
    pred = None if predicted is None else np.asarray(predicted)[::step, ::step]
    true = None if truth is None else np.asarray(truth)[::step, ::step]

    if pred is not None and false_positives is not None:
        _fill(rgb, np.isin(pred, np.fromiter(false_positives, np.int64)) & (pred > 0),
              FALSE_POSITIVE_COLOUR)
    if true is not None and misses is not None:
        _fill(rgb, np.isin(true, np.fromiter(misses, np.int64)) & (true > 0), MISS_COLOUR)

    true_edge = find_boundaries(true, mode="inner") if true is not None else None
    pred_edge = find_boundaries(pred, mode="inner") if pred is not None else None
    if true_edge is not None:
        rgb[true_edge] = TRUTH_COLOUR
    if pred_edge is not None:
        rgb[pred_edge] = PREDICTED_COLOUR
    if true_edge is not None and pred_edge is not None:
        rgb[true_edge & pred_edge] = BOTH_COLOUR
    return rgb


def save_overlay(path: str | os.PathLike, rgb: np.ndarray, overwrite: bool = False) -> Path:
    """Write an overlay as PNG, atomically; refuse to replace a file without `overwrite`."""
    return write_png(path, rgb, overwrite=overwrite)
