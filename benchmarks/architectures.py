"""The architectures side by side on real microscopy (../shared/data): the U-Net, its
depthwise-separable variant, FCN-8s and DeepLabv3+, each trained from scratch with the same
config, loss (the border weight map), augmentation and number of training steps, then scored on
the same held-out images as benchmarks/accuracy.py (its layout, splits and scoring).

One table: parameters, GFLOPs per output megapixel (one forward pass at a 512-pixel output,
counted by TensorFlow's profiler), CPU predict throughput (`unetcell predict`'s overlap-tile
pass over a 1024 x 1024 image, tiling overhead included), training seconds, F1 at IoU 0.5 and
mean AP (the post-processing stored with each model), and pixel error of probability > 0.5 (every set).

Training seconds are wall time on whatever else the machine runs: the budget is the same
number of steps of the same tile size, and the seconds say what each architecture paid for it.

    python benchmarks/architectures.py --sets nuclei em --seeds 0 1 2 --steps 300 --work runs/arch
    python benchmarks/architectures.py --schedule constant          # the README's tables
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import SPLITS, lay_out, score, truth_of  # noqa: E402

from unetcell.config import ARCHITECTURES, SCHEDULES, Config  # noqa: E402

FLOPS_OUTPUT_EDGE = 512
THROUGHPUT_EDGE = 1024


def forward_gflops_per_mpx(model, geometry) -> float:
    """GFLOPs of one forward pass per output megapixel, at an output edge of about 512."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler import model_analyzer, option_builder

    size = geometry.valid_tile(FLOPS_OUTPUT_EDGE + 2 * geometry.margin, "up")
    out = geometry.output_size(size)
    channels = int(model.input_shape[-1])
    run = tf.function(lambda x: model(x, training=False))
    graph = convert_variables_to_constants_v2(
        run.get_concrete_function(tf.TensorSpec([1, size, size, channels], tf.float32))).graph
    options = (option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder.float_operation())
               .with_empty_output().build())
    flops = model_analyzer.profile(graph, options=options).total_float_ops
    return flops / out**2 * 1e6 / 1e9


def throughput(predictor) -> float:
    """Output megapixels per second of `Predictor.probabilities` on a random image (after one
    warm-up pass that traces the graph)."""
    image = np.random.default_rng(0).random((THROUGHPUT_EDGE, THROUGHPUT_EDGE, predictor.channels))
    image = (image * 255).astype(np.float32)
    predictor.probabilities(image[:256, :256])
    start = time.perf_counter()
    predictor.probabilities(image)
    return THROUGHPUT_EDGE**2 / 1e6 / (time.perf_counter() - start)


def train_arch(arch: str, name: str, seed: int, steps: int, tile: int, work: Path, reuse: bool,
               config: Config):
    from unetcell.train import train

    train_folder = SPLITS[name][1]
    run = work / "runs" / f"{arch}-{name}-seed{seed}-{steps}x{tile}-{config.train.schedule}"
    if reuse and (run / "model.keras").exists():
        return run / "model.keras", float((run / "train_seconds.txt").read_text())
    config = (config.override("model", arch=arch, filters=16)
              .override("train", epochs=10, steps_per_epoch=max(1, steps // 10), tile=tile,
                        val_fraction=0.0, seed=seed))
    start = time.perf_counter()
    train(work / "data" / train_folder, run, config, overwrite=True, verbose=0)
    seconds = time.perf_counter() - start
    (run / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"  trained {arch} on {name} seed {seed} ({steps} steps of tile {tile}) in {seconds:.0f} s",
          flush=True)
    return run / "model.keras", seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("runs/architectures"))
    parser.add_argument("--sets", nargs="+", default=["nuclei", "em", "phase"], choices=["nuclei", "phase", "em"])
    parser.add_argument("--splits", nargs="*", help="Only these splits (e.g. nuclei-a em).")
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="Training steps (10 epochs), every architecture.")
    parser.add_argument("--tile", type=int, default=572,
                        help="Training tile edge, rounded to each architecture's nearest valid size.")
    parser.add_argument("--schedule", choices=SCHEDULES, default=Config().train.schedule,
                        help="Learning-rate schedule of every run (the README's table used constant).")
    parser.add_argument("--reuse", action="store_true", help="Reuse trained models in --work.")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"{args.data}: no shared data here; run from the project root beside ../shared")
        return 1
    from unetcell.model import build_model
    from unetcell.predict import load_predictor
    from unetcell.tiling import Geometry

    lay_out(args.data, args.work)
    config = Config().override("train", schedule=args.schedule)
    cost = {}
    for arch in args.archs:
        model = build_model(config.model.__class__(arch=arch, filters=16, dropout=0.0))
        cost[arch] = (model.count_params(), forward_gflops_per_mpx(model, Geometry.of_model(model)))
    rows = []
    for name, (kind, _, test_folder, _) in SPLITS.items():
        if kind not in args.sets or (args.splits and name not in args.splits):
            continue
        images = sorted((args.work / "data" / test_folder / "images").glob("*.tif"))
        masks = [args.work / "data" / test_folder / "masks" / i.name for i in images]
        truths = [truth_of(tifffile.imread(m), kind) for m in masks]
        for arch in args.archs:
            for seed in args.seeds:
                path, seconds = train_arch(arch, name, seed, args.steps, args.tile, args.work, args.reuse, config)
                predictor = load_predictor(path)
                maps = [predictor.probabilities(tifffile.imread(i)) for i in images]
                result = score(truths, [predictor.instances(p) for p in maps])
                result["pixel_error"] = float(np.mean(
                    [np.mean((p > 0.5) != (tifffile.imread(m) > 0)) for p, m in zip(maps, masks)]))
                result["mpx_s"] = throughput(predictor)
                result["train_s"] = seconds
                rows.append((name, arch, seed, result))
                print_rows(rows[-1:], cost)
    print(f"\narchitectures, 16 filters, {args.steps} steps of tile {args.tile}, {args.schedule} rate, seeds "
          f"{' '.join(map(str, args.seeds))} ({time.strftime('%Y-%m-%d')}):")
    print_rows(rows, cost, header=True)
    if len(args.seeds) > 1:
        print("\nmedian [min, max] over the seeds:")
        print_medians(rows, cost)
    return 0


def print_medians(rows, cost) -> None:
    """One line per split and architecture: the seeds' medians, with the range of F1 and mean AP
    (the spread that says whether two architectures differ)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for name, arch, _, result in rows:
        groups.setdefault((name, arch), []).append(result)
    print(f"{'split':9s} {'arch':15s} {'n':>2s} {'params':>9s} {'GFLOP/Mpx':>9s} {'Mpx/s':>6s} {'train s':>7s} "
          f"{'F1@0.5 [min, max]':>22s} {'mAP [min, max]':>22s} {'pixerr':>6s}")
    for (name, arch), results in groups.items():
        med = {key: float(np.median([r[key] for r in results]))
               for key in ("mpx_s", "train_s", "f1", "ap", "pixel_error")}
        spread = {key: f"{med[key]:.3f} [{min(r[key] for r in results):.3f}, {max(r[key] for r in results):.3f}]"
                  for key in ("f1", "ap")}
        params, gflops = cost[arch]
        print(f"{name:9s} {arch:15s} {len(results):2d} {params:9,d} {gflops:9.1f} {med['mpx_s']:6.2f} "
              f"{med['train_s']:7.0f} {spread['f1']:>22s} {spread['ap']:>22s} {med['pixel_error']:6.3f}", flush=True)


def print_rows(rows, cost, header=False) -> None:
    if header:
        print(f"{'split':9s} {'arch':15s} {'seed':>4s} {'params':>9s} {'GFLOP/Mpx':>9s} {'Mpx/s':>6s} "
              f"{'train s':>7s} {'F1@0.5':>6s} {'mAP':>6s} {'pixerr':>6s}")
    for name, arch, seed, r in rows:
        params, gflops = cost[arch]
        print(f"{name:9s} {arch:15s} {seed!s:>4s} {params:9,d} {gflops:9.1f} {r['mpx_s']:6.2f} "
              f"{r['train_s']:7.0f} {r['f1']:6.3f} {r['ap']:6.3f} {r['pixel_error']:6.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
