"""Folder discovery and validation, the validation split, and the tile pipeline."""

import numpy as np
import pytest
import tifffile

from unetcell.config import Config
from unetcell.data import (
    TileGeometry,
    compute_targets,
    discover_pairs,
    load_examples,
    split_examples,
    training_dataset,
    validation_tiles,
)
from unetcell.errors import DataError


def _folder(tmp_path, names=("a",), mask_names=None, shape=(40, 50), mask_shape=None, mask=None):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", rng.integers(0, 255, shape, dtype=np.uint8))
    for name in mask_names if mask_names is not None else names:
        m = mask if mask is not None else np.zeros(mask_shape or shape, np.uint16)
        if mask is None:
            m[5:15, 5:15], m[15:25, 5:15] = 1, 2
        tifffile.imwrite(tmp_path / "masks" / f"{name}.tif", m)
    return tmp_path


def test_pairs_are_matched_by_stem(tmp_path):
    pairs = discover_pairs(_folder(tmp_path, names=("b", "a")))
    assert [p.stem for p in pairs] == ["a", "b"]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(names=("a", "b"), mask_names=("a",)), ["b.tif", "no mask"]),
        (dict(names=("a",), mask_names=("a", "c")), ["c.tif", "without an image"]),
    ],
)
def test_missing_partners_name_the_file(tmp_path, kwargs, words):
    with pytest.raises(DataError) as e:
        discover_pairs(_folder(tmp_path, **kwargs))
    assert all(w in str(e.value) for w in words)


def test_empty_and_malformed_folders(tmp_path):
    with pytest.raises(DataError, match="images/"):
        discover_pairs(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no images"):
        discover_pairs(tmp_path)


def test_size_mismatch_and_float_masks_name_the_mask(tmp_path):
    folder = _folder(tmp_path, mask_shape=(40, 49))
    with pytest.raises(DataError, match=r"a\.tif.*40 x 49"):
        load_examples(discover_pairs(folder), Config())
    tifffile.imwrite(folder / "masks" / "a.tif", np.full((40, 50), 0.5, np.float32))
    with pytest.raises(DataError, match="a.tif.*fractional"):
        load_examples(discover_pairs(folder), Config())


def test_unreadable_image_names_the_file(tmp_path):
    folder = _folder(tmp_path)
    (folder / "images" / "a.tif").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match="a.tif.*cannot be read"):
        load_examples(discover_pairs(folder), Config())


def test_binary_masks_are_reported_and_split_into_instances(tmp_path):
    mask = np.zeros((40, 50), np.uint8)
    mask[2:10, 2:10] = 255
    mask[20:30, 20:30] = 255
    folder = _folder(tmp_path, mask=mask)
    examples, report = load_examples(discover_pairs(folder), Config())
    assert report.kind == "binary" and report.cells == 2
    assert set(np.unique(examples[0].labels)) == {0, 1, 2}


def test_targets_are_cached_by_mask_content(tmp_path):
    labels = np.zeros((30, 30), np.int32)
    labels[3:12, 3:12], labels[12:20, 3:12] = 1, 2
    c1, w1 = compute_targets(labels, Config().targets, tmp_path)
    assert len(list(tmp_path.glob("targets-*.npz"))) == 1
    c2, w2 = compute_targets(labels, Config().targets, tmp_path)
    np.testing.assert_array_equal(w1, w2)
    labels[25:28, 25:28] = 3
    compute_targets(labels, Config().targets, tmp_path)
    assert len(list(tmp_path.glob("targets-*.npz"))) == 2


def test_single_image_validation_is_a_held_out_strip(synth_folder):
    examples, _ = load_examples(discover_pairs(synth_folder)[:1], Config())
    train, val = split_examples(examples, 0.25, seed=0)
    assert train[0].image.shape[1] + val[0].image.shape[1] == examples[0].image.shape[1]
    np.testing.assert_array_equal(val[0].image, examples[0].image[:, -32:])


def test_images_are_split_whole(synth_folder):
    examples, _ = load_examples(discover_pairs(synth_folder), Config())
    train, val = split_examples(examples, 0.25, seed=0)
    assert len(train) == 3 and len(val) == 1
    assert {e.name for e in train}.isdisjoint({e.name for e in val})


@pytest.mark.parametrize("padding, tile", [("valid", 92), ("same", 64)])
def test_pipeline_shapes_for_valid_and_same_padding(synth_folder, padding, tile):
    config = Config().override("model", depth=2, padding=padding).override("train", tile=tile, batch_size=3)
    examples, _ = load_examples(discover_pairs(synth_folder), config)
    geometry = TileGeometry.for_config(config)
    images, packed = next(iter(training_dataset(examples, config)))
    assert images.shape == (3, geometry.input, geometry.input, 1)
    assert packed.shape == (3, geometry.output, geometry.output, 2)
    assert geometry.output == (52 if padding == "valid" else 64)
    val_images, val_packed = validation_tiles(examples, config)
    assert val_images.shape[1:] == (geometry.input, geometry.input, 1)


def test_same_seed_same_first_batches_and_resume_continues(synth_folder):
    config = Config().override("model", depth=2).override("train", tile=92, batch_size=2, seed=9)
    examples, _ = load_examples(discover_pairs(synth_folder), config)
    first = [b[0].numpy() for b in training_dataset(examples, config).take(3)]
    again = [b[0].numpy() for b in training_dataset(examples, config).take(3)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    resumed = next(iter(training_dataset(examples, config, start=4)))[0].numpy()
    np.testing.assert_array_equal(resumed, first[2])
    other = next(iter(training_dataset(examples, config.override("train", seed=10))))[0].numpy()
    assert not np.array_equal(other, first[0])


def test_tiles_mirror_past_the_border_of_a_small_image(tmp_path):
    folder = _folder(tmp_path, shape=(20, 24), mask_shape=(20, 24))
    config = Config().override("model", depth=2).override("train", tile=92, batch_size=1)
    examples, _ = load_examples(discover_pairs(folder), config)
    images, packed = next(iter(training_dataset(examples, config)))
    assert images.shape == (1, 92, 92, 1) and np.isfinite(images.numpy()).all()
