"""Post-processing picked on validation data: the known best of a stub, ties to the defaults."""

import dataclasses

import numpy as np
import pytest

from unetcell.config import Config, load_config
from unetcell.model import saved_config
from unetcell.train import train
from unetcell.tuning import pooled_f1, tune_postprocessing


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
    untuned = config.override("train", tune_postprocessing=False)
    train(synth_folder, tmp_path / "plain", untuned, verbose=0)
    assert saved_config(tmp_path / "plain" / "model.keras") == untuned
