"""Scores of a segmentation against true masks: the metrics people report, per image and pooled.

Pixel (semantic) scores compare foreground (label > 0) with true foreground:

    pixel_accuracy  correct pixels / all pixels           (the paper's "pixel error" is 1 - this)
    iou             foreground intersection / union       (the paper's IoU, Table 2)
    mean_iou        mean of the background and foreground IoU
    dice            2 |T and P| / (|T| + |P|) on the foreground

Instance scores match predicted cells to true cells by their intersection over union (IoU). At
a threshold t a pair matches when IoU > t (strictly). For t >= 0.5 a cell can have at most one
partner with IoU > t (two partners would each cover more than half of it), so the matching is
unique without any assignment step: TP = pairs with IoU > t, FP = predicted cells without a
match, FN = true cells without a match. Then, at each t in 0.50, 0.55, ..., 0.95,

    ap  = TP / (TP + FP + FN)      the Data Science Bowl 2018 "average precision" at t
    f1  = 2 TP / (2 TP + FP + FN)

and `mean_ap` is ap averaged over the ten thresholds (the DSB2018 score). `rand_error` is the
adapted Rand error of the SNEMI3D / ISBI 2012 challenges (`skimage.metrics.adapted_rand_error`;
the paper reports 0.0382 on ISBI 2012). It ignores pixels that are background in the truth,
but predicted background is a segment like any other: true-cell pixels that the prediction
leaves as background count as one large predicted segment spanning the whole image, so thin
disagreements at the rims of many cells weigh heavily (a 2 px shift of 4000 cells gives 0.7).

Conventions where a ratio has no denominator (nothing to find and nothing found): ap, f1, iou
and dice are 1.0 (the prediction agrees with the truth), and likewise the background IoU of an
image that is all foreground in both. The adapted Rand error is undefined (None) when no pair of
true-foreground pixels shares a label in either image (e.g. no true cells).

Pooling over images follows what the counts mean rather than averaging ratios: pixel counts
are summed over all images (pooled pixel accuracy = all correct pixels / all pixels, pooled
IoU = summed intersections / summed unions), and TP, FP, FN are summed over images before ap
and f1 are formed, so an image with 500 cells weighs more than one with 5. The adapted Rand
error does not decompose into counts; its pooled value is the mean over the images where it is
defined.

All overlaps come from one sparse contingency table of (true label, predicted label) pairs over
the pixels, never from one mask per cell, so an image with thousands of cells scores in a
fraction of a second (benchmarks/evaluate.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
from skimage.metrics import adapted_rand_error

from .errors import DataError, UnetcellError
from .files import check_writable, write_text_atomic
from .folders import files_by_stem, find_pairs
from .io import read_mask

THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


# -- overlaps ---------------------------------------------------------------------------------


def _renumber_cells(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, areas, index): the non-zero labels present, their pixel counts, and the label
    image re-numbered 0 (background), 1..n in the order of `ids`."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 2 * flat.size + (1 << 20):
        # Labels are dense enough for a lookup table: linear time, no sort.
        counts = np.bincount(flat, minlength=1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        return ids, counts[ids], lut[flat]
    values, index, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if values[0] != 0:  # no background pixel: shift so that index 0 stays "background"
        return values, counts, index.astype(np.int64) + 1
    return values[1:], counts[1:], index.astype(np.int64)


@dataclass(frozen=True)
class CellOverlaps:
    """The sparse contingency table of a true and a predicted label image.

    `true_ids` / `predicted_ids` are the cell labels present (sorted) with their pixel counts
    in `true_areas` / `predicted_areas`. Each overlapping pair k is true cell
    `true_ids[pair_true[k]]` and predicted cell `predicted_ids[pair_predicted[k]]`, sharing
    `intersections[k]` pixels. Pairs that do not touch are not stored: their IoU is 0.
    """

    pixels: int
    true_ids: np.ndarray
    true_areas: np.ndarray
    predicted_ids: np.ndarray
    predicted_areas: np.ndarray
    pair_true: np.ndarray
    pair_predicted: np.ndarray
    intersections: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair: intersection / (true + predicted area - intersection)."""
        union = (
            self.true_areas[self.pair_true] + self.predicted_areas[self.pair_predicted]
            - self.intersections
        )
        return self.intersections / union

    def matches(self, threshold: float = 0.5) -> np.ndarray:
        """Which pairs match at `threshold` (IoU > threshold); unique when threshold >= 0.5."""
        if threshold < 0.5:
            raise ValueError(
                f"Matching by IoU > t is one-to-one only for t >= 0.5. Received: {threshold}"
            )
        return self.iou > threshold

    def unmatched(self, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """(false positives, misses): labels of predicted cells that match no true cell and of
        true cells that no predicted cell matches, at `threshold`."""
        hit = self.matches(threshold)
        found = self.predicted_ids[self.pair_predicted[hit]]
        false_positives = np.setdiff1d(self.predicted_ids, found)
        misses = np.setdiff1d(self.true_ids, self.true_ids[self.pair_true[hit]])
        return false_positives, misses


def cell_overlaps(truth: np.ndarray, predicted: np.ndarray) -> CellOverlaps:
    """Pixel counts of every true cell, predicted cell and overlapping pair, in one pass.

    Each pixel where both images hold a cell is coded as one integer (true index x number of
    predicted cells + predicted index); counting the codes gives every intersection at once.
    """
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if truth.shape != predicted.shape:
        raise ValueError(f"truth and predicted differ in shape: {truth.shape} vs {predicted.shape}")
    for name, labels in (("truth", truth), ("predicted", predicted)):
        if labels.dtype.kind not in "iub" or (labels.size and labels.min() < 0):
            raise ValueError(
                f"{name} must be a non-negative integer label image. Received dtype {labels.dtype}"
            )
    true_ids, true_areas, t = _renumber_cells(truth.astype(np.int64, copy=False))
    pred_ids, pred_areas, p = _renumber_cells(predicted.astype(np.int64, copy=False))
    both = (t > 0) & (p > 0)
    columns = len(pred_ids) + 1
    codes = t[both] * columns + p[both]
    cells = (len(true_ids) + 1) * columns
    if cells <= max(4 * codes.size, 1 << 16):
        counts = np.bincount(codes, minlength=cells)
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:  # thousands of cells: the dense table would not fit, sort the codes instead
        codes, counts = np.unique(codes, return_counts=True)
    return CellOverlaps(
        pixels=int(truth.size),
        true_ids=true_ids,
        true_areas=true_areas.astype(np.int64),
        predicted_ids=pred_ids,
        predicted_areas=pred_areas.astype(np.int64),
        pair_true=codes // columns - 1,
        pair_predicted=codes % columns - 1,
        intersections=counts.astype(np.int64),
    )


def _adapted_rand_error(overlaps: CellOverlaps) -> float | None:
    """skimage's adapted Rand error, fed the contingency table we already have.

    skimage builds its own table as a sparse matrix indexed by the raw label values, whose size
    grows with the largest label; ours is compact. Rows are true cells (true background is
    ignored, as skimage does by default), columns predicted cells plus predicted background.
    """
    ov = overlaps
    n_true = len(ov.true_ids)
    on_background = ov.true_areas - np.bincount(ov.pair_true, ov.intersections, minlength=n_true)
    rows = np.concatenate([ov.pair_true, np.arange(n_true)])
    cols = np.concatenate([ov.pair_predicted + 1, np.zeros(n_true, np.int64)])
    data = np.concatenate([ov.intersections, on_background]).astype(np.float64)
    table = scipy.sparse.csr_array((data, (rows, cols)), shape=(n_true, len(ov.predicted_ids) + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        error = float(adapted_rand_error(table=table)[0])
    return error if np.isfinite(error) else None


# -- scores -----------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, and 1.0 when there is nothing to count (see the module notes)."""
    return float(numerator / denominator) if denominator else 1.0


@dataclass(frozen=True)
class ImageScores:
    """The counts behind every score of one image (or of several, summed by `pool`).

    Pixel counts: `true_pixels` / `predicted_pixels` are the foreground of the truth and of the
    prediction, `overlap_pixels` the foreground of both. `tp[i]` is the number of matched cells
    at `THRESHOLDS[i]`.
    """

    stem: str
    pixels: int
    true_pixels: int
    predicted_pixels: int
    overlap_pixels: int
    true_cells: int
    predicted_cells: int
    tp: tuple[int, ...]
    rand_error: float | None

    @classmethod
    def from_overlaps(cls, overlaps: CellOverlaps, stem: str = "") -> ImageScores:
        iou = overlaps.iou
        return cls(
            stem=stem,
            pixels=overlaps.pixels,
            true_pixels=int(overlaps.true_areas.sum()),
            predicted_pixels=int(overlaps.predicted_areas.sum()),
            overlap_pixels=int(overlaps.intersections.sum()),
            true_cells=len(overlaps.true_ids),
            predicted_cells=len(overlaps.predicted_ids),
            tp=tuple(int(np.count_nonzero(iou > t)) for t in THRESHOLDS),
            rand_error=_adapted_rand_error(overlaps),
        )

    def thresholds(self) -> list[dict]:
        """The threshold sweep: TP, FP, FN, ap and f1 at each IoU threshold."""
        rows = []
        for t, tp in zip(THRESHOLDS, self.tp):
            fp, fn = self.predicted_cells - tp, self.true_cells - tp
            rows.append({"threshold": t, "tp": tp, "fp": fp, "fn": fn,
                         "ap": _ratio(tp, tp + fp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)})
        return rows

    def metrics(self) -> dict:
        """Every score as a plain dict (JSON-ready); `stem` only when it is set."""
        both = self.overlap_pixels
        false_fg = self.predicted_pixels - both
        missed_fg = self.true_pixels - both
        background = self.pixels - both - false_fg - missed_fg
        foreground_iou = _ratio(both, both + false_fg + missed_fg)
        background_iou = _ratio(background, background + false_fg + missed_fg)
        sweep = self.thresholds()
        out = {"stem": self.stem} if self.stem else {}
        out.update({
            "pixel_accuracy": _ratio(both + background, self.pixels),
            "iou": foreground_iou,
            "mean_iou": (foreground_iou + background_iou) / 2,
            "dice": _ratio(2 * both, self.true_pixels + self.predicted_pixels),
            "ap_50": sweep[0]["ap"],
            "f1_50": sweep[0]["f1"],
            "mean_ap": float(np.mean([row["ap"] for row in sweep])),
            "rand_error": self.rand_error,
            "true_cells": self.true_cells,
            "predicted_cells": self.predicted_cells,
            "thresholds": sweep,
        })
        return out


def score_image(truth: np.ndarray, predicted: np.ndarray, stem: str = "") -> ImageScores:
    """Score one predicted instance label image against the true one (0 = background)."""
    return ImageScores.from_overlaps(cell_overlaps(truth, predicted), stem)


def pool(scores: Sequence[ImageScores]) -> dict:
    """Pooled scores over images (counts summed, see the module notes) with the per-image
    scores under "images"."""
    if not scores:
        raise ValueError("pool needs the scores of at least one image")
    rand = [s.rand_error for s in scores if s.rand_error is not None]
    total = ImageScores(
        stem="",
        pixels=sum(s.pixels for s in scores),
        true_pixels=sum(s.true_pixels for s in scores),
        predicted_pixels=sum(s.predicted_pixels for s in scores),
        overlap_pixels=sum(s.overlap_pixels for s in scores),
        true_cells=sum(s.true_cells for s in scores),
        predicted_cells=sum(s.predicted_cells for s in scores),
        tp=tuple(int(sum(col)) for col in zip(*(s.tp for s in scores))),
        rand_error=float(np.mean(rand)) if rand else None,
    )
    result = total.metrics()
    result["images"] = [s.metrics() for s in scores]
    return result


# -- folders ----------------------------------------------------------------------------------


def _label_files(folder: Path) -> dict[str, Path]:
    """Label images in `folder` by stem; two files with one stem is an error naming both."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of predictions")
    return files_by_stem(folder)


def _instances(labels: np.ndarray, source: Path) -> np.ndarray:
    # Binary masks (0/1, 0/255) become cells by connected components, exactly as for training.
    from .targets import as_instances

    return as_instances(labels, source=str(source))


def evaluate_folder(
    data: str | os.PathLike,
    predictions: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    config=None,
    overlay_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    manual_dir: str | os.PathLike | None = None,
) -> dict:
    """Score the predictions for a dataset folder (images/, masks/) against its masks; `data`
    may be a `tfds:` data set read from `manual_dir` instead (`unetcell.folders.find_pairs`).

    The predictions are either label images in the folder `predictions`, matched to the masks
    by file stem (any of .tif, .tiff, .png), or made here by the saved `model` from the images
    (`config` overrides the settings saved with it). Exactly one of the two must be given.
    Binary masks and predictions are split into cells by connected components.

    With `overlay_dir`, writes one PNG per image: true contours green, predicted magenta, false
    positives (at IoU 0.5) filled red and missed cells blue. Returns `pool`'s dict, with the
    data folder and the source of the predictions added.
    """
    if (predictions is None) == (model is None):
        raise UnetcellError("evaluate needs exactly one of --model MODEL and --predictions DIR")
    pairs = find_pairs(data, manual_dir)
    # Every missing file and every output in the way is reported before any work starts.
    files: dict[str, Path] = {}
    if predictions is not None:
        found = _label_files(Path(predictions))
        for pair in pairs:
            if pair.stem not in found:
                raise DataError(
                    f"{pair.mask}: no prediction with the stem {pair.stem!r} in {predictions} "
                    f"(expected e.g. {Path(predictions) / (pair.stem + '.tif')})"
                )
            files[pair.stem] = found[pair.stem]
    overlays = {}
    if overlay_dir is not None:
        overlays = {
            p.stem: check_writable(Path(overlay_dir) / f"{p.stem}.png", overwrite) for p in pairs
        }
    predictor = None
    if model is not None:
        from .predict import load_predictor

        predictor = (
            load_predictor(model) if config is None else load_predictor(model, config=config)
        )

    scores = []
    for pair in pairs:
        truth = _instances(pair.load_mask(), pair.mask)
        image = pair.load_image() if predictor is not None or overlays else None
        if predictor is not None:
            source = pair.image
            predicted = np.asarray(predictor.labels(image))
        else:
            source = files[pair.stem]
            predicted = _instances(read_mask(source), source)
        if predicted.shape != truth.shape:
            raise DataError(
                f"{source}: prediction is {predicted.shape[0]} x {predicted.shape[1]} but its "
                f"mask {pair.mask} is {truth.shape[0]} x {truth.shape[1]}"
            )
        overlaps = cell_overlaps(truth, predicted)
        scores.append(ImageScores.from_overlaps(overlaps, pair.stem))
        if overlays:
            from .overlay import contour_overlay, save_overlay

            false_positives, misses = overlaps.unmatched(0.5)
            rgb = contour_overlay(image, predicted, truth,
                                  false_positives=false_positives, misses=misses)
            save_overlay(overlays[pair.stem], rgb, overwrite=overwrite)

    result = {"data": str(data)}
    if predictions is not None:
        result["predictions"] = str(predictions)
    else:
        result["model"] = str(model)
    result.update(pool(scores))
    return result


# -- reports ----------------------------------------------------------------------------------


def _row(name: str, width: int, m: dict) -> str:
    rand = "-" if m["rand_error"] is None else f"{m['rand_error']:.4f}"
    return (
        f"{name:<{width}} {m['true_cells']:>6} {m['predicted_cells']:>6} "
        f"{m['pixel_accuracy']:>8.4f} {m['iou']:>7.4f} {m['dice']:>7.4f} "
        f"{m['ap_50']:>7.4f} {m['f1_50']:>7.4f} {m['mean_ap']:>7.4f} {rand:>8}"
    )


def format_table(result: dict) -> str:
    """The scores as a terminal table: one row per image, the pooled row, the threshold sweep."""
    images = result.get("images", [])
    width = max([len("pooled"), len("image")] + [len(m.get("stem", "")) for m in images])
    header = (
        f"{'image':<{width}} {'true':>6} {'pred':>6} {'pix acc':>8} {'IoU':>7} {'Dice':>7} "
        f"{'AP@0.5':>7} {'F1@0.5':>7} {'mAP':>7} {'Rand err':>8}"
    )
    lines = [header, "-" * len(header)]
    lines += [_row(m.get("stem", ""), width, m) for m in images]
    lines += ["-" * len(header), _row("pooled", width, result), ""]
    lines.append(f"{'IoU >':>6} {'TP':>7} {'FP':>7} {'FN':>7} {'AP':>7} {'F1':>7}")
    for row in result["thresholds"]:
        lines.append(
            f"{row['threshold']:>6.2f} {row['tp']:>7} {row['fp']:>7} {row['fn']:>7} "
            f"{row['ap']:>7.4f} {row['f1']:>7.4f}"
        )
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the scores as JSON, atomically; refuse to replace a file without `overwrite`."""
    path = check_writable(path, overwrite)
    write_text_atomic(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    return path
