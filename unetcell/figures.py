"""Pictures of what the network is taught, like the paper's Figure 3: the image, the class map
with the gaps carved between touching cells, and the weight map of eq. 2 as a heat map.

`targets_figure` draws the panels side by side with titles and a colour bar for the weights;
`save_targets_figure` is what `unetcell targets MASK -o PNG` runs. Pure numpy: the colour map
(viridis, from its anchor colours) and the letters (a 5 x 7 pixel font) are built here, so
drawing needs neither matplotlib nor a font file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import TargetsConfig
from .errors import DataError
from .files import check_writable
from .io import read_image, read_mask, write_png
from .overlay import display_stride, to_display
from .targets import as_instances, carve_gaps, weight_map

# viridis at 0, 1/8, ..., 1 (matplotlib's values, rounded): perceptually uniform, readable in
# gray and by colour-blind readers; linear interpolation between anchors is indistinguishable.
_VIRIDIS_ANCHORS = np.array(
    [
        (68, 1, 84), (71, 44, 122), (59, 82, 139), (44, 114, 142), (33, 145, 140),
        (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
    ],
    np.float64,
)
VIRIDIS = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS_ANCHORS)), c)
     for c in _VIRIDIS_ANCHORS.T],
    axis=-1,
).round().astype(np.uint8)

GAP_COLOUR = (255, 255, 255)  # carved gap pixels: white between the coloured cells
PAPER = (255, 255, 255)  # figure background
INK = (0, 0, 0)  # text

# Panels are scaled up by whole pixels to at least this edge (small tiles stay readable) and
# shown on an integer stride beyond MAX_EDGE (a whole slide stays a few megapixels).
MIN_EDGE = 384
MAX_EDGE = 2048


# --- colour ---------------------------------------------------------------------------------


def colormap(values: np.ndarray, vmax: float, lut: np.ndarray = VIRIDIS) -> np.ndarray:
    """`values` in 0..vmax as uint8 RGB through a 256-entry lookup table."""
    scale = (len(lut) - 1) / vmax if vmax > 0 else 0.0
    index = np.clip(np.rint(np.asarray(values, np.float64) * scale), 0, len(lut) - 1)
    return lut[index.astype(np.intp)]


def instance_colours(labels: np.ndarray) -> np.ndarray:
    """Each cell a light colour of its own (hues spaced by the golden ratio, so neighbouring
    ids differ strongly), background black; uint8 RGB."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    hue = (ids * 0.6180339887) % 1.0
    value, saturation = 0.95, 0.6
    # HSV to RGB: channel n is value * (1 - saturation * clip(min(k, 4 - k), 0, 1)) with
    # k = (n + 6 hue) mod 6, for n = 5, 3, 1 (red, green, blue).
    k = (np.array([5, 3, 1])[None, :] + 6 * hue[:, None]) % 6
    table = value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))
    table = (table * 255).round().astype(np.uint8)
    table[ids == 0] = 0
    return table[np.searchsorted(ids, labels)]


# --- letters --------------------------------------------------------------------------------

# A 5 x 7 pixel font: each glyph is seven rows of five pixels, '#' ink and '.' paper.
_GLYPHS = """
A .###. #...# #...# ##### #...# #...# #...#
B ####. #...# #...# ####. #...# #...# ####.
C .###. #...# #.... #.... #.... #...# .###.
D ###.. #..#. #...# #...# #...# #..#. ###..
E ##### #.... #.... ####. #.... #.... #####
F ##### #.... #.... ####. #.... #.... #....
G .###. #...# #.... #.### #...# #...# .####
H #...# #...# #...# ##### #...# #...# #...#
I .###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
J ..### ...#. ...#. ...#. ...#. #..#. .##..
K #...# #..#. #.#.. ##... #.#.. #..#. #...#
L #.... #.... #.... #.... #.... #.... #####
M #...# ##.## #.#.# #.#.# #...# #...# #...#
N #...# #...# ##..# #.#.# #..## #...# #...#
O .###. #...# #...# #...# #...# #...# .###.
P ####. #...# #...# ####. #.... #.... #....
Q .###. #...# #...# #...# #.#.# #..#. .##.#
R ####. #...# #...# ####. #.#.. #..#. #...#
S .#### #.... #.... .###. ....# ....# ####.
T ##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..
U #...# #...# #...# #...# #...# #...# .###.
V #...# #...# #...# #...# #...# .#.#. ..#..
W #...# #...# #...# #.#.# #.#.# #.#.# .#.#.
X #...# #...# .#.#. ..#.. .#.#. #...# #...#
Y #...# #...# .#.#. ..#.. ..#.. ..#.. ..#..
Z ##### ....# ...#. ..#.. .#... #.... #####
0 .###. #...# #..## #.#.# ##..# #...# .###.
1 ..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.
2 .###. #...# ....# ...#. ..#.. .#... #####
3 ##### ...#. ..#.. ...#. ....# #...# .###.
4 ...#. ..##. .#.#. #..#. ##### ...#. ...#.
5 ##### #.... ####. ....# ....# #...# .###.
6 ..##. .#... #.... ####. #...# #...# .###.
7 ##### ....# ...#. ..#.. .#... .#... .#...
8 .###. #...# #...# .###. #...# #...# .###.
9 .###. #...# #...# .#### ....# ...#. .##..
. ..... ..... ..... ..... ..... .##.. .##..
, ..... ..... ..... ..... .##.. ..#.. .#...
= ..... ..... ##### ..... ##### ..... .....
- ..... ..... ..... ##### ..... ..... .....
+ ..... ..#.. ..#.. ##### ..#.. ..#.. .....
( ...#. ..#.. .#... .#... .#... ..#.. ...#.
) .#... ..#.. ...#. ...#. ...#. ..#.. .#...
: ..... .##.. .##.. ..... .##.. .##.. .....
/ ..... ....# ...#. ..#.. .#... #.... .....
% ##... ##..# ...#. ..#.. .#... #..## ...##
"""
FONT = {
    line[0]: np.array([[c == "#" for c in row] for row in line[2:].split()], bool)
    for line in _GLYPHS.strip().splitlines()
}
FONT[" "] = np.zeros((7, 5), bool)


def text_size(text: str, scale: int) -> tuple[int, int]:
    """(height, width) in pixels of `text` at `scale` (one font pixel = scale x scale)."""
    return 7 * scale, max(len(text) * 6 - 1, 0) * scale


def draw_text(canvas: np.ndarray, text: str, top: int, left: int, scale: int,
              colour: tuple[int, int, int] = INK) -> None:
    """Write `text` (upper-cased; characters the font lacks show as blanks) onto an RGB
    canvas in place, clipped at its edges."""
    for i, char in enumerate(text.upper()):
        glyph = np.kron(FONT.get(char, FONT[" "]), np.ones((scale, scale), bool))
        y, x = top, left + i * 6 * scale
        h = min(glyph.shape[0], canvas.shape[0] - y)
        w = min(glyph.shape[1], canvas.shape[1] - x)
        if h > 0 and w > 0 and y >= 0 and x >= 0:
            canvas[y : y + h, x : x + w][glyph[:h, :w]] = colour


def _fitting_scale(texts: list[str], width: int, largest: int) -> int:
    """The largest text scale (1..largest) at which every text fits in `width` pixels."""
    for scale in range(largest, 1, -1):
        if all(text_size(t, scale)[1] <= width for t in texts):
            return scale
    return 1


# --- the figure -----------------------------------------------------------------------------


def _block_max(a: np.ndarray, step: int) -> np.ndarray:
    """Maximum over step x step blocks: a one-pixel gap or a thin ridge of heavy weight stays
    visible when a large image is shown smaller (a plain stride would skip it)."""
    if step == 1:
        return a
    h, w = a.shape
    padded = np.pad(a, ((0, -h % step), (0, -w % step)), mode="edge")
    return padded.reshape(padded.shape[0] // step, step, padded.shape[1] // step, step).max(axis=(1, 3))


def colour_bar(height: int, width: int, vmax: float, scale: int) -> np.ndarray:
    """A vertical viridis bar, 0 at the bottom and vmax at the top, with five labelled ticks."""
    labels = [f"{vmax * i / 4:.3g}" for i in range(5)]
    label_width = max(text_size(t, scale)[1] for t in labels)
    tick = 3 * scale
    bar = np.full((height, width + tick + scale * 2 + label_width, 3), PAPER, np.uint8)
    ramp = np.linspace(vmax, 0, height)[:, None].repeat(width, axis=1)
    bar[:, :width] = colormap(ramp, vmax)
    text_h = text_size("0", scale)[0]
    for i, label in enumerate(labels):
        y = int(round((height - 1) * (1 - i / 4)))
        bar[max(y - scale // 2, 0) : y + (scale + 1) // 2 + 1, width : width + tick] = INK
        top = min(max(y - text_h // 2, 0), height - text_h)
        draw_text(bar, label, top, width + tick + scale * 2, scale)
    return bar


def targets_figure(
    labels: np.ndarray,
    image: np.ndarray | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    balance: float = 1.0,
    gap: int = 1,
) -> np.ndarray:
    """What the network is taught for one instance label image, as uint8 RGB (paper Fig. 3).

    Panels side by side: the image (when given: H x W or H x W x C, raw or normalised, shown
    by `overlay.to_display`), the class map (each cell a colour of its own on black, the gap
    pixels carved between touching cells white), and the weight map `weight_map(labels, w0,
    sigma, balance, gap)` in viridis with a colour bar from 0 to its maximum. Titles state the
    settings, the number of cells and carved gap pixels.

    Small images are scaled up by whole pixels so the letters fit; images with an edge longer
    than MAX_EDGE are shown on an integer stride, the gaps and the weights by block maxima so
    that one-pixel gaps stay visible.
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
    weights = weight_map(labels, w0=w0, sigma=sigma, balance=balance, gap=gap)
    gaps = (labels != 0) & (carved == 0)
    vmax = float(weights.max()) if weights.size else 0.0

    height, width = labels.shape
    step = display_stride(height, width, MAX_EDGE)
    zoom = max(1, -(-MIN_EDGE // max(-(-height // step), -(-width // step), 1)))

    def show(rgb: np.ndarray) -> np.ndarray:
        return np.kron(rgb, np.ones((zoom, zoom, 1), np.uint8)) if zoom > 1 else rgb

    panels, titles = [], []
    if image is not None:
        panels.append(show(to_display(np.asarray(image)[::step, ::step])))
        titles.append(["image"])
    class_rgb = instance_colours(carved[::step, ::step])
    class_rgb[_block_max(gaps, step)] = GAP_COLOUR
    panels.append(show(class_rgb))
    cells = int(np.count_nonzero(np.unique(labels)))
    titles.append([f"classes, gap {gap} px", f"{cells} cells, {int(gaps.sum())} gap px"])
    panels.append(show(colormap(_block_max(weights, step), vmax)))
    titles.append([f"weights w0={w0:g} sigma={sigma:g}", f"balance {balance:g}, max {vmax:.3g}"])

    panel_h, panel_w = panels[-1].shape[:2]
    scale = _fitting_scale([t for lines in titles for t in lines], panel_w, largest=max(2, panel_w // 160))
    margin = 6 * scale
    line_h = text_size("A", scale)[0] + 3 * scale
    title_h = 2 * line_h
    bar = colour_bar(panel_h, max(4 * scale, panel_w // 24), vmax, scale)

    fig_w = margin + sum(p.shape[1] + margin for p in panels) + bar.shape[1] + margin
    fig_h = margin + title_h + panel_h + margin
    fig = np.full((fig_h, fig_w, 3), PAPER, np.uint8)
    x = margin
    for panel, lines in zip(panels, titles):
        for i, line in enumerate(lines):
            draw_text(fig, line, margin + i * line_h, x, scale)
        fig[margin + title_h : margin + title_h + panel_h, x : x + panel.shape[1]] = panel
        x += panel.shape[1] + margin
    fig[margin + title_h : margin + title_h + panel_h, x : x + bar.shape[1]] = bar
    return fig


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
    figure = targets_figure(
        labels, image=image, w0=targets_config.w0, sigma=targets_config.sigma,
        balance=targets_config.balance, gap=targets_config.gap,
    )
    return write_png(out_path, figure, overwrite=overwrite)
