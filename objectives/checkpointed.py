"""Any objective under activation checkpointing: its network's activations are not held for backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sdo_lightning.contracts import Objective


class Checkpointed(Objective):
    """Run ``objective`` under activation checkpointing (``torch.utils.checkpoint``).

    The reward network's activations (a CLIP or classifier forward on full-size images) are
    dropped after the forward pass and recomputed in backward: the same per-sample losses and
    gradient, the memory of the images instead of the network's activations, for one more forward
    pass of the objective. The random draws of the objective (augmented copies) are replayed in the
    recomputation, so they match the forward pass. ``terms`` are the wrapped objective's.

    Args:
        objective: the objective to run under checkpointing.
    """

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        if torch.is_grad_enabled():
            losses = checkpoint(self.objective, images, batch, use_reentrant=False)
        else:  # nothing is held for backward anyway
            losses = self.objective(images, batch)
        # copied now: the recomputation in backward fills the wrapped objective's terms again
        self.terms = dict(self.objective.terms)
        return losses
