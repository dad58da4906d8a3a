"""A SavedModel that serves raw images of any size with TensorFlow alone.

    raw images [batch, H, W, C] -> per image: percentiles (the saved settings, in the graph)
    -> normalised -> mirrored overlap-tile pass on the 2**depth grid (`tiling.tiled_forward`,
    the plan of `geometry.tile_plan`) -> foreground probability [batch, H, W] and class
    probabilities [batch, H, W, classes]

Everything `unetcell predict` does up to the probabilities runs inside the graph, so a client
(TensorFlow Serving, or a program that imports only TensorFlow) sends raw intensities and gets
what `unetcell predict` writes, to float round-off. Neither Keras nor unetcell is needed to
load or call it: the network is traced into the graph with its weights as variables.

Instance labels need the whole foreground map and a connected-component pass; they are a client
step (threshold `foreground_probability` at the saved threshold, label connected components),
as documented in the README.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .config import Config, NormalizeConfig, config_to_toml
from .errors import UnetcellError
from .files import atomic_dir, check_writable

# The names a client sees: the input keyword of `serving_default` and its two outputs.
INPUT = "images"
FOREGROUND = "foreground_probability"
CLASSES = "class_probabilities"
SIGNATURE = "serving_default"

# The unetcell settings (threshold, min size for the client's labels; the normalisation baked
# into the graph) beside the SavedModel, where TensorFlow Serving ignores extra files.
CONFIG_FILE = Path("assets.extra") / "unetcell_config.toml"

# What `--check` allows between the served graph and `unetcell predict` (measured <= 1e-6).
CHECK_TOLERANCE = 1e-4


def percentiles_tf(image, config: NormalizeConfig):
    """`unetcell.normalize.percentiles` in TensorFlow ops: per-channel (low, high) of an
    (H, W, C) tensor, on the same strided subsample and with numpy's "linear" rule, so the
    served normalisation equals predict's.

    The two order statistics each percentile interpolates come from `tf.math.top_k`, from
    whichever end of the sorted sample is nearer (exact, and 10x faster than `tf.sort` on
    2048^2, DESIGN.md).
    """
    import tensorflow as tf

    shape = tf.shape(image, out_type=tf.int64)
    pixels = tf.cast(shape[0] * shape[1], tf.float64)
    # normalize.subsample_stride in float64, as numpy computes it.
    step = tf.cast(tf.math.ceil(tf.sqrt(pixels / max(config.sample_pixels, 1))), tf.int32)
    step = tf.maximum(step, 1)
    sample = tf.reshape(image[::step, ::step], [-1, tf.shape(image)[-1]])
    values = tf.transpose(sample)  # (C, n): top_k works along the last axis
    n = tf.shape(values)[1]

    def percentile(q):
        # numpy's linear method: virtual index (n - 1) * q between two order statistics.
        index = tf.cast(n - 1, tf.float64) * (q / 100.0)
        below = tf.math.floor(index)
        gamma = index - below
        lo = tf.cast(below, tf.int32)
        hi = tf.minimum(lo + 1, n - 1)
        if q <= 50.0:  # the (hi + 1) smallest, ascending
            smallest = -tf.math.top_k(-values, k=hi + 1, sorted=True).values
            a, b = smallest[:, lo], smallest[:, hi]
        else:  # the (n - lo) largest, descending
            largest = tf.math.top_k(values, k=n - lo, sorted=True).values
            a, b = largest[:, n - 1 - lo], largest[:, n - 1 - hi]
        # numpy's _lerp: the difference in the input's precision, the blend in float64, and
        # from the upper end when gamma >= 0.5.
        diff = tf.cast(b - a, tf.float64)
        a64, b64 = tf.cast(a, tf.float64), tf.cast(b, tf.float64)
        blend = tf.where(gamma >= 0.5, b64 - diff * (1.0 - gamma), a64 + diff * gamma)
        return tf.cast(blend, tf.float32)

    return percentile(config.lower), percentile(config.upper)


def normalize_tf(image, config: NormalizeConfig):
    """`unetcell.normalize.normalize` of one (H, W, C) image in TensorFlow ops."""
    import tensorflow as tf

    low, high = percentiles_tf(image, config)
    scale = tf.where(high > low, high - low, tf.ones_like(high))
    return (image - low) / scale


def serving_module(model, config: Config, tile: int | None = None, batch_size: int | None = None):
    """A `tf.Module` holding `model` and its `serving_default` function: raw float32 images
    [batch, height, width, channels] in, {FOREGROUND: [batch, H, W], CLASSES: [batch, H, W,
    classes]} out. `tile` and `batch_size` default to what `unetcell predict` uses."""
    import tensorflow as tf

    from .predict import choose_tile
    from .tiling import Geometry, foreground, needs_static_shapes, tiled_forward

    geometry = Geometry.of_model(model)
    tile = choose_tile(config.predict.tile if tile is None else tile, geometry)[0]
    batch_size = batch_size or config.predict.batch_size
    channels, classes = int(model.input_shape[-1]), int(model.output_shape[-1])

    def one_image(image):
        normalised = normalize_tf(image, config.normalize)
        return tiled_forward(model, normalised, tile, batch_size, output="classes",
                             balance_shift=config.predict.balance_shift)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name=INPUT)])
    def serve(images):
        probabilities = tf.map_fn(
            one_image, images, fn_output_signature=tf.TensorSpec([None, None, classes], tf.float32))
        return {FOREGROUND: foreground(probabilities), CLASSES: probabilities}

    module = tf.Module()
    if needs_static_shapes(geometry):
        # Saving a tracked Keras model also traces its own default signature with open height
        # and width, which bilinear UpSampling2D (DeepLabv3+) cannot run: track the weights alone.
        module.weights = list(model.weights)
    else:
        module.model = model  # tracked: its weights become the SavedModel's variables
    module.serve = serve
    return module


def export_model(
    model_path: str | os.PathLike, out: str | os.PathLike, config: Config | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the SavedModel of a model saved by `unetcell train` to `out` (TensorFlow Serving's
    convention: a numbered version folder such as serving/cells/1), atomically: it is built
    beside `out` and renamed into place. `config` replaces the settings saved with the model."""
    import tensorflow as tf

    from .model import load_model

    out = check_writable(out, overwrite)
    model, config = load_model(model_path, config=config)
    module = serving_module(model, config)
    with atomic_dir(out) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: module.serve})
        (tmp / CONFIG_FILE).parent.mkdir(exist_ok=True)
        (tmp / CONFIG_FILE).write_text(config_to_toml(config))
    return out


# Run in a fresh interpreter by `check_export`: TensorFlow alone, with Keras made unimportable.
_SERVE_SCRIPT = f"""
import sys
sys.modules["keras"] = sys.modules["tf_keras"] = None
import numpy as np, tensorflow as tf
saved, source, target = sys.argv[1:4]
serve = tf.saved_model.load(saved).signatures["{SIGNATURE}"]
out = serve({INPUT}=tf.constant(np.load(source)))["{FOREGROUND}"].numpy()
if "unetcell" in sys.modules:
    sys.exit("loading the SavedModel imported unetcell")
np.save(target, out)
"""


def serve_in_fresh_process(saved: str | os.PathLike, images: np.ndarray) -> np.ndarray:
    """The SavedModel's foreground probability for `images` [batch, H, W, C], computed by a new
    Python process that imports TensorFlow alone (Keras and unetcell cannot be imported)."""
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "images.npy", Path(tmp) / "served.npy"
        np.save(source, np.asarray(images, np.float32))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        run = subprocess.run(
            [sys.executable, "-I", "-c", _SERVE_SCRIPT, str(saved), str(source), str(target)],
            cwd=tmp, env=env, capture_output=True, text=True,
        )
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise UnetcellError(f"{saved}: the SavedModel did not serve in a fresh process: {last}")
        return np.load(target)


def check_export(
    model_path: str | os.PathLike, saved: str | os.PathLike, config: Config | None = None,
    shape: tuple[int, int] = (301, 457), seed: int = 0,
) -> float:
    """Max |served - predict| of the foreground probability of a random image of `shape`
    (raw 8-bit intensities), served by the SavedModel in a fresh process and predicted by
    `unetcell predict`'s `Predictor`."""
    from .predict import load_predictor

    predictor = load_predictor(model_path, config)
    rng = np.random.default_rng(seed)
    image = (rng.random(shape + (predictor.channels,)) * 255).round().astype(np.float32)
    expected = predictor.probabilities(image)
    expected = expected[..., 0] if expected.ndim == 3 else expected  # three-class: the foreground
    served = serve_in_fresh_process(saved, image[None])[0]
    return float(np.abs(served - expected).max())
