"""The pictures: `targets_figure` shows the class map and the weights pixel for pixel (gaps in the
gap colour, even on a slide shown smaller; the colour bar spans the weights), and the README's
augmented tiles (docs/make_figures.py) show what the augmenter did, with the class contours on
the moved cells."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from unetcell import figures
from unetcell.augment import build_augmenter
from unetcell.config import AugmentConfig
from unetcell.errors import OutputExistsError
from unetcell.overlay import TRUTH_COLOUR
from unetcell.targets import carve_gaps, weight_map

_SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "make_figures.py"
_spec = importlib.util.spec_from_file_location("make_figures", _SCRIPT)
make_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_figures)

SIZE = 64


def discs_tile(size=SIZE, seed=0):
    """Bright discs on a dark ground, away from the tile's edges, with their classes and a
    weight map that is heavier on the cells and varies along x."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    classes = np.zeros((size, size), np.uint8)
    for _ in range(6):
        cy, cx, r = rng.uniform(16, size - 16), rng.uniform(16, size - 24), rng.uniform(4, 7)
        classes[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    image = (0.1 + 0.8 * classes + rng.normal(0, 0.02, classes.shape)).astype(np.float32)[..., None]
    weights = (1.0 + classes + xx / size).astype(np.float32)
    return image, classes, weights


def green(rgb):
    return np.all(rgb == TRUTH_COLOUR, axis=-1)


# --- targets_figure ---------------------------------------------------------------------------


def panels(fig) -> list[np.ndarray]:
    """The image panels of a rendered `panel_grid` figure, cropped from its pixels by their
    axes' boxes, left to right and top to bottom."""
    rgb = figures.render(fig)
    height = rgb.shape[0]
    crops = []
    for ax in fig.axes:
        if not ax.images:  # the colour bar
            continue
        (x0, y0), (x1, y1) = np.rint(ax.get_window_extent().get_points()).astype(int)
        crops.append(rgb[height - y1 : height - y0, x0:x1])
    return crops


def touching_rectangles(height: int, width: int, split: int) -> np.ndarray:
    """Two rectangles side by side that touch along column `split`, with background around."""
    labels = np.zeros((height, width), np.int32)
    labels[height // 4 : 3 * height // 4, 2:split] = 1
    labels[height // 4 : 3 * height // 4, split : width - 2] = 2
    return labels


def test_class_panel_is_the_class_map_pixel_for_pixel_with_gaps_white():
    labels = touching_rectangles(40, 60, split=31)
    fig = figures.targets_plot(labels, image=np.random.default_rng(0).random((40, 60)))
    image_panel, class_panel, weight_panel = panels(fig)
    zoom = class_panel.shape[0] // 40
    assert zoom * 60 >= figures.MIN_EDGE and class_panel.shape == (40 * zoom, 60 * zoom, 3)
    assert image_panel.shape == weight_panel.shape == class_panel.shape
    shown = class_panel[::zoom, ::zoom]
    assert np.array_equal(np.kron(shown, np.ones((zoom, zoom, 1), np.uint8)), class_panel)  # whole pixels

    carved = carve_gaps(labels, 1)
    gaps = (labels > 0) & (carved == 0)
    assert gaps.sum() == 20  # one column of the 20 rows where the cells touch
    white = np.all(shown == 255, axis=-1)
    black = np.all(shown == 0, axis=-1)
    assert np.array_equal(white, gaps)
    assert np.array_equal(black, labels == 0)
    left, right = shown[carved == 1], shown[carved == 2]
    assert (left == left[0]).all() and (right == right[0]).all()  # one colour per cell
    assert not np.array_equal(left[0], right[0])  # touching cells told apart by colour too


def test_colour_bar_spans_zero_to_the_heaviest_weight_and_the_panel_follows_it():
    labels = touching_rectangles(40, 60, split=31)
    weights = weight_map(labels, w0=10, sigma=5, balance=1.0, gap=1)
    fig = figures.targets_plot(labels, w0=10, sigma=5, balance=1.0, gap=1)
    bar = next(ax for ax in fig.axes if ax.get_label() == "colour bar")
    assert bar.get_ylim() == pytest.approx((0.0, weights.max()))
    _, weight_panel = panels(fig)
    zoom = weight_panel.shape[0] // 40
    shown = weight_panel[::zoom, ::zoom].astype(int)
    top_of_viridis = np.array([253, 231, 37])
    heaviest = weights == weights.max()
    assert np.abs(shown[heaviest] - top_of_viridis).max() <= 2
    assert np.abs(shown[weights < 0.2 * weights.max()] - top_of_viridis).sum(axis=-1).min() > 300  # dark


def test_three_class_figure_shows_the_interiors_the_border_class_and_their_weights():
    from unetcell.config import TargetsConfig
    from unetcell.targets import BORDER, INTERIOR, training_targets

    labels = touching_rectangles(40, 60, split=31)
    settings = figures.figure_settings(TargetsConfig(kind="three-class", border=2, balance=1.0))
    fig = figures.targets_plot(labels, **settings)
    class_panel, weight_panel = panels(fig)
    zoom = class_panel.shape[0] // 40
    shown = class_panel[::zoom, ::zoom]
    taught, weights = training_targets(labels, w0=10, sigma=5, balance=1.0, gap=1, kind="three-class", border=2)
    white = np.all(shown == 255, axis=-1)
    assert np.array_equal(white, taught == BORDER)  # 2 px inside each cell, the carved gap included
    assert np.array_equal(np.all(shown == 0, axis=-1), taught == 0)
    carved = carve_gaps(labels, 1)
    left, right = shown[(taught == INTERIOR) & (carved == 1)], shown[(taught == INTERIOR) & (carved == 2)]
    assert len(left) and len(right) and (left == left[0]).all() and (right == right[0]).all()
    assert not np.array_equal(left[0], right[0])
    bar = next(ax for ax in fig.axes if ax.get_label() == "colour bar")
    assert bar.get_ylim() == pytest.approx((0.0, weights.max()))
    assert weights.max() != pytest.approx(weight_map(labels, w0=10, sigma=5, balance=1.0, gap=1).max())
    with pytest.raises(ValueError, match="kind"):
        figures.targets_plot(labels, kind="four-class")


def test_one_pixel_gap_stays_visible_on_a_slide_shown_smaller():
    # 5000 px wide is drawn on a stride of 3: the gap column (3001) is not on the stride, so
    # a plain stride would drop it; the block maximum keeps it.
    labels = touching_rectangles(120, 5000, split=3001)
    step = 3
    fig = figures.targets_plot(labels)
    class_panel, weight_panel = panels(fig)
    assert class_panel.shape[:2] == weight_panel.shape[:2] == (40, 1667)  # 1:1, within MAX_EDGE
    white = np.all(class_panel == 255, axis=-1)
    rows = np.arange(120)[::step]
    touching_rows = (rows >= 30) & (rows < 90)
    assert np.array_equal(np.flatnonzero(white.any(axis=0)), [3001 // step])
    assert np.array_equal(white[:, 3001 // step], touching_rows)


def test_figure_size_stays_within_bounds_for_tiles_and_slides():
    small = figures.targets_figure(touching_rectangles(20, 30, split=15))
    assert small.dtype == np.uint8 and small.ndim == 3 and small.shape[2] == 3
    assert small.shape[1] >= 2 * figures.MIN_EDGE  # two panels scaled up to be readable
    large = panels(figures.targets_plot(touching_rectangles(60, 4500, split=2000)))
    assert all(max(p.shape[:2]) <= figures.MAX_EDGE for p in large)


def test_neighbour_colouring_gives_touching_cells_different_colours():
    from test_targets import random_blobs

    labels = random_blobs((96, 128), 40, seed=3)
    colouring = figures.neighbour_colouring(labels, reach=2)
    assert np.array_equal(colouring > 0, labels > 0)
    for cell in np.unique(labels[labels > 0]):
        assert len(np.unique(colouring[labels == cell])) == 1
    # every pair of pixels of different cells at most 2 px apart has two colours
    for dy, dx in [(0, 1), (0, 2), (1, -1), (1, 0), (1, 1), (2, 0)]:
        a = labels[: labels.shape[0] - dy, max(0, -dx) : labels.shape[1] - max(0, dx)]
        b = labels[dy:, max(0, dx) : labels.shape[1] - max(0, -dx)]
        ca = colouring[: labels.shape[0] - dy, max(0, -dx) : labels.shape[1] - max(0, dx)]
        cb = colouring[dy:, max(0, dx) : labels.shape[1] - max(0, -dx)]
        near = (a > 0) & (b > 0) & (a != b)
        assert near.any() or dx != 1
        assert (ca[near] != cb[near]).all()


# --- the README's augmented tiles ----------------------------------------------------------------


def test_figure_is_rgb_with_one_column_per_seed():
    tile = discs_tile()
    augment = build_augmenter(AugmentConfig())
    two = make_figures.augmented_tiles_plot(*tile, augment, seeds=(1, 2))
    three = make_figures.augmented_tiles_plot(*tile, augment, seeds=(1, 2, 3))
    assert len(panels(two)) == 2 * 3 and len(panels(three)) == 2 * 4
    assert all(p.shape == (SIZE * make_figures.ZOOM, SIZE * make_figures.ZOOM, 3) for p in panels(three))
    rgb = make_figures.augmented_tiles_figure(*tile, augment, seeds=(1, 2))
    assert rgb.dtype == np.uint8 and rgb.shape == figures.render(two).shape


def test_panels_move_with_the_augmenter_and_contours_with_the_image():
    # An augmenter that shifts everything right by 5 px per seed: each panel must be the
    # original panel shifted, contours and weights included (the discs never reach the edge).
    def shift(image, classes, weights, seed):
        return tuple(np.roll(a, 5 * seed, axis=1) for a in (image, classes, weights))

    tile = discs_tile()
    images, weight_maps, vmax = make_figures.augmented_panels(*tile, shift, seeds=(1, 2))
    assert vmax == tile[2].max()  # one colour scale: the heaviest weight of any panel
    for k, seed in enumerate((1, 2), start=1):
        assert np.array_equal(images[k], np.roll(images[0], 5 * seed, axis=1))
        assert np.array_equal(weight_maps[k], np.roll(weight_maps[0], 5 * seed, axis=1))
        assert not np.array_equal(images[k], images[0])


def test_default_augmentation_panels_outline_the_augmented_cells():
    image, classes, weights = discs_tile()
    augment = build_augmenter(AugmentConfig(affine_p=1.0, elastic_p=1.0))
    seeds = (1, 2, 3)
    images, weight_maps, _ = make_figures.augmented_panels(image, classes, weights, augment, seeds)
    assert len(images) == len(weight_maps) == 1 + len(seeds)
    for seed, rgb in zip(seeds, images[1:]):
        _, moved, _ = augment(image, classes, weights, seed)  # deterministic in the seed
        assert not np.array_equal(green(rgb), green(images[0]))
        assert np.array_equal(green(rgb), find_boundaries(moved, mode="inner"))
        # the image moved with the classes: bright under the cells, dark around them
        gray = rgb[..., 0].astype(float)
        inside, outside = (moved == 1) & ~green(rgb), moved == 0
        assert gray[inside].mean() > gray[outside].mean() + 100


def test_make_figures_writes_small_pngs_and_refuses_to_overwrite(tmp_path):
    written = make_figures.make_figures(tmp_path)
    assert [p.name for p in written] == ["targets.png", "augmented_tiles.png"]
    assert all(p.stat().st_size < 400_000 for p in written)
    with pytest.raises(OutputExistsError):
        make_figures.make_figures(tmp_path)
    make_figures.make_figures(tmp_path, overwrite=True)
