"""From a foreground probability map to instance labels (pure numpy and scipy).

The network is taught to leave a thin background gap between touching cells (paper section 3,
Figure 3c: the border term of the weight map), so instances are the connected components of
the thresholded foreground. Three steps:

1. threshold the foreground probability and label the 4-connected components (4-connectivity,
   so that a one-pixel diagonal gap still separates two cells);
2. drop components smaller than `min_size` pixels (specks), and fill holes: background
   enclosed by one cell (a dark nucleolus, texture below the threshold) joins that cell;
3. give the gap back: the carved gap exists only where cells touch, so a background pixel is
   returned to a cell only when it lies in a gap of at most two pixels between two different
   cells (it touches one cell and, once both sides have grown by one pixel, the other). Each
   such pixel goes to the neighbouring cell of highest foreground probability. Isolated cells
   are not grown: growing every instance by a one-pixel ring lowered F1 and IoU on real nuclei
   (DESIGN.md), since away from touching neighbours the foreground is already full size.

Instances are made after stitching, on the whole foreground map, never per tile, so a cell cut
by a tile border stays one cell. That needs the probability map in memory: about 25 bytes per
pixel at the peak (`unetcell.predict.check_label_memory` refuses a slide that would not fit).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_FOUR = ndimage.generate_binary_structure(2, 1)


def instances(probability: np.ndarray, threshold: float = 0.5, min_size: int = 16) -> np.ndarray:
    """Instance labels (H x W int32, 0 background, 1..N cells, numbered in raster order) from
    an H x W foreground probability map."""
    probability = np.asarray(probability, dtype=np.float32)
    if probability.ndim != 2:
        raise ValueError(f"expected an H x W probability map. Received shape {probability.shape}")
    labels, count = ndimage.label(probability > threshold, structure=_FOUR, output=np.int32)
    if count == 0:
        return labels
    labels = drop_small(labels, min_size)
    return fill_gaps(fill_holes(labels), probability)


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Give every hole to the cell around it: a background region (8-connected, the
    complement of 4-connected cells) that does not reach the image border and touches exactly
    one cell. A dark nucleolus or a textured interior below the threshold is part of its
    cell; background enclosed by several cells (a ring of a cluster, a gap) stays background."""
    background = labels == 0
    regions, count = ndimage.label(background, structure=np.ones((3, 3), bool))
    if count == 0:
        return labels
    # The largest and smallest cell id next to each background pixel (4-neighbours).
    beyond = np.iinfo(np.int32).max
    highest = ndimage.grey_dilation(labels, footprint=_FOUR, mode="constant", cval=0)
    lowest = ndimage.grey_erosion(np.where(background, beyond, labels), footprint=_FOUR,
                                  mode="constant", cval=beyond)
    index = np.arange(1, count + 1)
    region_high = ndimage.maximum(highest, regions, index)
    region_low = ndimage.minimum(lowest, regions, index)
    edge = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    hole = (region_high == region_low) & (region_high > 0)
    hole[edge[edge > 0] - 1] = False
    owner = np.zeros(count + 1, labels.dtype)
    owner[1:][hole] = np.asarray(region_high, labels.dtype)[hole]
    filled = labels.copy()
    filled[background] = owner[regions[background]]
    return filled


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove instances of fewer than `min_size` pixels and number the rest 1..N in order."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    renumber = np.zeros(len(sizes), np.int32)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return renumber[labels]


def _shifts(height: int, width: int):
    """(target, source) slice pairs for the four 4-neighbours: target pixel, its neighbour."""
    return [
        ((slice(1, height), slice(None)), (slice(0, height - 1), slice(None))),  # neighbour above
        ((slice(0, height - 1), slice(None)), (slice(1, height), slice(None))),  # below
        ((slice(None), slice(1, width)), (slice(None), slice(0, width - 1))),  # left
        ((slice(None), slice(0, width - 1)), (slice(None), slice(1, width))),  # right
    ]


def fill_gaps(labels: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """Return to their cells the background pixels of gaps (at most two pixels wide) between
    two different cells; every other background pixel stays background.

    Each background pixel next to a cell (4-neighbourhood) is first given to the neighbouring
    cell of highest foreground probability; it is kept only if, after that one-pixel growth of
    every cell, it touches a pixel of another cell, i.e. it lies in a gap between two cells.
    """
    height, width = labels.shape
    shifts = _shifts(height, width)
    grown = labels.copy()
    best = np.full(labels.shape, -1.0, np.float32)  # probability of the chosen neighbour
    background = labels == 0
    for target, source in shifts:
        neighbour = labels[source]
        better = background[target] & (neighbour > 0) & (probability[source] > best[target])
        grown[target][better] = neighbour[better]
        best[target][better] = probability[source][better]
    del best
    candidate = background & (grown > 0)
    in_gap = np.zeros(labels.shape, bool)
    for target, source in shifts:
        other = grown[source]
        in_gap[target] |= candidate[target] & (other > 0) & (other != grown[target])
    grown[candidate & ~in_gap] = 0
    return grown
