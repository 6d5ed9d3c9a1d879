"""Fidelity objectives: stay close to the unoptimized sample."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sdo_lightning.contracts import Objective


class L2Fidelity(Objective):
    """Mean squared distance between each image and its unoptimized version.

    The unoptimized images come from ``batch["initial_images"]`` (the LightningModules add them).
    Logs ``l2`` (the root of the per-pixel mean, i.e. an RMS distance in [0, 1] units).
    """

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        if "initial_images" not in batch:
            raise KeyError("L2Fidelity needs batch['initial_images'] (the unoptimized samples).")
        mse = (images - batch["initial_images"]).pow(2).flatten(1).mean(1)
        self.terms = {"l2": mse.detach().sqrt()}
        return mse
