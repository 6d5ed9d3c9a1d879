"""The scikit-learn digits data set as image tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits_images(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's 1797 digits as ``(images, labels)``.

    ``images`` is a float tensor of shape ``(N, 1, size, size)`` with values in [0, 1]
    (the raw 0..16 pixel values divided by 16); ``labels`` is a long tensor of shape ``(N,)``.
    For ``size != 8`` the 8x8 originals are resized with bilinear interpolation (no antialiasing).
    """
    from sklearn.datasets import load_digits

    if int(size) < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    size = int(size)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images.clamp_(0.0, 1.0).contiguous(), labels
