"""Truncated backpropagation: the last K network calls keep their graph (DRaFT-K, AlignProp).

The latent is detached before the first kept call, so no gradient reaches earlier steps:
with K fixed this is DRaFT-K / AlignProp-K, K=1 is AlignProp-1 (DRaFT-1), and with K drawn
uniformly from 1..N per optimizer step it is AlignProp's randomized truncation.
"""

from __future__ import annotations

import torch

from sdo_lightning.contracts import GradientMode, GradientPlan, Target


class TruncatedBackprop(GradientMode):
    """Backpropagate through the last K network calls only.

    Args:
        k: number of final calls that keep their graph (clipped to the trajectory length).
            Ignored when ``random_k`` is True.
        random_k: draw K uniformly from ``1..N`` once per optimizer step (AlignProp-uniform).
        checkpoint: activation checkpointing for the kept calls.
    """

    def __init__(self, k: int = 1, random_k: bool = False, checkpoint: bool = False) -> None:
        if k < 1:
            raise ValueError(f"TruncatedBackprop k must be >= 1, got {k}.")
        self.k = k
        self.random_k = random_k
        self.checkpoint = checkpoint

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        if self.random_k:
            k = int(torch.randint(1, num_calls + 1, (1,), generator=generator))
        else:
            k = min(self.k, num_calls)
        first = num_calls - k
        if target.kind == "latent" and first > target.first_call:
            raise ValueError(
                f"TruncatedBackprop keeps only the last {k} of {num_calls} calls, so no gradient "
                "reaches a latent read by the first call; use ShortcutGradient or FullBackprop for "
                "latent targets (or k equal to the number of steps)."
            )
        keep = tuple(i >= first for i in range(num_calls))
        return GradientPlan(keep=keep, checkpoint=self.checkpoint, detach_before=first if first > 0 else None)
