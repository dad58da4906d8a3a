"""What augmentation costs: where its time goes, what it does to the tf.data pipeline, and what
it does to training (issue 4; the bar: training wall time with / without <= 1.15 on 2 cores).

    .venv/bin/python benchmarks/pipeline.py                      # (a), (b) and (c)
    .venv/bin/python benchmarks/pipeline.py --parts a b          # without the training runs
    .venv/bin/python benchmarks/pipeline.py --repeats 3          # more training pairs

(a) milliseconds per tile of each transform alone (applied with p = 1, on an image, its class
    map and its weight map as the pipeline passes them) and of the whole default pipeline, for
    the tile sizes 188, 316 and 572 (the paper's);
(b) batches per second of unetcell.data's training pipeline alone, with and without the
    augmenter, and the augmenter alone inside tf.data's parallel map;
(c) `unetcell train` wall and CPU time with augmentation over without, same model and steps,
    the runs alternated (aug, plain, aug, plain, ...) so a machine that gets busier or quieter
    affects both; the median ratio is the figure.

Timings are medians (a) or best of a few passes (b): on a shared machine other processes only
ever add time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from unetcell import augment, targets  # noqa: E402
from unetcell.config import AugmentConfig, Config, NormalizeConfig  # noqa: E402
from unetcell.normalize import normalize  # noqa: E402
from unetcell.synth import synth_sample, write_dataset  # noqa: E402

SIZES = (188, 316, 572)
TRAIN_ARGS = ["--filters", "8", "--depth", "3", "--epochs", "1", "--steps-per-epoch", "40", "--seed", "1"]


def sample_tile(size: int, seed: int = 0):
    """A normalised synthetic fluorescence tile with its class map and weight map."""
    image, labels = synth_sample((size, size), seed)
    image = normalize(image if image.ndim == 3 else image[..., None], NormalizeConfig())
    return (np.ascontiguousarray(image, np.float32), targets.classes(labels),
            targets.weight_map(labels, balance=0.5).astype(np.float32))


def median_ms(fn, reps: int) -> float:
    fn(0)
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


# --- (a) -------------------------------------------------------------------------------------

def transform_table(reps: int) -> None:
    config = AugmentConfig()
    every = replace(config, affine_p=1, elastic_p=1, brightness_contrast_p=1, gamma_p=1, noise_p=1, blur_p=1)
    geometric = augment.geometric_transforms(every)
    gray = augment.gray_value_transforms(every)
    tiles = {n: sample_tile(n) for n in SIZES}
    rows: list[tuple[str, dict[int, float]]] = []

    def row(name, make_call):
        rows.append((name, {n: median_ms(make_call(*tiles[n]), reps) for n in SIZES}))

    for t in geometric:
        def make(image, classes, weights, t=t):
            compose = A.Compose([t], additional_targets={"weights": "image"})
            return lambda s: (compose.set_random_seed(s), compose(image=image, mask=classes, weights=weights))
        row(f"{type(t).__name__} (image, classes, weights)", make)
    for t in gray:
        def make(image, classes, weights, t=t):
            compose = A.Compose([t])
            return lambda s: (compose.set_random_seed(s), compose(image=image))
        row(f"{type(t).__name__} (image)", make)
    for threads in (1, 2):
        for name, cfg in (("default pipeline, the config's p", config), ("every transform applied", every)):
            def make(image, classes, weights, cfg=cfg, threads=threads):
                augmenter = augment.build_augmenter(cfg, cv2_threads=threads)
                return lambda s: augmenter(image, classes, weights, s)
            row(f"{name}, cv2 threads {threads}", make)
    cv2.setNumThreads(1)

    print(f"(a) augmentation, ms per tile (median of {reps}, 1 image channel; cv2 threads 1 "
          "unless said)")
    width = max(len(name) for name, _ in rows)
    print(f"    {'':{width}}" + "".join(f"{n:>9}" for n in SIZES))
    for name, times in rows:
        print(f"    {name:{width}}" + "".join(f"{times[n]:9.2f}" for n in SIZES))


# --- (b) -------------------------------------------------------------------------------------

def pipeline_rates(data: Path, batches: int) -> None:
    import tensorflow as tf

    from unetcell.data import discover_pairs, load_examples, split_examples, training_dataset

    config = Config().override("model", filters=8, depth=3).override("train", seed=1)
    examples, _ = load_examples(discover_pairs(data), config)
    train, _ = split_examples(examples, config.train.val_fraction, config.train.seed)

    def rate(dataset) -> float:
        iterator = iter(dataset)
        for _ in range(5):  # warm-up: threads, autotuning, the pipelines of each thread
            next(iterator)
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            best = max(best, batches / (time.perf_counter() - t))
        return best

    augmenter = augment.build_augmenter(config.augment)
    plain = rate(training_dataset(train, config))
    augmented = rate(training_dataset(train, config, augmenter))
    tile = sample_tile(config.train.tile)
    alone = rate(
        tf.data.Dataset.range(2**62).map(
            lambda i: tf.numpy_function(lambda s: augmenter(*tile, s)[0], [i], tf.float32, stateful=False),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        ).prefetch(tf.data.AUTOTUNE)
    )
    print(f"(b) tf.data, batches of {config.train.batch_size} tile(s) of {config.train.tile} px per "
          f"second (best of 3 x {batches}):")
    print(f"    unetcell.data training pipeline, plain      {plain:7.1f}")
    print(f"    unetcell.data training pipeline, augmented  {augmented:7.1f}   ({plain / augmented:.2f} x the time)")
    print(f"    the augmenter alone in a parallel map       {alone:7.1f}")


# --- (c) -------------------------------------------------------------------------------------

def train_ratio(data: Path, work: Path, repeats: int) -> None:
    cli = Path(sys.executable).with_name("unetcell")
    runs: dict[str, list[tuple[float, float]]] = {"aug": [], "plain": []}
    for r in range(repeats):
        order = ("aug", "plain") if r % 2 == 0 else ("plain", "aug")
        for mode in order:
            out = work / f"run-{mode}-{r}"
            flag = ["--no-augment"] if mode == "plain" else []
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            done = subprocess.run([str(cli), "train", str(data), "--out", str(out), *TRAIN_ARGS, *flag],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                sys.exit(f"unetcell train failed: {done.stderr.strip().splitlines()[-1:]}")
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            runs[mode].append((wall, cpu))
            print(f"    {mode:5} wall {wall:6.1f} s  cpu {cpu:6.1f} s", flush=True)
    ratios = [a[0] / p[0] for a, p in zip(runs["aug"], runs["plain"])]
    cpu_ratios = [a[1] / p[1] for a, p in zip(runs["aug"], runs["plain"])]
    print(f"(c) unetcell train {' '.join(TRAIN_ARGS)}: with / without augmentation")
    print(f"    wall time ratio per pair {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f} (bar <= 1.15)")
    print(f"    CPU time ratio per pair  {', '.join(f'{r:.3f}' for r in cpu_ratios)}; "
          f"median {statistics.median(cpu_ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    parser.add_argument("--reps", type=int, default=40, help="tiles per timing in (a)")
    parser.add_argument("--batches", type=int, default=40, help="batches per pass in (b)")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of training runs in (c)")
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}, OpenCV {cv2.__version__}, albumentations {A.__version__}")
    if "a" in args.parts:
        transform_table(args.reps)
    if "b" in args.parts or "c" in args.parts:
        work = Path(tempfile.mkdtemp(prefix="unetcell-bench-"))
        try:
            data = work / "data"  # as the acceptance check: unetcell synth DATA --count 6 --shape 512 512 --seed 2
            write_dataset(data, count=6, shape=(512, 512), seed=2)
            if "b" in args.parts:
                pipeline_rates(data, args.batches)
            if "c" in args.parts:
                train_ratio(data, work, args.repeats)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
