"""Full backpropagation through every network call: the exact gradient."""

from __future__ import annotations

import torch

from sdo_lightning.contracts import GradientMode, GradientPlan, Target


class FullBackprop(GradientMode):
    """Every network call keeps its graph: the exact gradient, and the memory of N graphs.

    Args:
        checkpoint: recompute each call's activations during backward (per-step activation
            checkpointing). Same gradient; memory of about one graph; about one more forward
            pass per call.
    """

    def __init__(self, checkpoint: bool = False) -> None:
        self.checkpoint = checkpoint

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        return GradientPlan(keep=(True,) * num_calls, checkpoint=self.checkpoint)
