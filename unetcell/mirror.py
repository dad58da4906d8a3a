"""The mirror rule for context beyond an image's border (paper section 2, Figure 2).

Training tiles and prediction tiles both extrapolate missing context by mirroring, with the
same rule, so that the network sees at prediction time what it saw in training. The rule is
numpy's "reflect" (the edge pixel is not repeated), applied again and again when the context
needed is larger than the image: the index sequence is periodic with period 2 (n - 1).
`tf.pad(mode="REFLECT")` cannot do that (it fails once the pad reaches the image size), so
the rule is an index map, usable with numpy indexing and with `tf.gather` alike.
"""

from __future__ import annotations

import numpy as np


def mirror_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices in 0..n-1 for the positions start..stop-1 of a mirror-extended axis."""
    positions = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(positions)
    period = 2 * (n - 1)
    folded = np.mod(positions, period)
    return np.where(folded < n, folded, period - folded)


def mirror_window(array: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """array[top:top+height, left:left+width] where the window may reach past the borders,
    filled by mirroring. The window is a view-free copy; in-bounds windows are plain slices."""
    h, w = array.shape[:2]
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return array[top:top + height, left:left + width]
    rows = mirror_indices(top, top + height, h)
    cols = mirror_indices(left, left + width, w)
    return array[rows[:, None], cols[None, :]]
