"""Post-processing settings chosen from the training data.

When training starts, the minimum cell size is raised to a fraction of the smallest cells
the user annotated (`annotated_min_size`): whatever the network finds that is far smaller than
any annotated cell is debris, not a cell (Cellpose takes its object scale from the training
masks in the same way). This needs no validation data, so it holds with --val-fraction 0.

At the end of training (StarDist's optimize_thresholds habit): the foreground threshold, the
minimum cell size and the watershed's h, each picked by the pooled F1 at IoU 0.5 of the
validation images' instances.

The probabilities are computed once; only the cheap step from probabilities to instances is
repeated for every setting. Ties go to the setting nearest the defaults, so a flat optimum
does not drift. Without validation data nothing is tuned: the defaults stand alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .config import Config
from .evaluate import pool, score_image
from .postprocess import instances

SMALL_CELL_PERCENTILE = 1.0  # of the annotated areas: robust to a stray one-pixel label
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.3, 0.86, 0.05))
WATERSHED_HS = (0.5, 1.0, 2.0, 3.0)
MIN_SIZE_FACTORS = (0.5, 1.0, 2.0)  # of the configured min_size


@dataclass(frozen=True)
class Tuned:
    """The chosen settings and the validation F1@0.5 they reach (and the defaults' F1)."""

    threshold: float
    min_size: int
    watershed_h: float
    f1: float
    default_f1: float

    def describe(self) -> str:
        return (f"threshold {self.threshold:.2f}, min size {self.min_size}, watershed h "
                f"{self.watershed_h:g}: validation F1@0.5 {self.f1:.3f} "
                f"(defaults {self.default_f1:.3f})")


def annotated_min_size(labels: list[np.ndarray], fraction: float) -> tuple[int, float]:
    """(min size, smallest annotated area): `fraction` of the 1st percentile of the areas of
    every annotated cell in `labels` (instance label images), rounded; (0, 0.0) without
    cells."""
    areas = np.concatenate([np.bincount(np.asarray(lab, np.int64).ravel())[1:] for lab in labels])
    areas = areas[areas > 0]
    if areas.size == 0:
        return 0, 0.0
    smallest = float(np.percentile(areas, SMALL_CELL_PERCENTILE))
    return int(round(fraction * smallest)), smallest


def pooled_f1(probabilities, truths, threshold, min_size, method, h, ratio=0.0) -> float:
    scores = [score_image(truth, instances(p, threshold, min_size, method, h, ratio))
              for p, truth in zip(probabilities, truths)]
    return float(pool(scores)["f1_50"])


def tune_postprocessing(probabilities: list[np.ndarray], truths: list[np.ndarray], config: Config,
                        thresholds=THRESHOLDS, hs=WATERSHED_HS,
                        min_size_factors=MIN_SIZE_FACTORS) -> Tuned:
    """The (threshold, min size, h) of best pooled validation F1@0.5 for the configured
    instance method (h only matters for the watershed)."""
    p = config.predict
    if p.instances != "watershed":
        hs = (p.watershed_h,)
    sizes = sorted({max(0, int(round(p.min_size * f))) for f in min_size_factors})
    default = pooled_f1(probabilities, truths, p.threshold, p.min_size, p.instances, p.watershed_h,
                        p.watershed_ratio)

    def distance(setting):  # from the defaults, in steps of each grid
        t, size, h = setting
        far = abs(t - p.threshold) / 0.05 + abs(np.log2(max(size, 1) / max(p.min_size, 1)))
        return far + (abs(np.log2(h / p.watershed_h)) if p.watershed_h > 0 and h > 0 else 0.0)

    best, best_key = None, None
    for setting in itertools.product(thresholds, sizes, hs):
        f1 = pooled_f1(probabilities, truths, setting[0], setting[1], p.instances, setting[2],
                       p.watershed_ratio)
        key = (round(f1, 6), -distance(setting))
        if best_key is None or key > best_key:
            best, best_key = setting, key
    threshold, min_size, h = best
    return Tuned(float(threshold), int(min_size), float(h), float(best_key[0]), default)


def validation_probabilities(predictor, images: list[np.ndarray]) -> list[np.ndarray]:
    """Foreground probabilities of already normalised images (training's examples) by the
    same overlap-tile pass as `unetcell predict`."""
    return [predictor.normalised_probability(image) for image in images]
