"""Slides larger than memory: read lazily by rows, written tile by tile.

`open_slide(path)` gives a `Slide`: the image as H x W x C in its stored dtype, of which only
the rows asked for are read. TIFF is read through tifffile, with the axes rules of
`unetcell.io.read_image` (Y, X and at most one channel axis, C or S; every other axis of
size 1; ImageJ hyperstacks and OME-TIFF through tifffile's series axes):

- uncompressed, contiguous TIFF (what `tifffile.imwrite` writes by default: often one strip
  for the whole image) is read with positioned reads (`os.preadv`) of exactly the rows needed.
  Neither zarr (its chunk would be the whole strip) nor a memory map (the pages it touches
  stay resident and count in the process's memory) keeps memory flat there. Measured by
  `benchmarks/slides.py` on an 8192^2 16-bit TIFF read in bands of 512 rows (page cache warm):
  with 64-row strips, preadv 0.086 s and +9 MiB peak RSS, `tifffile.memmap` 0.077 s (x0.89)
  but +137 MiB (the whole image resident), `aszarr` 0.36 s (x4.2); as one strip, aszarr takes
  6.7 s (x70, each band decodes the whole strip) and +137 MiB. tifffile offers no reader of
  row ranges that is as fast and as flat, so the preadv path stays;
- tiled or striped and compressed TIFF and BigTIFF go through tifffile's zarr store
  (`aszarr`), which decodes only the tiles or strips a window touches;
- PNG, JPEG and other formats are read whole (`unetcell.io.read_image`).

`write_tiled_tiff` writes an image that arrives as bands of rows (the output of
`unetcell.tiling.predict_tiled_bands`) into a tiled TIFF, 256 x 256 tiles in TIFF tile order,
through a temporary file renamed at the end; BigTIFF when the data needs it (> 2 GiB).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from .errors import DataError
from .files import atomic_path, check_writable
from .io import (
    TIFF_SUFFIXES,
    TiffAxes,
    channels_after,
    check_tiff_size,
    parse_channels,
    read_image,
    select_channels,
)

_BAND_ROWS = 256  # rows per read when a sample of the slide is gathered


class Slide:
    """A 2D image (H x W x C, stored dtype) read by rows; a context manager."""

    path: Path | None = None
    shape: tuple[int, int, int]
    dtype: np.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (stop - start, W, C) in the stored dtype."""
        raise NotImplementedError

    def _rows_at(self, index: np.ndarray) -> np.ndarray:
        """Rows at sorted indices, read band by band (subclasses may read them one by one).

        A band spans at most _BAND_ROWS rows of the image, not _BAND_ROWS of the rows asked
        for: slide[::50] of a 100k-row slide would otherwise read 12,800 rows at once."""
        parts = []
        first = 0
        while first < len(index):
            stop = first + int(np.searchsorted(index[first:], index[first] + _BAND_ROWS))
            chunk = index[first:stop]
            band = self.rows(int(chunk[0]), int(chunk[-1]) + 1)
            parts.append(band[chunk - chunk[0]])
            first = stop
        return np.concatenate(parts, axis=0) if parts else np.empty((0,) + self.shape[1:], self.dtype)

    def __getitem__(self, key) -> np.ndarray:
        """Strided windows, such as slide[::step, ::step] for percentiles of a subsample: the
        rows are read in bands and the columns strided band by band, so memory stays small."""
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 3 or not all(isinstance(k, slice) for k in key):
            raise TypeError("a Slide supports slices only, e.g. slide[::4, ::4]")
        rows = np.arange(self.shape[0])[key[0]]
        rest = key[1:]
        if len(rows) and np.any(np.diff(rows) < 0):
            raise TypeError("a Slide reads rows in ascending order only")
        parts = []
        for first in range(0, len(rows), _BAND_ROWS):
            parts.append(self._rows_at(rows[first:first + _BAND_ROWS])[(slice(None),) + rest])
        if not parts:
            return np.empty((0,) + np.empty(self.shape[1:])[rest].shape, self.dtype)
        return np.concatenate(parts, axis=0)

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path or ''} {self.shape} {self.dtype})"


class ArraySlide(Slide):
    """An image already in memory (or read whole: PNG, JPEG)."""

    def __init__(self, array: np.ndarray, path: str | os.PathLike | None = None):
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            where = f"{path}: " if path else ""
            raise DataError(f"{where}expected an H x W or H x W x C image. Received shape {array.shape}")
        self.array = array
        self.path = Path(path) if path else None
        self.shape = tuple(int(s) for s in array.shape)  # type: ignore[assignment]
        self.dtype = array.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def __getitem__(self, key) -> np.ndarray:
        return self.array[key]


class _TiffSlide(Slide):
    """A TIFF series read by rows: positioned reads when the data is uncompressed and
    contiguous, tifffile's zarr store otherwise."""

    def __init__(self, path: Path):
        self.path = path
        self._tif = None
        self._fd = None
        self._zarr = None
        try:
            # Inside the try: a file that is not a TIFF at all raises tifffile's own error here.
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            self._layout = TiffAxes.of(path, series.axes, series.shape)  # as read_image's
            check_tiff_size(path, series, in_memory=False)
            self._stored_shape, self._y = self._layout.shape, self._layout.y
            self.shape = self._layout.yxc_shape
            self.dtype = np.dtype(series.dtype).newbyteorder("=")
            if self.dtype.kind not in "uif" and self.dtype != bool:
                raise DataError(f"{path}: unsupported pixel type {series.dtype}")
            page = series.keyframe
            offset = series.dataoffset
            plain = (
                offset is not None and page.compression == 1 and page.predictor == 1
                and page.fillorder == 1 and page.bitspersample == 8 * self.dtype.itemsize
            )
            if plain:
                self._offset = int(offset)
                self._file_dtype = np.dtype(series.dtype).newbyteorder(self._tif.byteorder)
                self._fd = os.open(path, os.O_RDONLY)
            else:
                import zarr

                self._zarr = zarr.open(series.aszarr(), mode="r")
        except DataError:
            self.close()
            raise
        except Exception as e:  # tifffile and zarr raise many types
            self.close()
            raise DataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None

    def _to_yxc(self, data: np.ndarray, nrows: int) -> np.ndarray:
        return np.ascontiguousarray(self._layout.to_yxc(data, nrows), dtype=self.dtype)

    def _read_plain(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of every plane before the Y axis, by positioned reads."""
        before = int(np.prod(self._stored_shape[:self._y], dtype=np.int64))
        per_row = int(np.prod(self._stored_shape[self._y + 1:], dtype=np.int64))
        height = self._stored_shape[self._y]
        itemsize = self._file_dtype.itemsize
        nrows = stop - start
        out = np.empty((before, nrows * per_row), self._file_dtype)
        for plane in range(before):
            position = self._offset + ((plane * height + start) * per_row) * itemsize
            view = memoryview(out[plane]).cast("B")
            got = 0
            while got < view.nbytes:  # pread may return fewer bytes than asked
                n = os.preadv(self._fd, [view[got:]], position + got)
                if n <= 0:
                    raise DataError(f"{self.path}: file is shorter than its TIFF header says")
                got += n
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        # Clamped like a slice of an array: rows past the end give an empty band, not an error.
        start = min(max(int(start), 0), self.shape[0])
        stop = min(max(int(stop), start), self.shape[0])
        nrows = stop - start
        try:
            if self._fd is not None:
                data = self._read_plain(start, stop)
            else:
                window = [slice(None)] * len(self._stored_shape)
                window[self._y] = slice(start, stop)
                data = np.asarray(self._zarr[tuple(window)])
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.path}: cannot read rows {start}..{stop} ({type(e).__name__}: {e})") from None
        return self._to_yxc(data, nrows)

    def _rows_at(self, index: np.ndarray) -> np.ndarray:
        if self._fd is None:
            return super()._rows_at(index)
        # Positioned reads of exactly the rows asked for: a strided sample reads 1/step of the file.
        out = np.empty((len(index),) + self.shape[1:], self.dtype)
        for i, row in enumerate(index):
            out[i] = self.rows(int(row), int(row) + 1)[0]
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._zarr = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None


class PickedSlide(Slide):
    """A slide with `--channels` applied to every band it reads (see `io.select_channels`)."""

    def __init__(self, slide: Slide, spec: str):
        self.slide, self.spec, self.path = slide, spec, slide.path
        height, width, stored = slide.shape
        self.shape = (height, width, channels_after(spec, stored, slide.path))
        self.dtype = np.dtype(np.float32) if parse_channels(spec) == "gray" else slide.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        return select_channels(self.slide.rows(start, stop), self.spec, self.path)

    def _rows_at(self, index: np.ndarray) -> np.ndarray:
        return select_channels(self.slide._rows_at(index), self.spec, self.path)

    def close(self) -> None:
        self.slide.close()


def pick_channels(slide: Slide, spec: str | None) -> Slide:
    """`slide` with `--channels spec` applied; the slide itself when spec keeps every channel."""
    return slide if parse_channels(spec) is None else PickedSlide(slide, spec)


def open_slide(path: str | os.PathLike) -> Slide:
    """The image at `path` as a `Slide`: lazy for TIFF, read whole for other formats."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _TiffSlide(path)
    return ArraySlide(read_image(path), path)


def as_slide(image: np.ndarray | Slide) -> Slide:
    """An in-memory image (H x W or H x W x C) as a Slide; a Slide as it is."""
    return image if isinstance(image, Slide) else ArraySlide(image)


def write_tiled_tiff(
    path: str | os.PathLike,
    bands: Iterable[tuple[int, np.ndarray]],
    shape: tuple[int, int],
    dtype: np.dtype | str,
    tile: int = 256,
    compression: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an H x W image that arrives as bands `(first_row, rows)` from top to bottom into a
    tiled TIFF, holding one row of TIFF tiles at a time; atomically (a temporary file renamed
    at the end), refusing to replace a file without `overwrite`."""
    path = check_writable(path, overwrite)
    height, width = shape
    dtype = np.dtype(dtype)
    bigtiff = height * width * dtype.itemsize > 2**31 - 2**25  # headroom for the tile tables
    with atomic_path(path, size_hint=height * width * dtype.itemsize) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tiff:
            tiff.write(
                _tiff_tiles(bands, shape, dtype, tile), shape=(height, width), dtype=dtype,
                tile=(tile, tile), compression=compression, photometric="minisblack",
            )
    return path


def _tiff_tiles(
    bands: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int], dtype: np.dtype, tile: int
) -> Iterator[np.ndarray]:
    """Regroup bands of rows into tile x tile tiles in TIFF order (row of tiles by row of
    tiles, left to right); edge tiles padded with zeros as the TIFF format wants."""
    height, width = shape
    buffer = np.zeros((tile, width), dtype)
    filled = 0  # rows of buffer holding data
    next_row = 0

    def emit(rows: int) -> Iterator[np.ndarray]:
        for left in range(0, width, tile):
            block = np.zeros((tile, tile), dtype)
            part = buffer[:rows, left:left + tile]
            block[:rows, :part.shape[1]] = part
            yield block

    for first, band in bands:
        if first != next_row or band.shape[1:] != (width,):
            raise ValueError(f"band at row {first} with shape {band.shape}; expected row {next_row}, width {width}")
        next_row += band.shape[0]
        used = 0
        while used < band.shape[0]:
            take = min(tile - filled, band.shape[0] - used)
            buffer[filled:filled + take] = band[used:used + take]
            filled += take
            used += take
            if filled == tile:
                yield from emit(tile)
                filled = 0
        del band  # copied into the buffer: not held while the next band is computed
    if next_row != height:
        raise ValueError(f"bands ended at row {next_row}; expected {height} rows")
    if filled:
        yield from emit(filled)


def array_bands(array: np.ndarray, rows: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """An in-memory image as bands for `write_tiled_tiff`."""
    for first in range(0, array.shape[0], rows):
        yield first, array[first:first + rows]
