"""Reading and writing images: TIFF through tifffile (with its axes), PNG/JPEG through imageio.

Images come back as H x W x C arrays in their stored dtype (normalisation is a separate step,
`unetcell.normalize`); masks as H x W int32 labels. Every error names the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from .errors import DataError
from .files import atomic_path, check_writable

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp")

# tifffile axis codes that carry colour or channels; every other non-spatial axis must be 1.
CHANNEL_AXES = "CS"


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def kept_axes(path: Path, axes: str, shape: tuple[int, ...]) -> list[str]:
    """The axes of a TIFF series kept as Y, X and at most one channel axis (C or S), in stored
    order; any other axis must have size 1. Shared by `read_image` and the lazy slides."""
    keep = []
    for axis, size in zip(axes, shape):
        if axis in "YX" or axis in CHANNEL_AXES:
            keep.append(axis)
        elif size != 1:
            raise DataError(
                f"{path}: has axes {axes} with shape {tuple(shape)}; unetcell segments 2D images, "
                f"so axis {axis} (size {size}) must be split into separate files"
            )
    if sum(a in CHANNEL_AXES for a in keep) > 1:
        raise DataError(f"{path}: has more than one channel axis ({axes})")
    if "Y" not in keep or "X" not in keep:
        raise DataError(f"{path}: has axes {axes}; expected an image with Y and X axes")
    return keep


def _tiff_as_yxc(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        data = series.asarray()
    keep = kept_axes(path, axes, data.shape)
    data = data.reshape([s for a, s in zip(axes, data.shape) if a in keep])
    channel_axes = [i for i, a in enumerate(keep) if a in CHANNEL_AXES]
    order = [keep.index("Y"), keep.index("X")] + channel_axes
    data = np.transpose(data, order)
    return data if data.ndim == 3 else data[..., None]


def read_image(path: str | os.PathLike, channels: Sequence[int] | None = None) -> np.ndarray:
    """An image as H x W x C in its stored dtype; `channels` picks channels by index."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            data = _tiff_as_yxc(path)
        else:
            data = np.asarray(iio.imread(path))
            if data.ndim == 2:
                data = data[..., None]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # every reader has its own exception types
        raise DataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 2D image (H x W or H x W x C). Received shape {data.shape}")
    if data.dtype.kind not in "uif" and data.dtype != bool:
        raise DataError(f"{path}: unsupported pixel type {data.dtype}")
    if channels is not None:
        bad = [c for c in channels if not -data.shape[2] <= c < data.shape[2]]
        if bad:
            raise DataError(f"{path}: has {data.shape[2]} channel(s); cannot pick channel(s) {bad}")
        data = data[..., list(channels)]
    return data


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask as H x W int32: instance labels as stored, binary masks as 0/1 (split into
    instances later, by `unetcell.targets.as_instances`)."""
    path = Path(path)
    data = read_image(path)
    if data.shape[2] != 1:
        if all(np.array_equal(data[..., 0], data[..., c]) for c in range(1, data.shape[2])):
            data = data[..., :1]  # a gray mask saved as RGB(A)
        else:
            raise DataError(
                f"{path}: a mask must have one channel (instance labels or 0/255). "
                f"Received {data.shape[2]} differing channels"
            )
    mask = data[..., 0]
    if mask.dtype.kind == "f" or mask.dtype == bool:
        if mask.dtype.kind == "f" and not np.all(np.isfinite(mask) & (mask == np.round(mask))):
            raise DataError(
                f"{path}: a mask must hold integer labels (0 background, 1..N cells). "
                "Received fractional float values; is this a probability map rather than a mask?"
            )
    if mask.min() < 0:
        raise DataError(f"{path}: a mask must not hold negative labels (min {mask.min()})")
    if mask.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path}: label values exceed int32")
    return mask.astype(np.int32)


def write_tiff(
    path: str | os.PathLike, data: np.ndarray, overwrite: bool = False, **kwargs
) -> Path:
    """Write a TIFF atomically; refuse to replace an existing file without `overwrite`."""
    path = check_writable(path, overwrite)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


def write_png(path: str | os.PathLike, rgb: np.ndarray, overwrite: bool = False) -> Path:
    """Write an 8-bit PNG atomically; refuse to replace an existing file without `overwrite`."""
    path = check_writable(path, overwrite)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.asarray(rgb, dtype=np.uint8), extension=".png")
    return path
