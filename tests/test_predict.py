"""unetcell predict: streamed overlap-tile prediction of files, against in-memory and
whole-image references; output naming, refusals and atomic writes."""

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage

import unetcell.predict as predict_module
from unetcell.cli import main
from unetcell.config import Config
from unetcell.errors import ConfigError, DataError, OutputExistsError
from unetcell.model import build_unet, save_model
from unetcell.normalize import normalize
from unetcell.postprocess import instances
from unetcell.predict import (
    Predictor,
    check_label_memory,
    choose_tile,
    load_predictor,
    output_paths,
    predict_files,
)
from unetcell.tiling import Geometry, whole_image_predict


def _config(channels=1, **predict):
    return Config().override("model", filters=4, depth=2, channels=channels).override("predict", **predict)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    config = _config()
    path = tmp_path_factory.mktemp("model") / "model.keras"
    save_model(build_unet(config.model), path, config)
    return path


@pytest.fixture(scope="module")
def predictor(model_file):
    return load_predictor(model_file)


def _smooth_image(shape, seed=0, scale=60000, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), 3)
    return (image / image.max() * scale).astype(dtype)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_tile_edge_is_rounded_to_a_valid_size_and_the_user_told():
    geometry = Geometry(depth=2)
    assert choose_tile(100, geometry) == (100, None)  # 44 + 4k is valid at depth 2
    tile, note = choose_tile(99, geometry)
    assert tile == 100 and "nearest valid size, 100" in note
    tile, note = choose_tile(10, geometry)
    assert tile == geometry.valid_tile(4 + 2 * geometry.context, "up") and "smallest" in note
    tile, note = choose_tile(0, Geometry(depth=4))
    assert (tile, note) == (700, None)  # 512 output pixels kept at the paper's depth


def test_streamed_file_equals_in_memory_and_whole_image_prediction(predictor, tmp_path):
    image = _smooth_image((133, 97))
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(32, 32))  # read through zarr
    result = predictor.predict_slide(tmp_path / "slide.tif", probabilities=tmp_path / "p.tif")
    streamed = tifffile.imread(tmp_path / "p.tif")
    assert streamed.shape == (133, 97) and streamed.dtype == np.float32
    assert tifffile.TiffFile(tmp_path / "p.tif").pages[0].is_tiled
    assert result.written == [tmp_path / "p.tif"]

    in_memory = predictor.probabilities(image)
    np.testing.assert_array_equal(streamed, in_memory)
    normalised = normalize(image[..., None], predictor.config.normalize)
    whole = whole_image_predict(normalised, predictor.predict_fn, predictor.geometry)
    assert np.abs(in_memory - whole).max() <= 1e-5
    assert in_memory.std() > 1e-3  # a network whose output varies, or the test proves nothing


def test_cli_result_does_not_depend_on_the_tile_size(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "odd.tif", _smooth_image((157, 211), seed=1))
    small = _run("predict", model_file, tmp_path / "odd.tif", "-o", tmp_path / "a.tif", "--tile", 47)
    assert small.exit_code == 0, small.output
    assert "nearest valid size, 48" in small.output
    large = _run("predict", model_file, tmp_path / "odd.tif", "-o", tmp_path / "b.tif", "--tile", 400,
                 "--batch-size", 3)
    assert large.exit_code == 0, large.output
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert a.shape == b.shape == (157, 211)
    assert np.abs(a - b).max() <= 1e-5


def _bright_squares(shape=(120, 90), seed=2):
    """A noisy dark image with six bright 12 x 12 squares, apart, and their instance labels."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.int32)
    for k, (top, left) in enumerate([(5, 5), (5, 40), (40, 20), (45, 60), (80, 8), (95, 70)], start=1):
        truth[top:top + 12, left:left + 12] = k
    image = (rng.normal(50, 5, shape) + 150 * (truth > 0)).clip(0, 255).astype(np.uint8)
    return image, truth


def test_labels_and_probabilities_of_a_network_with_a_known_answer(tmp_path):
    """A stand-in network whose probability is a known function of the intensity: the files
    hold that function of the normalised image, and the labels are the six bright squares."""
    from conftest import bright_cells_probability, save_bright_cells_unet

    predictor = load_predictor(save_bright_cells_unet(tmp_path / "stub.keras"),
                               Config().override("predict", tile=20))
    image, truth = _bright_squares()
    tifffile.imwrite(tmp_path / "x.tif", image)
    result = predictor.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / "p.tif",
                                     labels=tmp_path / "l.tif", overlay=tmp_path / "o.png")
    assert result.tiles > 1  # several tiles: the seams are crossed
    probabilities = tifffile.imread(tmp_path / "p.tif")
    expected = bright_cells_probability(normalize(image[..., None], predictor.config.normalize)[..., 0])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    labels = tifffile.imread(tmp_path / "l.tif")
    assert labels.dtype == np.int32 and labels.shape == (120, 90)
    assert result.cells == 6
    np.testing.assert_array_equal(labels > 0, truth > 0)
    pairs = {(int(t), int(p)) for t, p in zip(truth[truth > 0], labels[truth > 0])}
    assert len(pairs) == 6 and len({p for _, p in pairs}) == 6  # one label per square
    np.testing.assert_array_equal(labels, predictor.labels(image))  # in memory as from the file
    assert iio.imread(tmp_path / "o.png").shape == (120, 90, 3)


def test_overlay_of_a_large_slide_is_downsampled(predictor, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "OVERLAY_EDGE", 40)
    tifffile.imwrite(tmp_path / "x.tif", _smooth_image((150, 101), seed=3))
    predictor.predict_slide(tmp_path / "x.tif", overlay=tmp_path / "o.png")
    assert iio.imread(tmp_path / "o.png").shape == (38, 26, 3)  # stride 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "x.tif"]


def test_output_paths_for_one_file_and_for_folders(tmp_path):
    one = output_paths(["s/a.tif"], tmp_path / "r.tif", "both", overlay=True)[0]
    assert (one.probabilities, one.labels, one.overlay) == (
        tmp_path / "r.tif", tmp_path / "r_labels.tif", tmp_path / "r_overlay.png")
    assert output_paths(["s/a.tif"], tmp_path / "r.tif", "labels", False)[0].labels == tmp_path / "r.tif"
    many = output_paths(["s/a.tif", "t/b.png"], tmp_path / "out", "labels", overlay=True)
    assert [m.labels for m in many] == [tmp_path / "out" / "a.tif", tmp_path / "out" / "b.tif"]
    assert many[1].overlay == tmp_path / "out" / "overlays" / "b.png"
    both = output_paths(["s/a.tif", "t/b.png"], tmp_path / "out", "both", overlay=False)
    assert both[0].probabilities == tmp_path / "out" / "probabilities" / "a.tif"
    assert both[0].labels == tmp_path / "out" / "labels" / "a.tif"
    with pytest.raises(ConfigError, match="same stem"):
        output_paths(["s/a.tif", "t/a.png"], tmp_path / "out", "labels", False)
    with pytest.raises(ConfigError, match="need an output folder"):
        output_paths(["s/a.tif", "t/b.png"], tmp_path / "r.tif", "labels", False)


def test_several_images_into_a_folder_from_the_command_line(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _smooth_image((64, 80), seed=4))
    iio.imwrite(tmp_path / "b.png", _smooth_image((50, 40), seed=5, scale=255, dtype=np.uint8))
    r = _run("predict", model_file, tmp_path / "a.tif", tmp_path / "b.png", "-o", tmp_path / "out",
             "--output", "both")
    assert r.exit_code == 0, r.output
    assert tifffile.imread(tmp_path / "out" / "labels" / "b.tif").shape == (50, 40)
    assert tifffile.imread(tmp_path / "out" / "probabilities" / "a.tif").shape == (64, 80)


def test_existing_outputs_are_refused_before_any_work(model_file, tmp_path):
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", _smooth_image((40, 40), seed=6))
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.tif").write_bytes(b"mine")
    r = _run("predict", model_file, tmp_path / "a.tif", tmp_path / "b.tif", "-o", out)
    assert r.exit_code == 1 and "--overwrite" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["b.tif"]  # a.tif was not written either
    assert (out / "b.tif").read_bytes() == b"mine"
    r = _run("predict", model_file, tmp_path / "a.tif", tmp_path / "b.tif", "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert tifffile.imread(out / "b.tif").shape == (40, 40)


def test_bad_inputs_name_the_file_and_leave_nothing(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", _smooth_image((40, 40, 3), seed=7))
    r = _run("predict", model_file, tmp_path / "rgb.tif", "-o", tmp_path / "o.tif")
    assert r.exit_code == 1 and "rgb.tif" in r.output and "3 channel" in r.output
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    r = _run("predict", model_file, tmp_path / "broken.tif", "-o", tmp_path / "o.tif")
    assert r.exit_code == 1 and "broken.tif" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.tif", "rgb.tif"]


def test_a_failure_midway_leaves_no_partial_file(predictor, tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "x.tif", _smooth_image((200, 60), seed=8))
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("out of memory, say")
        margin = predictor.geometry.margin
        return np.zeros((batch.shape[0], batch.shape[1] - 2 * margin, batch.shape[2] - 2 * margin),
                        np.float32)

    monkeypatch.setattr(predictor, "predict_fn", failing)
    monkeypatch.setattr(predictor, "tile", 44)  # many small tiles, so the failure is midway
    with pytest.raises(RuntimeError):
        predictor.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / "p.tif")
    assert 2 <= len(calls) <= 3  # stopped at the failure; the next batch may already be in flight
    assert [p.name for p in tmp_path.iterdir()] == ["x.tif"]


def test_labels_of_a_slide_too_large_for_memory_are_refused_up_front(monkeypatch):
    monkeypatch.setattr(predict_module, "physical_memory", lambda: 8 * 2**30)
    check_label_memory((4096, 4096))  # 2 GiB with the watershed: fine
    with pytest.raises(DataError, match="--output probabilities"):
        check_label_memory((32768, 32768), "big.tif")


def test_multichannel_model_and_saved_settings(tmp_path):
    config = _config(channels=2, threshold=0.6, min_size=3, tile=60)
    save_model(build_unet(config.model), tmp_path / "m.keras", config)
    predictor = load_predictor(tmp_path / "m.keras")
    assert isinstance(predictor, Predictor)
    assert (predictor.tile, predictor.config.predict.threshold) == (60, 0.6)
    image = np.stack([_smooth_image((70, 75), seed=9), _smooth_image((70, 75), seed=10)], axis=-1)
    probabilities = predictor.probabilities(image)
    normalised = normalize(image, predictor.config.normalize)
    whole = whole_image_predict(normalised, predictor.predict_fn, predictor.geometry)
    assert np.abs(probabilities - whole).max() <= 1e-5
    with pytest.raises(ConfigError, match="at least one image"):
        predict_files(tmp_path / "m.keras", [], tmp_path / "x", progress=False)
    with pytest.raises(OutputExistsError):
        predictor.predict_slide(image, probabilities=tmp_path / "m.keras")


def _dihedral(image, turns, flipped):
    image = np.rot90(image, turns, axes=(0, 1))
    return image[:, ::-1] if flipped else image


def test_tta_is_the_mean_of_eight_exact_whole_image_passes(model_file):
    predictor = load_predictor(model_file, _config(tta=True))
    image = _smooth_image((61, 83), seed=4)  # not square: rotations change the tile plan
    tta = predictor.probabilities(image)
    normalised = normalize(image[..., None], predictor.config.normalize)
    passes = []
    for turns in range(4):
        for flipped in (False, True):
            view = np.ascontiguousarray(_dihedral(normalised, turns, flipped))
            out = whole_image_predict(view, predictor.predict_fn, predictor.geometry)
            if flipped:
                out = out[:, ::-1]
            passes.append(np.rot90(out, -turns))
    assert tta.shape == (61, 83) and tta.dtype == np.float32
    assert np.abs(tta - np.mean(passes, axis=0)).max() <= 1e-5
    plain = load_predictor(model_file).probabilities(image)
    assert np.abs(tta - plain).max() > 1e-4  # this network is not symmetric: TTA changes it


def test_tta_of_a_symmetric_network_equals_the_plain_pass(model_file, tmp_path):
    plain = load_predictor(model_file)
    tta = load_predictor(model_file, _config(tta=True))
    m = plain.geometry.margin

    def pointwise(tiles):  # commutes with every flip and rotation
        tiles = np.asarray(tiles)
        return (1 / (1 + np.exp(-tiles[:, m:tiles.shape[1] - m, m:tiles.shape[2] - m, 0]))).astype(np.float32)

    plain.predict_fn = tta.predict_fn = pointwise
    image = _smooth_image((70, 45), seed=5)
    np.testing.assert_allclose(tta.probabilities(image), plain.probabilities(image), atol=1e-6)
    tifffile.imwrite(tmp_path / "x.tif", image)
    tta.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / "p.tif", labels=tmp_path / "l.tif")
    np.testing.assert_allclose(tifffile.imread(tmp_path / "p.tif"), plain.probabilities(image), atol=1e-6)


def test_instance_method_and_tta_from_the_command_line(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", _smooth_image((90, 90), seed=6))
    labels = {}
    for name, extra in (("plain", []), ("components", ["--instances", "components"]), ("tta", ["--tta"])):
        result = _run("predict", model_file, tmp_path / "x.tif", "-o", tmp_path / f"{name}.tif",
                      "--output", "both", *extra)
        assert result.exit_code == 0, result.output
        labels[name] = tifffile.imread(tmp_path / f"{name}_labels.tif")
    probability = tifffile.imread(tmp_path / "plain.tif")
    p = Config().predict
    np.testing.assert_array_equal(labels["components"],
                                  instances(probability, p.threshold, p.min_size, "components"))
    np.testing.assert_array_equal(labels["plain"], instances(
        probability, p.threshold, p.min_size, "watershed", p.watershed_h, p.watershed_ratio))
    assert np.abs(tifffile.imread(tmp_path / "tta.tif") - probability).max() > 1e-4
    bad = _run("predict", model_file, tmp_path / "x.tif", "-o", tmp_path / "z.tif", "--instances", "magic")
    assert bad.exit_code != 0 and "magic" in bad.output


def test_predict_files_plans_and_checks_each_image_once(tmp_path, monkeypatch):
    """One tile plan, one channel check and one writability check per output, with a
    progress bar whose total is the plan's tile count."""
    from conftest import save_bright_cells_unet

    model = save_bright_cells_unet(tmp_path / "stub.keras")
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", _bright_squares(seed=len(name))[0])
    counts = {"plan": 0, "channels": 0, "writable": 0}

    def counting(name, function):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(predict_module, "tile_plan", counting("plan", predict_module.tile_plan))
    monkeypatch.setattr(predict_module, "check_writable", counting("writable", predict_module.check_writable))
    monkeypatch.setattr(predict_module.Predictor, "_check_channels",
                        counting("channels", predict_module.Predictor._check_channels))
    totals = []
    real_tqdm = __import__("unetcell.progress", fromlist=["tqdm"]).tqdm

    def recording_tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        totals.append(bar)
        return bar

    monkeypatch.setattr("unetcell.progress.tqdm", recording_tqdm)
    results = predict_module.predict_files(
        model, [tmp_path / "a.tif", tmp_path / "b.tif"], tmp_path / "out",
        Config().override("predict", tile=20), output="both", overlay=True, progress=True)
    assert counts == {"plan": 2, "channels": 2, "writable": 6}
    assert [r.cells for r in results] == [6, 6]
    tile_bars = [bar for bar in totals if bar.unit == "tile"]
    assert [bar.total for bar in tile_bars] == [r.tiles for r in results] == [bar.n for bar in tile_bars]
