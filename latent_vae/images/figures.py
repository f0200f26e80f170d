"""Pictures for people to look at: error maps, captioned strips and grids of images."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def error_map(original: np.ndarray, reconstruction: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """uint8 HxWx3 absolute difference, amplified by `gain` so small errors are visible."""
    difference = np.abs(original.astype(np.float32) - reconstruction.astype(np.float32)) * gain
    return np.clip(difference, 0, 255).astype(np.uint8)


def image_strip(images: Sequence[Image.Image | np.ndarray], labels: Sequence[str] | None = None, gap: int = 4) -> Image.Image:
    """Images side by side on white, with an optional caption above each."""
    pils = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
    caption = 14 if labels else 0
    width = sum(im.width for im in pils) + gap * (len(pils) - 1)
    height = max(im.height for im in pils) + caption
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    x = 0
    for i, im in enumerate(pils):
        strip.paste(im.convert("RGB"), (x, caption))
        if labels:
            # each caption drawn on a canvas of its column's width, so a long one is clipped, not overlapping
            label = Image.new("RGB", (im.width, caption), (255, 255, 255))
            ImageDraw.Draw(label).text((2, 1), labels[i], fill=(0, 0, 0))
            strip.paste(label, (x, 0))
        x += im.width + gap
    return strip


def image_grid(rows: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """Strips stacked vertically."""
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height for r in rows) + gap * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height + gap
    return grid
