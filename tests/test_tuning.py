"""Post-processing chosen from the training data: the minimum size from the annotated cells,
and on validation data the known best of a stub, ties to the defaults."""

import dataclasses
import glob

import numpy as np
import pytest
import tifffile
from skimage.measure import regionprops

from unetcell.config import Config, load_config
from unetcell.model import saved_config
from unetcell.targets import carve_gaps
from unetcell.train import train
from unetcell.tuning import annotated_min_size, pooled_f1, tune_postprocessing


def _stub():
    """Two cells touching along a column that the "network" is unsure of (0.58), and a small
    true cell of 12 pixels: thresholds >= 0.6 split the pair, min size <= 12 keeps the small
    one, so (0.6, 8) is the best setting nearest (0.5, 16)."""
    truth = np.zeros((40, 60), np.int32)
    truth[5:25, 5:20] = 1
    truth[5:25, 20:36] = 2
    truth[30:33, 45:49] = 3
    probability = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    probability[5:25, 20] = 0.58
    return probability, truth


def test_annotated_min_size_is_a_fraction_of_the_smallest_cells_over_all_masks():
    rng = np.random.default_rng(0)
    areas = rng.integers(40, 400, size=150)
    # Cells of known areas as runs of one label along a row, split over two label images.
    first = np.repeat(np.arange(1, 101), areas[:100])[None, :]
    second = np.repeat(np.arange(1, 51), areas[100:])[None, :]
    smallest = np.percentile(areas, 1)
    assert annotated_min_size([first, second], 0.25) == (int(round(0.25 * smallest)), smallest)
    assert annotated_min_size([np.zeros((5, 5), np.int32)], 0.25) == (0, 0.0)


def test_tuning_picks_the_known_best_setting_nearest_the_defaults():
    probability, truth = _stub()
    config = Config().override("predict", instances="components", threshold=0.5, min_size=16)
    tuned = tune_postprocessing([probability], [truth], config)
    assert (tuned.threshold, tuned.min_size) == (0.6, 8)
    assert tuned.watershed_h == config.predict.watershed_h  # no h to pick for components
    assert tuned.f1 == 1.0
    # The defaults merge the pair (it matches cell 2 alone, IoU 320 / 620) and drop the
    # small cell: 1 match, 0 false positives, 2 misses.
    assert tuned.default_f1 == pooled_f1([probability], [truth], 0.5, 16, "components", 1.0)
    assert tuned.default_f1 == 0.5
    assert "threshold 0.60" in tuned.describe()


def test_a_flat_optimum_keeps_the_defaults():
    truth = np.zeros((30, 30), np.int32)
    truth[5:20, 5:20] = 1
    probability = np.where(truth > 0, 0.95, 0.05).astype(np.float32)  # any setting is right
    tuned = tune_postprocessing([probability], [truth], Config())
    defaults = Config().predict
    assert (tuned.threshold, tuned.min_size, tuned.watershed_h) == (
        defaults.threshold, defaults.min_size, defaults.watershed_h)
    assert tuned.f1 == tuned.default_f1 == 1.0


@pytest.mark.slow
def test_training_with_validation_stores_the_picked_settings_with_the_model(synth_folder, tmp_path, capsys):
    config = (Config().override("model", filters=4, depth=2)
              .override("train", tile=92, batch_size=2, epochs=1, steps_per_epoch=3, val_fraction=0.25))
    train(synth_folder, tmp_path / "run", config, verbose=1)
    assert "post-processing picked on validation: threshold" in capsys.readouterr().out
    saved = saved_config(tmp_path / "run" / "model.keras")
    assert load_config(tmp_path / "run" / "config.toml") == saved
    assert dataclasses.replace(saved, predict=config.predict) == config  # only predict changes
    assert saved.predict.balance_shift > 0  # measured on the masks
    untuned = (config.override("train", tune_postprocessing=False, calibrate=False)
               .override("predict", min_size_fraction=0))
    train(synth_folder, tmp_path / "plain", untuned, verbose=0)
    assert saved_config(tmp_path / "plain" / "model.keras") == untuned


@pytest.mark.slow
def test_training_raises_min_size_to_a_fraction_of_the_annotated_cells(synth_folder, tmp_path, capsys):
    config = (Config().override("model", filters=4, depth=2)
              .override("train", tile=92, epochs=1, steps_per_epoch=1, val_fraction=0)
              .override("predict", min_size=4, min_size_fraction=0.5))
    train(synth_folder, tmp_path / "run", config, verbose=1)
    areas = [region.area for mask in sorted(glob.glob(str(synth_folder / "masks" / "*")))
             for region in regionprops(tifffile.imread(mask).astype(np.int32))]
    expected = int(round(0.5 * np.percentile(areas, 1)))
    assert expected > 4  # the synthetic cells are far larger than 8 pixels
    saved = saved_config(tmp_path / "run" / "model.keras").predict
    assert saved.min_size == expected
    out = capsys.readouterr().out
    assert f"min size {expected} px" in out
    # ... and the class-balance shift of the same masks (gaps carved as in training), stored so
    # that predict divides it out: balance * log(background / foreground), averaged per pixel.
    carved = [carve_gaps(tifffile.imread(m)) != 0 for m in sorted(glob.glob(str(synth_folder / "masks" / "*")))]
    shift = sum(c.size * config.targets.balance * np.log((1 - c.mean()) / c.mean()) for c in carved)
    shift /= sum(c.size for c in carved)
    assert shift > 0.1 and saved.balance_shift == pytest.approx(shift, abs=1e-5)
    assert f"balance shift {shift:+.3f}" in out
