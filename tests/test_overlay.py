"""Overlay pictures: the display stretch, contours where scikit-image finds them, the colours
of false positives and misses, striding of large images, and the no-overwrite rule."""

import imageio.v3 as iio
import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from unetcell.errors import OutputExistsError
from unetcell.overlay import (
    BOTH_COLOUR,
    PREDICTED_COLOUR,
    TRUTH_COLOUR,
    contour_overlay,
    display_stride,
    save_overlay,
    to_display,
)


def two_cells(shape=(40, 60)):
    labels = np.zeros(shape, np.int32)
    labels[5:20, 5:20] = 1
    labels[5:20, 20:35] = 2  # touching cell 1
    return labels


def colour_mask(rgb, colour):
    return np.all(rgb == np.asarray(colour, np.uint8), axis=-1)


def test_to_display_stretches_16_bit_gray_to_the_full_range():
    rng = np.random.default_rng(0)
    image = rng.integers(1000, 1200, (50, 50)).astype(np.uint16)
    rgb = to_display(image)
    assert rgb.shape == (50, 50, 3) and rgb.dtype == np.uint8
    assert rgb.min() == 0 and rgb.max() == 255
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_to_display_keeps_colour_and_handles_other_channel_counts():
    rgb_in = np.zeros((8, 8, 3), np.uint8)
    rgb_in[..., 0] = np.arange(64).reshape(8, 8)  # only the red channel varies
    out = to_display(rgb_in)
    assert out[..., 0].max() == 255 and out[..., 1].max() == 0
    assert to_display(np.zeros((8, 8, 4), np.float32)).shape == (8, 8, 3)  # RGBA, or 4 channels
    two = np.stack([np.arange(64).reshape(8, 8), np.zeros((8, 8))], -1)
    assert np.array_equal(to_display(two)[..., 2], to_display(two[..., 0])[..., 2])
    assert to_display(np.full((5, 5), 7.0)).max() == 0  # flat: no division by zero


def test_contours_are_inner_boundaries_in_their_colours():
    truth = two_cells()
    pred = np.roll(truth, 2, axis=0)
    rgb = contour_overlay(np.zeros(truth.shape), predicted=pred, truth=truth)
    t_edge = find_boundaries(truth, mode="inner")
    p_edge = find_boundaries(pred, mode="inner")
    assert np.array_equal(colour_mask(rgb, TRUTH_COLOUR), t_edge & ~p_edge)
    assert np.array_equal(colour_mask(rgb, PREDICTED_COLOUR), p_edge & ~t_edge)
    assert np.array_equal(colour_mask(rgb, BOTH_COLOUR), t_edge & p_edge)
    # Touching cells keep their own outlines: the shared border is drawn on both sides.
    assert t_edge[10, 19] and t_edge[10, 20]


def test_false_positives_are_filled_red_and_misses_blue():
    truth = two_cells()
    pred = np.zeros_like(truth)
    pred[25:35, 40:50] = 7
    gray = np.full(truth.shape, 100, np.uint8)
    gray[0, 0] = 0
    gray[0, 1] = 200
    rgb = contour_overlay(gray, predicted=pred, truth=truth, false_positives=[7], misses=[2])
    inside_fp, inside_miss, inside_other = rgb[30, 45], rgb[12, 27], rgb[12, 12]
    assert inside_fp[0] > inside_fp[1] and inside_fp[0] > inside_fp[2]
    assert inside_miss[2] > inside_miss[0] and inside_miss[2] > inside_miss[1]
    assert inside_other[0] == inside_other[1] == inside_other[2]  # not marked: stays gray


def test_large_images_are_strided_without_inventing_labels():
    truth = np.zeros((3000, 500), np.int32)
    truth[100:900, 100:400] = 1
    truth[1000:2000, 50:450] = 2
    image = np.random.default_rng(1).random(truth.shape)
    assert display_stride(3000, 500, 1024) == 3
    rgb = contour_overlay(image, truth=truth, max_edge=1024)
    assert rgb.shape == (1000, 167, 3)
    small = contour_overlay(image[::3, ::3], truth=truth[::3, ::3], max_edge=1024)
    assert np.array_equal(rgb, small)
    assert colour_mask(rgb, TRUTH_COLOUR).sum() > 0


def test_labels_alone_draw_on_black_and_mismatched_shapes_are_rejected():
    rgb = contour_overlay(None, truth=two_cells())
    assert rgb.shape == (40, 60, 3) and colour_mask(rgb, TRUTH_COLOUR).any()
    with pytest.raises(ValueError):
        contour_overlay(np.zeros((40, 61)), truth=two_cells())
    with pytest.raises(ValueError):
        contour_overlay(None)


def test_save_overlay_writes_a_png_and_refuses_to_overwrite(tmp_path):
    rgb = contour_overlay(np.zeros((40, 60)), truth=two_cells())
    path = save_overlay(tmp_path / "o.png", rgb)
    assert np.array_equal(iio.imread(path), rgb)
    with pytest.raises(OutputExistsError):
        save_overlay(path, rgb)
    save_overlay(path, rgb, overwrite=True)
