"""The README's pictures, drawn from the shipped sample (data/sample) by unetcell's own code.

    .venv/bin/python docs/make_figures.py [--overwrite]

docs/targets.png          what the network is taught for one sample image: `unetcell targets`
                          with the default settings (the paper's Figure 3).
docs/augmented_tiles.png  one training tile and a few augmented versions of it (default
                          augmentation, one seed per column): the image with the contours of
                          its class map, and the weight map (paper section 3.1).

The tile goes through the training path: percentile normalisation of the whole image, targets
of the whole mask (so the weight map near the tile's edge sees the cells beyond it), then the
Augmenter that training calls. Drawn with matplotlib through `unetcell.figures`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries

from unetcell import figures, targets
from unetcell.augment import AugmentFn, build_augmenter
from unetcell.config import AugmentConfig, NormalizeConfig, TargetsConfig
from unetcell.errors import UnetcellError
from unetcell.figures import save_targets_figure
from unetcell.io import read_image, read_mask, write_png
from unetcell.normalize import normalize
from unetcell.overlay import TRUTH_COLOUR, to_display

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
STEM = "cell_001"  # clusters of touching cells: carved gaps and heavy border weights to see
TILE = 188  # a valid input edge of a depth-3 U-Net (100 px output), as in `--depth 3 --tile 188`
SEEDS = (1, 2, 3, 4)

ZOOM = 2  # screen pixels per tile pixel: a 188 px tile is drawn 376 px wide, its text readable


def load_tile(
    image_path: Path,
    mask_path: Path,
    size: int = TILE,
    targets_config: TargetsConfig = TargetsConfig(),
    normalize_config: NormalizeConfig = NormalizeConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The centred size x size tile of a sample as training sees it before augmentation:
    (normalised image float32 H x W x C, classes uint8, weights float32), all aligned."""
    image = normalize(read_image(image_path), normalize_config)
    labels = targets.as_instances(read_mask(mask_path), source=str(mask_path))
    classes = targets.classes(labels, gap=targets_config.gap)
    weights = targets.weight_map(
        labels, w0=targets_config.w0, sigma=targets_config.sigma,
        balance=targets_config.balance, gap=targets_config.gap,
    ).astype(np.float32)
    h, w = classes.shape
    if min(h, w) < size:
        raise UnetcellError(f"{image_path}: {h} x {w} is smaller than the {size} px tile")
    rows = slice((h - size) // 2, (h - size) // 2 + size)
    cols = slice((w - size) // 2, (w - size) // 2 + size)
    return image[rows, cols], classes[rows, cols], weights[rows, cols]


def augmented_panels(
    image: np.ndarray, classes: np.ndarray, weights: np.ndarray, augment: AugmentFn, seeds: Sequence[int]
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """For the tile and its augmented versions (one per seed, in that order): the image with
    the contours of its class map in green as uint8 RGB, and the weight map; plus the heaviest
    weight of them all, the top of their common colour scale.

    All images share one display stretch (`to_display` of them side by side) and all weight
    maps one colour scale, so the gray-value changes and the weights compare across panels.
    """
    tiles = [(image, classes, weights)] + [augment(image, classes, weights, seed) for seed in seeds]
    shown = np.split(to_display(np.concatenate([t[0] for t in tiles], axis=1)), len(tiles), axis=1)
    vmax = max(float(t[2].max()) for t in tiles)
    images = []
    for rgb, (_, tile_classes, _) in zip(shown, tiles):
        rgb[find_boundaries(tile_classes, mode="inner")] = TRUTH_COLOUR
        images.append(rgb)
    return images, [t[2] for t in tiles], vmax


def augmented_tiles_plot(
    image: np.ndarray,
    classes: np.ndarray,
    weights: np.ndarray,
    augment: AugmentFn,
    seeds: Sequence[int] = SEEDS,
    targets_config: TargetsConfig = TargetsConfig(),
) -> Figure:
    """`augmented_panels` as one matplotlib figure: a column per tile titled "original",
    "seed 1", ...; the images in the top row, the weight maps below with a colour bar. Tiles
    are drawn ZOOM screen pixels per pixel. `targets_config` only labels the weight row."""
    images, weight_maps, vmax = augmented_panels(image, classes, weights, augment, seeds)
    titles = ["original"] + [f"seed {seed}" for seed in seeds]
    tile_h, tile_w = images[0].shape[:2]
    fig, axes, bars = figures.panel_grid(
        2, len(images), (tile_h * ZOOM, tile_w * ZOOM), row_label_inches=1.0, colour_bar_rows=(1,)
    )
    for k, (title, rgb, heat) in enumerate(zip(titles, images, weight_maps)):
        axes[0][k].set_title(title, fontsize=figures.FONT_SIZE, loc="left")
        figures.show(axes[0][k], rgb)
        shown = figures.show(axes[1][k], heat, cmap=figures.WEIGHT_CMAP, vmin=0.0, vmax=vmax)
    row_labels = [
        "image,\nclass\ncontours",
        f"weights\nw$_0$={targets_config.w0:g}\nσ={targets_config.sigma:g} px",
    ]
    for row, label in zip(axes, row_labels):
        row[0].text(-0.06, 1.0, label, transform=row[0].transAxes, ha="right", va="top", fontsize=figures.FONT_SIZE)
    figures.weight_colour_bar(shown, bars[1])
    return fig


def augmented_tiles_figure(*args, **kwargs) -> np.ndarray:
    """`augmented_tiles_plot` rendered to an H x W x 3 uint8 RGB array."""
    return figures.render(augmented_tiles_plot(*args, **kwargs))


def make_figures(out_dir: Path, overwrite: bool = False, sample: Path = SAMPLE, stem: str = STEM) -> list[Path]:
    """Write targets.png and augmented_tiles.png into `out_dir` with the default settings."""
    image_path, mask_path = sample / "images" / f"{stem}.tif", sample / "masks" / f"{stem}.tif"
    config = TargetsConfig()
    written = [save_targets_figure(mask_path, out_dir / "targets.png", config, image_path, overwrite)]
    augment = build_augmenter(AugmentConfig())
    figure = augmented_tiles_figure(*load_tile(image_path, mask_path, TILE, config), augment, SEEDS, config)
    written.append(write_png(out_dir / "augmented_tiles.png", figure, overwrite=overwrite))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true", help="replace existing PNGs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNGs (docs/)")
    args = parser.parse_args(argv)
    try:
        for path in make_figures(args.out, args.overwrite):
            print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    except UnetcellError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
