"""Specifications of the targets (paper section 3, eq. 2 and Fig. 3): the border weight map
against an independent brute force, the class balance, the carved gaps, masks as instances,
and the figure that shows them."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from skimage.measure import label as connected_components

from unetcell.errors import DataError, OutputExistsError
from unetcell.targets import (
    as_instances,
    border_weights,
    carve_gaps,
    class_weights,
    classes,
    is_binary,
    weight_map,
)

TOLERANCE = 1e-3


# --- an independent reference and test images -----------------------------------------------


def brute_force_border(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """Paper eq. 2's border term the slow, obvious way: one full-image distance transform per
    cell, d1 and d2 the two smallest distances over all cells at each pixel (float64)."""
    ids = [k for k in np.unique(labels) if k != 0]
    if len(ids) < 2:
        return np.zeros(labels.shape)
    distances = np.stack([ndimage.distance_transform_edt(labels != k) for k in ids])
    d1, d2 = np.partition(distances, 1, axis=0)[:2]
    term = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    term[labels != 0] = 0
    return term


def random_blobs(shape, n, seed, rmin=3.0, rmax=10.0) -> np.ndarray:
    """Random ellipses painted in order, so later ones cut into earlier ones: cells touch,
    overlap the image border, and some are left in pieces. Labels 1..n (some may vanish)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(1, n + 1):
        cy, cx = rng.uniform(-rmin, shape[0] + rmin), rng.uniform(-rmin, shape[1] + rmin)
        ry, rx = rng.uniform(rmin, rmax, size=2)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k
    return labels


def two_squares(gap: int, size: int = 10) -> np.ndarray:
    """Two size x size squares side by side, `gap` background columns apart (0: touching)."""
    labels = np.zeros((40, 60), np.int32)
    labels[10 : 10 + size, 10 : 10 + size] = 1
    left = 10 + size + gap
    labels[10 : 10 + size, left : left + size] = 2
    return labels


# --- border_weights ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, n, seed, sigma",
    [
        ((64, 48), 6, 0, 5.0),
        ((192, 160), 40, 1, 5.0),
        ((256, 256), 120, 2, 5.0),
        ((256, 200), 90, 3, 2.0),  # small sigma: windows much smaller than the image
        ((300, 90), 50, 4, 8.0),  # large sigma: windows reach across the image
    ],
)
def test_border_weights_match_brute_force_on_random_touching_cells(shape, n, seed, sigma):
    labels = random_blobs(shape, n, seed)
    fast = border_weights(labels, w0=10.0, sigma=sigma)
    assert fast.dtype == np.float32 and fast.shape == labels.shape
    assert np.abs(fast - brute_force_border(labels, 10.0, sigma)).max() <= TOLERANCE


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_border_weights_do_not_depend_on_dtype_or_label_values(dtype):
    labels = random_blobs((160, 140), 30, seed=5)
    reference = brute_force_border(labels)
    ids = np.unique(labels)[1:]
    # non-consecutive ids that fit the dtype: 3, 70, 9000, ... (uint8: spread over 1..250)
    top = 250 if dtype == np.uint8 else 9000
    new_ids = np.linspace(3, top, len(ids)).astype(np.int64)
    remap = np.zeros(labels.max() + 1, np.int64)
    remap[ids] = new_ids
    relabelled = remap[labels].astype(dtype)
    assert np.abs(border_weights(relabelled) - reference).max() <= TOLERANCE


def test_border_weights_accept_huge_and_negative_ids():
    labels = random_blobs((120, 100), 20, seed=6)
    reference = brute_force_border(labels)
    huge = np.where(labels > 0, labels * 10**12 + 7, 0)
    negative = -labels
    assert np.abs(border_weights(huge) - reference).max() <= TOLERANCE
    assert np.abs(border_weights(negative) - reference).max() <= TOLERANCE


def test_border_weight_at_the_gap_midpoint_is_the_analytic_value():
    labels = two_squares(gap=7)  # background columns 20..26: the midpoint column 23
    d1 = d2 = 4.0  # from column 23 to the squares' nearest columns 19 and 27
    expected = 10.0 * math.exp(-((d1 + d2) ** 2) / (2 * 5.0**2))
    assert border_weights(labels)[15, 23] == pytest.approx(expected, abs=1e-5)


def test_border_weights_are_zero_with_fewer_than_two_cells():
    empty = np.zeros((30, 30), np.int32)
    one = empty.copy()
    one[5:15, 5:25] = 4
    one[20:25, 5:10] = 4  # one cell in two pieces is still one cell
    for labels in (empty, one):
        assert not np.any(border_weights(labels))


def test_border_weights_are_zero_on_cell_pixels():
    labels = random_blobs((128, 128), 40, seed=7)
    weights = border_weights(labels)
    assert not np.any(weights[labels != 0])
    assert np.any(weights[labels == 0] > 1.0)


def test_border_weights_are_exactly_zero_far_from_cell_pairs():
    labels = np.zeros((40, 300), np.int32)
    labels[10:20, 10:20] = 1
    labels[10:20, 280:290] = 2  # 260 px apart: the term is far below float32's resolution
    assert not np.any(border_weights(labels))


@settings(max_examples=150, deadline=None)
@given(
    labels=arrays(np.int16, st.tuples(st.integers(1, 40), st.integers(1, 40)),
                  elements=st.sampled_from([0, 0, 0, 1, 2, 3, 70, -5])),
    sigma=st.floats(0.5, 6.0),
    w0=st.floats(0.0, 20.0),
)
def test_border_weights_match_brute_force_on_tiny_random_images(labels, sigma, w0):
    # Salt-and-pepper labels: many cells in pieces, touching everywhere, on every border.
    fast = border_weights(labels, w0=w0, sigma=sigma)
    assert np.abs(fast - brute_force_border(labels, w0, sigma)).max() <= TOLERANCE


def test_importing_border_weights_does_not_import_tensorflow():
    code = "import sys; from unetcell.targets import border_weights; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- class_weights --------------------------------------------------------------------------


def _with_foreground_fraction(fraction: float, size: int = 200) -> np.ndarray:
    mask = np.zeros(size * size, np.uint8)
    mask[: int(round(fraction * mask.size))] = 1
    return mask.reshape(size, size)


def test_class_weights_average_one_and_balance_the_classes_as_promised():
    mask = _with_foreground_fraction(0.185)
    weights = class_weights(mask, balance=1.0)
    assert weights.dtype == np.float32
    assert weights.mean() == pytest.approx(1.0, abs=1e-5)
    assert weights[mask == 1][0] == pytest.approx(2.70, abs=0.01)
    assert weights[mask == 0][0] == pytest.approx(0.61, abs=0.01)
    half = class_weights(mask, balance=0.5)
    assert half.mean() == pytest.approx(1.0, abs=1e-5)
    ratio = half[mask == 1][0] / half[mask == 0][0]
    assert ratio == pytest.approx(math.sqrt(0.815 / 0.185), rel=1e-4)


def test_class_weights_are_ones_without_balance_or_with_one_class():
    mask = _with_foreground_fraction(0.3)
    assert np.all(class_weights(mask, balance=0.0) == 1)
    assert np.all(class_weights(np.zeros((20, 20), np.uint8)) == 1)
    assert np.all(class_weights(np.full((20, 20), 5, np.int32)) == 1)


def test_class_weights_take_instance_labels_as_foreground():
    labels = random_blobs((64, 64), 10, seed=8)
    assert np.array_equal(class_weights(labels), class_weights(labels != 0))


# --- carve_gaps and classes -------------------------------------------------------------------


def test_carved_gap_separates_two_touching_cells():
    labels = two_squares(gap=0)
    assert connected_components(labels != 0, connectivity=2).max() == 1
    target = classes(labels, gap=1)
    assert target.dtype == np.uint8
    assert connected_components(target, connectivity=2).max() == 2
    # one column carved (from the larger id of two equal cells), nothing else touched
    assert np.count_nonzero(labels != 0) - np.count_nonzero(target) == 10
    assert not np.any(target[10:20, 20])


def test_gap_of_two_carves_both_sides_and_zero_carves_nothing():
    labels = two_squares(gap=0)
    assert not np.any(classes(labels, gap=2)[10:20, 19:21])
    assert np.count_nonzero(labels != 0) - np.count_nonzero(classes(labels, gap=2)) == 20
    assert np.array_equal(carve_gaps(labels, gap=0), labels)


def test_carving_leaves_isolated_cells_and_cell_borders_on_background_alone():
    labels = two_squares(gap=0)
    labels[30:36, 40:50] = 3  # touches nobody
    carved = carve_gaps(labels, gap=1)
    assert np.array_equal(carved == 3, labels == 3)
    # only pixels next to the other cell go: the squares keep their outer edges
    changed = carved != labels
    assert np.array_equal(np.argwhere(changed)[:, 1], np.full(10, 20))


def test_carving_keeps_the_smaller_cell_whole():
    labels = np.zeros((30, 30), np.int32)
    labels[5:25, 5:25] = 1
    labels[12:16, 12:16] = 2  # a small cell inside a large one
    carved = carve_gaps(labels, gap=1)
    assert np.array_equal(carved == 2, labels == 2)
    assert connected_components(carved != 0, connectivity=2).max() == 2


def test_carving_never_deletes_a_thin_cell():
    labels = np.zeros((20, 30), np.int32)
    labels[2:18, 2:14] = 5
    labels[2:18, 14] = 9  # a one-pixel-wide cell between two large ones: all of it is contact
    labels[2:18, 15:28] = 7
    for gap in (1, 2):
        carved = carve_gaps(labels, gap=gap)
        assert set(np.unique(carved)) == {0, 5, 7, 9}
        assert np.array_equal(carved == 9, labels == 9)  # it keeps its pixels...
        assert connected_components(carved != 0, connectivity=2).max() == 3  # ...and its gaps


def test_carving_two_single_pixel_cells_keeps_both_and_warns():
    labels = np.zeros((5, 5), np.int32)
    labels[2, 1], labels[2, 2] = 1, 2
    with pytest.warns(UserWarning, match="stay touching"):
        carved = carve_gaps(labels, gap=1)
    assert np.array_equal(carved, labels)


def test_carving_cuts_diagonal_contacts():
    labels = np.zeros((20, 20), np.int32)
    labels[2:8, 2:8] = 1
    labels[8:14, 8:14] = 2  # touches cell 1 only at a corner
    assert connected_components(labels != 0, connectivity=2).max() == 1
    assert connected_components(classes(labels, gap=1), connectivity=2).max() == 2


def _touching_pixels(labels: np.ndarray) -> np.ndarray:
    """Cell pixels with a pixel of another cell among their 8 neighbours."""
    lab = labels.astype(np.int64)
    big = int(np.abs(lab).max()) + 1  # a sentinel that survives the filters' float cval
    lowest = ndimage.minimum_filter(np.where(lab != 0, lab, big), size=3, mode="constant", cval=big)
    highest = ndimage.maximum_filter(np.where(lab != 0, lab, -big), size=3, mode="constant", cval=-big)
    return (lab != 0) & ((lowest < lab) | (highest > lab))


def test_carving_keeps_dtype_ids_and_every_cell_of_random_images():
    labels = random_blobs((200, 200), 120, seed=9).astype(np.uint16) * 37
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cell here is too thin for a gap
        carved = carve_gaps(labels, gap=1)
    assert carved.dtype == np.uint16
    assert np.array_equal(np.unique(carved), np.unique(labels))
    assert np.all((carved == labels) | (carved == 0))
    assert not np.any(_touching_pixels(carved))


@settings(max_examples=150, deadline=None)
@given(
    labels=arrays(np.int32, st.tuples(st.integers(1, 16), st.integers(1, 16)),
                  elements=st.sampled_from([0, 0, 1, 1, 1, 2, 2, 3, 40])),
    gap=st.sampled_from([1, 2]),
)
def test_carving_only_removes_contact_pixels_and_never_a_whole_cell(labels, gap):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        carved = carve_gaps(labels, gap=gap)
    removed = (carved == 0) & (labels != 0)
    assert np.all((carved == labels) | removed)
    assert not np.any(removed & ~_touching_pixels(labels))  # interiors and outer edges stay
    assert set(np.unique(carved)) - {0} == set(np.unique(labels)) - {0}  # no cell deleted
    if not caught:  # cells that stay touching are never silent
        assert not np.any(_touching_pixels(carved))


# --- weight_map -------------------------------------------------------------------------------


def balanced_class_term(carved: np.ndarray, balance: float) -> np.ndarray:
    """w_c solved from what it promises: w_fg / w_bg = (n_bg / n_fg) ** balance, mean 1."""
    n_fg = np.count_nonzero(carved)
    n_bg = carved.size - n_fg
    ratio = (n_bg / n_fg) ** balance
    w_bg = carved.size / (n_fg * ratio + n_bg)
    return np.where(carved != 0, ratio * w_bg, w_bg)


def test_weight_map_of_two_touching_squares_by_hand():
    labels = two_squares(gap=0)  # 40 x 60: two 10 x 10 squares touching along column 20
    carved_by_hand = labels.copy()
    carved_by_hand[10:20, 20] = 0
    assert np.array_equal(carve_gaps(labels, gap=1), carved_by_hand)
    # 190 cell pixels of 2400 at balance 0.5: w_fg / w_bg = sqrt(2210 / 190) = 3.4105,
    # 190 w_fg + 2210 w_bg = 2400 -> w_bg = 0.83975, w_fg = 2.86400
    class_term = np.where(carved_by_hand != 0, 2.86400, 0.83975)
    assert np.allclose(balanced_class_term(carved_by_hand, 0.5), class_term, atol=1e-5)
    expected = class_term + brute_force_border(carved_by_hand, w0=10.0, sigma=5.0)
    got = weight_map(labels, w0=10.0, sigma=5.0, balance=0.5, gap=1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_weight_map_matches_brute_force_on_random_touching_cells():
    labels = random_blobs((128, 128), 40, seed=10)
    carved = carve_gaps(labels, gap=1)
    expected = balanced_class_term(carved, 0.5) + brute_force_border(carved, w0=10.0, sigma=5.0)
    got = weight_map(labels, w0=10.0, sigma=5.0, balance=0.5, gap=1)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)


def test_carved_gap_pixels_get_the_heavy_border_weight():
    labels = two_squares(gap=0)
    weights = weight_map(labels, w0=10.0, sigma=5.0, balance=0.0, gap=1)
    # the carved column is 1 px from each cell: w_c + w0 exp(-(1 + 1)^2 / (2 sigma^2))
    assert weights[15, 20] == pytest.approx(1.0 + 10.0 * math.exp(-4 / 50), abs=1e-5)
    assert weights[15, 15] == pytest.approx(1.0)  # a cell pixel: class term only


def test_training_targets_carve_once_and_equal_classes_and_weight_map(monkeypatch):
    import unetcell.targets as targets_module

    labels = random_blobs((96, 96), 25, seed=3)
    expected = (targets_module.classes(labels, gap=1),
                weight_map(labels, w0=10.0, sigma=5.0, balance=0.5, gap=1))
    calls = []
    original = targets_module.carve_gaps
    monkeypatch.setattr(targets_module, "carve_gaps", lambda *a, **k: calls.append(1) or original(*a, **k))
    got = targets_module.training_targets(labels, w0=10.0, sigma=5.0, balance=0.5, gap=1)
    assert len(calls) == 1
    assert got[0].dtype == np.uint8 and np.array_equal(got[0], expected[0])
    assert got[1].dtype == np.float32 and np.array_equal(got[1], expected[1])
    assert expected[0].sum() < np.count_nonzero(labels)  # there were gaps to carve


# --- masks as instances -----------------------------------------------------------------------


def _corner_touching_blobs() -> np.ndarray:
    mask = np.zeros((12, 12), np.uint8)
    mask[1:5, 1:5] = 1
    mask[5:9, 5:9] = 1  # meets the first only at a corner
    mask[9:11, 1:3] = 1
    return mask


@pytest.mark.parametrize("scale, dtype", [(1, np.uint8), (255, np.uint8), (1, bool), (255, np.int64), (1, np.float32)])
def test_binary_masks_become_instances_by_4_connected_components(scale, dtype):
    mask = (_corner_touching_blobs() * scale).astype(dtype)
    assert is_binary(mask)
    labels = as_instances(mask)
    assert labels.dtype == np.int32
    assert labels.max() == 3 and len(np.unique(labels)) == 4


def test_instance_labels_come_back_unchanged_as_int32():
    labels = np.zeros((10, 10), np.uint16)
    labels[1:3, 1:3], labels[5:7, 5:7], labels[2:4, 6:9] = 3, 70, 9000
    assert not is_binary(labels)
    out = as_instances(labels)
    assert out.dtype == np.int32 and np.array_equal(out, labels)
    assert np.array_equal(as_instances(labels.astype(np.float64)), labels)  # whole-number floats


def test_is_binary_tells_binary_from_label_images():
    assert is_binary(np.zeros((3, 3), np.uint8))
    assert is_binary(np.full((3, 3), 255, np.uint8))
    assert is_binary(np.array([[0, 1], [1, 0]], np.float64))
    assert not is_binary(np.array([[0, 1], [2, 0]], np.uint8))
    assert not is_binary(np.array([[0, 1], [255, 0]], np.uint8))
    assert not is_binary(np.array([[0, 0.5], [1, 0]]))
    assert not is_binary(np.array([[0, np.nan], [1, 0]]))


def test_fractional_float_mask_is_a_data_error_naming_the_file():
    mask = np.array([[0.0, 0.25], [0.9, 1.0]], np.float32)
    with pytest.raises(DataError, match=r"masks/a\.tif.*probability map"):
        as_instances(mask, source="masks/a.tif")


def test_negative_labels_and_non_2d_masks_are_data_errors():
    with pytest.raises(DataError, match="negative"):
        as_instances(np.array([[0, -3], [2, 0]], np.int32), source="m.png")
    with pytest.raises(DataError, match="2D"):
        as_instances(np.zeros((4, 4, 2), np.uint8), source="m.png")


# --- the figure -------------------------------------------------------------------------------


def test_targets_figure_is_rgb_with_a_panel_per_map_and_one_for_the_image():
    from unetcell.figures import targets_figure

    labels = random_blobs((96, 128), 20, seed=11)
    without = targets_figure(labels)
    with_image = targets_figure(labels, image=np.random.default_rng(0).random((96, 128)))
    assert without.dtype == np.uint8 and without.ndim == 3 and without.shape[2] == 3
    assert with_image.shape[0] == without.shape[0] and with_image.shape[1] > without.shape[1]


def test_save_targets_figure_writes_png_and_refuses_to_overwrite(tmp_path):
    import imageio.v3 as iio

    from unetcell.config import TargetsConfig
    from unetcell.figures import save_targets_figure

    mask_path = tmp_path / "mask.png"
    iio.imwrite(mask_path, (two_squares(gap=0) > 0).astype(np.uint8) * 255)
    image_path = tmp_path / "image.tif"
    import tifffile

    tifffile.imwrite(image_path, np.random.default_rng(0).integers(0, 4000, (40, 60), np.uint16))
    out = tmp_path / "figs" / "targets.png"
    save_targets_figure(mask_path, out, TargetsConfig(), image_path=image_path)
    figure = iio.imread(out)
    assert figure.ndim == 3 and figure.shape[2] == 3
    with pytest.raises(OutputExistsError):
        save_targets_figure(mask_path, out, TargetsConfig())
    save_targets_figure(mask_path, out, TargetsConfig(gap=2), overwrite=True)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind


# --- three classes ----------------------------------------------------------------------------


def _two_touching_squares():
    labels = np.zeros((30, 40), np.int32)
    labels[5:20, 5:20] = 1
    labels[5:20, 20:35] = 2
    return labels


@pytest.mark.parametrize("border", [1, 2, 3])
def test_three_classes_part_touching_interiors_by_twice_the_border(border):
    from unetcell.targets import BORDER, INTERIOR, three_classes

    labels = _two_touching_squares()
    classes = three_classes(labels, gap=1, border=border)
    assert np.array_equal(classes != 0, labels != 0)  # the gap is border, not background
    # Brute force: interior is a cell pixel whose whole (2 border + 1)^2 window is that cell,
    # on the carved labels, the image's edge extended.
    carved = carve_gaps(labels, 1)
    padded = np.pad(carved, border, mode="edge")
    for y, x in zip(*np.nonzero(labels)):
        window = padded[y:y + 2 * border + 1, x:x + 2 * border + 1]
        expected = INTERIOR if carved[y, x] and np.all(window == carved[y, x]) else BORDER
        assert classes[y, x] == expected
    interior_cols = np.nonzero(classes[12] == INTERIOR)[0]
    gaps = np.diff(interior_cols)
    assert gaps.max() - 1 >= 2 * border  # border pixels between the two interiors


def test_three_classes_the_image_edge_is_not_a_border():
    from unetcell.targets import INTERIOR, three_classes

    labels = np.zeros((20, 20), np.int32)
    labels[:, :10] = 1
    classes = three_classes(labels, border=2)
    assert np.all(classes[:, :8] == INTERIOR)  # the cell goes on past the top, bottom and left


def test_three_class_weights_balance_each_class_and_keep_the_border_term():
    from unetcell.targets import three_class_weight_map, three_classes

    labels = _two_touching_squares()
    carved = carve_gaps(labels, 1)
    classes = three_classes(labels, carved=carved)
    plain = three_class_weight_map(classes, carved, w0=0, balance=1.0)
    assert plain.mean() == pytest.approx(1.0, rel=1e-6)
    counts = np.bincount(classes.ravel())
    for c in range(3):  # full balancing: every class carries the same total weight
        assert plain[classes == c].sum() == pytest.approx(classes.size / 3, rel=1e-5)
        assert np.ptp(plain[classes == c]) == 0 and counts[c] > 0
    weighted = three_class_weight_map(classes, carved, w0=10, sigma=5, balance=1.0)
    assert np.allclose(weighted - plain, border_weights(carved, 10, 5), atol=1e-6)
    assert np.all(three_class_weight_map(classes, carved, w0=0, balance=0) == 1)


def test_training_targets_three_class_agree_with_the_pieces():
    from unetcell.targets import three_class_weight_map, three_classes, training_targets

    labels = _two_touching_squares()
    classes, weights = training_targets(labels, w0=10, sigma=5, balance=0.5, gap=1, kind="three-class", border=2)
    assert np.array_equal(classes, three_classes(labels, 1, 2))
    assert np.array_equal(weights, three_class_weight_map(classes, carve_gaps(labels, 1), 10, 5, 0.5))
    with pytest.raises(ValueError, match="kind"):
        training_targets(labels, kind="four-class")
