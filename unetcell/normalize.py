"""Percentile normalisation per channel, computed once per image or slide.

The statistics come from the whole image (a strided subsample when it is large), never from a
tile: per-tile statistics make neighbouring tiles disagree at their seams and break the
equality of tiled and whole-image prediction. The same affine map then applies to every tile.
Mapping the lower and upper percentiles to 0 and 1 makes a 16-bit copy of an 8-bit scene with
another gain and offset give the same input to the network (DESIGN.md, measured).
"""

from __future__ import annotations

import numpy as np

from .config import NormalizeConfig


def subsample_stride(height: int, width: int, sample_pixels: int) -> int:
    """The stride that keeps at most about `sample_pixels` pixels of an image for statistics."""
    return max(1, int(np.ceil(np.sqrt(height * width / max(sample_pixels, 1)))))


def percentiles(image: np.ndarray, config: NormalizeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles of an H x W x C array (or a strided view of one).

    `image` may be any array-like supporting strided slicing (a zarr view of a slide works).
    """
    h, w = image.shape[:2]
    step = subsample_stride(h, w, config.sample_pixels)
    sample = np.asarray(image[::step, ::step], dtype=np.float32)
    flat = sample.reshape(-1, sample.shape[-1])
    # NumPy 2 returns float64 percentiles; cast before they meet float32 tensors.
    low, high = np.percentile(flat, [config.lower, config.upper], axis=0).astype(np.float32)
    return low, high


def apply_normalization(image: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(image - low) / (high - low) per channel, float32; a flat channel maps to 0."""
    scale = np.where(high > low, high - low, 1.0).astype(np.float32)
    # In place on one float32 copy: a band of a wide slide would otherwise hold three.
    out = np.array(image, dtype=np.float32)
    out -= low
    out /= scale
    return out


def normalize(image: np.ndarray, config: NormalizeConfig) -> np.ndarray:
    """Percentile-normalise a whole H x W x C image held in memory."""
    low, high = percentiles(image, config)
    return apply_normalization(image, low, high)
