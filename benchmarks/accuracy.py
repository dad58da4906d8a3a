"""Accuracy on real microscopy (../shared/data): train, predict and score side by side.

Splits (each trained on one part, scored on images it never saw):
  nuclei  the two DSB 2018 fluorescence samples: train 1d4a5e72 -> test 212b858a, and the reverse
  phase   phase-contrast whole cells (16-bit): train set1-4 -> test set5-6
  em      ISBI 2012 EM: train slices 0-14 -> test slices 15-19 (cells 255, membranes 0)

Budgets at 16 filters, --val-fraction 0 (what ../shared/acceptance/11-accuracy trains):
  small   20 epochs x 15 steps (nuclei) or x 25 steps (phase, em): 300 / 500 steps
  large   ten times the steps

Methods, each scored on the same test images:
  otsu+watershed   no network: Otsu's threshold of the image, then the distance watershed
  round-1          round 1's defaults: the paper's network (no batch normalisation), a constant
                   learning rate, the paper's connected components at 0.5, min size 16
  new              this version's defaults (`Config()`), each split trained on its own, scored
                   with the post-processing stored with its model (the min size it measured on
                   the training masks)
  three-class      the defaults with --targets three-class: background, interior and border
                   classes, instances grown from the interiors
  constant         the defaults with a constant learning rate instead of the cosine schedule
                   (the defaults of 2026-12-01)
Instances: F1 at IoU 0.5 and mean AP over IoU 0.5:0.95 (pooled over the test images; EM cells
are the 4-connected components of the mask). EM also: pixel error of probability > 0.5 against
the mask, and the adapted Rand error. Models and probability maps are kept in --work, so a
rerun with --reuse only scores.

    python benchmarks/accuracy.py --sets nuclei phase em --seeds 0 --budget small --work runs/acc
    python benchmarks/accuracy.py --sets nuclei --seeds 0 1 2 --methods new   # medians of 3 seeds
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage.filters import threshold_otsu
from skimage.measure import label

from unetcell.config import Config
from unetcell.evaluate import pool, score_image
from unetcell.model import saved_config
from unetcell.normalize import normalize
from unetcell.postprocess import instances, split_touching

SPLITS = {  # name: (set, train folder, test folder, steps per epoch at the small budget)
    "nuclei-a": ("nuclei", "1d4a5e72", "212b858a", 15),
    "nuclei-b": ("nuclei", "212b858a", "1d4a5e72", 15),
    "phase": ("phase", "pc_train", "pc_test", 25),
    "em": ("em", "em_train", "em_test", 25),
}


def lay_out(data: Path, work: Path) -> None:
    """The shared data as unetcell dataset folders (images/ and masks/) under work/data."""
    import imageio.v3 as iio

    def put(folder, stem, image, mask):
        for sub, array in (("images", image), ("masks", mask)):
            path = work / "data" / folder / sub / f"{stem}.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                tifffile.imwrite(path, array)

    for short in ("1d4a5e72", "212b858a"):
        sample = glob.glob(f"{data}/dsb2018/stage1_train/{short}*")[0]
        image = iio.imread(glob.glob(f"{sample}/images/*.png")[0])[..., 0]  # grey: R = G = B
        labels = np.zeros(image.shape, np.uint16)
        for k, m in enumerate(sorted(glob.glob(f"{sample}/masks/*.png")), 1):
            labels[iio.imread(m) > 0] = k
        put(short, short, image, labels)
    for i in range(1, 7):
        put("pc_train" if i <= 4 else "pc_test", f"set{i}",
            tifffile.imread(data / "phase-contrast" / "images" / f"set{i}.tif"),
            tifffile.imread(data / "phase-contrast" / "masks" / f"set{i}.tif"))
    volume = tifffile.imread(data / "isbi2012" / "train-volume.tif")
    masks = tifffile.imread(data / "isbi2012" / "train-labels.tif")
    for i in range(len(volume)):
        put("em_train" if i < 15 else "em_test", f"s{i:02d}", volume[i], masks[i])


def truth_of(mask: np.ndarray, kind: str) -> np.ndarray:
    return label(mask > 0, connectivity=1) if kind == "em" else mask.astype(np.int64)


def otsu_watershed(image: np.ndarray) -> np.ndarray:
    """The no-network baseline: Otsu's foreground (bright cells), split by the distance
    watershed and cleaned like the network's instances."""
    image = normalize(image[..., None] if image.ndim == 2 else image, Config().normalize)[..., 0]
    foreground = image > threshold_otsu(image)
    labels = label(foreground, connectivity=1).astype(np.int32)
    return instances(np.where(split_touching(labels) > 0, 0.9, 0.1).astype(np.float32))


PRESETS = {  # method: the configuration it trains and predicts with
    "round-1": (Config().override("model", batch_norm=False)
                .override("train", schedule="constant", calibrate=False)
                .override("predict", threshold=0.5, min_size=16, min_size_fraction=0.0,
                          instances="components")),
    "new": Config(),
    # the boundary U-Net's targets (Caicedo et al. 2019), instances grown from the interiors
    "three-class": Config().override("targets", kind="three-class"),
    "constant": Config().override("train", schedule="constant"),
}


def train_split(name: str, seed: int, budget: str, work: Path, reuse: bool, config: Config,
                method: str = "new") -> Path:
    from unetcell.train import train

    _, train_folder, _, steps = SPLITS[name]
    factor = 10 if budget == "large" else 1
    run = work / "runs" / f"{name}-{method}-seed{seed}-{budget}"
    if reuse and (run / "model.keras").exists():
        return run / "model.keras"
    config = (config.override("model", filters=16)
              .override("train", epochs=20, steps_per_epoch=steps * factor, val_fraction=0.0, seed=seed))
    start = time.perf_counter()
    train(work / "data" / train_folder, run, config, overwrite=True, verbose=0)
    print(f"  trained {name} seed {seed} ({budget}: {20 * steps * factor} steps) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return run / "model.keras"


def probability_maps(model: Path, images: list[Path], reuse: bool) -> list[np.ndarray]:
    from unetcell.predict import load_predictor

    out_dir = model.parent / "test_probabilities"
    maps, predictor = [], None
    for image in images:
        path = out_dir / image.name
        if reuse and path.exists():
            maps.append(tifffile.imread(path))
            continue
        predictor = predictor or load_predictor(model)
        p = predictor.probabilities(tifffile.imread(image))
        out_dir.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, p)
        maps.append(p)
    return maps


def foreground_of(probability: np.ndarray) -> np.ndarray:
    """The foreground of a map: a three-class model's maps are (foreground, interior)."""
    return probability[..., 0] if probability.ndim == 3 else probability


def score(truths, predictions) -> dict:
    pooled = pool([score_image(t, p) for t, p in zip(truths, predictions)])
    return {"f1": pooled["f1_50"], "ap": pooled["mean_ap"], "rand": pooled["rand_error"]}


def instances_of(model: Path):
    """The step from probabilities to instances with the settings stored with `model`."""
    p = saved_config(model).predict
    return lambda prob: instances(prob, p.threshold, p.min_size, p.instances, p.watershed_h,
                                  p.watershed_ratio)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--sets", nargs="+", default=["nuclei", "phase", "em"],
                        choices=["nuclei", "phase", "em"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0],
                        help="Seeds to train; none: the Otsu baseline only.")
    parser.add_argument("--budget", choices=["small", "large"], default="small")
    parser.add_argument("--methods", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                        help="Trained methods to run (Otsu + watershed always runs: no training).")
    parser.add_argument("--reuse", action="store_true", help="Reuse models and maps in --work.")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"{args.data}: no shared data here; run from the project root beside ../shared")
        return 1
    lay_out(args.data, args.work)
    rows = []
    for name, (kind, _, test_folder, _) in SPLITS.items():
        if kind not in args.sets:
            continue
        images = sorted((args.work / "data" / test_folder / "images").glob("*.tif"))
        masks = [args.work / "data" / test_folder / "masks" / i.name for i in images]
        truths = [truth_of(tifffile.imread(m), kind) for m in masks]
        baseline = [otsu_watershed(tifffile.imread(i)) for i in images]
        otsu = score(truths, baseline)
        if kind == "em":
            otsu["pixel_error"] = float(np.mean(
                [np.mean((o > 0) != (tifffile.imread(m) > 0)) for o, m in zip(baseline, masks)]))
        rows.append((name, "otsu+watershed", "-", otsu))
        for seed in args.seeds:
            for method in args.methods:
                config = PRESETS[method]
                model = train_split(name, seed, args.budget, args.work, args.reuse, config, method)
                maps = probability_maps(model, images, args.reuse)
                make = instances_of(model)
                result = score(truths, [make(p) for p in maps])
                if kind == "em":
                    result["pixel_error"] = float(np.mean(
                        [np.mean((foreground_of(p) > 0.5) != (tifffile.imread(m) > 0))
                         for p, m in zip(maps, masks)]))
                rows.append((name, method, seed, result))
            print_rows(rows[-len(args.methods):])
    print(f"\naccuracy, {args.budget} budget, seeds {' '.join(map(str, args.seeds))} "
          f"({time.strftime('%Y-%m-%d')}):")
    print_rows(rows, header=True)
    summarise(rows)
    return 0


def _fmt(value) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def print_rows(rows, header=False) -> None:
    if header:
        print(f"{'split':9s} {'method':15s} {'seed':>4s} {'F1@0.5':>6s} {'mAP':>6s} "
              f"{'pixerr':>6s} {'rand':>6s}")
    for name, method, seed, r in rows:
        print(f"{name:9s} {method:15s} {seed!s:>4s} {_fmt(r['f1'])} {_fmt(r['ap'])} "
              f"{_fmt(r.get('pixel_error'))} {_fmt(r['rand'] if name == 'em' else None)}", flush=True)


def summarise(rows) -> None:
    """Median and spread over seeds per split and method."""
    groups: dict = {}
    for name, method, seed, r in rows:
        if seed != "-":
            groups.setdefault((name, method), []).append(r)
    if not any(len(v) > 1 for v in groups.values()):
        return
    print("\nover seeds: median F1@0.5 [min, max] (EM: median pixel error [min, max])")
    for (name, method), results in groups.items():
        key = "pixel_error" if name == "em" else "f1"
        values = [r[key] for r in results]
        print(f"{name:9s} {method:15s} {np.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]")


if __name__ == "__main__":
    sys.exit(main())
