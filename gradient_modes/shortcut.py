"""Shortcut Diffusion Optimization (SDO): keep the graph of one network call.

Paper, section 4.2-4.3. For a latent x_k (Eq. 15, 18-19) the kept call is the first one that
reads x_k; the gradient reaches x_k through the kept call and the solver's skip path. For
anything every call reads (parameters, prompt embeddings; Eq. 16-17, 20) the sum over calls is
estimated by one call drawn uniformly per optimizer step: N times the expectation of that
single-call gradient is Eq. 16. With M calls drawn, each kept call's network reads a detached
input, so the gradient is the sum of the M calls' own terms (no cross terms between kept
calls) and N / M times its expectation is Eq. 16.
"""

from __future__ import annotations

from typing import Literal

import torch

from sdo_lightning.contracts import GradientMode, GradientPlan, Target


class ShortcutGradient(GradientMode):
    """SDO: only one network call per trajectory keeps its autograd graph.

    Args:
        num_kept: for parameter targets, keep this many calls drawn uniformly without
            replacement (default 1, the paper's choice). The gradient is the sum of the kept
            calls' Eq. 16 terms, so its expectation is ``num_kept / N`` times Eq. 16; a larger
            value lowers the variance at the cost of one network graph per kept call. Latent
            targets always keep one call.
        scale: for parameter targets, ``paper`` (default) uses the kept calls' gradient as it is,
            as the paper's practical form does (``num_kept / N`` of Eq. 16 in expectation);
            ``unbiased`` multiplies it by ``N / num_kept``, so its expectation is Eq. 16 itself,
            the scale full backprop and truncation have (it matters with gradient clipping and
            with optimizers that are not scale-invariant, e.g. SGD). Latent targets are exact
            either way (no draw) and ignore it.
        checkpoint: recompute the kept call's activations in backward (activation
            checkpointing): the same gradient, the memory of the call's inputs and output
            instead of its activations, for about one more forward pass of that call.
    """

    def __init__(self, num_kept: int = 1, scale: Literal["paper", "unbiased"] = "paper",
                 checkpoint: bool = False) -> None:
        if num_kept < 1:
            raise ValueError(f"ShortcutGradient num_kept must be >= 1, got {num_kept}.")
        if scale not in ("paper", "unbiased"):
            raise ValueError(f"ShortcutGradient scale must be 'paper' or 'unbiased', got {scale!r}.")
        self.num_kept = num_kept
        self.scale = scale
        self.checkpoint = checkpoint

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        if target.kind == "latent":
            if not 0 <= target.first_call < num_calls:
                raise ValueError(
                    f"the latent is first read by call {target.first_call}, outside the trajectory's "
                    f"{num_calls} calls."
                )
            kept = [target.first_call]
        else:
            m = min(self.num_kept, num_calls)
            # Draw from range(N): the paper's Fig. 5 uses randint(0, N) inclusive, which picks
            # no call at all in 1/(N+1) of the steps and makes backward fail.
            kept = torch.randperm(num_calls, generator=generator)[:m].tolist()
        keep = tuple(i in kept for i in range(num_calls))
        parameters = target.kind == "parameters"
        scale = num_calls / len(kept) if parameters and self.scale == "unbiased" else 1.0
        # Parameter targets: each kept call contributes its direct dependence on the parameters
        # only (Eq. 16's stop-gradient on the input); a no-op with one kept call.
        return GradientPlan(keep=keep, detach_kept_inputs=parameters, grad_scale=scale, checkpoint=self.checkpoint)
