"""How much faster `unetcell.targets.border_weights` is than the brute force, and how close.

The brute force of the paper's border term (section 3, eq. 2) is one full-image Euclidean
distance transform per cell, d1 and d2 the two smallest distances at each pixel:
O(cells x pixels). Both run side by side in this process on random touching discs:

    1024 x 1024,  ~900 cells: brute force in full; max |diff| over every pixel
    2048 x 2048, ~3500 cells: brute force timed on a subset of cells and scaled linearly (its
                              cost per cell is one full-image transform, the same for every
                              cell); max |diff| at sampled pixels against exact distances
                              from k-d trees of each cell's pixels. --full runs it in full
                              (about 15-20 minutes on 2 cores).

    .venv/bin/python benchmarks/weights.py [--full]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from unetcell.targets import border_weights

W0, SIGMA = 10.0, 5.0


def random_discs(shape, n, seed, rmin=5.0, rmax=14.0) -> np.ndarray:
    """n random discs painted in order (later ones cut into earlier ones), ids 1..N."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(rmin, rmax)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, shape[0])
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, shape[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        labels[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    ids = np.unique(labels)
    remap = np.zeros(ids.max() + 1, np.int32)
    remap[ids] = np.arange(len(ids))
    return remap[labels]


def brute_force(labels, cells=None) -> np.ndarray:
    """The border term from one full-image distance transform per cell (all, or `cells`)."""
    ids = [k for k in np.unique(labels) if k != 0] if cells is None else cells
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    for k in ids:
        d = ndimage.distance_transform_edt(labels != k)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    term = W0 * np.exp(-((d1 + d2) ** 2) / (2 * SIGMA**2))
    term[labels != 0] = 0
    return term


def brute_force_at(labels, points) -> np.ndarray:
    """The border term at `points` (N x 2) from exact distances to every pixel of every cell."""
    cell = labels != 0
    coords, ids = np.argwhere(cell), labels[cell]
    order = np.argsort(ids, kind="stable")
    coords, ids = coords[order], ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    distances = np.empty((len(starts), len(points)))
    for i, (a, b) in enumerate(zip(starts, np.r_[starts[1:], len(ids)])):
        distances[i] = cKDTree(coords[a:b]).query(points)[0]
    d1, d2 = np.partition(distances, 1, axis=0)[:2]
    term = W0 * np.exp(-((d1 + d2) ** 2) / (2 * SIGMA**2))
    term[cell[points[:, 0], points[:, 1]]] = 0
    return term


def time_fast(labels, repeats=3) -> tuple[float, np.ndarray]:
    border_weights(labels[:64, :64])  # warm up imports and caches
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = border_weights(labels, W0, SIGMA)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="full brute force at 2048 too")
    parser.add_argument("--subset", type=int, default=150, help="cells timed at 2048 (default 150)")
    args = parser.parse_args()
    print(f"border term, w0={W0:g} sigma={SIGMA:g}; fast: best of 3 runs, brute force: one run")

    labels = random_discs((1024, 1024), 900, seed=7)
    cells = int(labels.max())
    fast_s, fast = time_fast(labels)
    t = time.perf_counter()
    slow = brute_force(labels)
    slow_s = time.perf_counter() - t
    diff = np.abs(fast - slow).max()
    print(f"1024x1024, {cells} cells: fast {fast_s:.3f} s, brute force {slow_s:.1f} s (all cells), "
          f"speed-up {slow_s / fast_s:.0f}x, max |diff| {diff:.1e} (every pixel)")

    labels = random_discs((2048, 2048), 3500, seed=8)
    cells = int(labels.max())
    fast_s, fast = time_fast(labels)
    if args.full:
        t = time.perf_counter()
        slow = brute_force(labels)
        slow_s = time.perf_counter() - t
        diff = np.abs(fast - slow).max()
        how, where = "all cells", "every pixel"
    else:
        subset = list(range(1, cells + 1, max(1, cells // args.subset)))[: args.subset]
        t = time.perf_counter()
        brute_force(labels, subset)
        slow_s = (time.perf_counter() - t) * cells / len(subset)
        # half the sample where the term is large (the gaps), half anywhere in the background
        rng = np.random.default_rng(0)
        heavy = np.argwhere(fast > 1.0)
        background = np.argwhere(labels == 0)
        points = np.concatenate([heavy[rng.choice(len(heavy), 2500, replace=False)],
                                 background[rng.choice(len(background), 2500, replace=False)]])
        diff = np.abs(fast[points[:, 0], points[:, 1]] - brute_force_at(labels, points)).max()
        how = f"timed on {len(subset)} cells, scaled linearly to {cells}"
        where = f"{len(points)} sampled pixels, exact distances"
    print(f"2048x2048, {cells} cells: fast {fast_s:.3f} s, brute force {slow_s:.1f} s ({how}), "
          f"speed-up {slow_s / fast_s:.0f}x, max |diff| {diff:.1e} ({where})")


if __name__ == "__main__":
    main()
