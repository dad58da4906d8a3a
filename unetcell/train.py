"""Training (paper section 3): a custom loop around one step function.

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy, so the loop is ours: the model
and optimizer are created in `strategy.scope()`, `train_step` is what `strategy.run` executes
on each replica, and the loss is summed per replica and divided by the global number of pixels
so that any number of replicas gives the same gradient. Cross-cutting work (checkpoints, CSV
and TensorBoard logs, the progress bar) lives in Keras callbacks.

A run folder holds:
    model.keras     the best model by validation loss (the last one without validation)
    last.keras      the last epoch's model and optimizer, which --resume continues from, with
                    the training state inside (so a kill -9 never leaves them out of step)
    state.json      the number of finished epochs and the best validation loss so far
    history.csv     one row per epoch: loss, val_loss, val_iou, val_pixel_accuracy
    logs/           TensorBoard
    config.toml     the resolved settings
    cache/          the targets of each mask, keyed by its content

Under a multi-worker strategy every worker runs this same loop; only the chief writes the run
folder, the others write theirs to a temporary folder (`unetcell.distribute`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from . import augment, targets
from .config import Config, save_config
from .data import (
    TileGeometry,
    find_pairs,
    load_examples,
    split_examples,
    training_dataset,
    validation_dataset,
)
from .distribute import Role, make_strategy, role, worker_dir
from .errors import OutputExistsError, TrainingStopped, UnetcellError
from .files import write_text_atomic
from .geometry import Geometry
from .losses import WeightedCrossEntropy, foreground_counts
from .model import build_model, load_model, save_model, saved_config, saved_entry

RUN_FILES = ("model.keras", "last.keras", "state.json", "history.csv", "config.toml")

# The training state saved inside last.keras (and copied to state.json for people to read).
STATE_ENTRY = "unetcell_state.json"


def scheduled_learning_rate(config: Config, step: int) -> float:
    """The learning rate of step `step` (0-based, counted over the whole run): constant, or
    cosine: a linear warm-up over the first 5 % of the steps, then a cosine decay towards zero
    at the last step. The loop sets it before every step from the run's own step count, so a
    resumed run, even one given more epochs, follows its configuration's curve."""
    t = config.train
    if t.schedule == "constant":
        return t.learning_rate
    total = t.epochs * t.steps_per_epoch
    warmup = max(1, total // 20)
    if step < warmup:
        return t.learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return t.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


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
        with self.strategy.scope(), precision_policy(config.train.mixed_precision):
            # Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer.
            self.model = model or build_model(config.model)
            if model is None or model.optimizer is None:
                self.model.compile(optimizer=make_optimizer(config), loss=WeightedCrossEntropy())
            # The loss compiled in (or restored from last.keras) is the one the steps call.
            self.loss = self.model.loss
            self.optimizer = self.model.optimizer
            if not self.optimizer.built:
                # Built lazily inside the first distributed step, the slots of a second
                # mirrored replica fail to initialise (placeholder error in a cond).
                self.optimizer.build(self.model.trainable_variables)

    def train_step(self, images, packed):
        """One replica's step. The loss sums over this replica's pixels and divides by the
        global number of pixels (its pixels x the replicas: `WeightedCrossEntropy`), so the
        replicas' sum is the loss of the global batch."""
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            loss = self.loss(packed, probabilities)
            scaled = self.optimizer.scale_loss(loss)  # float16: a LossScaleOptimizer's scale
        variables = self.model.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return loss

    def eval_step(self, images, packed):
        probabilities = self.model(images, training=False)
        # Summed, not reduced per batch: the last batch may be smaller than the others.
        loss_sum = tf.reduce_sum(self.loss.call(packed, probabilities))
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
        self.save_last(epoch + 1)

    def save_last(self, epochs_done: int, steps_done: int = 0, loss_sum: float = 0.0) -> None:
        """last.keras with the state inside it: `steps_done` steps into the next epoch (an
        interrupted epoch) whose losses summed to `loss_sum`."""
        state = {"epochs_done": epochs_done, "steps_done": steps_done, "loss_sum": loss_sum,
                 "best": self.best if math.isfinite(self.best) else None,
                 "dropout_seeds": _seed_states(self.model)}
        text = json.dumps(state, indent=2)
        save_model(self.model, self.run_dir / "last.keras", self.config, overwrite=True,
                   extra={STATE_ENTRY: text})
        write_text_atomic(self.run_dir / "state.json", text)


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
        # A run killed in its first epoch has its config.toml but no checkpoint yet.
        if not (run_dir / "last.keras").exists() and not (run_dir / "config.toml").exists():
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


@contextlib.contextmanager
def precision_policy(mixed_precision: str):
    """Layers built inside compute in bfloat16 or float16 with float32 variables (the U-Net's
    softmax is float32 regardless); the global policy is restored afterwards."""
    if mixed_precision == "off":
        yield
        return
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def seed_everything(config: Config) -> None:
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()


def train(
    data: str | os.PathLike, run_dir: str | os.PathLike, config: Config, resume: bool = False,
    overwrite: bool = False, save_targets: bool = False, strategy: tf.distribute.Strategy | None = None,
    verbose: int = 1, manual_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Train on a dataset folder (or a `tfds:` data set read from `manual_dir`) and write the
    run; returns the last epoch's logs.

    Without `strategy`, the one named by config.train.strategy is built first (a multi-worker
    strategy must exist before TensorFlow starts)."""
    run_dir = Path(run_dir)
    strategy = strategy or make_strategy(config.train.strategy)
    this = role(strategy)
    with worker_dir(run_dir, this) as out_dir:
        try:
            return _train(data, run_dir, out_dir, this, config, resume, overwrite, save_targets,
                          strategy, verbose, manual_dir)
        except tf.errors.UnavailableError as e:
            if this.workers == 1:
                raise
            # The usual cause is another worker's own error (its log says which); this one
            # only sees its collectives aborted.
            raise UnetcellError(
                f"{this.describe()}: lost the other workers (one of them stopped or cannot be "
                f"reached; see its log): {str(e).splitlines()[0][:200]}"
            ) from None


def _train(
    data, run_dir: Path, out_dir: Path, this: Role, config: Config, resume: bool,
    overwrite: bool, save_targets: bool, strategy: tf.distribute.Strategy, verbose: int,
    manual_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """The loop of every worker. `out_dir` is what this worker writes (the run folder on the
    chief, a temporary folder on the others); `run_dir` is read to resume."""
    config = config.for_targets()
    if this.is_chief or resume:  # the others must not touch the chief's run before resuming
        _prepare_run_dir(run_dir, resume, overwrite)
    if resume and (run_dir / "last.keras").exists():  # before anything in the run is rewritten
        _check_same_model(run_dir / "last.keras", saved_config(run_dir / "last.keras"), config)
    unpaired: list[str] = []  # reported with the pairs' own problems, in one message
    pairs = find_pairs(data, manual_dir, unpaired=unpaired)
    seed_everything(config)
    examples, report = load_examples(pairs, config, cache_dir=out_dir / "cache", unpaired=unpaired)
    channels = examples[0].image.shape[2]
    if channels != config.model.channels:
        config = config.override("model", channels=channels)
    _say(verbose, f"{len(pairs)} image(s) from {data}: {report.describe()}")
    train_examples, val_examples = split_examples(examples, config.train.val_fraction, config.train.seed)
    config = _annotated_min_size(config, examples, verbose)
    config = _balance_shift(config, examples, verbose)
    geometry = TileGeometry.for_config(config)
    if geometry.input != config.train.tile:
        network = Geometry.of_config(config.model).describe()
        _say(verbose, f"tile {config.train.tile} is not valid for {network}; using {geometry.input}")
        config = config.override("train", tile=geometry.input)
    _say(verbose, f"training tiles {geometry.input} -> {geometry.output} px; "
                  f"validation: {', '.join(e.name for e in val_examples) or 'none'}")
    replicas = strategy.num_replicas_in_sync
    global_batch = config.train.batch_size * replicas
    if replicas > 1 or this.workers > 1:
        name = {"CollectiveAllReduceStrategy": "MultiWorkerMirroredStrategy"}.get(
            type(strategy).__name__, type(strategy).__name__)
        _say(verbose, f"{name} ({this.describe()}), {replicas} replicas: global batch "
                      f"{global_batch} = {config.train.batch_size} per replica x {replicas}")
    if config.train.mixed_precision != "off":
        _say(verbose, f"mixed precision: {config.train.mixed_precision} compute, float32 variables")
    save_config(config, out_dir / "config.toml")
    if save_targets and this.is_chief:
        _save_target_figures(pairs, examples, run_dir / "targets", config)

    epochs_done, steps_done, loss_sum, best = 0, 0, 0.0, math.inf
    model = None
    if resume and not (run_dir / "last.keras").exists():
        _say(verbose, f"resuming {run_dir}: it was stopped before its first checkpoint, so "
                      f"training starts at epoch 1 of {config.train.epochs}")
    elif resume:
        state = _resume_state(run_dir)
        epochs_done, steps_done = int(state["epochs_done"]), int(state.get("steps_done", 0))
        loss_sum = float(state.get("loss_sum", 0.0))
        best = state["best"] if state.get("best") is not None else math.inf
        with strategy.scope():  # mirrored variables, whatever the strategy
            model, _ = load_model(run_dir / "last.keras", compile=True)
        _restore_seed_states(model, state.get("dropout_seeds", {}))
        if this.is_chief:
            _trim_history(run_dir / "history.csv", epochs_done)
        if epochs_done >= config.train.epochs:
            _say(verbose, f"nothing to resume: {run_dir} has finished {epochs_done} of "
                          f"{config.train.epochs} epochs; raise --epochs to train longer")
            return {}
        within = f", step {steps_done + 1} of {config.train.steps_per_epoch}" if steps_done else ""
        _say(verbose, f"resuming {run_dir} from its checkpoint after {epochs_done} epoch(s): "
                      f"epoch {epochs_done + 1}{within} of {config.train.epochs}")
    trainer = Trainer(config, strategy, model)
    augmenter = augment.build_augmenter(config.augment) if config.augment.enabled else None
    steps = config.train.steps_per_epoch
    train_ds = _distributed_training_dataset(strategy, train_examples, config, augmenter,
                                             start=(epochs_done * steps + steps_done) * global_batch)
    val_ds = validation_dataset(val_examples, config.override("train", batch_size=global_batch))
    pictures = []
    if val_ds is not None:
        tiles, packed = next(iter(val_ds.unbatch().batch(3)))
        pictures = [ValidationImages(out_dir / "logs", tiles.numpy(), packed.numpy(), geometry.margin)]
        # Each worker evaluates every n-th batch; the sums are reduced across all of them.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        val_ds = strategy.experimental_distribute_dataset(val_ds.with_options(options))

    checkpoint = RunCheckpoint(out_dir, config, best, "val_loss" if val_ds is not None else None)
    callbacks = keras.callbacks.CallbackList(
        [
            checkpoint,
            keras.callbacks.CSVLogger(str(out_dir / "history.csv"), append=resume),
            keras.callbacks.TensorBoard(str(out_dir / "logs"), write_graph=False),
            *pictures,
        ],
        add_progbar=verbose > 0 and this.is_chief, verbose=verbose, model=trainer.model,
        epochs=config.train.epochs, steps=steps,
    )
    logs: dict[str, float] = {}
    callbacks.on_train_begin()
    batches = iter(train_ds)
    resume_hint = f"unetcell train {data} --out {run_dir} --resume"
    scheduled = config.train.schedule != "constant"
    with _stop_requests() as stop:
        for epoch in range(epochs_done, config.train.epochs):
            callbacks.on_epoch_begin(epoch)
            first = steps_done if epoch == epochs_done else 0
            total = loss_sum if epoch == epochs_done else 0.0
            for step in range(first, steps):
                callbacks.on_train_batch_begin(step)
                if scheduled:
                    trainer.optimizer.learning_rate = scheduled_learning_rate(config, epoch * steps + step)
                loss = float(trainer.distributed_train_step(next(batches)))
                if not math.isfinite(loss):
                    raise TrainingStopped(_diverged(run_dir, loss, epoch, step, config))
                total += loss
                callbacks.on_train_batch_end(step, {"loss": total / (step + 1)})
                if stop.requested and step + 1 < steps:
                    checkpoint.save_last(epoch, step + 1, total)
                    raise TrainingStopped(
                        f"{stop.requested}: training stopped at epoch {epoch + 1}, step "
                        f"{step + 1} of {steps}; saved {run_dir / 'last.keras'}. Continue with: "
                        f"{resume_hint}", exit_code=130)
            logs = {"loss": total / steps}
            if val_ds is not None:
                logs.update(trainer.evaluate(val_ds))
            callbacks.on_epoch_end(epoch, logs)
            if stop.requested:
                raise TrainingStopped(
                    f"{stop.requested}: training stopped after epoch {epoch + 1} of "
                    f"{config.train.epochs}; saved {run_dir / 'last.keras'}. Continue with: "
                    f"{resume_hint}", exit_code=130)
    callbacks.on_train_end(logs)
    if val_examples and config.train.tune_postprocessing and this.is_chief:
        tune_saved_model(run_dir, config, val_examples, verbose)
    return logs


class _StopRequest:
    requested: str | None = None  # the signal's name once one arrived


@contextlib.contextmanager
def _stop_requests():
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at the next step boundary, where the
    model and optimizer are consistent and can be saved; a second Ctrl-C stops at once."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {}

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"\n{stop.requested}: saving a checkpoint after this step "
              "(Ctrl-C again to stop without saving)", flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _diverged(run_dir: Path, loss: float, epoch: int, step: int, config: Config) -> str:
    if (run_dir / "last.keras").exists():
        kept = (f"{run_dir / 'last.keras'} keeps the last good checkpoint (before epoch "
                f"{epoch + 1}); continue from it with --resume and a lower rate")
    else:
        kept = "no checkpoint was written (it diverged in the first epoch)"
    advice = "lower --learning-rate"
    if config.train.optimizer == "sgd":
        advice += f" or use --optimizer adam (SGD with momentum {config.train.momentum} diverges easily)"
    return (f"training stopped: the loss became {loss} at epoch {epoch + 1}, step {step + 1}; "
            f"{kept}. {advice} (now {config.train.learning_rate:g})")


def _seed_states(model: keras.Model) -> dict[str, list[int]]:
    """The random state of each dropout layer: Keras keeps it outside the model's weights, and
    a resumed run must draw the dropout masks an uninterrupted run would have drawn."""
    return {
        layer.name: [int(v) for v in keras.ops.convert_to_numpy(layer.seed_generator.state)]
        for layer in model.layers if getattr(layer, "seed_generator", None) is not None
    }


def _restore_seed_states(model: keras.Model, states: dict[str, list[int]]) -> None:
    for layer in model.layers:
        generator = getattr(layer, "seed_generator", None)
        if generator is not None and layer.name in states:
            generator.state.assign(np.asarray(states[layer.name], dtype=generator.state.dtype))


def _resume_state(run_dir: Path) -> dict:
    """The state saved inside last.keras (state.json for runs from before it was)."""
    text = saved_entry(run_dir / "last.keras", STATE_ENTRY)
    if text is None and (run_dir / "state.json").exists():
        text = (run_dir / "state.json").read_text()
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise UnetcellError(f"{run_dir / 'last.keras'}: holds no training state to resume from") from None


def _check_same_model(path: Path, saved: Config | None, config: Config) -> None:
    """A resumed run keeps its network: refuse options that would describe another one."""
    if saved is None:
        return
    changed = [
        f"{name} {getattr(saved.model, name)} in the checkpoint, {getattr(config.model, name)} asked"
        for name in saved.model.__dataclass_fields__
        if name != "channels" and getattr(saved.model, name) != getattr(config.model, name)
    ]
    if changed:
        raise UnetcellError(
            f"{path}: --resume continues the same network, but {'; '.join(changed)}; drop those "
            "options or start a new run with another --out"
        )


def _trim_history(path: Path, epochs_done: int) -> None:
    """Drop history rows of epochs after the checkpoint (a run killed between writing its
    log and its checkpoint), so the resumed run's log has one row per epoch."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) > epochs_done + 1:
        write_text_atomic(path, "".join(lines[:epochs_done + 1]))


def _distributed_training_dataset(strategy, examples, config: Config, augmenter, start: int):
    """Training batches for every replica. Worker k of n draws tiles start + k, start + k + n,
    ... and its replicas take consecutive per-replica batches, so one step covers tiles
    [start + s G, start + (s+1) G) of global batch G on every strategy, as on one device: the
    same tiles, a resume at the same index, and no worker augmenting tiles it throws away."""

    def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return training_dataset(examples, config, augmenter, start=start,
                                shard=(context.input_pipeline_id, context.num_input_pipelines))

    return strategy.distribute_datasets_from_function(per_worker)


def _annotated_min_size(config: Config, examples, verbose: int) -> Config:
    """Raise predict.min_size to its fraction of the smallest annotated cells (stored with the
    model, so `unetcell predict` drops the network's debris-sized false positives)."""
    from .tuning import annotated_min_size

    p = config.predict
    if p.min_size_fraction <= 0:
        return config
    floor, smallest = annotated_min_size([e.labels for e in examples], p.min_size_fraction)
    if floor <= p.min_size:
        return config
    _say(verbose, f"min size {floor} px: {p.min_size_fraction:g} of the smallest annotated cells "
                  f"({smallest:.0f} px, 1st percentile of the masks' cell areas)")
    return config.override("predict", min_size=floor)


def _balance_shift(config: Config, examples, verbose: int) -> Config:
    """Store the logit by which the class-balance term raises the foreground, so that predict
    divides it out and gives calibrated probabilities (`tiling.calibrated`)."""
    if not config.train.calibrate:
        return config
    if config.targets.kind == "three-class":
        # The shift is one logit between background and foreground; three classes have a
        # balance weight each, so their probabilities stay as the loss taught them and the
        # threshold on the interiors is what is tuned.
        _say(verbose, "class balance: three-class probabilities are not calibrated")
        return config.override("predict", balance_shift=0.0)
    shift = targets.balance_shift([e.classes for e in examples], config.targets.balance)
    if shift:
        _say(verbose, f"class balance: the loss weighs foreground x{math.exp(shift):.2f} against "
                      f"background here; predict divides it out (balance shift {shift:+.3f})")
    return config.override("predict", balance_shift=round(shift, 6))


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
    from .figures import figure_settings, targets_figure
    from .io import write_png

    for pair, example in zip(pairs, examples):
        figure = targets_figure(example.labels, image=example.image, **figure_settings(config.targets))
        write_png(out_dir / f"{pair.stem}.png", figure, overwrite=True)
