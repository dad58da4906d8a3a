"""The custom training loop's step against `model.fit`'s, and the input pipeline ahead of both.

    .venv/bin/python benchmarks/train_step.py                        # 16 filters, tile 572
    .venv/bin/python benchmarks/train_step.py --filters 8 --tile 380 --steps 10

`unetcell train` runs its own loop (`train.Trainer.distributed_train_step` under a
tf.distribute strategy, a host sync per step for the NaN check and the progress bar) so that it
can checkpoint mid-epoch, resume at the same tile and stop cleanly on Ctrl-C. This measures
what that costs against Keras' own `model.fit` of the same model (same weights, optimizer and
loss) on the same in-memory batches, in one process, the two alternated so that load from
other processes hits both; the figure is the best time per step of each and their ratio
(bar: custom / fit <= 1.05). Then the training input pipeline (`data.training_dataset`,
augmentation on) alone, in batches per second, over the steps per second of the loop: how far
ahead of the step it runs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from unetcell import augment  # noqa: E402
from unetcell.config import Config  # noqa: E402
from unetcell.data import load_examples, training_dataset  # noqa: E402
from unetcell.folders import find_pairs  # noqa: E402
from unetcell.synth import write_dataset  # noqa: E402
from unetcell.train import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--tile", type=int, default=572)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed pass")
    parser.add_argument("--repeats", type=int, default=3, help="alternated passes of each")
    args = parser.parse_args()
    config = (Config().override("model", filters=args.filters, depth=args.depth, channels=1)
              .override("train", tile=args.tile, batch_size=args.batch_size))
    with tempfile.TemporaryDirectory(prefix="unetcell-bench-") as tmp:
        write_dataset(Path(tmp), count=4, shape=(600, 600), seed=1)
        examples, _ = load_examples(find_pairs(tmp), config)
    augmenter = augment.build_augmenter(config.augment)
    dataset = training_dataset(examples, config, augmenter)
    batches = [tuple(t for t in batch) for batch in dataset.take(args.steps)]

    custom = Trainer(config)
    fitted = Trainer(config)  # the same model, compiled the same way, for model.fit
    fitted.model.set_weights(custom.model.get_weights())
    images = tf.concat([b[0] for b in batches], 0)
    packed = tf.concat([b[1] for b in batches], 0)
    fit_data = tf.data.Dataset.from_tensor_slices((images, packed)).batch(args.batch_size).repeat()

    def run_custom() -> float:
        start = time.perf_counter()
        for batch in batches:
            float(custom.distributed_train_step(batch))  # as unetcell train: a sync per step
        return (time.perf_counter() - start) / len(batches)

    def run_fit() -> float:
        start = time.perf_counter()
        fitted.model.fit(fit_data, epochs=1, steps_per_epoch=len(batches), verbose=0)
        return (time.perf_counter() - start) / len(batches)

    run_custom(), run_fit()  # trace both
    load = os.getloadavg()[0]
    custom_s, fit_s = [], []
    for _ in range(args.repeats):
        custom_s.append(run_custom())
        fit_s.append(run_fit())
    c, f = min(custom_s), min(fit_s)
    print(f"training step, {args.filters} filters, depth {args.depth}, tile {args.tile}, batch "
          f"{args.batch_size}, Keras {keras.__version__}; best of {args.repeats} x {len(batches)} steps, "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores")
    print(f"    custom loop (unetcell train) {1000 * c:7.0f} ms/step   (all passes: "
          + ", ".join(f"{1000 * v:.0f}" for v in custom_s) + ")")
    print(f"    model.fit                    {1000 * f:7.0f} ms/step   (all passes: "
          + ", ".join(f"{1000 * v:.0f}" for v in fit_s) + ")")
    print(f"    ratio custom / fit: {c / f:.3f} (bar <= 1.05)")

    pipeline = iter(training_dataset(examples, config, augmenter, start=10**6))
    next(pipeline)
    best = np.inf
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(4 * args.steps):
            next(pipeline)
        best = min(best, (time.perf_counter() - start) / (4 * args.steps))
    print(f"    input pipeline alone (augmentation on) {1000 * best:.1f} ms/batch: "
          f"{c / best:.0f}x the step rate")


if __name__ == "__main__":
    main()
