"""Synthetic microscopy: reproducible, touching cells, both bit depths."""

import numpy as np
import pytest
import tifffile

from unetcell.errors import OutputExistsError
from unetcell.synth import synth_sample, write_dataset


def _touching_pairs(labels):
    pairs = set()
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:], labels[:-1])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[m], b[m])}
    return pairs


def test_same_seed_same_files(tmp_path):
    write_dataset(tmp_path / "a", count=2, shape=(64, 80), seed=5)
    write_dataset(tmp_path / "b", count=2, shape=(64, 80), seed=5)
    for sub in ("images", "masks"):
        for name in ("cell_000.tif", "cell_001.tif"):
            np.testing.assert_array_equal(
                tifffile.imread(tmp_path / "a" / sub / name), tifffile.imread(tmp_path / "b" / sub / name)
            )
    image, _ = synth_sample((64, 80), seed=6)
    assert not np.array_equal(image, tifffile.imread(tmp_path / "a/images/cell_000.tif"))


def test_cells_touch_and_vary_in_size():
    image, labels = synth_sample((256, 256), seed=1)
    ids = np.unique(labels)[1:]
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert len(ids) > 30
    from skimage.measure import label

    for cell in ids:  # every cell is one connected piece
        assert label(labels == cell, connectivity=1).max() == 1
    assert len(_touching_pairs(labels)) > 10
    areas = np.bincount(labels.ravel())[1:]
    assert areas.max() > 2 * np.median(areas)
    # Cells are brighter than background, as in fluorescence.
    assert image[labels > 0].mean() > 2 * image[labels == 0].mean()


def test_sixteen_bit_uses_the_range_with_an_offset():
    image, _ = synth_sample((128, 128), seed=2, bit_depth=16)
    assert image.dtype == np.uint16 and image.max() > 5000 and image.min() > 100


def test_write_dataset_refuses_to_overwrite(tmp_path):
    write_dataset(tmp_path, count=1, shape=(32, 32), seed=0)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_dataset(tmp_path, count=1, shape=(32, 32), seed=0)
