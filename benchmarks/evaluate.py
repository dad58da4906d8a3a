"""How fast instance scoring is: the sparse contingency table against one mask per cell pair.

    .venv/bin/python benchmarks/evaluate.py

Scores a 2048 x 2048 image with about 4000 cells (truth: nearest-seed cells cut to a radius;
prediction: the same shifted by 2 px, some cells dropped, some given the label of another) and
compares with the naive way (one boolean mask per true/predicted pair) on a small image, where
the naive way still finishes; its cost grows with cells^2 x pixels, so the ratio is
extrapolated.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

from unetcell.evaluate import THRESHOLDS, score_image


def cells(size: int, count: int, seed: int = 0) -> np.ndarray:
    """An instance label image of about `count` touching, roundish cells."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    rows, cols = rng.integers(0, size, (2, count))
    seeds[rows, cols] = np.arange(1, count + 1)
    distance, (ri, ci) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    radius = 0.6 * size / np.sqrt(count)
    labels = np.where(distance < radius, seeds[ri, ci], 0)
    return labels.astype(np.int32)


def damaged(truth: np.ndarray, seed: int = 1) -> np.ndarray:
    """A damaged prediction: shifted 2 px, 5 % of the cells dropped, 5 % given the next label
    (merged with a cell elsewhere, so each such pair becomes one predicted cell)."""
    rng = np.random.default_rng(seed)
    pred = np.roll(truth, (2, 1), axis=(0, 1))
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, rng.choice(ids, len(ids) // 20, replace=False))] = 0
    merge = rng.choice(ids, len(ids) // 20, replace=False)
    pred[np.isin(pred, merge)] += 1  # label k joins label k + 1 where that one exists
    return pred


def naive_tp(truth: np.ndarray, pred: np.ndarray) -> list[int]:
    """TP at each threshold with one boolean mask per pair of cells (the reference)."""
    ious = []
    for i in np.unique(truth)[1:]:
        t = truth == i
        for j in np.unique(pred)[1:]:
            p = pred == j
            ious.append((t & p).sum() / (t | p).sum())
    ious = np.asarray(ious)
    return [int((ious > t).sum()) for t in THRESHOLDS]


def timed(fn, *args, repeat: int = 3):
    best, result = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    small_t = cells(256, 60)
    small_p = damaged(small_t)
    naive_s, naive = timed(naive_tp, small_t, small_p, repeat=1)
    fast_s, scores = timed(score_image, small_t, small_p)
    assert list(scores.tp) == naive, (scores.tp, naive)
    n_t, n_p = scores.true_cells, scores.predicted_cells
    print(f"256^2, {n_t} true / {n_p} predicted cells: naive per-pair masks {naive_s:.3f} s, "
          f"contingency table {fast_s * 1e3:.1f} ms ({naive_s / fast_s:.0f}x); "
          "same TP at every threshold")

    big_t = cells(2048, 4000)
    big_p = damaged(big_t)
    big_s, big = timed(score_image, big_t, big_p)
    megapixels = big_t.size / 1e6
    # The naive cost scales with pairs x pixels; extrapolate from the measured small case.
    pairs_x_pixels = big.true_cells * big.predicted_cells * big_t.size
    naive_big = naive_s * pairs_x_pixels / (n_t * n_p * small_t.size)
    print(f"2048^2, {big.true_cells} true / {big.predicted_cells} predicted cells: {big_s:.3f} s "
          f"({big_s / megapixels * 1e3:.0f} ms per megapixel, rand error included); "
          f"naive extrapolated {naive_big / 3600:.0f} h ({naive_big / big_s:.1e}x)")
    m = big.metrics()
    print(f"  ap_50 {m['ap_50']:.3f}  f1_50 {m['f1_50']:.3f}  mean_ap {m['mean_ap']:.3f}  "
          f"iou {m['iou']:.3f}  rand_error {m['rand_error']:.3f}")


if __name__ == "__main__":
    main()
