"""Pictures of what the network is taught, like the paper's Figure 3: the image, the class map
with the gaps carved between touching cells, and the weight map of eq. 2 as a heat map.

`targets_plot` draws the panels side by side with matplotlib (titles in a real font, a colour
bar for the weights) and returns the `Figure`, for a notebook; `targets_figure` renders it to a
uint8 RGB array and `save_targets_figure` is what `unetcell targets MASK -o PNG` runs. Figures
are rendered by the Agg canvas directly (no pyplot, no GUI backend, no global state).

Each panel is laid out to a whole number of screen pixels per image pixel, so that matplotlib's
nearest-neighbour drawing neither drops nor smears a pixel: a one-pixel gap stays one pixel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from .config import TargetsConfig
from .errors import DataError
from .files import check_writable
from .io import read_image, read_mask, write_png
from .overlay import display_stride, to_display
from .targets import BORDER, INTERIOR, as_instances, carve_gaps, training_targets

WEIGHT_CMAP = "viridis"  # perceptually uniform, readable in gray and by colour-blind readers
GAP_COLOUR = (255, 255, 255)  # carved gap pixels: white between the coloured cells
# Cells that touch get different colours from this palette (matplotlib's tab10 without its
# gray, which would read as background).
CELL_COLOURS = tuple(
    to_rgb(c) for c in ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:pink",
                        "tab:olive", "tab:cyan", "tab:brown", "tab:red")
)

# Panels are scaled up by whole pixels to at least this edge (small tiles stay readable) and
# shown on an integer stride beyond MAX_EDGE (a whole slide stays a few megapixels).
MIN_EDGE = 384
MAX_EDGE = 2048
# A panel's longer edge is this long on the page, whatever its pixel count: the resolution (dpi)
# follows the panel, so text keeps its size relative to the pictures on a tile and on a slide.
PANEL_INCHES = 3.2
FONT_SIZE = 10  # points


# --- colour ---------------------------------------------------------------------------------


def neighbour_colouring(labels: np.ndarray, reach: int = 2, colours: int = len(CELL_COLOURS)) -> np.ndarray:
    """A colour index (1, 2, ...) per pixel of each cell, 0 on the background, such that two
    cells at most `reach` pixels apart (touching, or across a carved gap) never share an index.
    Greedy in label order over `colours` indices; a cell with that many neighbours or more
    takes a further index (whose colour repeats the palette)."""
    labels = np.asarray(labels)
    h, w = labels.shape
    padded = np.pad(labels, reach)
    pairs = []
    for dy in range(reach + 1):  # half the disc: each pair of pixels is compared once
        for dx in range(-reach, reach + 1):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx > reach * reach:
                continue
            other = padded[reach + dy : reach + dy + h, reach + dx : reach + dx + w]
            near = (labels != other) & (labels > 0) & (other > 0)
            pairs.append(np.stack([labels[near], other[near]]))
    pairs = np.unique(np.concatenate(pairs, axis=1), axis=1) if pairs else np.zeros((2, 0), labels.dtype)
    neighbours: dict[int, set[int]] = {}
    for a, b in pairs.T.tolist():
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    ids = np.unique(labels)
    lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.int32)
    for cell in ids[ids > 0].tolist():
        taken = {int(lut[n]) for n in neighbours.get(cell, ())}
        # the first free index from one that varies with the id, so the picture uses the
        # whole palette rather than mostly its first two colours
        start = cell * 5 % colours
        candidates = [(start + k) % colours + 1 for k in range(colours)]
        candidates += range(colours + 1, colours + len(taken) + 2)
        lut[cell] = next(c for c in candidates if c not in taken)
    return lut[labels]


def instance_colours(labels: np.ndarray) -> np.ndarray:
    """Each cell a colour from CELL_COLOURS on black, cells that touch in different colours
    (`neighbour_colouring`); uint8 RGB. skimage's `label2rgb` cycles its colours by label id,
    which gives neighbouring cells the same colour as often as not: told apart only by the
    one-pixel gap, they would read as one cell at the picture's size."""
    index = neighbour_colouring(labels)
    repeats = int(index.max()) // len(CELL_COLOURS) + 1
    palette = np.vstack([np.zeros((1, 3)), np.tile(np.asarray(CELL_COLOURS), (repeats, 1))])
    return (palette[index] * 255).round().astype(np.uint8)


def block_max(a: np.ndarray, step: int) -> np.ndarray:
    """Maximum over step x step blocks: a one-pixel gap or a thin ridge of heavy weight stays
    visible when a large image is shown smaller (a plain stride would skip it)."""
    if step == 1:
        return a
    h, w = a.shape
    padded = np.pad(a, ((0, -h % step), (0, -w % step)), mode="edge")
    return padded.reshape(padded.shape[0] // step, step, padded.shape[1] // step, step).max(axis=(1, 3))


# --- layout and rendering -------------------------------------------------------------------


def panel_grid(
    rows: int,
    cols: int,
    panel_shape: tuple[int, int],
    title_lines: int = 1,
    row_label_inches: float = 0.0,
    colour_bar_rows: Sequence[int] = (),
) -> tuple[Figure, list[list[Axes]], dict[int, Axes]]:
    """A figure of rows x cols image axes, each exactly `panel_shape` (height, width) pixels
    at whole-pixel positions, with room for `title_lines` of title above each column, row
    labels `row_label_inches` wide on the left, and a colour bar beside the last panel of each
    row in `colour_bar_rows`. Returns the figure, the axes by row, the colour-bar axes by row.
    """
    panel_h, panel_w = panel_shape
    dpi = max(panel_h, panel_w) / PANEL_INCHES

    def px(inches: float) -> int:
        return int(round(inches * dpi))

    gap, margin = px(0.12), px(0.1)
    line = px(FONT_SIZE / 72 * 1.4)
    title_h = title_lines * line + px(0.05)
    bar_w, bar_room = (px(0.14), px(0.1) + px(0.14) + px(0.75)) if colour_bar_rows else (0, 0)
    left = margin + px(row_label_inches)
    width = left + cols * panel_w + (cols - 1) * gap + bar_room + margin
    height = margin + rows * (title_h + panel_h) + (rows - 1) * gap + margin

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    fig.set_canvas(FigureCanvasAgg(fig))

    def box(x: int, top: int, w: int, h: int) -> list[float]:  # pixels from the top-left
        return [x / width, (height - top - h) / height, w / width, h / height]

    axes, bars = [], {}
    for r in range(rows):
        top = margin + title_h + r * (title_h + panel_h + gap)
        row = []
        for c in range(cols):
            ax = fig.add_axes(box(left + c * (panel_w + gap), top, panel_w, panel_h))
            ax.set_axis_off()
            row.append(ax)
        axes.append(row)
        if r in colour_bar_rows:
            x = left + cols * panel_w + (cols - 1) * gap + px(0.1)
            bars[r] = fig.add_axes(box(x, top, bar_w, panel_h), label="colour bar")
    return fig, axes, bars


def show(ax: Axes, picture: np.ndarray, **imshow: object) -> AxesImage:
    """An image on a `panel_grid` axes, pixel for pixel (nearest neighbour, no smoothing)."""
    return ax.imshow(picture, interpolation="nearest", resample=False, **imshow)


def weight_colour_bar(weights: AxesImage, cax: Axes) -> None:
    """The colour bar of a weight map drawn by `show`, on the axes `panel_grid` made for it."""
    cax.figure.colorbar(weights, cax=cax).ax.tick_params(labelsize=FONT_SIZE - 1)
    cax.set_ylabel("weight w(x)", fontsize=FONT_SIZE - 1)


def render(fig: Figure) -> np.ndarray:
    """A matplotlib figure as H x W x 3 uint8 RGB, drawn by the Agg canvas."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --- the figure -----------------------------------------------------------------------------


def targets_plot(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    balance: float = 1.0,
    gap: int = 1,
    kind: str = "two-class",
    border: int = 2,
) -> Figure:
    """What the network is taught for one instance label image, as a matplotlib figure (paper
    Fig. 3).

    Panels side by side: the image (when given: H x W or H x W x C, raw or normalised, shown
    by `overlay.to_display`), the class map (each cell a colour of its own on black, touching
    cells in different colours, the gap pixels carved between them white), and the weight map
    `weight_map(labels, w0, sigma, balance, gap)` in viridis with a colour bar from 0 to its
    maximum. Titles state the settings, the number of cells and carved gap pixels.

    kind "three-class" draws `three_classes` instead: each cell's interior in its colour, the
    border class (`border` px inside each cell, the carved gaps included) white, and the
    weights `three_class_weight_map` that come with them.

    Small images are scaled up by whole pixels to MIN_EDGE; images with an edge longer than
    MAX_EDGE are shown on an integer stride, the gaps and the weights by block maxima so that
    one-pixel gaps and thin ridges of weight stay visible.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2D label image. Received shape {labels.shape}")
    if image is not None and np.shape(image)[:2] != labels.shape:
        raise ValueError(
            f"image must be {labels.shape[0]} x {labels.shape[1]} like the labels. "
            f"Received shape {np.shape(image)}"
        )
    carved = carve_gaps(labels, gap)
    gaps = (labels != 0) & (carved == 0)
    cells = int(np.count_nonzero(np.unique(labels)))
    taught, weights = training_targets(labels, w0=w0, sigma=sigma, balance=balance, gap=gap, kind=kind,
                                       border=border, carved=carved)
    if kind == "three-class":
        coloured, white = np.where(taught == INTERIOR, carved, 0), taught == BORDER
        class_title = (f"classes, border {border} px (white), gap {gap} px\n"
                       f"{cells} cells, {int(white.sum())} border px")
    else:
        coloured, white = carved, gaps
        class_title = f"classes, gap {gap} px\n{cells} cells, {int(gaps.sum())} gap px (white)"
    vmax = float(weights.max()) if weights.size else 0.0

    height, width = labels.shape
    step = display_stride(height, width, MAX_EDGE)
    shown_h, shown_w = -(-height // step), -(-width // step)
    zoom = max(1, -(-MIN_EDGE // max(shown_h, shown_w, 1)))

    class_rgb = instance_colours(coloured[::step, ::step])
    class_rgb[block_max(white, step)] = GAP_COLOUR
    panels = [
        (class_rgb, class_title, {}),
        (block_max(weights, step), f"weights (eq. 2), w$_0$={w0:g}, σ={sigma:g} px\nbalance {balance:g}, "
         f"max {vmax:.3g}", {"cmap": WEIGHT_CMAP, "vmin": 0.0, "vmax": max(vmax, 1e-12)}),
    ]
    if image is not None:
        panels.insert(0, (to_display(np.asarray(image)[::step, ::step]), f"image\n{height} x {width} px", {}))

    fig, axes, bars = panel_grid(1, len(panels), (shown_h * zoom, shown_w * zoom), title_lines=2,
                                 colour_bar_rows=(0,))
    for ax, (picture, title, style) in zip(axes[0], panels):
        shown = show(ax, picture, **style)
        ax.set_title(title, fontsize=FONT_SIZE, loc="left")
    weight_colour_bar(shown, bars[0])
    return fig


def targets_figure(labels: np.ndarray, image: np.ndarray | None = None, **settings: float | str) -> np.ndarray:
    """`targets_plot` (settings w0, sigma, balance, gap, kind, border) rendered to H x W x 3
    uint8 RGB."""
    return render(targets_plot(labels, image=image, **settings))


def figure_settings(targets_config: TargetsConfig) -> dict[str, float | str]:
    """The `targets_plot` settings of a `[targets]` config: the figure shows what training
    with it teaches."""
    t = targets_config
    return {"w0": t.w0, "sigma": t.sigma, "balance": t.balance, "gap": t.gap, "kind": t.kind, "border": t.border}


def save_targets_figure(
    mask_path: str | os.PathLike,
    out_path: str | os.PathLike,
    targets_config: TargetsConfig,
    image_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Read a mask (and optionally its image), draw `targets_figure` with the settings of
    `targets_config` and write it as PNG, atomically; an existing `out_path` is replaced only
    with `overwrite`. A binary mask is split into cells first (`as_instances`), as training
    does. Returns the path written."""
    out_path = check_writable(out_path, overwrite)  # before the work, not after it
    mask_path = Path(mask_path)
    labels = as_instances(read_mask(mask_path), source=str(mask_path))
    image = None
    if image_path is not None:
        image = read_image(image_path)
        if image.shape[:2] != labels.shape:
            raise DataError(
                f"{image_path}: image is {image.shape[0]} x {image.shape[1]} but the mask "
                f"{mask_path.name} is {labels.shape[0]} x {labels.shape[1]}"
            )
    figure = targets_figure(labels, image=image, **figure_settings(targets_config))
    return write_png(out_path, figure, overwrite=overwrite)
