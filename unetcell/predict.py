"""Overlap-tile prediction of images and slides of any size (paper section 2, Figure 2).

    slide (lazy rows) -> percentiles once per slide -> normalised bands of rows, mirrored at the
    borders -> tiles on the 2**depth grid -> the U-Net in one tf.function per batch -> kept
    outputs stitched band by band -> probabilities written tile by tile into a tiled (Big)TIFF
    -> (labels: instances on the whole stitched foreground map) -> overlay PNG

`Predictor` holds a loaded model with its saved settings and predicts one image at a time,
in memory (`probabilities`, `labels`: what `unetcell evaluate --model` uses) or streamed from
a file to files (`predict_slide`). `predict_files` is `unetcell predict`: it decides the output
paths, refuses to replace existing files before any work, and shows a progress bar over files
and tiles.

Memory: probabilities stream in one band of tiles (tile x (W + 2 context) x C input, stride x W
output), whatever the slide's height; labels need the whole foreground map, because a cell
must never be cut at a band or tile border (instances are made after stitching), so they are
refused with a clear error on slides that would not fit this machine's memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import postprocess
from .config import Config
from .errors import ConfigError, DataError, UnetcellError
from .files import check_writable
from .geometry import DEFAULT_OUTPUT_EDGE, default_tile  # noqa: F401  (re-exported)
from .io import TIFF_SUFFIXES, check_finite
from .normalize import apply_normalization, percentiles
from .overlay import display_stride
from .pipeline import Aborted, Behind
from .slides import (
    PickedSlide,
    Slide,
    array_bands,
    as_slide,
    open_slide,
    pick_channels,
    write_tiled_tiff,
)
from .tiling import (
    Geometry,
    TilePlan,
    forward_fn,
    predict_tiled,
    predict_tiled_bands,
    smallest_tile,
    tile_plan,
)

OUTPUTS = ("probabilities", "labels", "both")

# How probabilities are stored: float32 as computed (4 bytes a pixel), float16 (2 bytes,
# within 2.4e-4 of float32 in [0, 1]) or uint8 (1 byte, round(p * 255), within 1/510: what
# many viewers expect). README, Prediction speed.
PROBABILITY_DTYPES = ("float32", "float16", "uint8")


def check_dtype(dtype: str) -> None:
    if dtype not in PROBABILITY_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(PROBABILITY_DTYPES)}. Received: {dtype!r}")


def encode_probabilities(band: np.ndarray, dtype: str) -> np.ndarray:
    """Foreground probabilities (float32 in [0, 1]) as stored with `--dtype`."""
    if dtype == "float32":
        return band
    if dtype == "float16":
        return band.astype(np.float16)
    check_dtype(dtype)
    return np.rint(np.clip(band, 0, 1) * np.float32(255)).astype(np.uint8)


# Peak bytes per pixel of making labels: the stitched float32 map and `postprocess.instances`
# on it. tracemalloc on a 1040 x 1392 nuclei map: 37 with connected components, 118 with the
# default watershed (float64 distances, its reconstruction, int64 piece keys).
LABEL_BYTES_PER_PIXEL = 125

# The edge of the overlay picture; larger slides are shown on an integer stride.
OVERLAY_EDGE = 2048


# The default tile (`geometry.default_tile`: 700 at depth 4) was kept on measurement (issue 19).
# Bigger tiles recompute less margin: 4.6 % more output per second at 876 and 11 % at 1212
# (16 filters, 2 cores), but a batch of 4 tiles of the paper's 64-filter network already adds
# 0.95 GiB of peak RSS at 700 (1.0 GiB with the model loaded -> 1.9 GiB), growing with the tile's
# area: 1.6 GiB at 892, 2.9 GiB at 1212. The bound is about 1 GiB for the forward pass, so that
# predict at 64 filters runs in 2 GiB; --tile trades memory for those few per cent.
def choose_tile(requested: int, geometry: Geometry) -> tuple[int, str | None]:
    """(tile, note): `requested` (0 = the default) as a valid tile edge for `geometry`, and a
    sentence for the user when it had to be changed (rounded to the nearest valid size, or up
    to the smallest tile that keeps any output)."""
    if requested == 0:
        return default_tile(geometry), None
    smallest = smallest_tile(geometry)
    if requested < smallest:
        return smallest, (
            f"tile {requested} is too small for {geometry.describe()}; "
            f"using the smallest tile that keeps any output, {smallest}"
        )
    tile = geometry.valid_tile(requested, "nearest")  # >= smallest, itself a valid size
    if tile != requested:
        return tile, (
            f"tile {requested} is not a valid input size for {geometry.describe()}; "
            f"using the nearest valid size, {tile}"
        )
    return tile, None


def tta_transforms() -> list[tuple[int, bool]]:
    """The 8 symmetries of the square (the dihedral group): (quarter turns, flipped)."""
    return [(turns, flipped) for turns in range(4) for flipped in (False, True)]


def _transform(image: np.ndarray, turns: int, flipped: bool) -> np.ndarray:
    image = np.rot90(image, turns, axes=(0, 1))
    return image[:, ::-1] if flipped else image


def _untransform(image: np.ndarray, turns: int, flipped: bool) -> np.ndarray:
    if flipped:
        image = image[:, ::-1]
    return np.rot90(image, -turns, axes=(0, 1))


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_label_memory(shape: tuple[int, int], source: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, to make labels of a slide whose stitched foreground map would
    not fit in about 3/4 of this machine's memory."""
    memory = physical_memory()
    need = LABEL_BYTES_PER_PIXEL * shape[0] * shape[1]
    if memory is not None and need > 0.75 * memory:
        where = f"{source}: " if source else ""
        raise DataError(
            f"{where}instance labels of a {shape[0]} x {shape[1]} slide need about "
            f"{need / 2**30:.1f} GiB (the whole foreground map, so no cell is cut at a tile "
            f"border) and this machine has {memory / 2**30:.1f} GiB; predict "
            "--output probabilities (streamed in flat memory) or crop the slide"
        )


@dataclass
class SlideResult:
    """What `Predictor.predict_slide` wrote, and a few figures about the run."""

    source: Path | None
    shape: tuple[int, int]
    tiles: int
    tile_shape: tuple[int, int]
    written: list[Path] = field(default_factory=list)
    cells: int | None = None


class Predictor:
    """A trained network (any --arch) ready to segment images of any size by overlap-tile
    prediction.

    The percentile normalisation, the threshold and the minimum cell size come from the
    settings saved with the model (`config` overrides them); the tile edge and batch size
    from `config.predict` (tile 0 = `default_tile`). `note` says when the tile was changed
    to a valid size.
    """

    def __init__(self, model, config: Config):
        self.model = model
        self.config = config
        self.geometry = Geometry.of_model(model)
        self.channels = int(model.input_shape[-1])
        self.tile, self.note = choose_tile(config.predict.tile, self.geometry)
        self.batch_size = config.predict.batch_size
        # A three-class model's map is (foreground, interior): its instances grow from the
        # interiors; the probability file holds the foreground alone, as for two classes.
        self.interiors = int(model.output_shape[-1]) == 3 and config.predict.instances == "interiors"
        if config.predict.instances == "interiors" and not self.interiors:
            raise ConfigError("--instances interiors needs a three-class model (trained with "
                              "--targets three-class); use watershed or components")
        self.predict_fn = forward_fn(model, "interiors" if self.interiors else "foreground",
                                     self.geometry, config.predict.balance_shift)

    def plan(self, height: int, width: int) -> TilePlan:
        return tile_plan(height, width, self.tile, self.geometry)

    def _check_channels(self, slide: Slide) -> None:
        if slide.shape[2] != self.channels:
            where = f"{slide.path}: " if slide.path else ""
            picked = self.config.model.pick_channels
            after = f" after --channels {picked}" if picked else ""
            raise DataError(
                f"{where}has {slide.shape[2]} channel(s){after} but the model was trained on "
                f"{self.channels}; give images with {self.channels} channel(s), or pick them "
                "with --channels (e.g. --channels 0 or --channels gray)"
            )

    def _picked(self, slide: Slide) -> Slide:
        """`slide` with the model's `--channels` applied (or the one given to predict)."""
        return slide if isinstance(slide, PickedSlide) else pick_channels(slide, self.config.model.pick_channels)

    def probability_bands(
        self, slide: Slide | np.ndarray, on_batch: Callable[[int], None] | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The foreground probability of `slide`, float32, as bands (first_row, rows x W) from
        top to bottom. Percentiles come once from the whole slide (a strided sample), never
        per tile, so tiles agree at their seams."""
        slide = self._picked(as_slide(slide))
        self._check_channels(slide)
        return self._probability_bands(slide, self.plan(slide.shape[0], slide.shape[1]), on_batch)

    def _probability_bands(self, slide: Slide, plan: TilePlan, on_batch=None):
        """`probability_bands` of a slide whose channels are checked, on its tile plan."""
        low, high = percentiles(slide, self.config.normalize)
        if self.config.predict.tta:
            return array_bands(self._tta_probability(slide, low, high, on_batch))

        def read_rows(start: int, stop: int) -> np.ndarray:
            rows = slide.rows(start, stop)
            check_finite(rows, slide.path, first_row=start)
            return rows

        # Normalised tile by tile: a band of a wide slide is held once, in its stored dtype.
        return predict_tiled_bands(read_rows, plan, self.predict_fn, self.batch_size, on_batch,
                                   prepare=lambda tiles: apply_normalization(tiles, low, high))

    def _tta_probability(self, slide: Slide, low, high, on_batch=None) -> np.ndarray:
        """The mean foreground probability over the 8 flips and 90-degree rotations of the
        image (test-time augmentation, in memory). Each is an exact overlap-tile pass over the
        transformed image, with the original image's percentiles, mapped back."""
        image = apply_normalization(slide.rows(0, slide.shape[0]), low, high)
        total = np.zeros(self.map_shape(*slide.shape[:2]), np.float64)
        for turns, flipped in tta_transforms():
            view = np.ascontiguousarray(_transform(image, turns, flipped))
            total += _untransform(self.normalised_probability(view, on_batch), turns, flipped)
        return (total / 8).astype(np.float32)

    def normalised_probability(self, image: np.ndarray, on_batch=None) -> np.ndarray:
        """H x W float32 foreground probability of an image already normalised (H x W x C in
        memory, as training's examples are), by the same overlap-tile pass."""
        return predict_tiled(image, self.predict_fn, self.tile, self.geometry, self.batch_size, on_batch)

    def map_shape(self, height: int, width: int) -> tuple[int, ...]:
        """The shape of the probability map of an image: H x W, or H x W x 2 (foreground,
        interior) for a three-class model."""
        return (height, width, 2) if self.interiors else (height, width)

    def probabilities(self, image: Slide | np.ndarray) -> np.ndarray:
        """H x W float32 foreground probability of an image (H x W or H x W x C, raw); H x W x 2
        (foreground, interior) for a three-class model."""
        slide = as_slide(image)
        out = np.empty(self.map_shape(*slide.shape[:2]), np.float32)
        for first, band in self.probability_bands(slide):
            out[first:first + band.shape[0]] = band
        return out

    def instances(self, probability: np.ndarray) -> np.ndarray:
        """Instance labels from a whole foreground map, with the saved threshold, min size and
        instance method."""
        p = self.config.predict
        return postprocess.instances(probability, p.threshold, p.min_size, p.instances,
                                     p.watershed_h, p.watershed_ratio)

    def labels(self, image: Slide | np.ndarray) -> np.ndarray:
        """H x W int32 instance labels of an image (H x W or H x W x C, raw)."""
        return self.instances(self.probabilities(image))

    def predict_slide(
        self,
        source: str | os.PathLike | Slide | np.ndarray,
        probabilities: str | os.PathLike | None = None,
        labels: str | os.PathLike | None = None,
        overlay: str | os.PathLike | None = None,
        overwrite: bool = False,
        on_batch: Callable[[int], None] | None = None,
        on_tiles: Callable[[int], None] | None = None,
        outputs_checked: bool = False,
        dtype: str = "float32",
    ) -> SlideResult:
        """Predict one image or slide into any of: a tiled TIFF of probabilities (float32, or
        `dtype` float16 or uint8; streamed: flat memory), a tiled int32 TIFF of instance
        labels, an overlay PNG of the predicted contours on a downsampled view. Every file is
        written through a temporary file renamed at the end; nothing is replaced without
        `overwrite`, and the outputs are checked before any work unless the caller did it
        (`outputs_checked`). The probabilities are encoded and written in a background thread
        while the network runs (unetcell.pipeline). `on_tiles(count)` is called once with the
        number of tiles, before the first batch; `on_batch(n)` after each batch of n tiles."""
        outputs = [p for p in (probabilities, labels, overlay) if p is not None]
        if not outputs:
            raise ValueError("predict_slide needs at least one output path")
        check_dtype(dtype)
        if not outputs_checked:
            for path in outputs:
                check_writable(path, overwrite)
        slide = open_slide(source) if isinstance(source, (str, os.PathLike)) else as_slide(source)
        slide = self._picked(slide)
        with slide:
            self._check_channels(slide)
            height, width = slide.shape[:2]
            if labels is not None or self.config.predict.tta:  # both hold the whole map
                check_label_memory((height, width), slide.path)
            plan = self.plan(height, width)
            if on_tiles is not None:
                on_tiles(plan.count)
            result = SlideResult(slide.path, (height, width), plan.count, plan.tile_shape)
            step = display_stride(height, width, OVERLAY_EDGE)
            whole = np.empty(self.map_shape(height, width), np.float32) if labels is not None else None
            small = []  # the foreground map on the overlay's stride, when no labels are made

            def bands() -> Iterator[tuple[int, np.ndarray]]:
                for first, band in self._probability_bands(slide, plan, on_batch):
                    if whole is not None:
                        whole[first:first + band.shape[0]] = band
                    elif overlay is not None:
                        small.append(band[(-first) % step::step, ::step].copy())
                    yield first, band
                    del band  # a band of the slide's width: not held while the next is made

            if probabilities is not None:
                def write(items: Iterator[tuple[int, np.ndarray]]) -> Path:
                    def encoded() -> Iterator[tuple[int, np.ndarray]]:
                        for first, band in items:
                            yield first, encode_probabilities(band[..., 0] if band.ndim == 3 else band, dtype)
                            del band  # a band of the slide's width: not held while waiting

                    try:
                        return write_tiled_tiff(probabilities, encoded(), (height, width), dtype,
                                                overwrite=overwrite)
                    except (UnetcellError, Aborted):
                        raise
                    except Exception as e:  # tifffile and the OS raise many types
                        raise UnetcellError(
                            f"{probabilities}: cannot be written ({type(e).__name__}: {e})") from e

                with Behind(write, name="unetcell-writer") as writer:
                    for item in bands():
                        writer.send(item)
                        del item
                result.written.append(writer.result)
            else:
                for _ in bands():
                    pass

            label_image = None
            if whole is not None:
                label_image = self.instances(whole)
                del whole
                result.cells = int(label_image.max())
                result.written.append(write_tiled_tiff(
                    labels, array_bands(label_image), (height, width), np.int32,
                    compression="zlib", overwrite=overwrite))
            if overlay is not None:
                from .overlay import contour_overlay, save_overlay

                if label_image is not None:
                    shown = label_image[::step, ::step]
                else:
                    # Contours of instances made on the overlay's stride: the picture of a
                    # probabilities-only run costs no full-size map.
                    min_size = -(-self.config.predict.min_size // (step * step))
                    p = self.config.predict
                    shown = postprocess.instances(np.concatenate(small, axis=0), p.threshold,
                                                  min_size, p.instances, p.watershed_h / step,
                                                  p.watershed_ratio)
                view = slide[::step, ::step]
                rgb = contour_overlay(view, shown, max_edge=max(view.shape[:2]))
                result.written.append(save_overlay(overlay, rgb, overwrite=overwrite))
        return result


def load_predictor(model_path: str | os.PathLike, config: Config | None = None) -> Predictor:
    """A `Predictor` for a model saved by `unetcell train`; `config` replaces the settings
    saved with it (normalisation, threshold, min size, tile, batch size)."""
    from .model import load_model

    model, config = load_model(model_path, compile=False, config=config)
    return Predictor(model, config)


# --- unetcell predict ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """Where one image's results go."""

    image: Path
    probabilities: Path | None
    labels: Path | None
    overlay: Path | None

    def paths(self) -> list[Path]:
        return [p for p in (self.probabilities, self.labels, self.overlay) if p is not None]


def output_paths(
    images: Sequence[str | os.PathLike], out: str | os.PathLike, output: str, overlay: bool
) -> list[Outputs]:
    """The files `unetcell predict` writes for each image.

    One image and OUT ending in .tif/.tiff: OUT is the file (`--output both`: probabilities in
    OUT, labels in OUT_labels.tif); the overlay goes beside it as OUT_overlay.png.
    Otherwise OUT is a folder: OUT/<stem>.tif for one kind of output (so `unetcell evaluate
    --predictions OUT` finds label images by stem), OUT/probabilities/<stem>.tif and
    OUT/labels/<stem>.tif for both, overlays in OUT/overlays/<stem>.png.
    """
    if output not in OUTPUTS:
        raise ConfigError(f"output must be one of {', '.join(OUTPUTS)}. Received: {output!r}")
    images = [Path(p) for p in images]
    if not images:
        raise ConfigError("predict needs at least one image")
    out = Path(out)
    want_prob = output in ("probabilities", "both")
    want_labels = output in ("labels", "both")
    single_file = len(images) == 1 and out.suffix.lower() in TIFF_SUFFIXES and not out.is_dir()
    if len(images) > 1 and out.suffix.lower() in TIFF_SUFFIXES and not out.is_dir():
        raise ConfigError(f"{out}: {len(images)} images need an output folder, not a TIFF file")
    if single_file:
        stem = out.with_suffix("")
        return [Outputs(
            images[0],
            out if want_prob else None,
            (Path(f"{stem}_labels.tif") if want_prob else out) if want_labels else None,
            Path(f"{stem}_overlay.png") if overlay else None,
        )]
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise ConfigError(
                f"{image}: has the same stem as {stems[image.stem]}; their outputs in {out} "
                "would collide, predict them into separate folders"
            )
        stems[image.stem] = image
    both = want_prob and want_labels
    return [
        Outputs(
            image,
            (out / "probabilities" if both else out) / f"{image.stem}.tif" if want_prob else None,
            (out / "labels" if both else out) / f"{image.stem}.tif" if want_labels else None,
            out / "overlays" / f"{image.stem}.png" if overlay else None,
        )
        for image in images
    ]


def predict_files(
    model_path: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: Config | None = None,
    output: str = "probabilities",
    overlay: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    dtype: str = "float32",
) -> list[SlideResult]:
    """`unetcell predict`: every image through `Predictor.predict_slide`, with a tqdm bar over
    files and one over tiles. Every output path is checked before the model is loaded, and
    every image is opened once to check it can be read, so a typo in the last of 50 files is
    reported before an hour of work, not after.

    `shard = (i, n)` keeps every n-th image from the i-th, after the output paths of the whole
    list are planned, so n machines given the same list write the same files between them."""
    from .progress import tqdm  # plain log lines when stderr is not a terminal

    todo = output_paths(images, out, output, overlay)
    check_dtype(dtype)
    if shard is not None:
        index, count = shard
        echo(f"shard {index}/{count}: {len(todo[index::count])} of {len(todo)} image(s)")
        todo = todo[index::count]
        if not todo:
            return []
    for outputs in todo:
        for path in outputs.paths():
            check_writable(path, overwrite)
    for outputs in todo:
        with open_slide(outputs.image):
            pass
    predictor = load_predictor(model_path, config)
    if predictor.note:
        echo(predictor.note)
    results = []
    files = tqdm(todo, desc="files", unit="file", disable=not progress or len(todo) < 2)
    for outputs in files:
        with tqdm(desc=outputs.image.name, unit="tile", leave=len(todo) == 1,
                  disable=not progress) as bar:
            result = predictor.predict_slide(
                outputs.image, outputs.probabilities, outputs.labels, outputs.overlay,
                overwrite=overwrite, on_batch=bar.update,
                on_tiles=lambda count, bar=bar: setattr(bar, "total", count), outputs_checked=True,
                dtype=dtype,
            )
        results.append(result)
    return results
