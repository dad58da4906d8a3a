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

By default (`method="watershed"`) each component is then split at the necks between
touching cells (`split_touching`): at a few CPU minutes of training the network often leaves
no gap between touching nuclei, and the shape still shows where one ends (README, Accuracy).

Instances are made after stitching, on the whole foreground map, never per tile, so a cell cut
by a tile border stays one cell. That needs the probability map in memory: about 120 bytes per
pixel at the peak with the watershed (`unetcell.predict.check_label_memory` refuses a slide
that would not fit).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_FOUR = ndimage.generate_binary_structure(2, 1)


METHODS = ("watershed", "components", "interiors")


def instances(probability: np.ndarray, threshold: float = 0.5, min_size: int = 16,
              method: str = "watershed", h: float = 1.0, ratio: float = 0.0) -> np.ndarray:
    """Instance labels (H x W int32, 0 background, 1..N cells, numbered in raster order) from
    an H x W foreground probability map, or the H x W x 2 (foreground, interior) map of a
    three-class model.

    method "components" is the paper's: the connected components of the thresholded map.
    "watershed" (the default) then splits each component along the necks between its
    cells (`split_touching`: markers at least `h` pixels and `ratio` of the cell's half-width
    above the neck). "interiors" (three-class maps only) grows the interiors above
    `threshold` into the foreground (`grow_interiors`); the other two read the foreground.
    """
    probability = np.asarray(probability, dtype=np.float32)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}. Received: {method!r}")
    if probability.ndim == 3 and probability.shape[2] == 2:
        if method == "interiors":
            return grow_interiors(probability[..., 0], probability[..., 1], threshold, min_size)
        probability = probability[..., 0]
    if probability.ndim != 2:
        raise ValueError("expected an H x W probability map (or H x W x 2 foreground and interior). "
                         f"Received shape {probability.shape}")
    if method == "interiors":
        raise ValueError("method 'interiors' needs the H x W x 2 (foreground, interior) map of a "
                         "three-class model. Received an H x W foreground map")
    labels, count = ndimage.label(probability > threshold, structure=_FOUR, output=np.int32)
    if count == 0:
        return labels
    labels = fill_holes(drop_small(labels, min_size))
    if method == "watershed":
        labels = drop_small(split_touching(labels, h, ratio=ratio), min_size)
    return fill_gaps(labels, probability)


def grow_interiors(foreground: np.ndarray, interior: np.ndarray, threshold: float = 0.5,
                   min_size: int = 16) -> np.ndarray:
    """Instances of a three-class map (Caicedo et al. 2019): each 4-connected region of
    interior probability above `threshold` is a cell, grown into the foreground (probability
    above 0.5) by a watershed of the interior probability, so the border pixels between two
    touching cells go to the one whose interior they lean to. Foreground that no interior
    reaches (a cell too small to have one) is a cell of its own. Holes are filled, cells under
    `min_size` pixels dropped, numbered 1..N."""
    from skimage.segmentation import watershed

    seeds, count = ndimage.label(interior > threshold, structure=_FOUR, output=np.int32)
    mask = (foreground > 0.5) | (seeds > 0)
    if count == 0:
        labels = ndimage.label(mask, structure=_FOUR, output=np.int32)[0]
    else:
        labels = watershed(-interior, seeds, mask=mask, connectivity=1).astype(np.int32)
        missed, extra = ndimage.label(mask & (labels == 0), structure=_FOUR, output=np.int32)
        if extra:
            labels = np.where(missed > 0, missed + count, labels).astype(np.int32)
    return drop_small(fill_holes(labels), min_size)


def split_touching(labels: np.ndarray, h: float = 1.0, smoothing: float = 1.0,
                   ratio: float = 0.0) -> np.ndarray:
    """Split instances at their necks: a watershed of each instance's distance to the
    background, seeded by the h-maxima of that distance (Gaussian-smoothed by `smoothing`
    pixels), so a maximum must stand `h` pixels above the saddle to its neighbour to become a
    cell of its own. Two touching discs are two maxima joined by a neck: two cells; one
    convex cell with a ragged outline keeps one marker. With `ratio` > 0 a peak must also
    rise `ratio` times the instance's largest distance (its half-width) above the neck, so
    large cells (whole cells in phase contrast) need deeper necks than small nuclei; an
    absolute h alone splits large irregular cells into pieces. Pixels keep their instance's
    foreground; only the boundaries inside it are new. Numbered 1..N in raster order."""
    from skimage.morphology import local_maxima, reconstruction
    from skimage.segmentation import watershed

    foreground = labels > 0
    if not foreground.any():
        return labels
    # The distance to the background or to another instance: cells split already stay split.
    edges = ndimage.grey_dilation(labels, footprint=_FOUR) != ndimage.grey_erosion(labels, footprint=_FOUR)
    distance = ndimage.distance_transform_edt(foreground & ~(edges & foreground))
    if smoothing > 0:
        distance = ndimage.gaussian_filter(distance, smoothing)
    distance = np.where(foreground, distance, 0.0)
    # The h-maxima as the regional maxima of the reconstruction of distance - h under the
    # distance (Soille), not skimage's h_maxima: that keeps two equal peaks apart however
    # shallow the saddle between them.
    depth = np.float64(h)
    if ratio > 0:
        half_width = ndimage.maximum(distance, labels, np.arange(int(labels.max()) + 1))
        depth = np.maximum(h, ratio * np.asarray(half_width)[labels])
    raised = reconstruction(distance - depth, distance, method="dilation") if np.any(depth > 0) else distance
    peaks = local_maxima(raised, connectivity=2, allow_borders=True)
    markers, _ = ndimage.label(peaks & foreground, structure=np.ones((3, 3), bool), output=np.int32)
    # A marker straddling two instances (it cannot, after the mask above, but a plateau can
    # touch the seam) is cut by the instances, and an instance with no marker keeps itself.
    markers = np.where(foreground, markers, 0)
    split = watershed(-distance, markers, mask=foreground, connectivity=1)
    # Instances the markers missed (tiny or flat) keep their own pixels as one cell.
    missed = foreground & (split == 0)
    if missed.any():
        split = np.where(missed, split.max() + labels, split)
    # A region may only grow inside one original instance: key each piece by (instance, region).
    pieces = labels.astype(np.int64) * (int(split.max()) + 1) + split
    _, renumbered = np.unique(pieces, return_inverse=True)
    renumbered = renumbered.reshape(labels.shape).astype(np.int32)
    # unique puts background (key 0) first, so 0 stays 0; raster order comes from drop_small.
    return drop_small(renumbered, 1)


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
