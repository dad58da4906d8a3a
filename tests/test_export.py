"""The SavedModel serves raw images of any size with TensorFlow alone and equals `unetcell
predict`; its tile plan is predict's plan; its percentiles are numpy's."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tifffile
from click.testing import CliRunner

from unetcell.cli import main
from unetcell.config import Config, NormalizeConfig
from unetcell.export import CLASSES, FOREGROUND, INPUT, export_model, percentiles_tf
from unetcell.geometry import Geometry, axis_steps, smallest_tile, tile_plan
from unetcell.model import build_unet, save_model
from unetcell.normalize import percentiles
from unetcell.predict import load_predictor
from unetcell.train import train

# Loads a SavedModel in a fresh interpreter where Keras cannot be imported (and unetcell is not
# on the path: -I, a scratch folder as cwd), serves every array of an .npz, saves the outputs.
SERVE = """
import sys
sys.modules["keras"] = sys.modules["tf_keras"] = None
import numpy as np, tensorflow as tf
saved, source, target = sys.argv[1:4]
serve = tf.saved_model.load(saved).signatures["serving_default"]
out = {}
for name, batch in np.load(source).items():
    result = serve(images=tf.constant(batch))
    out[name] = result["foreground_probability"].numpy()
    out[name + "/classes"] = result["class_probabilities"].numpy()
assert "unetcell" not in sys.modules and "keras" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
np.savez(target, **out)
"""


def serve_alone(saved, batches: dict, tmp_path):
    np.savez(tmp_path / "in.npz", **{k: v.astype(np.float32) for k, v in batches.items()})
    run = subprocess.run(
        [sys.executable, "-I", "-c", SERVE, str(saved), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        cwd=tmp_path, capture_output=True, text=True, env={"TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(tmp_path / "out.npz") as out:
        return dict(out)


def tiny_model(path, channels=1, depth=2, **model):
    keras.utils.set_random_seed(2)
    config = Config().override("model", channels=channels, filters=4, depth=depth, dropout=0.0, **model)
    save_model(build_unet(config.model), path, config)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    model = tiny_model(folder / "model.keras")
    return model, export_model(model, folder / "serving" / "cells" / "1")


def raw(shape, channels=1, seed=0):
    """8-bit intensities as float32, the way a client sends a TIFF's pixels."""
    return np.random.default_rng(seed).integers(0, 256, shape + (channels,)).astype(np.float32)


# --- one geometry ----------------------------------------------------------------------------------


def test_geometry_module_imports_without_keras_tensorflow_or_numpy():
    code = ("import sys\nfor m in ('keras', 'tensorflow', 'numpy'): sys.modules[m] = None\n"
            "import unetcell.geometry as g\nprint(g.tile_plan(301, 457, 572, g.Geometry(4)).count)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2"  # a 572 tile keeps 384: one row of tiles, two columns


@pytest.mark.parametrize("depth, padding, upsampling", [
    (2, "valid", "transpose"), (3, "valid", "transpose"), (4, "valid", "transpose"),
    (2, "same", "transpose"), (2, "valid", "bilinear"),
])
def test_the_served_plan_is_predicts_plan_for_sizes_from_1_to_odd_shapes(depth, padding, upsampling):
    geometry = Geometry(depth, padding, upsampling)
    sizes = list(range(1, 80)) + [127, 128, 129, 301, 457, 1000, 2048, 8191]
    for tile in (smallest_tile(geometry), geometry.valid_tile(300), geometry.valid_tile(700)):
        for balance in (True, False):
            served = steps_in_graph(sizes, tile, geometry, balance)
            for size, (count, stride, window) in zip(sizes, served):
                axis = tile_plan(size, 1, tile, geometry, balance).rows
                assert (count, stride, window) == (axis.count, axis.stride, axis.tile), (size, tile)


def steps_in_graph(sizes, tile, geometry, balance):
    """axis_steps on sizes known only when the graph runs, as in the serving graph."""
    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def steps(sizes):
        return tf.map_fn(lambda n: tf.stack(axis_steps(n, tile, geometry, balance)), sizes)

    return steps(tf.constant(sizes)).numpy()


@pytest.mark.parametrize("lower, upper", [(1.0, 99.8), (0.0, 100.0), (50.0, 50.5), (3.3, 71.0)])
def test_percentiles_in_the_graph_are_numpys(lower, upper):
    config = NormalizeConfig(lower=lower, upper=upper, sample_pixels=5000)
    rng = np.random.default_rng(1)
    images = [
        rng.normal(size=(1, 1, 1)),
        rng.integers(0, 4, (7, 300, 2)),  # many ties
        rng.gamma(2.0, 300.0, (301, 457, 3)),  # larger than sample_pixels: a strided sample
        rng.random((64, 79, 1)) * 65535,
    ]
    for image in images:
        image = image.astype(np.float32)
        low, high = percentiles(image, config)
        got_low, got_high = (v.numpy() for v in percentiles_tf(tf.constant(image), config))
        np.testing.assert_array_equal(got_low, low)
        np.testing.assert_array_equal(got_high, high)


# --- the SavedModel ------------------------------------------------------------------------------


def test_savedmodel_serves_any_size_and_a_batch_with_tensorflow_alone_as_predict(exported, tmp_path):
    model, saved = exported
    predictor = load_predictor(model)
    images = {"odd": raw((301, 457), seed=1), "one": raw((1, 1), seed=2), "thin": raw((7, 300), seed=3),
              "large": raw((2048, 2048), seed=4)}
    expected = {name: predictor.probabilities(image) for name, image in images.items()}
    # The output is not trivially constant, so agreement means something.
    assert expected["odd"].std() > 0.01
    second = raw((301, 457), seed=5) * 40 + 1000  # another image with other gain and offset
    batches = {name: image[None] for name, image in images.items()}
    batches["two"] = np.stack([images["odd"], second])
    served = serve_alone(saved, batches, tmp_path)
    for name in images:
        assert served[name].shape == (1,) + images[name].shape[:2]
        assert np.abs(served[name][0] - expected[name]).max() <= 1e-4, name  # measured 0 to 1e-7
        classes = served[name + "/classes"]
        assert classes.shape == (1,) + images[name].shape[:2] + (2,)
        np.testing.assert_allclose(classes.sum(-1), 1.0, atol=1e-5)
    # Each image of a batch is normalised with its own percentiles.
    assert np.abs(served["two"][0] - expected["odd"]).max() <= 1e-4
    assert np.abs(served["two"][1] - predictor.probabilities(second)).max() <= 1e-4


def test_saved_model_cli_lists_unknown_height_and_width(exported):
    _, saved = exported
    run = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all", "--dir", str(saved)],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout
    serving = text[text.index("signature_def['serving_default']"):]
    signature = serving[:serving.index("Method name is:")]
    assert f"inputs['{INPUT}']" in signature and "shape: (-1, -1, -1, 1)" in signature
    assert f"outputs['{FOREGROUND}']" in signature and "shape: (-1, -1, -1)\n" in signature
    assert f"outputs['{CLASSES}']" in signature and "shape: (-1, -1, -1, 2)" in signature


def test_export_refuses_an_existing_folder_and_writes_atomically(exported, tmp_path, monkeypatch):
    model, _ = exported
    out = tmp_path / "cells" / "1"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep")
    result = CliRunner().invoke(main, ["export", str(model), str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "mine.txt").read_text() == "keep"

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tf.saved_model, "save", broken)
    with pytest.raises(RuntimeError):
        export_model(model, tmp_path / "cells" / "2")
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["1"]  # no half-written folder


def test_export_check_reports_the_difference_to_predict(exported, tmp_path):
    model, _ = exported
    out = tmp_path / "cells" / "1"
    out.mkdir(parents=True)
    result = CliRunner().invoke(main, ["export", str(model), str(out), "--overwrite", "--check",
                                       "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert (out / "saved_model.pb").exists() and not (out / "mine.txt").exists()
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("check:") and "max |difference|" in line
    assert float(line.split()[-1]) <= 1e-4


@pytest.mark.slow
def test_a_model_trained_on_three_channels_serves_three_channels(synth_folder, tmp_path):
    data = tmp_path / "rgb"
    for kind in ("images", "masks"):
        (data / kind).mkdir(parents=True)
    for image_path in sorted((synth_folder / "images").glob("*.tif")):
        gray = tifffile.imread(image_path)
        # Three channels that differ: the served normalisation must be per channel.
        tifffile.imwrite(data / "images" / image_path.name, np.stack([gray, gray // 2, 255 - gray], -1))
        mask = synth_folder / "masks" / image_path.name
        (data / "masks" / mask.name).write_bytes(mask.read_bytes())
    config = (Config().override("model", filters=4, depth=2)
              .override("train", tile=92, epochs=1, steps_per_epoch=2, val_fraction=0.0))
    train(data, tmp_path / "run", config, verbose=0)
    model = tmp_path / "run" / "model.keras"
    saved = export_model(model, tmp_path / "served" / "1")
    image = np.stack([raw((97, 131), seed=6)[..., 0], raw((97, 131), seed=7)[..., 0] * 3,
                      raw((97, 131), seed=8)[..., 0] + 500], -1)
    served = serve_alone(saved, {"rgb": image[None]}, tmp_path)
    expected = load_predictor(model).probabilities(image)
    assert np.abs(served["rgb"][0] - expected).max() <= 1e-4
