"""What serving the exported SavedModel costs against `unetcell predict` in process, and its memory.

    .venv/bin/python benchmarks/export.py                      # (a) and (b)
    nice -n 10 .venv/bin/python benchmarks/export.py --parts b --size 8192

(a) Latency: the SavedModel's `serving_default` (percentiles, normalisation, mirroring, the
    overlap-tile pass and stitching, all in the graph) against `Predictor.probabilities`, the
    in-process path of `unetcell predict` (numpy percentiles and stitching around the same
    network), on one raw 512^2 and one 2048^2 image. Both run in this process on the same
    image, alternating, best of --repeats after a warm-up call; the figure is served / predict
    (bar <= 1.1). The network is the paper's U-Net (depth 4) at 16 filters, the CPU size the
    README recommends.
(b) Peak RSS of a fresh process that imports TensorFlow alone (Keras unimportable), loads the
    SavedModel and serves one raw image of --size^2 (8192^2 by default), measured with wait4,
    beside the same process serving 512^2 (the runtime and the model). At 8192^2 the input
    (256 MiB float32) and the two outputs the signature returns (foreground 256 MiB, class
    probabilities 512 MiB) are part of any peak. 4 filters, so it ends in minutes on 2 cores:
    memory is set by the image and the tiles in flight, not by the weights.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import ndimage  # noqa: E402

from unetcell.config import Config  # noqa: E402
from unetcell.export import FOREGROUND, INPUT, export_model  # noqa: E402
from unetcell.model import build_unet, save_model  # noqa: E402
from unetcell.predict import load_predictor  # noqa: E402

# A fresh interpreter: TensorFlow alone, a smooth raw 16-bit-range image, one served call.
SERVE_ONE = f"""
import sys, time
sys.modules["keras"] = None
import numpy as np, tensorflow as tf
saved, size = sys.argv[1], int(sys.argv[2])
serve = tf.saved_model.load(saved).signatures["serving_default"]
rng = np.random.default_rng(0)
image = rng.random((1, size, size, 1), dtype=np.float32) * 60000
start = time.perf_counter()
out = serve({INPUT}=tf.constant(image))["{FOREGROUND}"]
print(f"{{time.perf_counter() - start:.1f}} {{out.shape}}")
"""


def export_unet(folder: Path, filters: int) -> tuple[Path, Path]:
    config = Config().override("model", filters=filters, depth=4, channels=1)
    model = folder / f"unet-f{filters}.keras"
    save_model(build_unet(config.model), model, config)
    return model, export_model(model, folder / f"served-f{filters}" / "1")


def raw_image(size: int, seed: int = 0) -> np.ndarray:
    """Smooth 16-bit-range intensities, as a microscope gives them (not normalised)."""
    noise = np.random.default_rng(seed).random((size, size))
    return (ndimage.gaussian_filter(noise, 3) * 65535).astype(np.float32)[..., None]


def latency(folder: Path, sizes: list[int], repeats: int) -> None:
    model, saved = export_unet(folder, 16)
    predictor = load_predictor(model)
    serve = tf.saved_model.load(str(saved)).signatures["serving_default"]
    print(f"(a) latency, 16 filters, depth 4, tile {predictor.tile}, batch {predictor.batch_size}")
    for size in sizes:
        image = raw_image(size)
        batch = tf.constant(image[None])
        served_out = serve(**{INPUT: batch})[FOREGROUND].numpy()[0]  # warm-up: traces nothing new
        predicted = predictor.probabilities(image)
        served_t, predict_t = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            predictor.probabilities(image)
            predict_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            serve(**{INPUT: batch})[FOREGROUND].numpy()
            served_t.append(time.perf_counter() - start)
        print(f"    {size}^2: predict {min(predict_t):.2f} s, served {min(served_t):.2f} s, "
              f"served / predict {min(served_t) / min(predict_t):.3f} (bar <= 1.1); "
              f"max |served - predict| {np.abs(served_out - predicted).max():.1e}")


def peak_rss(folder: Path, size: int) -> None:
    _, saved = export_unet(folder, 4)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    peaks = {}
    for n in (512, size):
        process = subprocess.Popen([sys.executable, "-I", "-c", SERVE_ONE, str(saved), str(n)],
                                   cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            sys.exit(f"serving {n}^2 failed: {process.stderr.read().decode()[-500:]}")
        seconds, shape = process.stdout.read().decode().split(" ", 1)
        peaks[n] = usage.ru_maxrss / 1024  # kB on Linux
        print(f"(b) served {n}^2 with TensorFlow alone: peak RSS {peaks[n]:.0f} MiB, "
              f"{float(seconds):.0f} s, output {shape.strip()}")
    extra = (peaks[size] - peaks[512]) * 2**20 / (size * size - 512 * 512)
    print(f"    {size}^2 over 512^2: {peaks[size] - peaks[512]:.0f} MiB more, {extra:.1f} bytes per pixel "
          f"(input 4 + foreground 4 + class probabilities 8 are the signature's own)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 2048], help="(a) image edges")
    parser.add_argument("--size", type=int, default=8192, help="(b) image edge")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="unetcell-bench-") as tmp:
        if "a" in args.parts:
            latency(Path(tmp), args.sizes, args.repeats)
        if "b" in args.parts:
            peak_rss(Path(tmp), args.size)


if __name__ == "__main__":
    main()
