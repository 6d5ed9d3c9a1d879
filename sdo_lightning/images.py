"""Image grids for people to look at: PNG files and TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdo_lightning import atomic


def make_grid(images: Tensor, nrow: int = 8, pad: int = 2, scale: int = 1) -> Tensor:
    """Tile ``(B, C, H, W)`` images in [0, 1] into one ``(C, H', W')`` image, white padding."""
    images = images.detach().float().clamp(0, 1).cpu()
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(b):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def save_labelled_rows(rows: list[tuple[str, Tensor]], path: str | Path, nrow: int = 8) -> Path:
    """Write a PNG with one labelled grid per ``(label, images)`` entry, top to bottom."""
    from PIL import Image, ImageDraw

    kind = image_format(path)
    h = rows[0][1].shape[-1]
    scale = max(1, 64 // h)  # small images (digits) are enlarged so a person can see them
    grids = [(label, make_grid(images, nrow, scale=scale)) for label, images in rows]
    label_h = 14
    width = max(g.shape[-1] for _, g in grids)
    canvas = Image.new("RGB", (width, sum(g.shape[1] + label_h for _, g in grids)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, grid in grids:
        draw.text((4, y + 1), label, fill="black")
        y += label_h
        array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        canvas.paste(Image.fromarray(array), (0, y))
        y += grid.shape[1]
    path = Path(path)
    with atomic.replacing(path) as tmp:
        canvas.save(tmp, format=kind)
    return path


def image_format(path: str | Path) -> str:
    """The PIL format a file name asks for (``.png`` -> PNG), or a ValueError naming the fix."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    found = Image.registered_extensions().get(suffix)
    if found is None or found not in Image.SAVE:
        raise ValueError(f"cannot write an image to {str(path)!r}: {suffix or 'no extension'} is not an image file type; "
                         "give a file name ending in .png (or .jpg, .webp).")
    return found


def save_before_after(before: Tensor, after: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Write a PNG with the ``before`` grid above the ``after`` grid, each labelled."""
    return save_labelled_rows([("before", before), ("after", after)], path, nrow)
