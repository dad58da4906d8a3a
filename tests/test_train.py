"""Training end to end on synthetic cells: it learns, it repeats, it resumes."""

import csv
import dataclasses

import keras
import numpy as np
import pytest

from unetcell.config import Config, load_config
from unetcell.data import discover_pairs, load_examples, split_examples, validation_dataset
from unetcell.errors import OutputExistsError
from unetcell.train import Trainer, scheduled_learning_rate, seed_everything, train

pytestmark = pytest.mark.slow  # every test here trains a network; `make test-fast` skips them

SMALL = (
    Config()
    .override("model", filters=8, depth=2)
    .override("train", tile=92, batch_size=2, epochs=1, steps_per_epoch=6, seed=3, val_fraction=0.25)
)
# For tests about the loop itself: picking the post-processing on validation after training
# (tested in test_tuning and by the run folder test here) costs a prediction and a grid search
# per run and changes no loss, checkpoint or history row.
UNTUNED = SMALL.override("train", tune_postprocessing=False)


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_short_training_drives_the_loss_well_down(synth_folder, tmp_path):
    # Three epochs are the first half of a six-epoch run (constant rate, no augmentation): the
    # validation loss is already 0.27 of the untrained one and the IoU 0.68 after them.
    config = UNTUNED.override(
        "train", epochs=3, steps_per_epoch=30, tile=124, learning_rate=2e-3, schedule="constant"
    ).override("augment", enabled=False)
    seed_everything(config)
    examples, _ = load_examples(discover_pairs(synth_folder), config)
    _, val = split_examples(examples, config.train.val_fraction, config.train.seed)
    untrained = Trainer(config).evaluate(validation_dataset(val, config))
    logs = train(synth_folder, tmp_path / "run", config, verbose=0)
    # An untrained U-Net sits near ln 2 = 0.69; chance cannot bring it below a third of that.
    assert logs["val_loss"] < 0.35 * untrained["val_loss"]
    assert logs["val_iou"] > 0.6
    rows = _history(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == list(range(3))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_same_seed_same_losses(synth_folder, tmp_path):
    train(synth_folder, tmp_path / "a", UNTUNED, verbose=0)
    train(synth_folder, tmp_path / "b", UNTUNED, verbose=0)
    train(synth_folder, tmp_path / "c", UNTUNED.override("train", seed=4), verbose=0)
    a, b, c = (_history(tmp_path / r)[0] for r in "abc")
    assert a == b
    assert a["loss"] != c["loss"]


def test_run_folder_contents_and_safe_mode_loading(synth_folder, tmp_path):
    train(synth_folder, tmp_path / "run", SMALL, verbose=0)
    for name in ("model.keras", "last.keras", "state.json", "history.csv", "config.toml"):
        assert (tmp_path / "run" / name).exists(), name
    assert list((tmp_path / "run" / "logs").rglob("*tfevents*"))
    assert list((tmp_path / "run" / "logs" / "validation").rglob("*tfevents*"))  # overlay images
    model = keras.saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    assert model(np.zeros((1, 92, 92, 1), np.float32)).shape == (1, 52, 52, 2)
    saved = load_config(tmp_path / "run" / "config.toml")  # predict: picked on validation
    assert dataclasses.replace(saved, predict=SMALL.predict) == SMALL
    assert not list((tmp_path / "run").glob(".*"))  # no temporary files left behind


def test_resume_continues_from_the_last_epoch(synth_folder, tmp_path):
    # A finished one-epoch run extended to two equals a two-epoch run only at a constant rate:
    # a cosine's first epoch depends on the run's length (test_hardening resumes runs cut
    # short, which follow the cosine exactly).
    config = UNTUNED.override("train", epochs=2, schedule="constant")
    train(synth_folder, tmp_path / "straight", config, verbose=0)
    train(synth_folder, tmp_path / "resumed", config.override("train", epochs=1), verbose=0)
    train(synth_folder, tmp_path / "resumed", config, resume=True, verbose=0)
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [r["epoch"] for r in resumed] == ["0", "1"]
    # Same tiles, same optimizer state: the resumed epoch matches the uninterrupted one.
    np.testing.assert_allclose(float(resumed[1]["loss"]), float(straight[1]["loss"]), rtol=1e-3)


def test_an_existing_run_is_not_overwritten(synth_folder, tmp_path):
    train(synth_folder, tmp_path / "run", UNTUNED, verbose=0)
    before = (tmp_path / "run" / "model.keras").read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train(synth_folder, tmp_path / "run", UNTUNED, verbose=0)
    assert (tmp_path / "run" / "model.keras").read_bytes() == before
    train(synth_folder, tmp_path / "run", UNTUNED, overwrite=True, verbose=0)


def test_cosine_schedule_is_keras_cosine_decay_with_warmup():
    config = SMALL.override("train", schedule="cosine", epochs=10, steps_per_epoch=40, learning_rate=3e-3)
    total, warmup = 400, 20
    reference = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total - warmup, warmup_target=3e-3, warmup_steps=warmup)
    ours = np.array([scheduled_learning_rate(config, step) for step in range(total)])
    # Keras counts the warm-up from 0 at step 0; the loop's first step already learns.
    theirs = np.array([float(reference(step + 1 if step < warmup else step)) for step in range(total)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
    assert ours.max() == pytest.approx(3e-3) and ours[-1] < 1e-6
    constant = SMALL.override("train", schedule="constant")
    assert scheduled_learning_rate(constant, 123) == constant.train.learning_rate


def test_the_loop_follows_the_schedule_to_the_last_step(synth_folder, tmp_path):
    config = SMALL.override("train", schedule="cosine", epochs=2, val_fraction=0)
    train(synth_folder, tmp_path / "run", config, verbose=0)
    model = keras.saving.load_model(tmp_path / "run" / "last.keras", compile=True)
    last = scheduled_learning_rate(config, 2 * 6 - 1)
    assert float(model.optimizer.learning_rate) == pytest.approx(last, rel=1e-5)
    assert last < 0.1 * config.train.learning_rate


def test_a_three_class_run_saves_three_classes_and_predicts_from_the_interiors(synth_folder, tmp_path):
    import tifffile

    from unetcell.predict import load_predictor

    train(synth_folder, tmp_path / "run", SMALL.override("targets", kind="three-class"), verbose=0)
    saved = load_config(tmp_path / "run" / "config.toml")
    assert (saved.targets.kind, saved.model.classes, saved.predict.instances) == ("three-class", 3, "interiors")
    assert saved.predict.balance_shift == 0.0  # three classes are not calibrated by one logit
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert model.output_shape[-1] == 3

    predictor = load_predictor(tmp_path / "run" / "model.keras")
    image = tifffile.imread(sorted((synth_folder / "images").glob("*.tif"))[0])
    maps = predictor.probabilities(image)
    assert maps.shape == image.shape[:2] + (2,)
    assert np.all(maps[..., 1] <= maps[..., 0] + 1e-6)  # the interior is part of the foreground
    result = predictor.predict_slide(image, probabilities=tmp_path / "p.tif", labels=tmp_path / "l.tif")
    # The file holds the foreground alone, the labels are grown from the interiors.
    assert np.array_equal(tifffile.imread(tmp_path / "p.tif"), maps[..., 0])
    assert np.array_equal(tifffile.imread(tmp_path / "l.tif"), predictor.instances(maps))
    assert result.cells == int(predictor.instances(maps).max())
