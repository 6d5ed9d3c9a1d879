"""Differentiable augmentations that score an image through several random views of it.

:class:`DiffAugment` makes the augmented copies CLIP-guided editing scores (the authors' released
text-editing script scores CLIP on 20 DiffAugment copies of the image); :class:`Cutouts` makes
the random square crops their aesthetic script averages a predictor over. Both draw their random
parameters first, from the global torch generator as those scripts do, keep them in ``last``
(so a run can be replayed or checked), and then apply them with plain tensor ops that keep the
gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: the operations :class:`DiffAugment` knows, in the order it applies them
POLICIES = ("color", "translation", "resize", "cutout")


class DiffAugment:
    """DiffAugment (Zhao et al., 2020) on images in [0, 1], computed in [-1, 1] as diffusion
    models and the released scripts hold images (so a translated border or a cutout is gray,
    0 in [-1, 1], and a brightness shift of ``b`` moves [0, 1] pixels by ``b / 2``).

    Per copy: ``color`` adds a brightness ``b - 0.5``, scales the saturation (distance to the
    pixel's channel mean) by ``2 s`` and the contrast (distance to the image mean) by
    ``c + 0.5`` (``b, s, c ~ U[0, 1)``); ``translation`` shifts by whole pixels, up to 1/8 of the
    side each way, filling with 0; ``cutout`` zeroes a square of half the side centred at a
    random pixel (cut where it leaves the image). Per call: ``resize`` scales every copy by one
    ratio in [0.8, 1.2) (bilinear), padding a smaller image with 0 around it or keeping the
    top-left of a larger one.

    Args:
        copies: augmented copies per image.
        policy: comma-separated operations from ``color``, ``translation``, ``resize``, ``cutout``.
    """

    def __init__(self, copies: int = 20, policy: str = "color,translation,resize,cutout") -> None:
        ops = [p.strip() for p in policy.split(",") if p.strip()]
        unknown = sorted(set(ops) - set(POLICIES))
        if unknown or copies < 1:
            raise ValueError(f"DiffAugment needs copies >= 1 and a policy from {', '.join(POLICIES)}; got copies={copies}, "
                             f"unknown {unknown}.")
        self.copies = copies
        self.ops = [p for p in POLICIES if p in ops]
        self.last: dict[str, Any] = {}

    def draw(self, n: int, height: int, width: int, device: torch.device) -> dict[str, Any]:
        """The random parameters of ``n`` copies of ``height x width`` images."""
        params: dict[str, Any] = {}
        if "color" in self.ops:
            params["color"] = torch.rand(3, n, device=device)  # brightness, saturation, contrast
        if "translation" in self.ops:
            sy, sx = int(height * 0.125 + 0.5), int(width * 0.125 + 0.5)
            params["translation"] = torch.stack([torch.randint(-sy, sy + 1, (n,), device=device),
                                                 torch.randint(-sx, sx + 1, (n,), device=device)], 1)
        if "resize" in self.ops:
            params["resize"] = float(torch.rand(()) * 0.4 + 0.8)
        if "cutout" in self.ops:
            params["cutout"] = torch.stack([torch.randint(0, height, (n,), device=device),
                                            torch.randint(0, width, (n,), device=device)], 1)
        return params

    def __call__(self, images: Tensor) -> Tensor:
        """``(B * copies, C, H, W)`` in [0, 1]: rows ``i * copies ... (i + 1) * copies - 1`` are image ``i``'s copies."""
        x = images.repeat_interleave(self.copies, dim=0) * 2 - 1
        n, _, h, w = x.shape
        self.last = params = self.draw(n, h, w, x.device)
        if "color" in params:
            b, s, c = (p.to(x.dtype).view(-1, 1, 1, 1) for p in params["color"])
            x = x + (b - 0.5)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (s * 2) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (c + 0.5) + mean
        if "translation" in params:
            x = _shift(x, params["translation"])
        if "resize" in params:
            x = _rescale(x, params["resize"])
        if "cutout" in params:
            x = x * _cutout_mask(x, params["cutout"])
        return (x + 1) / 2


def _shift(x: Tensor, shifts: Tensor) -> Tensor:
    """Each image moved by its ``(dy, dx)`` whole pixels, the uncovered border 0."""
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1) - shifts[:, 0].view(n, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - shifts[:, 1].view(n, 1, 1)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)  # (n, h * w)
    moved = x.flatten(2).gather(2, index.unsqueeze(1).expand(-1, x.shape[1], -1)).view_as(x)
    return moved * inside.to(x.dtype)


def _rescale(x: Tensor, ratio: float) -> Tensor:
    size = x.shape[-1]
    new = int(ratio * size)
    resized = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
    if new < size:
        before = (size - new) // 2
        return F.pad(resized, (before, size - new - before, before, size - new - before))
    return resized[..., :size, :size]


def _cutout_mask(x: Tensor, centres: Tensor) -> Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    top = (centres[:, 0] - ch // 2).view(n, 1, 1)
    left = (centres[:, 1] - cw // 2).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cut = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return (~cut).unsqueeze(1).to(x.dtype)


class Cutouts:
    """Random square crops, each average-pooled to ``size x size``, as in CLIP-guided diffusion.

    A crop's side is ``int(r ** cut_power * (max - min) + min)`` (``r ~ U[0, 1)``, ``max`` the
    image's short side, ``min`` the smaller of it and ``size``): a ``cut_power`` below 1 favours
    large crops. Its top-left corner is uniform over the positions that keep it inside. All
    images of a batch share the crops of one call.

    Args:
        size: the side the crops are pooled to (the CLIP tower's input size).
        count: crops per call.
        cut_power: the exponent above.
    """

    def __init__(self, size: int, count: int = 16, cut_power: float = 1.0) -> None:
        if count < 1 or cut_power <= 0:
            raise ValueError(f"Cutouts needs count >= 1 and cut_power > 0, got count={count}, cut_power={cut_power}.")
        self.size, self.count, self.cut_power = size, count, cut_power
        self.last: list[tuple[int, int, int]] = []

    def __call__(self, images: Tensor) -> Tensor:
        """``(count, B, C, size, size)``: crop ``k`` of every image."""
        h, w = images.shape[-2:]
        largest, smallest = min(h, w), min(h, w, self.size)
        self.last = []
        crops = []
        for _ in range(self.count):
            side = int(torch.rand(()) ** self.cut_power * (largest - smallest) + smallest)
            left = int(torch.randint(0, w - side + 1, ()))
            top = int(torch.randint(0, h - side + 1, ()))
            self.last.append((side, top, left))
            crops.append(F.adaptive_avg_pool2d(images[..., top:top + side, left:left + side], self.size))
        return torch.stack(crops)
