"""Synthetic fluorescence microscopy with touching cells, for the demo and the tests.

The images imitate stained nuclei: cells in clusters that touch (so that separating them
matters, the point of the paper's weight map), varied sizes and irregular outlines, textured
interiors (chromatin), a blurring point spread function, uneven illumination and shot noise.
The masks are instance labels. Everything is drawn from one seed: same seed, same files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import measure
from skimage.segmentation import find_boundaries

from .errors import OutputExistsError
from .io import write_tiff


def _cell_field(shape, center, radius, elongation, angle, harmonics, window):
    """Inside-ness of one irregular ellipse over a window: > 0 inside, 1 at the centre."""
    (y0, y1), (x0, x1) = window
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / elongation
    v = (-dx * sin + dy * cos) * elongation
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    # Low harmonics of the outline make lobed, dented nuclei instead of perfect ellipses.
    wobble = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in harmonics)
    return 1.0 - rho / (radius * wobble)


def synth_labels(shape: tuple[int, int], rng: np.random.Generator, density: float = 1.0) -> np.ndarray:
    """Instance labels of clustered, touching cells (0 background, 1..N cells)."""
    h, w = shape
    scale = np.clip(min(h, w) / 256, 0.6, 1.5)
    mean_radius = 9.0 * scale
    n_cells = max(2, int(density * h * w / (np.pi * mean_radius**2) * 0.28))
    labels = np.zeros(shape, np.int32)
    best = np.zeros(shape, np.float32)
    placed = 0
    while placed < n_cells:
        cluster = min(int(rng.integers(1, 6)), n_cells - placed)
        center = rng.uniform([0, 0], [h, w])
        for _ in range(cluster):
            radius = float(mean_radius * rng.uniform(0.65, 1.4))
            # Members of a cluster sit about one radius apart: they touch and squeeze.
            c = center + rng.normal(0, 1.1 * mean_radius, 2) if placed else center
            elongation = float(rng.uniform(1.0, 1.5))
            angle = float(rng.uniform(0, np.pi))
            harmonics = [(k, float(rng.uniform(0, 0.08)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 5)]
            reach = int(np.ceil(radius * elongation * 1.3)) + 1
            y0, y1 = int(max(0, c[0] - reach)), int(min(h, c[0] + reach + 1))
            x0, x1 = int(max(0, c[1] - reach)), int(min(w, c[1] + reach + 1))
            if y1 <= y0 or x1 <= x0:
                continue
            field = _cell_field(shape, c, radius, elongation, angle, harmonics, ((y0, y1), (x0, x1)))
            window = (slice(y0, y1), slice(x0, x1))
            # Where cells overlap, the pixel goes to the cell it is deepest inside: the
            # boundary between squeezed neighbours is where real touching nuclei meet.
            wins = field > best[window]
            placed += 1
            labels[window][wins] = placed
            best[window][wins] = field[wins]
    # A cell cut in two by a neighbour keeps its largest piece; specks go; then number 1..N.
    pieces = measure.label(labels, background=0, connectivity=1)
    piece_area = np.bincount(pieces.ravel())
    piece_cell = np.zeros_like(piece_area)
    piece_cell[pieces.ravel()] = labels.ravel()
    order = np.lexsort((-piece_area[1:], piece_cell[1:])) + 1  # by cell, largest piece first
    first = np.r_[True, piece_cell[order][1:] != piece_cell[order][:-1]]
    keep = np.zeros(piece_area.size, bool)
    keep[order[first]] = True
    keep &= piece_area >= 12
    keep[0] = False
    labels = np.where(keep[pieces], labels, 0)
    kept = np.unique(labels)
    kept = kept[kept > 0]
    lookup = np.zeros(labels.max() + 1, np.int32)
    lookup[kept] = np.arange(1, kept.size + 1)
    return lookup[labels]


def render_fluorescence(labels: np.ndarray, rng: np.random.Generator, bit_depth: int = 8) -> np.ndarray:
    """A fluorescence image of `labels`: textured cells, blur, uneven background, noise."""
    h, w = labels.shape
    n = int(labels.max())
    brightness = np.concatenate([[0.0], rng.uniform(0.45, 1.0, n)]).astype(np.float32)
    signal = brightness[labels]
    # Chromatin texture: band-limited noise modulating each nucleus.
    texture = ndimage.gaussian_filter(rng.normal(size=(h, w)).astype(np.float32), 1.5)
    texture /= texture.std() + 1e-6
    signal = signal * (1.0 + 0.18 * texture)
    # Nuclei are dimmer at their rim, also where they meet a neighbour: a faint seam, as in
    # real touching nuclei, that the network must learn to find.
    inside = ndimage.distance_transform_edt(~find_boundaries(labels, mode="inner")).astype(np.float32)
    signal *= 0.6 + 0.4 * np.clip(inside / 4.0, 0, 1)
    signal = ndimage.gaussian_filter(signal, 1.2)  # point spread function
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * yy / h + np.sin(angle) * xx / w)
    background = 0.08 + 0.05 * ramp + 0.03 * ndimage.gaussian_filter(rng.normal(size=(h, w)), 25) * 25
    gain = rng.uniform(0.6, 1.0)
    expected = np.clip(gain * (signal + background.astype(np.float32)), 0, None)
    photons = 300.0
    noisy = rng.poisson(expected * photons).astype(np.float32) / photons
    noisy += rng.normal(0, 0.01, size=(h, w)).astype(np.float32)  # read noise
    top = 255 if bit_depth == 8 else 65535
    offset = 0 if bit_depth == 8 else rng.uniform(500, 3000)  # camera offset
    span = top * 0.7 if bit_depth == 8 else rng.uniform(8000, 40000)
    image = np.clip(offset + noisy * span, 0, top)
    return image.astype(np.uint8 if bit_depth == 8 else np.uint16)


def synth_sample(shape: tuple[int, int], seed: int, bit_depth: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """One (image, labels) pair; the same seed gives the same pair."""
    rng = np.random.default_rng(seed)
    labels = synth_labels(shape, rng)
    return render_fluorescence(labels, rng, bit_depth), labels


def write_dataset(
    out: str | os.PathLike, count: int = 8, shape: tuple[int, int] = (256, 256), seed: int = 0,
    bit_depth: int = 8, overwrite: bool = False,
) -> list[Path]:
    """Write `count` pairs in the folder format: OUT/images/cell_000.tif, OUT/masks/cell_000.tif."""
    out = Path(out)
    names = [f"cell_{i:03d}.tif" for i in range(count)]
    targets = [out / sub / name for name in names for sub in ("images", "masks")]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{existing[0]} exists ({len(existing)} files would be replaced); pass --overwrite"
        )
    seeds = np.random.SeedSequence(seed).spawn(count)
    written = []
    for name, child in zip(names, seeds):
        image, labels = synth_sample(shape, int(child.generate_state(1)[0]), bit_depth)
        # zlib keeps the shipped sample small; every TIFF reader handles it.
        write_tiff(out / "images" / name, image, overwrite=True, compression="zlib")
        mask_dtype = np.uint16 if labels.max() < 65536 else np.uint32
        write_tiff(out / "masks" / name, labels.astype(mask_dtype), overwrite=True, compression="zlib")
        written.append(out / "images" / name)
    return written
