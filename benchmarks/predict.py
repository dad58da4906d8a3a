"""What overlap-tile prediction costs beyond the network, which tile to use, and its memory.

    .venv/bin/python benchmarks/predict.py                   # (a), (b), (c) and (d)
    .venv/bin/python benchmarks/predict.py --parts d --repeats 2   # the whole process, 4096^2
    .venv/bin/python benchmarks/predict.py --parts c --sizes 2048 8192 16384

(a) Overhead: `unetcell predict`'s path on a 2048^2 16-bit TIFF (lazy row reads, percentiles,
    normalisation, mirroring, cutting tiles, stitching, the tiled TIFF written through a
    temporary file) against the network's forward pass alone on the same tiles, cut before the
    clock starts; the figure is the throughput of predict over that of the forward pass
    (bar >= 0.9). Runs alternate, best of --repeats.
(b) Output megapixels per second against the tile edge on a 2048^2 slide: valid convolutions
    recompute the margin of every tile (184 px at depth 4), so larger tiles waste less, until
    the activations leave the caches. The memory of a batch of tiles is printed beside it.
(c) Peak RSS of `unetcell predict` (a fresh process each, measured with wait4) on striped
    16-bit TIFF slides of 2048^2, 8192^2 and 16384^2; the bar is 8192^2 <= 1.3 x 2048^2.
(d) The whole `unetcell predict` process (start-up included, timed as a process, with its peak
    RSS) on a 4096^2 16-bit TIFF, `Predictor.predict_slide` in a warm process (start-up
    excluded) and the forward pass alone over the same tiles in the same batches, alternated in
    one run; their ratios (bars >= 0.85 and >= 0.95, issue 19), the forward pass with two
    batches in flight as predict runs it (`pipeline.in_flight`) against one at a time, then the breakdown: start-up
    (imports, model load, the first trace, in a fresh process) and every stage of predict timed
    alone, as a multiple of the forward pass.

The network of (a), (b) and (d) is the paper's U-Net (depth 4) at 16 filters, the CPU size the README
recommends; (c) uses 4 filters so the largest slide finishes in minutes on 2 cores: memory is
set by the band of tiles and the TensorFlow runtime, not by the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from scipy import ndimage  # noqa: E402

from unetcell.config import Config  # noqa: E402
from unetcell.mirror import mirror_indices  # noqa: E402
from unetcell.model import build_unet, save_model  # noqa: E402
from unetcell.normalize import apply_normalization, percentiles  # noqa: E402
from unetcell.pipeline import in_flight  # noqa: E402
from unetcell.predict import load_predictor  # noqa: E402
from unetcell.slides import open_slide, write_tiled_tiff  # noqa: E402
from unetcell.tiling import predict_tiled_bands  # noqa: E402

TILES = (252, 380, 508, 700, 892, 1084, 1276)
TILE_SLIDE = 2048  # large enough that every tile of TILES is used whole


def write_slide(path: Path, size: int, seed: int = 0) -> Path:
    """A smooth 16-bit striped TIFF of size x size, written in strips of 1024^2 blocks so that
    even 16384^2 is made in little memory."""
    rng = np.random.default_rng(seed)
    block = (ndimage.gaussian_filter(rng.random((1024, 1024)), 3) * 65535).astype(np.uint16)
    reps = max(size // 1024, 1)
    rows = np.tile(block[: min(size, 1024), : min(size, 1024)], (1, reps))

    def strips():
        for _ in range(reps):
            yield rows

    with tifffile.TiffWriter(path, bigtiff=size * size * 2 > 2**31) as tif:
        tif.write(strips(), shape=(rows.shape[0] * reps, rows.shape[1]), dtype=np.uint16,
                  rowsperstrip=64, photometric="minisblack")
    return path


def model_file(folder: Path, filters: int, depth: int = 4) -> Path:
    config = Config().override("model", filters=filters, depth=depth, channels=1)
    path = folder / f"unet-f{filters}-d{depth}.keras"
    if not path.exists():
        save_model(build_unet(config.model), path, config)
    return path


def cut_tiles(predictor, slide_path: Path) -> list[np.ndarray]:
    """Every batch of tiles that predict feeds the network for the slide, recorded by running
    the tiled pass with a stand-in network (the forward pass's input, cut in memory)."""
    batches = []
    margin = predictor.geometry.margin

    def record(batch: np.ndarray) -> np.ndarray:
        batches.append(batch)
        return np.zeros((len(batch), batch.shape[1] - 2 * margin, batch.shape[2] - 2 * margin), np.float32)

    with open_slide(slide_path) as slide:
        low, high = percentiles(slide, predictor.config.normalize)
        plan = predictor.plan(*slide.shape[:2])
        bands = predict_tiled_bands(lambda a, b: apply_normalization(slide.rows(a, b), low, high),
                                    plan, record, predictor.batch_size, parallel=1)  # in order
        for _ in bands:
            pass
    return batches


def overhead(folder: Path, repeats: int) -> None:
    slide = write_slide(folder / "s2048.tif", 2048)
    predictor = load_predictor(model_file(folder, 16))
    batches = cut_tiles(predictor, slide)
    predictor.predict_fn(batches[0])  # trace once
    forward, full = [], []
    for r in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            predictor.predict_fn(batch)
        forward.append(time.perf_counter() - start)
        out = folder / f"p{r}.tif"
        start = time.perf_counter()
        predictor.predict_slide(slide, probabilities=out, overwrite=True)
        full.append(time.perf_counter() - start)
    tiles = sum(len(b) for b in batches)
    mpx = 2048 * 2048 / 1e6
    print(f"(a) 2048^2, tile {predictor.tile}, {tiles} tiles, batch {predictor.batch_size}, 16 filters, depth 4")
    print(f"    forward pass alone {min(forward):.2f} s ({mpx / min(forward):.2f} Mpx/s); "
          f"predict file to file {min(full):.2f} s ({mpx / min(full):.2f} Mpx/s)")
    print(f"    throughput predict / forward pass: {min(forward) / min(full):.3f} (bar >= 0.9)")


def tile_sizes(folder: Path, repeats: int) -> None:
    n = TILE_SLIDE
    slide = write_slide(folder / f"s{n}.tif", n)
    path = model_file(folder, 16)
    print(f"(b) output Mpx/s against the tile edge, {n}^2 slide, 16 filters, depth 4, batch 4")
    print("    (a requested tile is shrunk to the smallest window whose stride still covers the slide)")
    print(f"    {'tile':>5} {'kept':>5} {'tiles':>5} {'Mpx/s':>7} {'input px / output px':>21} {'batch MiB':>9}")
    for tile in TILES:
        config = Config().override("model", filters=16, depth=4, channels=1).override("predict", tile=tile)
        predictor = load_predictor(path, config)
        predictor.probabilities(np.zeros((64, 64, 1), np.uint16))  # trace
        with open_slide(slide) as s:
            image = s.rows(0, s.shape[0])
        best = np.inf
        for _ in range(min(repeats, 2)):
            start = time.perf_counter()
            predictor.probabilities(image)
            best = min(best, time.perf_counter() - start)
        plan = predictor.plan(n, n)
        waste = plan.count * plan.tile_shape[0] * plan.tile_shape[1] / n**2
        # The largest activation of a batch: the first level's 16-filter float32 maps.
        batch_mib = 4 * plan.tile_shape[0] * plan.tile_shape[1] * 16 * 4 / 2**20
        print(f"    {plan.rows.tile:>5} {plan.rows.stride:>5} {plan.count:>5} {n**2 / 1e6 / best:>7.2f} "
              f"{waste:>21.2f} {batch_mib:>9.0f}")


def peak_rss(folder: Path, sizes: list[int]) -> None:
    model = model_file(folder, 4)
    cli = Path(sys.executable).with_name("unetcell")
    peaks = {}
    for size in sizes:
        slide = write_slide(folder / f"r{size}.tif", size)
        out = folder / f"o{size}.tif"
        start = time.perf_counter()
        process = subprocess.Popen([str(cli), "predict", str(model), str(slide), "-o", str(out), "--overwrite"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            sys.exit(f"predict {size}^2 failed: {process.stderr.read().decode()[-500:]}")
        peaks[size] = usage.ru_maxrss / 1024  # kB on Linux
        shape = tifffile.TiffFile(out).pages[0].shape
        print(f"(c) {size:>5}^2 16-bit striped TIFF ({slide.stat().st_size / 2**20:.0f} MiB): peak RSS "
              f"{peaks[size]:.0f} MiB, {seconds:.0f} s, output {shape[0]} x {shape[1]}")
        slide.unlink()
        out.unlink()
    base = min(sizes)
    for size in sizes:
        if size != base:
            print(f"    peak RSS {size}^2 / {base}^2: {peaks[size] / peaks[base]:.2f}"
                  + (" (bar <= 1.3)" if size == 8192 and base == 2048 else ""))



# --- (d) the whole process on 4096^2 -----------------------------------------------------------

WHOLE = 4096

STARTUP = """
import time, sys
t = [time.perf_counter()]
import unetcell.cli, tensorflow, keras, unetcell.predict  # noqa  (the command's import hooks)
t.append(time.perf_counter())
from unetcell.predict import load_predictor
import numpy as np
p = load_predictor(sys.argv[1])
t.append(time.perf_counter())
plan = p.plan(4096, 4096)
x = np.zeros((p.batch_size,) + plan.tile_shape + (p.channels,), np.float32)
p.predict_fn(x)
t.append(time.perf_counter())
p.predict_fn(x)
t.append(time.perf_counter())
print(*(b - a for a, b in zip(t, t[1:])))
"""


def run_process(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{' '.join(args[:3])} failed: {process.stderr.read().decode()[-500:]}")
    return seconds, usage.ru_maxrss / 1024


def staged(predictor, slide_path: Path, out: Path) -> dict[str, float]:
    """predict's work on a slide, one stage after the other, each timed on its own: the same
    calls as `Predictor.probability_bands` and `write_tiled_tiff`, unrolled."""
    clock = dict.fromkeys(["percentiles", "read", "normalise", "mirror+cut", "forward",
                           "stitch", "encode+write"], 0.0)

    @contextlib.contextmanager
    def timed(stage):
        start = time.perf_counter()
        yield
        clock[stage] += time.perf_counter() - start

    with open_slide(slide_path) as slide:
        with timed("percentiles"):
            low, high = percentiles(slide, predictor.config.normalize)
        plan = predictor.plan(*slide.shape[:2])
        rows, cols = plan.rows, plan.cols
        height, width = plan.shape
        col_index = mirror_indices(*cols.span, width)
        bands = []
        for ky in range(rows.count):
            row_index = mirror_indices(*rows.window(ky), height)
            lo, hi = int(row_index.min()), int(row_index.max()) + 1
            with timed("read"):
                source = slide.rows(lo, hi)
            src_y, dst_y = rows.keep(ky)
            out_band = np.empty((dst_y.stop - dst_y.start, width), np.float32)
            for first in range(0, cols.count, predictor.batch_size):
                ks = np.arange(first, min(first + predictor.batch_size, cols.count))
                with timed("mirror+cut"):  # one gather per batch, as predict_tiled_bands cuts
                    local_cols = col_index[ks[:, None] * cols.stride + np.arange(cols.tile)]
                    tiles = source[(row_index - lo)[None, :, None], local_cols[:, None, :]]
                with timed("normalise"):  # per batch, as predict does (`prepare`)
                    tiles = apply_normalization(tiles, low, high)
                with timed("forward"):
                    result = predictor.predict_fn(tiles)
                with timed("stitch"):
                    for k, tile_out in zip(ks, result):
                        src_x, dst_x = cols.keep(k)
                        out_band[:, dst_x] = tile_out[src_y, src_x]
            bands.append((dst_y.start, out_band))
    with timed("encode+write"):
        write_tiled_tiff(out, bands, plan.shape, np.float32, overwrite=True)
    return clock


def whole_process(folder: Path, repeats: int) -> None:
    size = WHOLE
    slide = write_slide(folder / f"w{size}.tif", size)
    model = model_file(folder, 16)
    cli = Path(sys.executable).with_name("unetcell")
    out = folder / "w.tif"
    predictor = load_predictor(model)
    plan = predictor.plan(size, size)
    tiles = cut_tiles(predictor, slide)
    predictor.predict_fn(tiles[0])  # trace once
    load = os.getloadavg()[0]
    whole, forward, paired, inside, rss, stages, startup, bare = [], [], [], [], [], [], [], []
    for _ in range(repeats):  # alternated, so a burst of load elsewhere hits every figure alike
        seconds, peak = run_process([str(cli), "predict", str(model), str(slide), "-o", str(out), "--overwrite"])
        whole.append(seconds)
        rss.append(peak)
        start = time.perf_counter()
        for batch in tiles:
            predictor.predict_fn(batch)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in in_flight(predictor.predict_fn, tiles, 2):
            pass
        paired.append(time.perf_counter() - start)
        start = time.perf_counter()
        predictor.predict_slide(slide, probabilities=out, overwrite=True)
        inside.append(time.perf_counter() - start)
        stages.append(staged(predictor, slide, out))
        result = subprocess.run([sys.executable, "-c", STARTUP, str(model)], capture_output=True, text=True)
        startup.append([float(v) for v in result.stdout.split()])
        bare.append(run_process([sys.executable, "-c", "import tensorflow"])[0])
    mpx = size * size / 1e6
    w, f, i = min(whole), min(forward), min(inside)
    print(f"(d) {size}^2 16-bit TIFF, {plan.count} tiles of {plan.tile_shape[0]} x {plan.tile_shape[1]}, "
          f"batch {predictor.batch_size}, 16 filters, depth 4; best of {repeats}, load average "
          f"{load:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} cores")
    print(f"    whole `unetcell predict` process {w:.1f} s ({mpx / w:.2f} Mpx/s), peak RSS {min(rss):.0f} MiB")
    print(f"    predict_slide in a warm process  {i:.1f} s ({mpx / i:.2f} Mpx/s)")
    print(f"    forward pass alone               {f:.1f} s ({mpx / f:.2f} Mpx/s)")
    print(f"    forward, two batches in flight   {min(paired):.1f} s ({mpx / min(paired):.2f} Mpx/s), "
          f"{f / min(paired):.3f} x the one-at-a-time throughput (what predict does)")
    print(f"    ratio forward / whole process:  {f / w:.3f} (bar >= 0.85)")
    print(f"    ratio forward / predict_slide:  {f / i:.3f} (excluding start-up; bar >= 0.95)")
    # The first bar leaves f / 0.85 - f for everything but the network, start-up included; a
    # bare `python -c "import tensorflow"` is a floor under start-up that no code of ours runs in.
    allowed = f / 0.85 - f
    print(f"    the 0.85 bar leaves {allowed:.2f} s beside the forward pass; a bare Python process "
          f"importing TensorFlow alone takes {min(bare):.2f} s ({min(bare) / allowed:.2f} x that)")
    best = {k: min(s[k] for s in stages) for k in stages[0]}
    imports, load_model, trace, warm = (min(s[j] for s in startup) for j in range(4))
    print("    breakdown (each stage alone, best of the runs; the sum of the stages after start-up is")
    print(f"    what a sequential predict costs; forward = {best['forward']:.1f} s here):")
    for name, value in [("imports (tensorflow, keras, unetcell)", imports), ("model load", load_model),
                        ("first batch: tracing", trace - warm)] + list(best.items()):
        print(f"      {name:<38} {value:6.2f} s  {value / best['forward']:6.3f} x forward")
    rest = sum(v for k, v in best.items() if k != "forward")
    print(f"      {'all but the network, after start-up':<38} {rest:6.2f} s  {rest / best['forward']:6.3f} x forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 8192, 16384])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="unetcell-bench-") as tmp:
        folder = Path(tmp)
        if "a" in args.parts:
            overhead(folder, args.repeats)
        if "b" in args.parts:
            tile_sizes(folder, args.repeats)
        if "c" in args.parts:
            peak_rss(folder, args.sizes)
        if "d" in args.parts:
            whole_process(folder, args.repeats)


if __name__ == "__main__":
    main()
