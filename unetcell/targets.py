"""What the network is taught: instance labels -> classes with carved gaps, and the weight map.

Ronneberger et al. 2015, section 3, eq. 2 weights every pixel of the cross-entropy by

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

with w_c balancing the class frequencies and d1, d2 the distances to the nearest and the
second-nearest cell. The second term (here `border_weights`) is large only in the thin
background gaps between touching cells, which the ground truth makes explicit by carving them
out of the cell class (paper Fig. 3c, here `carve_gaps`): it is what teaches the network to
separate touching cells.

Pure numpy / scipy / scikit-image: no TensorFlow, so the targets are testable and cacheable on
their own and `from unetcell.targets import border_weights` stays light.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
from scipy import ndimage

from .errors import DataError

# The border term is dropped where it is below this fraction of w0 (see `border_cutoff`):
# 1e-6 * w0 is 1e-5 at the paper's w0 = 10, far below any effect on training.
BORDER_TOLERANCE = 1e-6


# --- label images ---------------------------------------------------------------------------


def _label_image(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """`labels` as a 2D integer array (bool counts as one label); anything else is a bug."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2D label image. Received shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must have an integer dtype (instance labels, 0 = background). "
            f"Received {labels.dtype}; use as_instances() for binary or float masks"
        )
    return labels


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels whose ids index small arrays: ids are kept when they already do (the common
    case, and free), renumbered 1..N otherwise (negative ids, or ids such as 10**12 that would
    make `find_objects` and `bincount` allocate per possible id)."""
    if labels.size == 0:
        return labels.astype(np.intp)
    low, high = labels.min(), labels.max()
    if low >= 0 and high <= labels.size:
        return labels
    ids = np.unique(labels)
    ids = ids[ids != 0]
    compact = np.zeros(labels.shape, np.intp)
    cells = labels != 0
    compact[cells] = np.searchsorted(ids, labels[cells]) + 1
    return compact


def _touching(labels: np.ndarray) -> bool:
    """Whether any two different cells of `labels` (ids >= 0) are 8-neighbours."""
    cell = labels != 0
    lowest = ndimage.minimum_filter(np.where(cell, labels, labels.max() + 1), size=3, mode="constant",
                                    cval=labels.max() + 1)
    return bool(np.any(cell & (lowest < labels)))


# --- the border term ------------------------------------------------------------------------


def border_cutoff(w0: float = 10.0, sigma: float = 5.0) -> float:
    """The distance d1 + d2 beyond which the border term is below BORDER_TOLERANCE * w0:
    sigma * sqrt(2 ln(1 / BORDER_TOLERANCE)), about 26.3 px at sigma = 5."""
    return sigma * math.sqrt(2.0 * math.log(1.0 / BORDER_TOLERANCE))


def border_weights(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The separation term of the paper's weight map (section 3, eq. 2), float32 H x W:

        w0 * exp(-(d1 + d2)^2 / (2 sigma^2))

    on background pixels (label 0), 0 on cell pixels, and 0 everywhere when `labels` holds
    fewer than two cells. d1 and d2 are the Euclidean distances from a pixel to the nearest
    pixel of the nearest and of the second-nearest cell, as `distance_transform_edt` measures
    them. `labels` is a 2D integer instance label image: ids need not be consecutive, cells may
    touch each other and the image border.

    Exact where it matters, linear in the number of cells: the term is below
    BORDER_TOLERANCE * w0 once d1 + d2 > R = `border_cutoff(w0, sigma)`, and it is set to 0
    there. A pixel with d1 + d2 <= R lies within R of both of its cells, so each cell's
    distances are only needed in its bounding box grown by R. That window holds every pixel
    of the cell, so a distance transform of the window alone is exact wherever it is needed,
    and running minima give d1 and d2. The cost is one small transform per cell instead of
    one full-image transform per cell (the brute force, O(cells x pixels)): hundreds of times
    faster on a 1024 x 1024 image with 900 cells, and within 1e-5 of the brute force at
    w0 = 10 everywhere (at most BORDER_TOLERANCE * w0, where the term is dropped).
    """
    labels = _compact(_label_image(labels))
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0. Received: {sigma}")
    out = np.zeros(labels.shape, np.float32)
    if w0 == 0:
        return out
    boxes = ndimage.find_objects(labels)
    cells = [(k, box) for k, box in enumerate(boxes, start=1) if box is not None]
    if len(cells) < 2:  # no second-nearest cell: the term is defined as 0
        return out

    reach = border_cutoff(w0, sigma)
    margin = int(math.ceil(reach))
    height, width = labels.shape
    # float32 running minima: half the memory traffic of float64, and the distances they hold
    # (<= R, about 26) keep 7 significant digits, far more than the tolerance needs.
    d1 = np.full(labels.shape, np.inf, np.float32)
    d2 = np.full(labels.shape, np.inf, np.float32)
    edt = ndimage.distance_transform_edt
    for k, (rows, cols) in cells:
        window = (
            slice(max(rows.start - margin, 0), min(rows.stop + margin, height)),
            slice(max(cols.start - margin, 0), min(cols.stop + margin, width)),
        )
        d = edt(labels[window] != k)
        near, second = d1[window], d2[window]  # views: the updates land in d1 and d2
        np.minimum(second, np.maximum(near, d), out=second)
        np.minimum(near, d, out=near)

    total = d1
    total += d2  # d1 + d2, in place: d1 is not needed any more
    keep = (total <= reach) & (labels == 0)
    total = total[keep]
    out[keep] = w0 * np.exp(-(total * total) / np.float32(2.0 * sigma * sigma))
    return out


# --- the class term -------------------------------------------------------------------------


def _foreground_fraction(classes_or_labels) -> tuple[np.ndarray, float]:
    """(foreground mask, its fraction of the pixels): the class frequency w_c is made of."""
    foreground = np.asarray(classes_or_labels) != 0
    return foreground, float(np.count_nonzero(foreground)) / max(foreground.size, 1)


def class_weights(classes_or_labels: np.ndarray, balance: float = 1.0) -> np.ndarray:
    """The class-balance term w_c of the paper's weight map (section 3, eq. 2), float32 H x W.

    Every foreground pixel (non-zero: a class map or instance labels) gets w_fg, every
    background pixel w_bg, with w_c = (1 / f_c) ** balance for the class frequencies f_c,
    normalised so that the mean weight over the image is 1 and the loss keeps its scale.
    balance = 1 is full inverse-frequency balancing (18.5 % foreground: foreground x2.7,
    background x0.6), 0 none (all ones). Full balancing pushed foreground probabilities up and
    merged touching nuclei in a measurement on real data (DESIGN.md), which is why it is a
    setting. An image of one class only is all ones.
    """
    foreground, fraction = _foreground_fraction(classes_or_labels)
    if fraction in (0.0, 1.0) or balance == 0:
        return np.ones(foreground.shape, np.float32)
    w_fg = fraction**-balance
    w_bg = (1.0 - fraction) ** -balance
    mean = fraction * w_fg + (1.0 - fraction) * w_bg
    return np.where(foreground, np.float32(w_fg / mean), np.float32(w_bg / mean))


def balance_shift(class_maps, balance: float = 1.0) -> float:
    """log(w_fg / w_bg) of `class_weights` over training images: the logit by which the class
    term of the loss raises the network's foreground.

    Cross-entropy weighted w_fg on foreground and w_bg on background pixels is minimised by
    p = w_fg q / (w_fg q + w_bg (1 - q)) where q is the true foreground probability: the logit
    of q plus log(w_fg / w_bg), a prior shift the network learns exactly. Each image has its
    own weights (its own class frequencies), so the shift is their mean over every pixel of
    `class_maps` (class or label images); images of one class, or balance 0, count as 0.
    """
    pixels, total = 0, 0.0
    for classes in class_maps:
        foreground, fraction = _foreground_fraction(classes)
        pixels += foreground.size
        if 0.0 < fraction < 1.0 and balance:
            total += foreground.size * balance * math.log((1.0 - fraction) / fraction)
    return total / pixels if pixels else 0.0


# --- gaps between touching cells -------------------------------------------------------------


def carve_gaps(labels: np.ndarray, gap: int = 1) -> np.ndarray:
    """Labels with a background gap carved where two different cells touch (paper Fig. 3c).

    Touching means 8-neighbourhood: a pixel of cell a that has a pixel of another cell b among
    its 8 neighbours is a contact pixel. With gap = 1 the contact pixels of the larger cell of
    each touching pair (by area; ties by id) become background, a gap one pixel wide that
    keeps the smaller cell whole; with gap = 2 the contact pixels of both cells go. Either way
    no remaining pixel of a has a pixel of b among its 8 neighbours, so carved cells are apart
    even for 8-connected components, and diagonal contacts are cut too.

    Only contact pixels are removed, so every cell keeps its interior (its pixels that touch
    no other cell), and cells are not shrunk where they meet the background: the full-size
    foreground stays full size (DESIGN.md: growing or shrinking every cell hurt). A cell that
    is all contact (one or two pixels thick) is never deleted: it keeps its pixels and its
    neighbours give up theirs instead. Two such cells touching each other stay touching, with
    a warning. Carving can cut a thin neck of a cell into pieces; the id stays the same.
    gap = 0 returns a copy of `labels`. The dtype and the ids of `labels` are kept.
    """
    labels = _label_image(labels)
    if gap not in (0, 1, 2):
        raise ValueError(f"gap must be 0, 1 or 2. Received: {gap}")
    carved = labels.copy()
    if gap == 0 or labels.size == 0:
        return carved
    compact = _compact(labels)
    area = np.bincount(compact.ravel())
    area[0] = 0
    present = area > 0
    if np.count_nonzero(present) < 2:
        return carved

    # The yield order: rank 0 is the smallest cell. Background ranks above every cell for the
    # minimum filter and below every cell for the maximum filter, so it never counts as a
    # neighbour cell.
    ids = np.arange(area.size)
    order = np.lexsort((ids, area))
    rank = np.empty(area.size, np.int64)
    rank[order] = np.arange(area.size)
    cell = compact != 0
    ranks = rank[compact]
    nobody = np.int64(area.size)
    smallest_nb = ndimage.minimum_filter(np.where(cell, ranks, nobody), size=3, mode="constant", cval=nobody)
    base = cell & (smallest_nb < ranks)  # touches a smaller cell: yields its contact pixels
    if gap == 2:
        largest_nb = ndimage.maximum_filter(np.where(cell, ranks, -1), size=3, mode="constant", cval=-1)
        base |= cell & (largest_nb > ranks)  # ... and so does the smaller one

    protected = np.zeros(area.size, bool)
    footprint = np.ones((3, 3), bool)
    while True:
        carve = base.copy()
        if protected.any():
            kept = protected[compact]
            carve &= ~kept
            # A protected cell's neighbours carve the gap on their side instead.
            carve |= ndimage.binary_dilation(kept, footprint) & cell & ~kept
        remaining = np.bincount(compact[cell & ~carve], minlength=area.size)
        emptied = present & (remaining == 0) & ~protected
        if not emptied.any():
            break
        protected |= emptied

    if protected.any() and _touching(np.where(carve, 0, compact)):
        warnings.warn(
            "carve_gaps: some touching cells are too thin to carve a gap between them "
            "without deleting one; they stay touching in the class map",
            stacklevel=2,
        )
    carved[carve] = 0
    return carved


def classes(labels: np.ndarray, gap: int = 1) -> np.ndarray:
    """The per-pixel training target, uint8 H x W: 1 for cell after `carve_gaps`, 0 for
    background (the gaps between touching cells included)."""
    return (carve_gaps(labels, gap) != 0).astype(np.uint8)


def weight_map(
    labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0, balance: float = 1.0, gap: int = 1
) -> np.ndarray:
    """The paper's weight map (section 3, eq. 2), float32 H x W: `class_weights` of
    `classes(labels, gap)` plus `border_weights` of the carved labels.

    The border term is measured on the CARVED labels, so the gap pixels, which are
    background in the target, get the heavy weight (w0 * exp(-4 / (2 sigma^2)), about 9.2 at
    the paper's settings for a one-pixel gap) that makes the network learn them; on the
    uncarved labels they would be cell pixels with border weight 0.
    """
    return carved_weight_map(carve_gaps(labels, gap), w0, sigma, balance)


def carved_weight_map(
    carved: np.ndarray, w0: float = 10.0, sigma: float = 5.0, balance: float = 1.0
) -> np.ndarray:
    """`weight_map` of labels whose gaps `carve_gaps` has carved already."""
    return class_weights(carved != 0, balance) + border_weights(carved, w0=w0, sigma=sigma)


def training_targets(
    labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0, balance: float = 1.0, gap: int = 1,
    kind: str = "two-class", border: int = 2, carved: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(`classes`, `weight_map`) of an instance label image, carving the gaps once for both
    (or taking `carve_gaps(labels, gap)` already made, as `carved`); kind "three-class" gives
    `three_classes` and their weights (`three_class_weight_map`)."""
    carved = carve_gaps(labels, gap) if carved is None else carved
    if kind == "three-class":
        classes = three_classes(labels, gap, border, carved=carved)
        return classes, three_class_weight_map(classes, carved, w0, sigma, balance)
    if kind != "two-class":
        raise ValueError(f"kind must be 'two-class' or 'three-class'. Received: {kind!r}")
    return (carved != 0).astype(np.uint8), carved_weight_map(carved, w0, sigma, balance)


# --- three classes: background, interior, border ---------------------------------------------

BACKGROUND, INTERIOR, BORDER = 0, 1, 2


def three_classes(labels: np.ndarray, gap: int = 1, border: int = 2,
                  carved: np.ndarray | None = None) -> np.ndarray:
    """The boundary U-Net's target (Caicedo et al., Cytometry A 2019), uint8 H x W: 0 for
    background, 1 for a cell's interior, 2 for its border, the pixels of the cell within
    `border` pixels (chessboard distance) of anything that is not the same cell, and the gaps
    `carve_gaps` carves between touching cells.

    Touching cells are then two interiors parted by at least 2 * border pixels of border
    class, which the network learns as a class of its own rather than as a one-pixel gap of
    background; instances are grown back from the interiors (`postprocess.grow_interiors`). The
    image's edge is not a border: a cell cut by it goes on outside. A cell thinner than
    2 * border + 1 is all border and has no interior.
    """
    labels = _label_image(labels)
    if border < 1:
        raise ValueError(f"border must be >= 1. Received: {border}")
    carved = carve_gaps(labels, gap) if carved is None else carved
    size = 2 * border + 1
    # A pixel is interior when every pixel of its (2 border + 1)^2 window is the same cell.
    same = (ndimage.maximum_filter(carved, size=size, mode="nearest")
            == ndimage.minimum_filter(carved, size=size, mode="nearest"))
    out = np.where(carved != 0, np.uint8(BORDER), np.uint8(BACKGROUND))
    out[(carved != 0) & same] = INTERIOR
    out[(labels != 0) & (carved == 0)] = BORDER  # the carved gaps
    return out


def three_class_weight_map(classes: np.ndarray, carved: np.ndarray, w0: float = 10.0,
                           sigma: float = 5.0, balance: float = 1.0) -> np.ndarray:
    """Weights of the three-class target, float32 H x W: each class's frequency balance
    ((1 / f_c) ** balance, mean 1 over the image, as `class_weights`) plus the paper's border
    term of the carved labels, which is heavy in the gaps between touching cells."""
    classes = np.asarray(classes)
    counts = np.bincount(classes.ravel(), minlength=3).astype(np.float64)
    fractions = counts / max(classes.size, 1)
    per_class = np.ones(counts.size, np.float64)
    present = fractions > 0
    if balance and np.count_nonzero(present) > 1:
        per_class[present] = fractions[present] ** -balance
        per_class /= float(np.sum(fractions * per_class))
    return (per_class.astype(np.float32)[classes] + border_weights(carved, w0=w0, sigma=sigma)).astype(np.float32)


# --- masks as instances ---------------------------------------------------------------------


def is_binary(mask: np.ndarray) -> bool:
    """True for a bool mask or one whose values are a subset of {0, 1} or of {0, 255}."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return True
    if mask.size == 0:
        return True
    high, low = mask.max(), mask.min()
    if high not in (0, 1, 255) or low not in (0, high):
        return False  # NaN fails here too: it is never equal to 0, 1 or 255
    if mask.dtype.kind in "iu" and high <= 1:
        return True  # integers between 0 and 1 are 0 and 1
    return not np.any((mask != 0) & (mask != high))


def as_instances(mask: np.ndarray, source: str = "") -> np.ndarray:
    """A mask as int32 instance labels (0 = background).

    A binary mask (bool, or values within {0, 1} or {0, 255}, see `is_binary`) is split into
    cells by connected components with 4-connectivity, so two cells that meet only at a
    corner stay two cells; cells that share an edge in a binary mask cannot be told apart by
    any rule and become one. Any other integer mask is an instance label image and comes back
    as int32 with its ids unchanged. A float mask is accepted when its values are whole
    numbers; fractional values (a probability map?), negative labels or labels beyond int32
    are the user's error: DataError, naming `source` (the file) when given.
    """
    from skimage.measure import label  # imported here: scikit-image is slow to import

    mask = checked_mask(mask, source)
    if is_binary(mask):
        return label(mask != 0, connectivity=1).astype(np.int32)
    return mask.astype(np.int32)


def checked_mask(mask: np.ndarray, source: str | os.PathLike = "") -> np.ndarray:
    """`mask` as int32 values as stored (a binary mask stays 0/1 or 0/255), after the checks
    every mask gets, wherever it comes from (`io.read_mask`, a public data set): 2D, whole
    numbers (a fractional float mask is a probability map, not a mask), no negative label,
    none beyond int32. DataError naming `source` otherwise."""
    where = f"{source}: " if source else ""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"{where}a mask must be a 2D image. Received shape {mask.shape}")
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask) & (mask == np.round(mask))):
            raise DataError(
                f"{where}a mask must hold whole-number labels (0 background, 1..N cells, or "
                "0/255 binary). Received fractional float values; is this a probability map "
                "rather than a mask?"
            )
        mask = mask.astype(np.int64)
    elif mask.dtype != bool and mask.dtype.kind not in "iu":
        raise DataError(f"{where}a mask must hold integer labels. Received dtype {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise DataError(f"{where}a mask must not hold negative labels (min {mask.min()})")
    if mask.size and mask.max() > np.iinfo(np.int32).max:
        raise DataError(f"{where}label values exceed int32 (max {mask.max()}); renumber the cells")
    return mask.astype(np.int32)
