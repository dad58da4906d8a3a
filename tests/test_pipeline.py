"""The reader and writer threads beside the network (unetcell.pipeline), and what predict
writes through them: bit for bit the sequential result, errors raised in the main thread naming
the file, no partial output, and probabilities stored as float16 or uint8 on request."""

import threading
import time

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from scipy import ndimage

import unetcell.slides as slides_module
from unetcell.cli import main
from unetcell.config import Config
from unetcell.errors import ConfigError, DataError, UnetcellError
from unetcell.model import build_unet, save_model
from unetcell.normalize import apply_normalization, percentiles
from unetcell.pipeline import Behind, in_flight, prefetch
from unetcell.predict import encode_probabilities, load_predictor
from unetcell.slides import open_slide
from unetcell.tiling import Geometry, predict_tiled_bands, tile_plan


def _threads():
    return {t.name for t in threading.enumerate() if t.name.startswith("unetcell-")}


def _smooth_image(shape, seed=0):
    image = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 3)
    return (image / image.max() * 60000).astype(np.uint16)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    config = Config().override("model", filters=4, depth=2, channels=1)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    save_model(build_unet(config.model), path, config)
    return path


@pytest.fixture(scope="module")
def predictor(model_file):
    predictor = load_predictor(model_file)
    predictor.tile = 60  # several rows and columns of tiles on small images
    return predictor


# --- the threads ------------------------------------------------------------------------------


def test_prefetch_keeps_the_order_and_at_most_one_item_ahead():
    made, used = [], []

    def items():
        for i in range(20):
            made.append(i)
            yield i

    for item in prefetch(items(), ahead=1):
        time.sleep(0.002)  # let the producer run as far as it may
        assert len(made) - len(used) <= 2  # the item in use and the one made beside it
        used.append(item)
    assert used == list(range(20))
    assert not _threads()


def test_prefetch_raises_the_producers_error_at_its_item_and_stops_when_closed():
    def items():
        yield 1
        yield 2
        raise DataError("slide.tif: cannot read rows 64..128")

    got = []
    with pytest.raises(DataError, match="slide.tif: cannot read rows"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]

    closed = threading.Event()

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.set()

    stream = prefetch(endless())
    next(stream)
    stream.close()
    assert closed.is_set() and not _threads()


def test_behind_returns_the_consumers_result_and_raises_its_error_in_the_caller():
    with Behind(lambda items: sum(items)) as writer:
        for i in range(10):
            writer.send(i)
    assert writer.result == 45

    def failing(items):
        for i in items:
            if i == 3:
                raise UnetcellError("out.tif: cannot be written (OSError: disk on fire)")

    with pytest.raises(UnetcellError, match="out.tif: cannot be written"):
        with Behind(failing) as writer:
            for i in range(100):
                writer.send(i)
    assert not _threads()


def test_behind_stops_its_consumer_when_the_caller_fails():
    seen, cleaned = [], threading.Event()

    def consume(items):
        try:
            for i in items:
                seen.append(i)
        finally:
            cleaned.set()

    with pytest.raises(KeyError):
        with Behind(consume) as writer:
            writer.send(1)
            raise KeyError("the network failed")
    assert cleaned.is_set() and seen == [1] and not _threads()


def test_in_flight_keeps_the_order_with_at_most_width_calls_running():
    running, most = [0], [0]
    lock = threading.Lock()

    def call(k):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02 * (k % 3))  # later calls often finish first
        with lock:
            running[0] -= 1
        return k * k

    assert list(in_flight(call, range(12), width=3)) == [k * k for k in range(12)]
    assert most[0] == 3
    assert list(in_flight(call, range(5), width=1)) == [0, 1, 4, 9, 16]
    assert list(in_flight(call, [], width=2)) == []


def test_in_flight_raises_the_calls_error_at_its_item_and_stops_when_closed():
    started = []

    def call(k):
        started.append(k)
        if k == 4:
            raise ValueError("bad batch 4")
        return k

    results = in_flight(call, range(100), width=2)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="bad batch 4"):
        next(results)
    assert max(started) <= 6  # no call runs far ahead of the caller
    assert not _threads()

    early = in_flight(lambda k: k, range(100), width=2)
    assert next(early) == 0
    early.close()
    assert not _threads()


# --- predict through them ---------------------------------------------------------------------


def test_the_threaded_pass_equals_the_sequential_one_bit_for_bit(predictor, tmp_path):
    image = _smooth_image((301, 187), seed=4)
    tifffile.imwrite(tmp_path / "x.tif", image)
    predictor.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / "p.tif")
    threaded = tifffile.imread(tmp_path / "p.tif")

    with open_slide(tmp_path / "x.tif") as slide:
        low, high = percentiles(slide, predictor.config.normalize)
        plan = predictor.plan(*slide.shape[:2])
        assert plan.rows.count >= 4 and plan.cols.count >= 3
        sequential = np.concatenate([band for _, band in predict_tiled_bands(
            lambda a, b: apply_normalization(slide.rows(a, b), low, high), plan,
            predictor.predict_fn, predictor.batch_size, ahead=0, parallel=1)])
    assert threaded.dtype == np.float32 and threaded.std() > 1e-3
    np.testing.assert_array_equal(threaded, sequential)


def test_more_tiles_ahead_or_in_flight_change_nothing():
    image = np.random.default_rng(0).random((203, 157, 1)).astype(np.float32)
    geometry = Geometry(depth=2)
    plan = tile_plan(203, 157, 60, geometry)

    def fake_net(batch):  # any deterministic function of the whole tile, cropped by the margin
        m = geometry.margin
        return np.cumsum(batch[..., 0], axis=1)[:, m:-m, m:-m] * batch[:, m:-m, m:-m, 0]

    runs = [np.concatenate([b for _, b in predict_tiled_bands(lambda a, b: image[a:b], plan, fake_net, 3,
                                                              ahead=ahead, parallel=parallel)])
            for ahead, parallel in ((0, 1), (1, 1), (3, 1), (0, 2), (1, 2), (1, 3))]
    for run in runs[1:]:
        np.testing.assert_array_equal(runs[0], run)


def test_a_reader_error_names_the_slide_and_leaves_no_output(predictor, tmp_path):
    image = _smooth_image((300, 80), seed=5).astype(np.float32)
    image[250, 7] = np.nan  # found by the reader thread, several bands in
    tifffile.imwrite(tmp_path / "nan.tif", image)
    with pytest.raises(DataError, match=r"nan.tif: has 1 NaN .* row 250"):
        predictor.predict_slide(tmp_path / "nan.tif", probabilities=tmp_path / "p.tif")
    assert [p.name for p in tmp_path.iterdir()] == ["nan.tif"]
    assert not _threads()


def test_a_writer_error_names_the_output_and_leaves_nothing(predictor, tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "x.tif", _smooth_image((300, 80), seed=6))
    tiles = slides_module._tiff_tiles

    def failing(bands, shape, dtype, tile):
        for n, block in enumerate(tiles(bands, shape, dtype, tile)):
            if n == 1:
                raise OSError(5, "Input/output error")
            yield block

    monkeypatch.setattr(slides_module, "_tiff_tiles", failing)
    with pytest.raises(UnetcellError, match=r"p.tif: cannot be written \(OSError: .*Input/output error"):
        predictor.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / "p.tif")
    assert [p.name for p in tmp_path.iterdir()] == ["x.tif"]
    assert not _threads()


def test_probabilities_as_float16_and_uint8_round_trip(predictor, tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", _smooth_image((150, 120), seed=7))
    predictor.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / "f32.tif")
    exact = tifffile.imread(tmp_path / "f32.tif")
    for dtype, step in (("float16", 2.0**-12), ("uint8", 1 / 510)):
        predictor.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / f"{dtype}.tif", dtype=dtype)
        stored = tifffile.imread(tmp_path / f"{dtype}.tif")
        assert stored.dtype == np.dtype(dtype) and stored.shape == exact.shape
        np.testing.assert_array_equal(stored, encode_probabilities(exact, dtype))
        back = stored / 255.0 if dtype == "uint8" else stored.astype(np.float64)
        assert np.abs(back - exact).max() <= step + 1e-7
    assert np.array_equal(tifffile.imread(tmp_path / "uint8.tif"), np.round(exact * 255).astype(np.uint8))
    with pytest.raises(ConfigError, match="dtype must be one of"):
        predictor.predict_slide(tmp_path / "x.tif", probabilities=tmp_path / "bad.tif", dtype="int16")


def test_dtype_from_the_command_line(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", _smooth_image((90, 70), seed=8))
    r = CliRunner().invoke(main, ["predict", str(model_file), str(tmp_path / "x.tif"), "-o",
                                  str(tmp_path / "u.tif"), "--dtype", "uint8"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["predict", str(model_file), str(tmp_path / "x.tif"), "-o",
                                  str(tmp_path / "f.tif")])
    assert r.exit_code == 0, r.output
    exact = tifffile.imread(tmp_path / "f.tif")
    assert exact.dtype == np.float32
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "u.tif"), np.rint(exact * 255).astype(np.uint8))
