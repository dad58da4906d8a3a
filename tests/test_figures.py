"""The README's pictures (docs/make_figures.py): the augmented tiles show what the augmenter did,
with the class contours on the moved cells. (`targets_figure` is tested in test_targets.py.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from unetcell.augment import build_augmenter
from unetcell.config import AugmentConfig
from unetcell.errors import OutputExistsError
from unetcell.overlay import TRUTH_COLOUR

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


def test_figure_is_rgb_with_one_column_per_seed():
    tile = discs_tile()
    augment = build_augmenter(AugmentConfig())
    two = make_figures.augmented_tiles_figure(*tile, augment, seeds=(1, 2))
    three = make_figures.augmented_tiles_figure(*tile, augment, seeds=(1, 2, 3))
    assert two.dtype == np.uint8 and two.ndim == 3 and two.shape[2] == 3
    assert three.shape == (two.shape[0], two.shape[1] + SIZE + make_figures.MARGIN, 3)


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
