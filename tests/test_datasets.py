"""The TFDS builders read the public data sets' own layouts (the real files in ../shared/data
and fake layouts written here), and `tfds:` data goes through the folder pipeline."""

import importlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

from unetcell.config import Config
from unetcell.errors import DataError, OutputExistsError

tfds = pytest.importorskip("tensorflow_datasets")

import unetcell.datasets  # noqa: E402  (registers the builders)
from unetcell.data import load_examples  # noqa: E402
from unetcell.datasets import source  # noqa: E402
from unetcell.folders import discover_pairs, find_pairs  # noqa: E402

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data is absent")


@pytest.fixture(autouse=True)
def tfds_data_dir(tmp_path_factory, monkeypatch):
    """Prepared data sets go to a scratch folder, never to ~/tensorflow_datasets."""
    folder = tmp_path_factory.getbasetemp() / "tfds"
    monkeypatch.setenv("TFDS_DATA_DIR", str(folder))
    return folder


def examples(name, manual, split="train"):
    builder = source.prepared_builder(source.parse_spec(f"tfds:{name}"), manual)
    return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def four_connected_cells(binary):
    """Reference instance count: scipy's labelling with the 4-neighbourhood cross."""
    return ndi.label(binary, structure=ndi.generate_binary_structure(2, 1))[1]


# --- isbi2012 ------------------------------------------------------------------------------


def isbi_slice(z, shape=(48, 40)):
    """255 cells between 0 membranes: z + 2 vertical stripes, and two squares meeting at a
    corner in the first rows (one cell each under 4-connectivity, one blob under 8)."""
    labels = np.full(shape, 255, np.uint8)
    for col in np.linspace(0, shape[1], z + 3)[1:-1].astype(int):
        labels[:, col] = 0
    labels[:12] = 0
    labels[2:6, 2:6] = 255
    labels[6:10, 6:10] = 255
    return labels


@pytest.fixture
def isbi_manual(tmp_path):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "train-volume.tif", rng.integers(0, 256, (6, 48, 40), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "train-labels.tif", np.stack([isbi_slice(z) for z in range(6)]))
    tifffile.imwrite(tmp_path / "test-volume.tif", rng.integers(0, 256, (3, 48, 40), dtype=np.uint8))
    return tmp_path


def test_isbi2012_gives_every_slice_with_4_connected_cells(isbi_manual):
    train = examples("isbi2012", isbi_manual)
    volume = tifffile.imread(isbi_manual / "train-volume.tif")
    assert [e["id"].decode() for e in train] == [f"slice_{z:02d}" for z in range(6)]
    for z, example in enumerate(train):
        assert example["image"].dtype == np.uint8 and example["image"].shape == (48, 40, 1)
        np.testing.assert_array_equal(example["image"][..., 0], volume[z])
        assert example["labels"].dtype == np.uint16
        # z + 2 stripes and the two corner-touching squares
        assert len(np.unique(example["labels"])) - 1 == z + 2 + 2
        assert four_connected_cells(isbi_slice(z) == 255) == z + 4
        np.testing.assert_array_equal(example["labels"] > 0, isbi_slice(z) == 255)


def test_isbi2012_test_volume_has_no_labels(isbi_manual):
    test = examples("isbi2012", isbi_manual, split="test")
    assert len(test) == 3
    assert all(e["labels"].shape == (0, 0) for e in test)
    with pytest.raises(DataError, match="no labels"):
        find_pairs("tfds:isbi2012:test", isbi_manual)


def test_isbi2012_labels_other_than_0_and_255_are_an_error(isbi_manual):
    labels = tifffile.imread(isbi_manual / "train-labels.tif")
    labels[3, 20, 20] = 7
    tifffile.imwrite(isbi_manual / "train-labels.tif", labels)
    with pytest.raises(DataError, match=r"train-labels.tif slice 3: labels must be 0 .*255"):
        examples("isbi2012", isbi_manual)


def test_isbi2012_missing_labels_file_is_named(isbi_manual):
    (isbi_manual / "train-labels.tif").unlink()
    with pytest.raises(DataError, match=r"train-labels.tif: not found"):
        examples("isbi2012", isbi_manual)


@needs_real
def test_isbi2012_real_files():
    train = examples("isbi2012", REAL / "isbi2012")
    labels = tifffile.imread(REAL / "isbi2012" / "train-labels.tif")
    assert len(train) == 20
    for z, example in enumerate(train):
        assert example["image"].shape == (512, 512, 1) and example["image"].dtype == np.uint8
        assert len(np.unique(example["labels"])) - 1 == four_connected_cells(labels[z] == 255)
    assert min(int(e["labels"].max()) for e in train) > 50


# --- dsb2018 -------------------------------------------------------------------------------


def write_dsb_sample(stage, sample_id, rgba, nuclei):
    (stage / sample_id / "images").mkdir(parents=True)
    (stage / sample_id / "masks").mkdir()
    iio.imwrite(stage / sample_id / "images" / f"{sample_id}.png", rgba)
    for k, (rows, cols) in enumerate(nuclei):
        mask = np.zeros(rgba.shape[:2], np.uint8)
        mask[rows, cols] = 255
        iio.imwrite(stage / sample_id / "masks" / f"n{k:02d}.png", mask)


@pytest.fixture
def dsb_manual(tmp_path):
    rng = np.random.default_rng(1)
    stage = tmp_path / "stage1_train"
    gray = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    fluorescence = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    tissue = rng.integers(0, 256, (24, 36, 4), dtype=np.uint8)
    write_dsb_sample(stage, "aaa", fluorescence, [(slice(2, 6), slice(2, 6)), (slice(6, 9), slice(6, 9)),
                                                  (slice(20, 25), slice(30, 38))])
    write_dsb_sample(stage, "bbb", tissue, [(slice(0, 4), slice(0, 4)), (slice(10, 20), slice(10, 20))])
    return tmp_path


def test_dsb2018_drops_alpha_and_keeps_one_channel_when_gray(dsb_manual):
    found = {e["id"].decode(): e for e in examples("dsb2018", dsb_manual)}
    assert sorted(found) == ["aaa", "bbb"]
    gray = iio.imread(dsb_manual / "stage1_train/aaa/images/aaa.png")
    tissue = iio.imread(dsb_manual / "stage1_train/bbb/images/bbb.png")
    np.testing.assert_array_equal(found["aaa"]["image"], gray[..., :1])
    np.testing.assert_array_equal(found["bbb"]["image"], tissue[..., :3])
    assert found["aaa"]["image"].dtype == np.uint8


def test_dsb2018_merges_one_mask_per_nucleus(dsb_manual):
    found = {e["id"].decode(): e for e in examples("dsb2018", dsb_manual)}
    labels = found["aaa"]["labels"]
    assert labels.dtype == np.uint16 and labels.shape == (30, 40)
    # the first two squares touch along an edge: one binary mask each keeps them apart
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    assert (labels == 1).sum() == 16 and (labels == 2).sum() == 9 and (labels == 3).sum() == 5 * 8
    assert len(np.unique(found["bbb"]["labels"])) - 1 == 2


def test_dsb2018_overlapping_masks_are_an_error(dsb_manual):
    mask = np.zeros((24, 36), np.uint8)
    mask[2:6, 2:6] = 255  # overlaps n00 of bbb
    iio.imwrite(dsb_manual / "stage1_train/bbb/masks/n99.png", mask)
    with pytest.raises(DataError, match=r"n99.png: overlaps the nucleus of n00.png"):
        examples("dsb2018", dsb_manual)


def test_dsb2018_without_stage1_train_says_what_is_expected(tmp_path):
    (tmp_path / "stage1_test").mkdir()
    with pytest.raises(DataError, match=r"no stage1_train/ folder; expected .*images/<id>.png"):
        examples("dsb2018", tmp_path)


@needs_real
def test_dsb2018_real_samples():
    found = examples("dsb2018", REAL / "dsb2018")
    assert sorted(len(np.unique(e["labels"])) - 1 for e in found) == [27, 32, 100]
    assert sorted(e["image"].shape[-1] for e in found) == [1, 1, 3]
    for example in found:
        masks = sorted((REAL / "dsb2018" / "stage1_train" / example["id"].decode() / "masks").glob("*.png"))
        reference = np.zeros(example["labels"].shape, np.int64)
        for k, path in enumerate(masks, start=1):
            reference[iio.imread(path) > 0] = k
        np.testing.assert_array_equal(example["labels"], reference)


# --- ctc2d ---------------------------------------------------------------------------------


@pytest.fixture
def ctc_manual(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "PhC-C2DH-U373"
    for seq, annotated in (("01", (1, 3)), ("02", (0,))):
        (root / seq).mkdir(parents=True)
        (root / f"{seq}_GT" / "SEG").mkdir(parents=True)
        for t in range(5):
            tifffile.imwrite(root / seq / f"t{t:03d}.tif", rng.integers(0, 256, (40, 36), dtype=np.uint8))
        for t in annotated:
            labels = np.zeros((40, 36), np.uint16)
            labels[5:15, 5:15], labels[20:30, 5:15], labels[20:30, 15:25] = 7, 300 + t, 2
            tifffile.imwrite(root / f"{seq}_GT" / "SEG" / f"man_seg{t:03d}.tif", labels)
    (root / "03").mkdir()  # a sequence without segmentation truth adds nothing
    tifffile.imwrite(root / "03" / "t000.tif", np.zeros((40, 36), np.uint8))
    return tmp_path


def test_ctc2d_gives_only_the_annotated_frames(ctc_manual):
    found = examples("ctc2d/PhC-C2DH-U373", ctc_manual)
    root = ctc_manual / "PhC-C2DH-U373"
    assert [e["id"].decode() for e in found] == ["01_t001", "01_t003", "02_t000"]
    for example in found:
        seq, t = example["id"].decode().split("_t")
        np.testing.assert_array_equal(example["image"][..., 0], tifffile.imread(root / seq / f"t{t}.tif"))
        np.testing.assert_array_equal(example["labels"], tifffile.imread(root / f"{seq}_GT/SEG/man_seg{t}.tif"))
        assert example["labels"].dtype == np.uint16 and example["image"].shape[-1] == 1
        assert len(np.unique(example["labels"])) - 1 == 3


def test_ctc2d_missing_config_folder_is_an_error_not_an_empty_split(ctc_manual):
    with pytest.raises(DataError, match=r"no DIC-C2DH-HeLa/ folder; expected .*DIC-C2DH-HeLa/01/t000.tif"):
        examples("ctc2d/DIC-C2DH-HeLa", ctc_manual)


def test_ctc2d_segmentation_without_its_frame_is_named(ctc_manual):
    (ctc_manual / "PhC-C2DH-U373" / "01" / "t003.tif").unlink()
    with pytest.raises(DataError, match=r"man_seg003.tif: annotates frame 3, but .*01 has no t003.tif"):
        examples("ctc2d/PhC-C2DH-U373", ctc_manual)


def test_ctc2d_frame_of_another_pixel_type_is_named(ctc_manual):
    path = ctc_manual / "PhC-C2DH-U373" / "02" / "t000.tif"
    tifffile.imwrite(path, np.zeros((40, 36), np.uint16))
    with pytest.raises(DataError, match=r"t000.tif: pixel type uint16, but this data set's images are uint8"):
        examples("ctc2d/PhC-C2DH-U373", ctc_manual)


# --- registration, specs, the prepared-data cache -------------------------------------------


def test_importing_the_builders_again_does_not_fail():
    for module in (unetcell.datasets.isbi2012, unetcell.datasets.dsb2018, unetcell.datasets.ctc2d):
        importlib.reload(module)
    assert tfds.builder_cls("ctc2d") is not None
    assert "PhC-C2DH-U373" in [c.name for c in tfds.builder_cls("ctc2d").BUILDER_CONFIGS]


@pytest.mark.parametrize("spec, message", [
    ("tfds:mnist", "no data set 'mnist'"),
    ("tfds:ctc2d", "needs one of the configs PhC-C2DH-U373, DIC-C2DH-HeLa"),
    ("tfds:ctc2d/Fluo-X", "needs one of the configs"),
    ("tfds:isbi2012/x", "has no configs"),
    ("tfds:", "expected tfds:NAME"),
])
def test_bad_specs_say_what_is_expected(spec, message):
    with pytest.raises(DataError, match=message):
        source.parse_spec(spec)


def test_spec_split_defaults_to_train_and_takes_slices():
    assert source.parse_spec("tfds:ctc2d/DIC-C2DH-HeLa").split == "train"
    spec = source.parse_spec("tfds:isbi2012:train[15:]")
    assert (spec.name, spec.config, spec.split) == ("isbi2012", None, "train[15:]")


def test_missing_or_empty_manual_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="needs --manual-dir"):
        find_pairs("tfds:isbi2012", None)
    with pytest.raises(DataError, match="no such folder"):
        find_pairs("tfds:isbi2012", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-volume.tif"):
        find_pairs("tfds:isbi2012", tmp_path / "empty")


def test_a_changed_manual_folder_is_prepared_again(isbi_manual):
    assert len(find_pairs("tfds:isbi2012", isbi_manual)) == 6
    tifffile.imwrite(isbi_manual / "train-volume.tif", np.zeros((8, 48, 40), np.uint8))
    tifffile.imwrite(isbi_manual / "train-labels.tif", np.stack([isbi_slice(z % 6) for z in range(8)]))
    assert len(find_pairs("tfds:isbi2012", isbi_manual)) == 8


def test_split_slices_follow_the_data_sets_order(isbi_manual):
    assert [p.stem for p in find_pairs("tfds:isbi2012:train[4:]", isbi_manual)] == ["slice_04", "slice_05"]


# --- the folder pipeline: convert, training examples, evaluation -----------------------------


def test_convert_writes_the_folder_format_and_refuses_to_overwrite(ctc_manual, tmp_path):
    out = tmp_path / "converted"
    source.convert("tfds:ctc2d/PhC-C2DH-U373", ctc_manual, out)
    pairs = discover_pairs(out)
    assert [p.stem for p in pairs] == ["01_t001", "01_t003", "02_t000"]
    root = ctc_manual / "PhC-C2DH-U373"
    np.testing.assert_array_equal(pairs[0].load_image()[..., 0], tifffile.imread(root / "01" / "t001.tif"))
    np.testing.assert_array_equal(pairs[0].load_mask(), tifffile.imread(root / "01_GT/SEG/man_seg001.tif"))
    assert tifffile.imread(out / "masks" / "01_t001.tif").dtype == np.uint16
    with pytest.raises(OutputExistsError):
        source.convert("tfds:ctc2d/PhC-C2DH-U373", ctc_manual, out)


def test_convert_keeps_colour_channels(dsb_manual, tmp_path):
    source.convert("tfds:dsb2018", dsb_manual, tmp_path / "out")
    shapes = {p.stem: p.load_image().shape for p in discover_pairs(tmp_path / "out")}
    assert shapes == {"aaa": (30, 40, 1), "bbb": (24, 36, 3)}


def test_tfds_examples_equal_those_of_the_converted_folder(isbi_manual, tmp_path):
    """Same normalisation and targets whether a data set is read through TFDS or as files."""
    config = Config()
    source.convert("tfds:isbi2012", isbi_manual, tmp_path / "folder")
    from_tfds, report_tfds = load_examples(find_pairs("tfds:isbi2012", isbi_manual), config)
    from_folder, report_folder = load_examples(discover_pairs(tmp_path / "folder"), config)
    assert report_tfds.cells == report_folder.cells == sum(z + 4 for z in range(6))
    for a, b in zip(from_tfds, from_folder):
        assert a.name == b.name
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_evaluate_reads_tfds_data(isbi_manual, tmp_path):
    from unetcell.evaluate import evaluate_folder

    source.convert("tfds:isbi2012:train[2:4]", isbi_manual, tmp_path / "truth")
    result = evaluate_folder("tfds:isbi2012:train[2:4]", predictions=tmp_path / "truth" / "masks",
                             manual_dir=isbi_manual)
    assert [m["stem"] for m in result["images"]] == ["slice_02", "slice_03"]
    assert result["pixel_accuracy"] == 1.0 and result["f1_50"] == 1.0
    assert result["true_cells"] == (2 + 4) + (3 + 4)


def test_a_folder_takes_no_manual_dir(synth_folder, tmp_path):
    with pytest.raises(DataError, match="--manual-dir is for tfds"):
        find_pairs(synth_folder, tmp_path)


@pytest.mark.slow
def test_training_starts_from_tfds_input(ctc_manual, tmp_path):
    from click.testing import CliRunner

    from unetcell.cli import main

    result = CliRunner().invoke(main, [
        "train", "tfds:ctc2d/PhC-C2DH-U373", "--manual-dir", str(ctc_manual), "--out", str(tmp_path / "run"),
        "--filters", "4", "--depth", "2", "--epochs", "1", "--steps-per-epoch", "2", "--tile", "44",
        "--no-augment",
    ])
    assert result.exit_code == 0, result.output
    assert "3 image(s) from tfds:ctc2d/PhC-C2DH-U373" in result.output
    assert "instance masks, 9 cells" in result.output
    assert (tmp_path / "run" / "model.keras").exists()
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 2
