"""Training (paper section 3): a custom loop around one step function.

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy, so the loop is ours: the model
and optimizer are created in `strategy.scope()`, `train_step` is what `strategy.run` executes
on each replica, and the loss is summed per replica and divided by the global number of pixels
so that any number of replicas gives the same gradient. Cross-cutting work (checkpoints, CSV
and TensorBoard logs, the progress bar) lives in Keras callbacks.

A run folder holds:
    model.keras     the best model by validation loss (the last one without validation)
    last.keras      the last epoch's model and optimizer, which --resume continues from
    state.json      the number of finished epochs and the best validation loss so far
    history.csv     one row per epoch: loss, val_loss, val_iou, val_pixel_accuracy
    logs/           TensorBoard
    config.toml     the resolved settings
    cache/          the targets of each mask, keyed by its content
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from . import augment
from .config import Config, save_config
from .data import (
    TileGeometry,
    discover_pairs,
    load_examples,
    split_examples,
    training_dataset,
    validation_dataset,
)
from .errors import OutputExistsError, UnetcellError
from .files import write_text_atomic
from .losses import WeightedCrossEntropy, foreground_counts, pixel_losses
from .model import build_unet, load_model, save_model

RUN_FILES = ("model.keras", "last.keras", "state.json", "history.csv", "config.toml")


def make_optimizer(config: Config) -> keras.optimizers.Optimizer:
    t = config.train
    if t.optimizer == "sgd":
        # The paper's momentum of 0.99 averages over ~100 steps; with a mean-reduced loss it
        # needs a smaller learning rate than a summed one (DESIGN.md: 1e-2 diverged).
        return keras.optimizers.SGD(t.learning_rate, momentum=t.momentum)
    return keras.optimizers.Adam(t.learning_rate)


class Trainer:
    """Holds the model, optimizer and step functions of one run under one strategy."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy | None = None,
                 model: keras.Model | None = None):
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.geometry = TileGeometry.for_config(config)
        with self.strategy.scope():
            self.model = model or build_unet(config.model)
            if model is None or model.optimizer is None:
                self.model.compile(optimizer=make_optimizer(config), loss=WeightedCrossEntropy())
            self.optimizer = self.model.optimizer
        replicas = self.strategy.num_replicas_in_sync
        self._global_pixels = float(config.train.batch_size * replicas * self.geometry.output**2)

    def train_step(self, images, packed):
        """One replica's step: the weighted loss summed over its pixels / the global count."""
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            loss = tf.reduce_sum(pixel_losses(packed, probabilities)) / self._global_pixels
        variables = self.model.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return loss

    def eval_step(self, images, packed):
        probabilities = self.model(images, training=False)
        loss_sum = tf.reduce_sum(pixel_losses(packed, probabilities))
        return (loss_sum, tf.cast(tf.size(packed[..., 0]), tf.float32),
                *foreground_counts(packed, probabilities))

    @tf.function
    def distributed_train_step(self, batch):
        per_replica = self.strategy.run(self.train_step, args=batch)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    @tf.function
    def distributed_eval_step(self, batch):
        per_replica = self.strategy.run(self.eval_step, args=batch)
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica]

    def evaluate(self, dataset) -> dict[str, float]:
        totals = np.zeros(6)
        for batch in dataset:
            totals += np.array([float(v) for v in self.distributed_eval_step(batch)])
        loss_sum, pixels, intersection, union, correct, total = totals
        return {
            "val_loss": loss_sum / pixels,
            "val_iou": intersection / union if union else 1.0,
            "val_pixel_accuracy": correct / total,
        }


class RunCheckpoint(keras.callbacks.Callback):
    """Saves model.keras when validation loss improves (each epoch without validation) and
    last.keras + state.json after every epoch, each atomically, the config inside."""

    def __init__(self, run_dir: Path, config: Config, best: float, monitor: str | None):
        super().__init__()
        self.run_dir, self.config, self.best, self.monitor = run_dir, config, best, monitor

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        current = logs.get(self.monitor) if self.monitor else None
        if current is None or current < self.best:
            if current is not None:
                self.best = float(current)
            save_model(self.model, self.run_dir / "model.keras", self.config, overwrite=True,
                       include_optimizer=False)
        save_model(self.model, self.run_dir / "last.keras", self.config, overwrite=True)
        state = {"epochs_done": epoch + 1, "best": self.best if math.isfinite(self.best) else None}
        write_text_atomic(self.run_dir / "state.json", json.dumps(state, indent=2))


class ValidationImages(keras.callbacks.Callback):
    """A few validation tiles as TensorBoard images each epoch: predicted contours (magenta)
    and true contours (green) on the tile, so a user sees what the numbers mean."""

    def __init__(self, log_dir: Path, images: np.ndarray, packed: np.ndarray, margin: int):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(log_dir / "validation"))
        self.images, self.packed, self.margin = images, packed, margin

    def on_epoch_end(self, epoch, logs=None):
        from skimage.measure import label

        from .overlay import contour_overlay

        probabilities = self.model.predict_on_batch(self.images)[..., 1]
        m = self.margin
        pictures = []
        for image, packed, p in zip(self.images, self.packed, probabilities):
            inner = image[m:image.shape[0] - m, m:image.shape[1] - m] if m else image
            pictures.append(contour_overlay(
                inner, predicted=label(p > 0.5, connectivity=1),
                truth=label(packed[..., 0] > 0.5, connectivity=1),
            ))
        with self.writer.as_default():
            tf.summary.image("validation overlays", np.stack(pictures), step=epoch, max_outputs=len(pictures))
        self.writer.flush()


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if not (run_dir / "last.keras").exists():
            raise UnetcellError(f"{run_dir}: nothing to resume (no last.keras); start a new run")
        return
    if existing and not overwrite:
        raise OutputExistsError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue "
            "it, --overwrite to replace it, or choose another --out"
        )
    for name in existing:
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "logs", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def seed_everything(config: Config) -> None:
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()


def train(
    data: str | os.PathLike, run_dir: str | os.PathLike, config: Config, resume: bool = False,
    overwrite: bool = False, save_targets: bool = False, strategy: tf.distribute.Strategy | None = None,
    verbose: int = 1,
) -> dict[str, float]:
    """Train on a dataset folder and write the run; returns the last epoch's logs."""
    run_dir = Path(run_dir)
    _prepare_run_dir(run_dir, resume, overwrite)
    pairs = discover_pairs(data)
    seed_everything(config)
    examples, report = load_examples(pairs, config, cache_dir=run_dir / "cache")
    channels = examples[0].image.shape[2]
    if channels != config.model.channels:
        config = config.override("model", channels=channels)
    _say(verbose, f"{len(pairs)} image(s) from {data}: {report.describe()}")
    train_examples, val_examples = split_examples(examples, config.train.val_fraction, config.train.seed)
    geometry = TileGeometry.for_config(config)
    if geometry.input != config.train.tile:
        _say(verbose, f"tile {config.train.tile} is not valid for this U-Net; using {geometry.input}")
        config = config.override("train", tile=geometry.input)
    _say(verbose, f"training tiles {geometry.input} -> {geometry.output} px; "
                  f"validation: {', '.join(e.name for e in val_examples) or 'none'}")
    save_config(config, run_dir / "config.toml")
    if save_targets:
        _save_target_figures(pairs, examples, run_dir / "targets", config)

    epochs_done, best = 0, math.inf
    model = None
    if resume:
        state = json.loads((run_dir / "state.json").read_text())
        epochs_done = int(state["epochs_done"])
        best = state["best"] if state.get("best") is not None else math.inf
        model, _ = load_model(run_dir / "last.keras", compile=True)
        if epochs_done >= config.train.epochs:
            _say(verbose, f"{run_dir} has finished {epochs_done} of {config.train.epochs} epochs; "
                          "raise --epochs to train longer")
            return {}
    trainer = Trainer(config, strategy, model)
    augmenter = augment.build_augmenter(config.augment) if config.augment.enabled else None
    steps = config.train.steps_per_epoch
    train_ds = training_dataset(train_examples, config, augmenter,
                                start=epochs_done * steps * config.train.batch_size)
    train_ds = trainer.strategy.experimental_distribute_dataset(train_ds)
    val_ds = validation_dataset(val_examples, config)
    pictures = []
    if val_ds is not None:
        tiles, packed = next(iter(val_ds.unbatch().batch(3)))
        pictures = [ValidationImages(run_dir / "logs", tiles.numpy(), packed.numpy(), geometry.margin)]
        val_ds = trainer.strategy.experimental_distribute_dataset(val_ds)

    callbacks = keras.callbacks.CallbackList(
        [
            RunCheckpoint(run_dir, config, best, "val_loss" if val_ds is not None else None),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
            keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False),
            *pictures,
        ],
        add_progbar=verbose > 0, verbose=verbose, model=trainer.model,
        epochs=config.train.epochs, steps=steps,
    )
    logs: dict[str, float] = {}
    callbacks.on_train_begin()
    batches = iter(train_ds)
    for epoch in range(epochs_done, config.train.epochs):
        callbacks.on_epoch_begin(epoch)
        total = 0.0
        for step in range(steps):
            callbacks.on_train_batch_begin(step)
            loss = float(trainer.distributed_train_step(next(batches)))
            total += loss
            callbacks.on_train_batch_end(step, {"loss": total / (step + 1)})
        logs = {"loss": total / steps}
        if val_ds is not None:
            logs.update(trainer.evaluate(val_ds))
        if not np.isfinite(logs["loss"]):
            raise UnetcellError(
                f"training diverged at epoch {epoch + 1} (loss {logs['loss']}); "
                "lower --learning-rate"
            )
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end(logs)
    if val_examples and config.train.tune_postprocessing:
        tune_saved_model(run_dir, config, val_examples, verbose)
    return logs


def tune_saved_model(run_dir: Path, config: Config, val_examples, verbose: int = 1):
    """Pick the threshold, min size and watershed h on the validation images with the saved
    best model, and store them with it (model.keras and config.toml); `unetcell predict`
    uses them unless --threshold overrides."""
    from .predict import Predictor
    from .tuning import tune_postprocessing, validation_probabilities

    model, _ = load_model(run_dir / "model.keras", compile=False)
    probabilities = validation_probabilities(Predictor(model, config), [e.image for e in val_examples])
    tuned = tune_postprocessing(probabilities, [e.labels for e in val_examples], config)
    config = config.override("predict", threshold=tuned.threshold, min_size=tuned.min_size,
                             watershed_h=tuned.watershed_h)
    save_model(model, run_dir / "model.keras", config, overwrite=True, include_optimizer=False)
    save_config(config, run_dir / "config.toml")
    _say(verbose, f"post-processing picked on validation: {tuned.describe()}")
    return tuned


def _say(verbose: int, text: str) -> None:
    if verbose:
        print(text, flush=True)


def _save_target_figures(pairs, examples, out_dir: Path, config: Config) -> None:
    from .figures import targets_figure
    from .io import write_png

    for pair, example in zip(pairs, examples):
        figure = targets_figure(
            example.labels, image=example.image, w0=config.targets.w0, sigma=config.targets.sigma,
            balance=config.targets.balance, gap=config.targets.gap,
        )
        write_png(out_dir / f"{pair.stem}.png", figure, overwrite=True)
