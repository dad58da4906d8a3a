"""Scores checked against independent computations: one boolean mask per cell pair, matching
by brute force, direct pixel counts, scikit-image's adapted Rand error, hand-made cases."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from skimage.metrics import adapted_rand_error

from unetcell.errors import DataError, OutputExistsError, UnetcellError
from unetcell.evaluate import (
    THRESHOLDS,
    cell_overlaps,
    evaluate_folder,
    format_table,
    pool,
    score_image,
    write_json,
)

# -- independent references -------------------------------------------------------------------


def brute_iou(truth, pred):
    """IoU of every (true, predicted) pair from one boolean mask per pair."""
    t_ids, p_ids = np.unique(truth)[1:], np.unique(pred)[1:]
    iou = np.zeros((len(t_ids), len(p_ids)))
    for i, a in enumerate(t_ids):
        for j, b in enumerate(p_ids):
            t, p = truth == a, pred == b
            iou[i, j] = (t & p).sum() / (t | p).sum()
    return t_ids, p_ids, iou


def brute_counts(truth, pred, threshold):
    """TP, FP, FN by matching each true cell to the predicted cells above the threshold."""
    t_ids, p_ids, iou = brute_iou(truth, pred)
    partners = [np.flatnonzero(row > threshold) for row in iou]
    assert all(len(p) <= 1 for p in partners)  # unique for t >= 0.5
    matched_pred = [p[0] for p in partners if len(p)]
    assert len(set(matched_pred)) == len(matched_pred)
    tp = len(matched_pred)
    return tp, len(p_ids) - tp, len(t_ids) - tp


def random_cells(rng, shape=(48, 48), count=12, max_size=10):
    """Random overlapping rectangles: cells of all sizes, some touching, some hidden."""
    labels = np.zeros(shape, np.int32)
    for k in range(1, count + 1):
        r, c = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(2, max_size, 2)
        labels[r:r + h, c:c + w] = k
    return labels


def scores_at(scores, threshold):
    row = next(r for r in scores.thresholds() if r["threshold"] == threshold)
    return row["tp"], row["fp"], row["fn"]


# -- instance scores --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_iou_of_every_pair_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = random_cells(rng)
    pred = random_cells(rng)
    t_ids, p_ids, want = brute_iou(truth, pred)
    ov = cell_overlaps(truth, pred)
    assert np.array_equal(ov.true_ids, t_ids) and np.array_equal(ov.predicted_ids, p_ids)
    got = np.zeros_like(want)
    got[ov.pair_true, ov.pair_predicted] = ov.iou
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_matching_counts_equal_brute_force_at_every_threshold(seed):
    rng = np.random.default_rng(seed)
    truth = random_cells(rng, count=15)
    # A prediction near the truth: some cells shifted, one dropped, one added.
    pred = np.roll(truth, rng.integers(0, 3, 2), axis=(0, 1))
    pred[pred == 3] = 0
    pred[40:46, 40:46] = 99
    scores = score_image(truth, pred)
    for t in THRESHOLDS:
        assert scores_at(scores, t) == brute_counts(truth, pred, t)


def test_sparse_and_huge_label_values_score_like_small_ones():
    rng = np.random.default_rng(7)
    truth, pred = random_cells(rng), random_cells(rng)
    # Labels up to 2^31 - 1 take the sorting path instead of the lookup table.
    big_truth = np.where(truth > 0, truth * 150_000_000 + 7, 0).astype(np.int64)
    big_pred = np.where(pred > 0, 2**31 - 1 - pred, 0).astype(np.int64)
    assert score_image(big_truth, big_pred).metrics() == score_image(truth, pred).metrics()


def test_labels_without_background_pixels_are_scored():
    truth = np.ones((6, 6), np.int32)
    pred = np.full((6, 6), 2**31 - 1, np.int64)
    m = score_image(truth, pred).metrics()
    assert m["ap_50"] == 1.0 and m["pixel_accuracy"] == 1.0 and m["mean_iou"] == 1.0


def square(shape, top, left, size, label=1, out=None):
    out = np.zeros(shape, np.int32) if out is None else out
    out[top:top + size, left:left + size] = label
    return out


def test_no_predicted_cells_misses_every_true_cell():
    truth = square((30, 30), 2, 2, 8, 1)
    square((30, 30), 15, 15, 8, 2, out=truth)
    m = score_image(truth, np.zeros_like(truth)).metrics()
    assert [(r["tp"], r["fp"], r["fn"]) for r in m["thresholds"]] == [(0, 0, 2)] * 10
    assert m["ap_50"] == 0.0 and m["f1_50"] == 0.0 and m["mean_ap"] == 0.0
    assert m["iou"] == 0.0 and m["dice"] == 0.0
    assert m["pixel_accuracy"] == 1 - 128 / 900


def test_no_true_cells_makes_every_prediction_a_false_positive():
    pred = square((30, 30), 2, 2, 8, 5)
    m = score_image(np.zeros_like(pred), pred).metrics()
    assert m["thresholds"][0] == {"threshold": 0.5, "tp": 0, "fp": 1, "fn": 0, "ap": 0.0, "f1": 0.0}
    assert m["iou"] == 0.0 and m["dice"] == 0.0
    # The adapted Rand error ignores true background: with no true cells it is undefined.
    assert m["rand_error"] is None


def test_both_empty_scores_one_by_convention():
    empty = np.zeros((10, 12), np.uint16)
    m = score_image(empty, empty).metrics()
    for key in ("pixel_accuracy", "iou", "mean_iou", "dice", "ap_50", "f1_50", "mean_ap"):
        assert m[key] == 1.0, key
    assert m["rand_error"] is None


def test_a_cell_split_in_half_matches_neither_half():
    truth = square((20, 20), 5, 5, 10, 1)
    pred = np.zeros_like(truth)
    pred[5:15, 5:10], pred[5:15, 10:15] = 1, 2  # each half has IoU exactly 0.5: not > 0.5
    assert scores_at(score_image(truth, pred), 0.5) == (0, 2, 1)


def test_a_cell_split_unevenly_matches_its_larger_part_up_to_its_iou():
    truth = square((20, 20), 5, 5, 10, 1)
    pred = np.zeros_like(truth)
    pred[5:15, 5:11], pred[5:15, 11:15] = 1, 2  # IoU 0.6 and 0.4
    s = score_image(truth, pred)
    assert scores_at(s, 0.55) == (1, 1, 0)
    assert scores_at(s, 0.6) == (0, 2, 1)  # 0.6 is not > 0.6


def test_two_touching_cells_merged_match_neither():
    truth = square((20, 30), 5, 5, 10, 1)
    square((20, 30), 5, 15, 10, 2, out=truth)
    pred = (truth > 0).astype(np.int32)  # one cell over both: IoU 0.5 with each
    s = score_image(truth, pred)
    assert scores_at(s, 0.5) == (0, 1, 2)
    m = s.metrics()
    assert m["ap_50"] == 0.0 and m["iou"] == 1.0 and m["pixel_accuracy"] == 1.0


@pytest.mark.parametrize("shift, iou", [(4, 16 / 24), (5, 15 / 25), (6, 14 / 26)])
def test_a_shifted_cell_matches_exactly_below_its_iou(shift, iou):
    truth = square((40, 60), 10, 10, 20, 3)
    pred = square((40, 60), 10, 10 + shift, 20, 8)
    s = score_image(truth, pred)
    assert cell_overlaps(truth, pred).iou.tolist() == [iou]
    for t, tp in zip(THRESHOLDS, s.tp):
        assert tp == int(iou > t), t
    if shift == 5:  # IoU exactly 0.6: matched at 0.55, not at 0.6
        assert s.tp[:3] == (1, 1, 0)


def test_unmatched_lists_false_positives_and_misses():
    truth = square((30, 30), 0, 0, 10, 1)
    square((30, 30), 15, 15, 10, 2, out=truth)
    pred = square((30, 30), 0, 1, 10, 7)  # matches 1
    square((30, 30), 0, 20, 5, 9, out=pred)  # touches nothing
    fp, misses = cell_overlaps(truth, pred).unmatched(0.5)
    assert fp.tolist() == [9] and misses.tolist() == [2]


# -- pixel scores and Rand error --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_pixel_scores_equal_direct_counts(seed):
    rng = np.random.default_rng(seed)
    truth, pred = random_cells(rng, count=10), random_cells(rng, count=8)
    t, p = truth > 0, pred > 0
    m = score_image(truth, pred).metrics()
    fg = (t & p).sum() / (t | p).sum()
    bg = (~t & ~p).sum() / (~t | ~p).sum()
    assert m["pixel_accuracy"] == pytest.approx((t == p).mean(), abs=1e-12)
    assert m["iou"] == pytest.approx(fg, abs=1e-12)
    assert m["mean_iou"] == pytest.approx((fg + bg) / 2, abs=1e-12)
    assert m["dice"] == pytest.approx(2 * (t & p).sum() / (t.sum() + p.sum()), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_rand_error_equals_scikit_image(seed):
    rng = np.random.default_rng(seed)
    truth, pred = random_cells(rng, count=14), random_cells(rng, count=9)
    want = adapted_rand_error(truth, pred)[0]
    assert score_image(truth, pred).rand_error == pytest.approx(want, abs=1e-12)


# -- pooling ----------------------------------------------------------------------------------


def test_pooling_sums_counts_rather_than_averaging_ratios():
    # Image a: one big cell found. Image b: four small cells, one found, and a false positive.
    a_true = square((40, 40), 0, 0, 30, 1)
    a_pred = square((40, 40), 1, 0, 30, 1)
    b_true = np.zeros((40, 40), np.int32)
    for k, (r, c) in enumerate([(0, 0), (0, 20), (20, 0), (20, 20)], start=1):
        square((40, 40), r, c, 6, k, out=b_true)
    b_pred = square((40, 40), 0, 0, 6, 1)
    square((40, 40), 30, 30, 6, 2, out=b_pred)
    scores = [score_image(a_true, a_pred, "a"), score_image(b_true, b_pred, "b")]
    result = pool(scores)

    counts = [brute_counts(t, p, 0.5) for t, p in ((a_true, a_pred), (b_true, b_pred))]
    tp, fp, fn = (sum(c[i] for c in counts) for i in range(3))
    assert (tp, fp, fn) == (2, 1, 3)
    assert result["ap_50"] == tp / (tp + fp + fn)
    assert result["f1_50"] == 2 * tp / (2 * tp + fp + fn)
    per_image = [m["ap_50"] for m in result["images"]]
    assert result["ap_50"] != pytest.approx(np.mean(per_image))

    t = np.concatenate([a_true.ravel(), b_true.ravel()]) > 0
    p = np.concatenate([a_pred.ravel(), b_pred.ravel()]) > 0
    assert result["pixel_accuracy"] == pytest.approx((t == p).mean(), abs=1e-12)
    assert result["iou"] == pytest.approx((t & p).sum() / (t | p).sum(), abs=1e-12)
    assert result["iou"] != pytest.approx(np.mean([m["iou"] for m in result["images"]]))
    per_image_rand = [m["rand_error"] for m in result["images"]]
    assert result["rand_error"] == pytest.approx(np.mean(per_image_rand))
    assert [m["stem"] for m in result["images"]] == ["a", "b"]
    assert result["mean_ap"] == pytest.approx(np.mean([r["ap"] for r in result["thresholds"]]))


def test_pooled_rand_error_skips_images_where_it_is_undefined():
    cell = square((20, 20), 2, 2, 8, 1)
    result = pool([score_image(cell, cell), score_image(np.zeros_like(cell), cell)])
    assert result["rand_error"] == 0.0
    assert pool([score_image(np.zeros_like(cell), cell)])["rand_error"] is None


def test_pool_of_no_images_is_an_error():
    with pytest.raises(ValueError):
        pool([])


def test_result_has_the_documented_keys_and_is_json():
    cell = square((20, 20), 2, 2, 8, 1)
    result = pool([score_image(cell, cell, "x")])
    for key in ("pixel_accuracy", "iou", "mean_iou", "dice", "ap_50", "f1_50", "mean_ap",
                "rand_error", "thresholds", "images"):
        assert key in result
    assert [r["threshold"] for r in result["thresholds"]] == [
        0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    json.dumps(result, allow_nan=False)


def test_mismatched_or_non_label_inputs_are_rejected():
    with pytest.raises(ValueError):
        score_image(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError):
        score_image(np.zeros((4, 4), int), np.full((4, 4), 0.5))


# -- folders, table, JSON and the command -----------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    """data/images + data/masks (instance labels, one binary 0/255 mask) and pred/."""
    rng = np.random.default_rng(0)
    data, pred = tmp_path / "data", tmp_path / "pred"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    pred.mkdir()
    truths, preds = {}, {}
    for k, stem in enumerate(["a", "b", "c"]):
        truth = np.zeros((64, 80), np.int32)
        for i in range(6):
            square(truth.shape, 4 + 10 * i, 5 + 12 * i, 8, i + 1, out=truth)
        p = np.roll(truth, k, axis=1)
        p[p == k + 1] = 0
        image = (rng.normal(50, 5, truth.shape) + 150 * (truth > 0)).clip(0, 255).astype(np.uint8)
        iio.imwrite(data / "images" / f"{stem}.png", image)
        if stem == "c":  # a binary mask: cells come from connected components
            tifffile.imwrite(data / "masks" / f"{stem}.tif", ((truth > 0) * 255).astype(np.uint8))
        else:
            tifffile.imwrite(data / "masks" / f"{stem}.tif", truth.astype(np.uint16))
        (iio.imwrite(pred / f"{stem}.png", p.astype(np.uint8)) if stem == "b"
         else tifffile.imwrite(pred / f"{stem}.tif", p.astype(np.uint16)))
        truths[stem], preds[stem] = truth, p
    return data, pred, truths, preds


def test_evaluate_folder_equals_pooled_scores_of_its_images(folder):
    data, pred, truths, preds = folder
    result = evaluate_folder(data, predictions=pred)
    want = pool([score_image(truths[s], preds[s], s) for s in "abc"])
    for key in ("pixel_accuracy", "iou", "mean_iou", "dice", "ap_50", "f1_50", "mean_ap",
                "rand_error", "thresholds", "images"):
        assert result[key] == want[key], key
    assert result["predictions"] == str(pred)


def test_a_missing_prediction_is_an_error_naming_the_file(folder):
    data, pred, _, _ = folder
    (pred / "b.png").unlink()
    with pytest.raises(DataError, match="b.tif.*'b'"):
        evaluate_folder(data, predictions=pred)


def test_a_prediction_of_another_size_is_an_error_naming_it(folder):
    data, pred, _, _ = folder
    tifffile.imwrite(pred / "a.tif", np.zeros((64, 81), np.uint16))
    with pytest.raises(DataError, match=r"a\.tif.*64 x 81"):
        evaluate_folder(data, predictions=pred)


def test_exactly_one_source_of_predictions(folder):
    data, pred, _, _ = folder
    with pytest.raises(UnetcellError, match="exactly one"):
        evaluate_folder(data)
    with pytest.raises(UnetcellError, match="exactly one"):
        evaluate_folder(data, predictions=pred, model="m.keras")


class _ShiftPredictor:
    """Stands in for a trained model: 'predicts' the mask it was given, shifted."""

    def __init__(self, masks):
        self.masks = masks
        self.seen = []

    def labels(self, image):
        assert image.ndim == 3  # a raw H x W x C image, as read_image gives it
        self.seen.append(image.shape)
        return np.roll(self.masks[len(self.seen) - 1], 1, axis=0)


def test_a_model_predicts_each_image_through_load_predictor(folder, monkeypatch, tmp_path):
    import unetcell.predict

    data, _, truths, _ = folder
    fake = _ShiftPredictor([truths[s] for s in "abc"])
    calls = []
    monkeypatch.setattr(unetcell.predict, "load_predictor", lambda path, **kw: calls.append(path) or fake)
    result = evaluate_folder(data, model="model.keras", overlay_dir=tmp_path / "ov")
    assert calls == ["model.keras"] and fake.seen == [(64, 80, 1)] * 3
    want = pool([score_image(truths[s], np.roll(truths[s], 1, axis=0), s) for s in "abc"])
    assert result["mean_ap"] == want["mean_ap"] and result["model"] == "model.keras"
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["a.png", "b.png", "c.png"]


def test_format_table_shows_every_image_the_pooled_row_and_the_sweep(folder):
    data, pred, _, _ = folder
    result = evaluate_folder(data, predictions=pred)
    table = format_table(result)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["a", "b", "c"]
    pooled = next(line for line in lines if line.startswith("pooled"))
    assert f"{result['mean_ap']:.4f}" in pooled
    assert sum(line.strip().startswith(("0.5", "0.6", "0.7", "0.8", "0.9")) for line in lines) == 10


def test_write_json_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.json"
    write_json({"x": 1}, path)
    with pytest.raises(OutputExistsError):
        write_json({"x": 2}, path)
    write_json({"x": 2}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"x": 2}


def _cli(*args):
    from unetcell.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_prints_the_table_and_writes_json_and_overlays(folder, tmp_path):
    data, pred, truths, preds = folder
    out, overlays = tmp_path / "m.json", tmp_path / "overlays"
    r = _cli("evaluate", data, "--predictions", pred, "--json", out, "--overlay", overlays)
    assert r.exit_code == 0, r.output
    assert "pooled" in r.output and "AP@0.5" in r.output
    m = json.loads(out.read_text())
    want = pool([score_image(truths[s], preds[s], s) for s in "abc"])
    for key in ("f1_50", "ap_50", "mean_ap", "pixel_accuracy", "iou", "dice", "mean_iou"):
        assert m[key] == pytest.approx(want[key], abs=1e-12)
    assert [row["stem"] for row in m["images"]] == ["a", "b", "c"]
    pngs = sorted(overlays.glob("*.png"))
    assert [p.name for p in pngs] == ["a.png", "b.png", "c.png"]
    assert iio.imread(pngs[0]).shape == (64, 80, 3)

    again = _cli("evaluate", data, "--predictions", pred, "--json", out)
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert _cli("evaluate", data, "--predictions", pred, "--json", out, "--overlay", overlays,
                "--overwrite").exit_code == 0


@pytest.mark.parametrize("options", [[], ["--predictions", "PRED", "--model", "MODEL"]])
def test_cli_wants_exactly_one_of_model_and_predictions(folder, tmp_path, options):
    data, pred, _, _ = folder
    model = tmp_path / "model.keras"
    model.write_bytes(b"")
    options = [{"PRED": pred, "MODEL": model}.get(o, o) for o in options]
    r = _cli("evaluate", data, *options)
    assert r.exit_code == 1
    assert "error: evaluate needs exactly one of --model MODEL and --predictions DIR" in r.output


def test_cli_names_a_missing_prediction(folder):
    data, pred, _, _ = folder
    (pred / "c.tif").unlink()
    r = _cli("evaluate", data, "--predictions", pred)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "c.tif" in r.output
    assert "Traceback" not in r.output


def test_cli_scores_a_network_with_a_known_answer(folder, tmp_path):
    """`evaluate --model` with a stand-in network that finds exactly the bright squares of
    the folder's images: perfect scores; with one true cell erased from a mask, the found
    cell is a false positive and the pooled ap at 0.5 is 17 / 18."""
    from conftest import save_bright_cells_unet

    data, _, truths, _ = folder
    model = save_bright_cells_unet(tmp_path / "stub.keras")
    r = _cli("evaluate", data, "--model", model, "--json", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["pixel_accuracy"], m["iou"], m["ap_50"], m["mean_ap"]) == (1.0, 1.0, 1.0, 1.0)

    erased = truths["a"].copy()
    erased[erased == 3] = 0
    tifffile.imwrite(data / "masks" / "a.tif", erased.astype(np.uint16))
    r = _cli("evaluate", data, "--model", model, "--json", tmp_path / "erased.json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "erased.json").read_text())
    assert m["ap_50"] == pytest.approx(17 / 18) and m["pixel_accuracy"] < 1.0
