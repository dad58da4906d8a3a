"""Slides read lazily by rows equal what tifffile / imageio read whole; tiled TIFF written
band by band round-trips exactly, atomically, and never overwrites by accident."""

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from unetcell.errors import DataError, OutputExistsError
from unetcell.slides import (
    _BAND_ROWS,
    ArraySlide,
    Slide,
    array_bands,
    as_slide,
    open_slide,
    write_tiled_tiff,
)


def _random(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


def _as_yxc(array, axes):
    """The reference in H x W x C: tifffile's array moved to the slide's axis order."""
    if axes == "YX":
        return array[..., None]
    if axes == "YXS":
        return array
    return np.moveaxis(array, 0, -1)  # SYX or CYX


# name: (shape, dtype, tifffile.imwrite keywords, expected series axes, read with pread?)
TIFFS = {
    "uncompressed_contiguous": ((37, 53), np.uint8, {}, "YX", True),
    "striped_zlib": ((37, 53), np.uint8, {"compression": "zlib", "rowsperstrip": 5}, "YX", False),
    "zlib_predictor_16bit": (
        (131, 97), np.uint16, {"compression": "zlib", "predictor": True, "rowsperstrip": 8}, "YX", False),
    "tiled": ((131, 97), np.uint16, {"tile": (32, 48)}, "YX", False),
    "bigtiff": ((37, 53), np.float32, {"bigtiff": True}, "YX", True),
    "bigtiff_tiled_zlib": (
        (70, 53), np.float32, {"bigtiff": True, "tile": (16, 16), "compression": "zlib"}, "YX", False),
    "float32_striped": ((37, 53), np.float32, {"compression": "zlib", "rowsperstrip": 7}, "YX", False),
    "uint16_big_endian": ((37, 53), np.uint16, {"byteorder": ">"}, "YX", True),
    "rgb_contig": ((37, 53, 3), np.uint8, {"photometric": "rgb"}, "YXS", True),
    "rgb_contig_zlib": (
        (37, 53, 3), np.uint8, {"photometric": "rgb", "compression": "zlib", "rowsperstrip": 3}, "YXS", False),
    "rgb_tiled": ((37, 53, 3), np.uint8, {"photometric": "rgb", "tile": (16, 16)}, "YXS", False),
    "planar_rgb": ((3, 37, 53), np.uint8, {"photometric": "rgb", "planarconfig": "separate"}, "SYX", True),
    "planar_rgb_zlib_16bit": ((3, 37, 53), np.uint16, {"photometric": "rgb", "planarconfig": "separate",
                                                          "compression": "zlib", "rowsperstrip": 4}, "SYX", False),
    "imagej_channels": ((2, 37, 53), np.uint8, {"imagej": True, "metadata": {"axes": "CYX"}}, "CYX", True),
    "cyx_pages_16bit": ((2, 37, 53), np.uint16, {"metadata": {"axes": "CYX"}}, "CYX", True),
    "one_row": ((1, 40), np.uint8, {}, "YX", True),
    "one_column": ((53, 1), np.uint16, {"compression": "zlib"}, "YX", False),
}


@pytest.mark.parametrize("name", sorted(TIFFS))
def test_tiff_rows_and_strided_windows_equal_tifffile(tmp_path, name):
    shape, dtype, kwargs, axes, plain = TIFFS[name]
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, _random(shape, dtype), **kwargs)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == axes  # the case is what its name says
    expected = _as_yxc(tifffile.imread(path), axes)
    height = expected.shape[0]
    with open_slide(path) as slide:
        assert (slide._fd is not None) == plain  # positioned reads only where the data is plain
        assert slide.shape == expected.shape and slide.dtype == expected.dtype.newbyteorder("=")
        whole = slide.rows(0, height)
        assert whole.dtype.isnative
        np.testing.assert_array_equal(whole, expected)
        for start, stop in [(0, 1), (3, 9), (height - 2, height), (height // 2, height // 2)]:
            np.testing.assert_array_equal(slide.rows(start, stop), expected[start:stop])
        assert slide.rows(height, height + 5).shape == (0,) + expected.shape[1:]
        for key in [np.s_[::3, ::4], np.s_[5:30:7], np.s_[1::2, 2:, :1], np.s_[::1000, ::1000]]:
            np.testing.assert_array_equal(slide[key], expected[key])


def test_png_reads_whole_and_equals_imageio(tmp_path):
    rgb = _random((37, 53, 3), np.uint8)
    gray16 = _random((37, 53), np.uint16)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    iio.imwrite(tmp_path / "gray16.png", gray16)
    with open_slide(tmp_path / "rgb.png") as slide:
        assert slide.shape == (37, 53, 3) and slide.dtype == np.uint8
        np.testing.assert_array_equal(slide.rows(3, 9), rgb[3:9])
        np.testing.assert_array_equal(slide[::3, ::4], rgb[::3, ::4])
    with open_slide(tmp_path / "gray16.png") as slide:
        assert slide.shape == (37, 53, 1) and slide.dtype == np.uint16
        np.testing.assert_array_equal(slide.rows(0, 37)[..., 0], gray16)


def test_strided_windows_read_bands_of_bounded_height():
    # slide[::step] reads a band of rows at a time; the band spans at most _BAND_ROWS rows of
    # the image, however large the step, so a sample of a huge slide never reads it whole.
    array = _random((1500, 7, 2), np.uint16)

    class Recording(Slide):
        def __init__(self):
            self.shape, self.dtype, self.spans = array.shape, array.dtype, []

        def rows(self, start, stop):
            self.spans.append(stop - start)
            return array[start:stop]

    slide = Recording()
    for key in [np.s_[::300, ::2], np.s_[::3], np.s_[7:1400:11, 1:]]:
        slide.spans.clear()
        np.testing.assert_array_equal(slide[key], array[key])
        assert slide.spans and max(slide.spans) <= _BAND_ROWS
    with pytest.raises(TypeError):
        slide[::-1]


def test_array_slide_and_as_slide():
    gray = _random((5, 6), np.uint8)
    slide = as_slide(gray)
    assert isinstance(slide, ArraySlide) and slide.shape == (5, 6, 1)
    np.testing.assert_array_equal(slide.rows(1, 3)[..., 0], gray[1:3])
    assert as_slide(slide) is slide
    with pytest.raises(DataError, match="H x W"):
        ArraySlide(np.zeros((2, 3, 4, 5)), path="stack.npy")


def test_missing_unreadable_and_stacked_files_are_data_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.tif: no such file"):
        open_slide(tmp_path / "missing.tif")
    (tmp_path / "garbage.tif").write_bytes(b"this is not a TIFF file" * 10)
    with pytest.raises(DataError, match="garbage.tif: cannot be read"):
        open_slide(tmp_path / "garbage.tif")
    (tmp_path / "garbage.png").write_bytes(b"this is not a PNG file" * 10)
    with pytest.raises(DataError, match="garbage.png: cannot be read"):
        open_slide(tmp_path / "garbage.png")
    tifffile.imwrite(tmp_path / "stack.tif", _random((7, 37, 53), np.uint8))
    with pytest.raises(DataError, match=r"stack.tif: has axes QYX.*split into separate files"):
        open_slide(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "zstack.tif", _random((5, 37, 53), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(DataError, match=r"zstack.tif: .*axis Z \(size 5\)"):
        open_slide(tmp_path / "zstack.tif")
    # A TIFF cut short: the header promises rows the file does not hold.
    tifffile.imwrite(tmp_path / "whole.tif", _random((37, 53), np.uint8))
    (tmp_path / "short.tif").write_bytes((tmp_path / "whole.tif").read_bytes()[:600])
    with open_slide(tmp_path / "short.tif") as slide, pytest.raises(DataError, match="short.tif: file is shorter"):
        slide.rows(0, 37)


# --- writing ----------------------------------------------------------------------------------


def _bands(array, heights):
    first = 0
    for height in heights:
        yield first, array[first:first + height]
        first += height


@pytest.mark.parametrize("shape, dtype, tile, heights", [
    ((37, 53), np.float32, 16, [5, 1, 20, 11]),
    ((300, 257), np.uint16, 256, [100, 3, 197]),
    ((1, 40), np.uint8, 16, [1]),
    ((131, 97), np.int32, 32, [7] * 18 + [5]),
    ((53, 1), np.float32, 16, [53]),
])
def test_write_tiled_tiff_round_trips_bands_of_any_height(tmp_path, shape, dtype, tile, heights):
    assert sum(heights) == shape[0]
    array = _random(shape, dtype, seed=shape[0])
    path = write_tiled_tiff(tmp_path / "out.tif", _bands(array, heights), shape, dtype, tile=tile)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (tile, tile)
        assert len(tif.pages) == 1
        np.testing.assert_array_equal(tif.asarray(), array)
        assert tif.asarray().dtype == dtype
    with open_slide(path) as slide:  # and reads back lazily
        np.testing.assert_array_equal(slide.rows(0, shape[0])[..., 0], array)


def test_write_tiled_tiff_compressed(tmp_path):
    array = _random((70, 90), np.float32)
    path = write_tiled_tiff(tmp_path / "z.tif", array_bands(array, rows=9), array.shape, np.float32,
                            tile=32, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].compression == 8
        np.testing.assert_array_equal(tif.asarray(), array)


def test_write_tiled_tiff_leaves_nothing_behind_when_the_bands_fail(tmp_path):
    def failing():
        yield 0, np.zeros((10, 53), np.float32)
        raise RuntimeError("prediction failed")

    with pytest.raises(RuntimeError, match="prediction failed"):
        write_tiled_tiff(tmp_path / "out.tif", failing(), (37, 53), np.float32, tile=16)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="expected 37 rows"):  # bands that stop short
        write_tiled_tiff(tmp_path / "out.tif", array_bands(np.zeros((30, 53))), (37, 53), np.float32, tile=16)
    with pytest.raises(ValueError, match="expected row 10"):  # bands out of order
        write_tiled_tiff(tmp_path / "out.tif", [(0, np.zeros((10, 53))), (12, np.zeros((27, 53)))],
                         (37, 53), np.float32, tile=16)
    assert list(tmp_path.iterdir()) == []


def test_write_tiled_tiff_refuses_to_overwrite_without_overwrite(tmp_path):
    path = tmp_path / "out.tif"
    write_tiled_tiff(path, array_bands(np.zeros((37, 53))), (37, 53), np.float32, tile=16)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="out.tif exists; pass --overwrite"):
        write_tiled_tiff(path, array_bands(np.ones((37, 53))), (37, 53), np.float32, tile=16)
    assert path.read_bytes() == before
    write_tiled_tiff(path, array_bands(np.ones((37, 53)), rows=8), (37, 53), np.float32, tile=16, overwrite=True)
    np.testing.assert_array_equal(tifffile.imread(path), 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_write_tiled_tiff_switches_to_bigtiff_past_2_gib(tmp_path, monkeypatch):
    # Not written for real (gigabytes): the writer is replaced by one that records its options.
    seen = []

    class Recorder:
        def __init__(self, path, bigtiff=False, **kwargs):
            seen.append(bigtiff)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, *args, **kwargs):
            pass

    monkeypatch.setattr(tifffile, "TiffWriter", Recorder)
    write_tiled_tiff(tmp_path / "small.tif", iter([]), (1000, 1000), np.float32)
    write_tiled_tiff(tmp_path / "large.tif", iter([]), (30_000, 20_000), np.float32)  # 2.4 GB
    write_tiled_tiff(tmp_path / "bytes.tif", iter([]), (40_000, 40_000), np.uint8)  # 1.6 GB
    assert seen == [False, True, False]
