"""sdo-lightning plugins living in their own distribution: an objective here, a backbone in
:mod:`sdo_example_plugin.backbone`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sdo_lightning import Objective


class Brightness(Objective):
    """Mean pixel value of each image; negate it (``brighter: true``) to make images brighter.

    Args:
        brighter: lower loss for brighter images (True) or for darker ones (False).
    """

    def __init__(self, brighter: bool = True) -> None:
        super().__init__()
        self.brighter = brighter

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        mean = images.flatten(1).mean(1)
        self.terms = {"brightness": mean.detach()}
        return -mean if self.brighter else mean
