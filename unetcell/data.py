"""Training data: loading and checking pairs, the targets cache, the validation split and the
tf.data pipeline of tiles. Everything wrong with a dataset is reported before training starts,
naming the file (`unetcell.folders` finds the pairs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import targets
from .config import Config, TargetsConfig
from .errors import DataError
from .files import atomic_path
from .folders import Pair, discover_pairs, find_pairs  # noqa: F401  (re-exported: the folder API)
from .geometry import TileGeometry
from .io import select_channels
from .mirror import mirror_window
from .normalize import normalize

# Bump when the meaning of the cached targets changes, so old caches are not reused.
TARGETS_VERSION = 1


# --- loading: images, instances, targets (cached) ---------------------------------------

@dataclass
class Example:
    """One training image with what the network is taught for it, all H x W aligned."""

    name: str  # file stem, with the region when an image is split (e.g. "a[val]")
    image: np.ndarray  # float32 H x W x C, percentile-normalised
    classes: np.ndarray  # uint8 H x W, 1 = cell (gaps carved between touching cells); three-class: 1 interior, 2 border
    weights: np.ndarray  # float32 H x W, the weight map of paper eq. 2
    labels: np.ndarray  # int32 H x W instance labels

    def region(self, rows: slice, cols: slice, name: str) -> Example:
        return Example(name, self.image[rows, cols], self.classes[rows, cols],
                       self.weights[rows, cols], self.labels[rows, cols])


def _targets_key(mask: np.ndarray, config: TargetsConfig) -> str:
    digest = hashlib.sha256()
    digest.update(f"{TARGETS_VERSION}|{mask.shape}|{mask.dtype}|{config}".encode())
    digest.update(np.ascontiguousarray(mask).tobytes())
    return digest.hexdigest()[:32]


def compute_targets(
    labels: np.ndarray, config: TargetsConfig, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(classes, weight map) of an instance label image, from the cache when it has them.

    The key is the mask's content and the target settings, so an edited mask or another w0 is
    recomputed and a 100-epoch run pays for each weight map once.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"targets-{_targets_key(labels, config)}.npz"
        if path.exists():
            with np.load(path) as cached:
                return cached["classes"], cached["weights"]
    classes, weights = targets.training_targets(
        labels, w0=config.w0, sigma=config.sigma, balance=config.balance, gap=config.gap,
        kind=config.kind, border=config.border,
    )
    weights = weights.astype(np.float32)
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, classes=classes, weights=weights)
    return classes, weights


@dataclass(frozen=True)
class MaskReport:
    """What the masks of a dataset are, said at the start of training."""

    kind: str  # "instance" | "binary" | "mixed"
    cells: int
    merged_suspects: list[str]  # binary masks whose components look like merged cells
    empty: list[str] = field(default_factory=list)  # all-zero masks: images without cells

    def describe(self) -> str:
        text = f"{self.kind} masks, {self.cells} cells"
        if self.empty:
            text += (f"; {len(self.empty)} all-zero mask(s) taught as images without cells: "
                     f"{', '.join(self.empty[:5])}")
        if self.merged_suspects:
            text += (
                f"; binary masks with unusually large components (touching cells merged?): "
                f"{', '.join(self.merged_suspects[:5])}. Touching cells in a binary mask become "
                "one instance and cannot be taught apart: provide instance labels (1..N) to fix this"
            )
        return text


def _looks_merged(labels: np.ndarray) -> bool:
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return areas.size >= 3 and areas.max() > 3.0 * np.median(areas)


def read_pairs(
    pairs: list[Pair], pick_channels: str = "", unpaired: Sequence[str] = ()
) -> list[tuple[Pair, np.ndarray, np.ndarray]]:
    """(pair, image, mask) of every pair, `--channels` applied, after checking them all:
    every unreadable file, size mismatch, bad mask and odd channel count of the folder is
    reported together in one DataError with the `unpaired` files found before (images without
    masks and masks without images), so a user fixes them in one pass."""
    problems, loaded = list(unpaired), []
    for pair in pairs:
        image = mask = None
        try:
            image = select_channels(pair.load_image(), pick_channels, pair.image)
        except DataError as e:
            problems.append(str(e))
        try:
            mask = pair.load_mask()
        except DataError as e:
            problems.append(str(e))
        if image is None or mask is None:
            continue
        if image.shape[:2] != mask.shape:
            problems.append(
                f"{pair.mask}: mask is {mask.shape[0]} x {mask.shape[1]} but its image "
                f"{pair.image.name} is {image.shape[0]} x {image.shape[1]}"
            )
            continue
        loaded.append((pair, image, mask))
    counts: dict[int, list[str]] = {}
    for pair, image, _ in loaded:
        counts.setdefault(image.shape[2], []).append(pair.image.name)
    if len(counts) > 1:
        usual = max(counts, key=lambda c: len(counts[c]))
        for c, names in sorted(counts.items()):
            if c != usual:
                shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                problems.append(
                    f"{pairs[0].image.parent}: {shown} {'has' if len(names) == 1 else 'have'} {c} "
                    f"channel(s) but {len(counts[usual])} other image(s) have {usual}; pass "
                    "--channels gray to average colour to one channel, or --channels 0 (or 0,1,2 "
                    "...) to pick channels every image has"
                )
    if loaded and not problems and all(not mask.any() for _, _, mask in loaded):
        problems.append(
            f"{pairs[0].mask.parent}: every mask is all zero (no cells to learn); masks hold 0 "
            "for background and 1..N (or 255) for cells"
        )
    if problems:
        raise DataError.collect(problems, str(pairs[0].image.parent.parent))
    return loaded


def load_examples(
    pairs: list[Pair], config: Config, cache_dir: Path | None = None, unpaired: Sequence[str] = ()
) -> tuple[list[Example], MaskReport]:
    """Read, check and normalise every pair; compute (or fetch) its targets. `unpaired` files
    (`folders.discover_pairs`) are reported with the pairs' own problems."""
    examples, kinds, suspects, empty = [], set(), [], []
    for pair, image, mask in read_pairs(pairs, config.model.pick_channels, unpaired):
        binary = targets.is_binary(mask)
        kinds.add("binary" if binary else "instance")
        if not mask.any():
            empty.append(pair.mask.name)
        labels = targets.as_instances(mask, source=str(pair.mask))
        if binary and _looks_merged(labels):
            suspects.append(pair.mask.name)
        classes, weights = compute_targets(labels, config.targets, cache_dir)
        examples.append(Example(pair.stem, normalize(image, config.normalize), classes, weights, labels))
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    cells = sum(int(len(np.unique(e.labels))) - 1 for e in examples)
    return examples, MaskReport(kind, cells, suspects, empty)


def split_examples(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out whole images for validation; a single image gives up a strip instead.

    Validation tiles must never overlap training tiles, or validation measures memory: with
    one image the last `val_fraction` of its longer axis is held out, and training tiles
    mirror at the strip's edge rather than reach into it.
    """
    if val_fraction <= 0:
        return examples, []
    if len(examples) >= 2:
        order = np.random.default_rng(seed).permutation(len(examples))
        n_val = min(len(examples) - 1, max(1, int(round(val_fraction * len(examples)))))
        val = sorted(order[:n_val])
        return ([e for i, e in enumerate(examples) if i not in val], [examples[i] for i in val])
    (example,) = examples
    h, w = example.classes.shape
    axis_len = max(h, w)
    cut = axis_len - max(1, int(round(val_fraction * axis_len)))
    whole = slice(None)
    if w >= h:
        train = example.region(whole, slice(0, cut), f"{example.name}[train]")
        val = example.region(whole, slice(cut, None), f"{example.name}[val]")
    else:
        train = example.region(slice(0, cut), whole, f"{example.name}[train]")
        val = example.region(slice(cut, None), whole, f"{example.name}[val]")
    return [train], [val]


# --- tiles --------------------------------------------------------------------------------

def cut_tile(example: Example, top: int, left: int, geometry: TileGeometry):
    """The input tile whose output window starts at (top, left), mirrored past the borders,
    with classes and weights over the same input window (cropped after augmentation)."""
    m, n = geometry.margin, geometry.input
    return (
        mirror_window(example.image, top - m, left - m, n, n),
        mirror_window(example.classes, top - m, left - m, n, n),
        mirror_window(example.weights, top - m, left - m, n, n),
    )


def _crop_targets(classes, weights, geometry: TileGeometry) -> np.ndarray:
    m, o = geometry.margin, geometry.output
    return np.stack(
        [classes[m:m + o, m:m + o].astype(np.float32), weights[m:m + o, m:m + o]], axis=-1
    )


def _random_origin(rng: np.random.Generator, length: int, window: int) -> int:
    """Top-left of an output window along one axis: uniform over the positions that keep it
    inside the image, or that keep the image inside it when the image is smaller."""
    low, high = min(0, length - window), max(0, length - window)
    return int(rng.integers(low, high + 1))


class TileSampler:
    """Draws the i-th training tile from seed and index alone: reproducible, order-free, and
    safe to call from tf.data's parallel threads."""

    def __init__(self, examples: list[Example], geometry: TileGeometry, seed: int, augmenter=None):
        self.examples = examples
        self.geometry = geometry
        self.seed = seed
        self.augmenter = augmenter
        areas = np.array([e.classes.size for e in examples], np.float64)
        self.p = areas / areas.sum()  # larger images give proportionally more tiles

    def __call__(self, index) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        example = self.examples[rng.choice(len(self.examples), p=self.p)]
        h, w = example.classes.shape
        top = _random_origin(rng, h, self.geometry.output)
        left = _random_origin(rng, w, self.geometry.output)
        image, classes, weights = cut_tile(example, top, left, self.geometry)
        if self.augmenter is not None:
            image, classes, weights = self.augmenter(
                np.ascontiguousarray(image), np.ascontiguousarray(classes),
                np.ascontiguousarray(weights), int(rng.integers(2**31)),
            )
        return np.ascontiguousarray(image, np.float32), _crop_targets(classes, weights, self.geometry)


def training_dataset(
    examples: list[Example], config: Config, augmenter=None, start: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
    """An endless dataset of (input tiles, packed targets) batches.

    Tile i depends only on the seed and i, so a run resumed at step s continues with
    `start = s * batch_size` and sees the tiles an uninterrupted run would have seen.
    `shard = (k, n)` keeps tiles start + k, start + k + n, ...: each of n workers draws and
    augments only its own tiles (sharding by data, at the source).
    """
    geometry = TileGeometry.for_config(config)
    sampler = TileSampler(examples, geometry, config.train.seed, augmenter)
    channels = examples[0].image.shape[2]

    def sample(index):
        image, target = tf.numpy_function(sampler, [index], (tf.float32, tf.float32), stateful=False)
        image.set_shape((geometry.input, geometry.input, channels))
        target.set_shape((geometry.output, geometry.output, 2))
        return image, target

    return (
        tf.data.Dataset.range(start + shard[0], 2**62, shard[1])
        .map(sample, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(config.train.batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def validation_tiles(examples: list[Example], config: Config) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation tiles without augmentation: output windows on a grid over each image
    (at most `val_tiles` per image, spread evenly), mirrored past the borders as in predict."""
    geometry = TileGeometry.for_config(config)
    images, targets_ = [], []
    for example in examples:
        h, w = example.classes.shape
        tops = list(range(0, max(h - geometry.output, 0) + 1, geometry.output)) or [0]
        lefts = list(range(0, max(w - geometry.output, 0) + 1, geometry.output)) or [0]
        # The last window is flush with the far edge, so the grid reaches every pixel; at
        # most val_tiles of its windows are kept (spread evenly below), not all of them.
        if h > geometry.output and tops[-1] != h - geometry.output:
            tops.append(h - geometry.output)
        if w > geometry.output and lefts[-1] != w - geometry.output:
            lefts.append(w - geometry.output)
        if h < geometry.output:
            tops = [-((geometry.output - h) // 2)]
        if w < geometry.output:
            lefts = [-((geometry.output - w) // 2)]
        origins = [(top, left) for top in tops for left in lefts]
        spread = np.linspace(0, len(origins) - 1, min(len(origins), config.train.val_tiles))
        keep = np.unique(spread.round().astype(int))
        for k in keep:
            image, classes, weights = cut_tile(example, *origins[k], geometry)
            images.append(image)
            targets_.append(_crop_targets(classes, weights, geometry))
    return np.stack(images).astype(np.float32), np.stack(targets_)


def validation_dataset(examples: list[Example], config: Config) -> tf.data.Dataset | None:
    if not examples:
        return None
    images, packed = validation_tiles(examples, config)
    return tf.data.Dataset.from_tensor_slices((images, packed)).batch(config.train.batch_size)
