"""Reading and writing images: TIFF through tifffile (with its axes), PNG/JPEG through imageio.

Images come back as H x W x C arrays in their stored dtype (normalisation is a separate step,
`unetcell.normalize`); masks as H x W int32 labels. Every error names the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from .errors import ConfigError, DataError
from .files import atomic_path, check_writable, format_bytes
from .targets import checked_mask

# tifffile logs what it finds wrong in a file before raising; the DataError that follows says it
# in one line naming the file, so its log lines would only repeat it in another voice.
logging.getLogger("tifffile").setLevel(logging.ERROR)

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png", ".jpg", ".jpeg", ".bmp")

# tifffile axis codes that carry colour or channels; every other non-spatial axis must be 1.
CHANNEL_AXES = "CS"

# What tifffile's axis codes mean to a user, for the message that asks them to pick a plane.
_AXIS_NAMES = {"Z": "a z-stack", "T": "a time series", "Q": "a stack of planes (z, time or channels?)",
               "I": "a sequence of images", "R": "tiles or regions", "P": "a sequence of planes",
               "E": "lambda (spectral) planes", "L": "lifetime planes", "H": "phases"}

# Decoded bytes a codec can produce per stored byte, with slack: deflate tops out near 1032:1
# and PackBits at 64:1, so a file declaring more than this is lying (a decompression bomb or
# a truncated file), whatever its pixels. Codecs not listed (LZW, zstd, LZMA ...) get the
# generous default, which no real image reaches either.
_MAX_RATIO = {1: 1.0, 5: 4096.0, 8: 1100.0, 32946: 1100.0, 32773: 70.0}
_MAX_RATIO_DEFAULT = 100_000.0
_PNG_MAX_RATIO = 1100.0  # PNG is always deflate


def memory_budget() -> int:
    """Bytes an image read whole may take: half of the memory available now (Linux), or half
    of the physical memory where the OS does not say what is available."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def check_declared_size(
    path: Path, shape: tuple[int, ...], dtype: np.dtype, stored: int, max_ratio: float, in_memory: bool
) -> None:
    """Refuse, before anything is allocated or decoded, an image whose header declares more
    pixels than its stored bytes can hold (a decompression bomb, or a file cut short) or, when
    it is to be read whole, more than the memory budget."""
    declared = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    stored = max(int(stored), 1)
    if declared > max_ratio * stored + 65536:
        raise DataError(
            f"{path}: its header declares {' x '.join(map(str, shape))} {np.dtype(dtype)} pixels "
            f"({format_bytes(declared)}) but the file holds only {format_bytes(stored)} of image data; "
            "the file is truncated or malformed (refused before decoding)"
        )
    budget = memory_budget()
    if in_memory and declared > budget:
        raise DataError(
            f"{path}: {' x '.join(map(str, shape))} {np.dtype(dtype)} pixels need {format_bytes(declared)} "
            f"in memory and the budget is {format_bytes(budget)} (half of the available memory); crop or "
            "downsample it, or for prediction save it as TIFF, which is streamed"
        )


def check_tiff_size(path: Path, series, in_memory: bool) -> None:
    """`check_declared_size` for the first series of a TIFF, from its page tables."""
    file_size = path.stat().st_size
    pages = series.pages
    keyframe = series.keyframe
    # Data bytes declared by the pages, but never more than the file holds.
    try:
        stored = sum(int(sum(p.databytecounts)) for p in pages if p is not None)
    except (AttributeError, TypeError):
        stored = file_size
    stored = min(stored, file_size)
    ratio = _MAX_RATIO.get(int(keyframe.compression), _MAX_RATIO_DEFAULT)
    check_declared_size(path, tuple(series.shape), series.dtype, stored, ratio, in_memory)


def _check_png_header(path: Path) -> None:
    """The PNG IHDR chunk (the first one: bytes 16-29) declares width, height, bit depth and
    colour type; read them before handing the file to a decoder."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return  # not a PNG the guard understands; the decoder reports what is wrong
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    bit_depth, colour = head[24], head[25]
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
    if colour == 3:  # palette images decode to RGB(A)
        samples, bit_depth = 4, 8
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    check_declared_size(path, (height, width, samples), np.dtype(dtype), path.stat().st_size,
                        _PNG_MAX_RATIO, in_memory=True)


def check_finite(image: np.ndarray, path: str | os.PathLike | None, first_row: int = 0) -> None:
    """Refuse NaN or infinite pixels (float images only), naming the first one."""
    if image.dtype.kind != "f":
        return
    finite = np.isfinite(image)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    row, col = int(bad[0][0]) + first_row, int(bad[0][1])
    value = image[tuple(bad[0])]
    where = f"{path}: " if path else ""
    raise DataError(
        f"{where}has {len(bad)} NaN or infinite pixel value(s) (first: {value} at row {row}, "
        f"column {col}); replace them (e.g. with 0) before using the image"
    )


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
            position = axes.index(axis)
            index = "[" + ":, " * position + "0]"
            raise DataError(
                f"{path}: has axes {axes} with shape {tuple(shape)}: {_AXIS_NAMES.get(axis, 'a stack')} "
                f"along axis {axis} (size {size}). unetcell segments 2D images (Y, X and "
                f"channels), so the planes must be split into separate files: pick one, e.g. in "
                f"Python tifffile.imwrite('{path.stem}_{axis.lower()}0.tif', tifffile.imread('{path.name}'){index})"
            )
    if sum(a in CHANNEL_AXES for a in keep) > 1:
        raise DataError(f"{path}: has more than one channel axis ({axes})")
    if "Y" not in keep or "X" not in keep:
        raise DataError(f"{path}: has axes {axes}; expected an image with Y and X axes")
    return keep


@dataclass(frozen=True)
class TiffAxes:
    """How a TIFF series' stored axes become H x W x C, for `read_image` and the lazy slides
    alike: Y, X and at most one channel axis are kept, in that order (`kept_axes`)."""

    axes: str  # tifffile's axis codes, in stored order
    shape: tuple[int, ...]  # the stored shape

    @classmethod
    def of(cls, path: Path, axes: str, shape: Sequence[int]) -> TiffAxes:
        """The layout of a series; DataError naming `path` for a stack or a missing Y or X."""
        shape = tuple(int(s) for s in shape)
        kept_axes(path, axes, shape)
        return cls(axes, shape)

    @property
    def y(self) -> int:
        """The position of Y among the stored axes."""
        return self.axes.index("Y")

    @property
    def yxc_shape(self) -> tuple[int, int, int]:
        channel = [s for a, s in zip(self.axes, self.shape) if a in CHANNEL_AXES]
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")], (channel or [1])[0]

    def to_yxc(self, data: np.ndarray, rows: int | None = None) -> np.ndarray:
        """Stored data (or `rows` rows of it) as H x W x C: the size-1 axes dropped and the
        kept ones transposed (a view where numpy can make one)."""
        kept = [(a, s) for a, s in zip(self.axes, self.shape) if a in "YX" or a in CHANNEL_AXES]
        names = [a for a, _ in kept]
        shape = [rows if a == "Y" and rows is not None else s for a, s in kept]
        order = [names.index("Y"), names.index("X")] + [i for i, a in enumerate(names) if a in CHANNEL_AXES]
        data = np.transpose(data.reshape(shape), order)
        return data if data.ndim == 3 else data[..., None]


def _tiff_as_yxc(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        layout = TiffAxes.of(path, series.axes, series.shape)  # before decoding: a z-stack is refused at once
        check_tiff_size(path, series, in_memory=True)
        data = series.asarray()
    return layout.to_yxc(data)


def read_image(path: str | os.PathLike, channels: Sequence[int] | None = None) -> np.ndarray:
    """An image as H x W x C in its stored dtype; `channels` picks channels by index."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            data = _tiff_as_yxc(path)
        else:
            if path.suffix.lower() == ".png":
                _check_png_header(path)
            data = np.asarray(iio.imread(path))
            if data.ndim == 2:
                data = data[..., None]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # every reader has its own exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise DataError(
            f"{path}: cannot be read as an image, the file is corrupt, truncated or not an image "
            f"({type(e).__name__}: {reason})"
        ) from None
    if data.ndim != 3:
        raise DataError(
            f"{path}: expected a 2D image (H x W or H x W x C). Received shape {data.shape}; "
            "save one plane per file"
        )
    if data.dtype.kind not in "uif" and data.dtype != bool:
        raise DataError(f"{path}: unsupported pixel type {data.dtype}")
    check_finite(data, path)
    if channels is not None:
        bad = [c for c in channels if not -data.shape[2] <= c < data.shape[2]]
        if bad:
            raise DataError(f"{path}: has {data.shape[2]} channel(s); cannot pick channel(s) {bad}")
        data = data[..., list(channels)]
    return data


def parse_channels(spec: str | None) -> list[int] | str | None:
    """`--channels`: None or "" keeps the channels as stored, "gray" averages them to one,
    "0,2" picks channels 0 and 2 in that order (repeats allowed)."""
    if spec is None or str(spec).strip() == "":
        return None
    text = str(spec).strip().lower()
    if text in ("gray", "grey"):
        return "gray"
    try:
        picked = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--channels must be 'gray' or channel indices separated by commas, e.g. 0,2. "
            f"Received: {spec!r}"
        ) from None
    if any(c < 0 for c in picked):
        raise ConfigError(f"--channels indices start at 0. Received: {spec!r}")
    return picked


def channels_after(spec: str | None, stored: int, path: str | os.PathLike | None = None) -> int:
    """The channel count an image of `stored` channels has after `--channels spec`."""
    choice = parse_channels(spec)
    if choice is None:
        return stored
    if choice == "gray":
        return 1
    bad = [c for c in choice if c >= stored]
    if bad:
        where = f"{path}: " if path else ""
        raise DataError(
            f"{where}has {stored} channel(s) (0..{stored - 1}); --channels {spec} asks for "
            f"channel(s) {', '.join(map(str, bad))}"
        )
    return len(choice)


def select_channels(image: np.ndarray, spec: str | None, path: str | os.PathLike | None = None) -> np.ndarray:
    """An H x W x C image with `--channels spec` applied: picked or reordered channels in the
    stored dtype, or for "gray" the mean of all channels as float32."""
    choice = parse_channels(spec)
    if choice is None:
        return image
    channels_after(spec, image.shape[2], path)
    if choice == "gray":
        return image.mean(axis=2, dtype=np.float32)[..., None]
    return image[..., choice]


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
    return checked_mask(data[..., 0], path)


def write_tiff(
    path: str | os.PathLike, data: np.ndarray, overwrite: bool = False, **kwargs
) -> Path:
    """Write a TIFF atomically; refuse to replace an existing file without `overwrite`."""
    path = check_writable(path, overwrite)
    with atomic_path(path, size_hint=np.asarray(data).nbytes) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


def write_png(path: str | os.PathLike, rgb: np.ndarray, overwrite: bool = False) -> Path:
    """Write an 8-bit PNG atomically; refuse to replace an existing file without `overwrite`."""
    path = check_writable(path, overwrite)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.asarray(rgb, dtype=np.uint8), extension=".png")
    return path
