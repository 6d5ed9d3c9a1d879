"""DRTune-style gradient (Wu et al. 2024, "Deep Reward Supervisions for Tuning Text-to-Image
Diffusion Models"): keep the graph of a sparse set of K network calls and stop the gradient at
the denoiser's input on those calls.

Notation (one trajectory of N calls, call i reads x_i and the solver steps to x_{i+1}):

    x_{i+1} = step(eps_i, x_i),   eps_i = net_theta(sg(x_i), t_i)   for i in the kept set S
                                  eps_i = sg(net_theta(x_i, t_i))   otherwise

so the gradient of J(x_0) reaches the parameters through each kept call's direct dependence on
theta (its own term of the paper's Eq. 16, carried to x_0 by the solver's skip arithmetic), and
never through a network Jacobian d eps / d x. The kept set is K calls spaced N // K apart, from a
random offset in ``0..N // K - 1`` drawn per optimizer step (DRTune's choice), or from offset 0.
"""

from __future__ import annotations

import torch

from sdo_lightning.contracts import GradientMode, GradientPlan, Target


class DRTune(GradientMode):
    """Keep K evenly spaced network calls; their networks read a detached input (DRTune).

    For parameters (LoRA, a prompt or class embedding) the gradient is the sum of the K kept
    calls' stop-gradient terms of Eq. 16, each carried to x_0 through the solver arithmetic only;
    ``N / K`` times its expectation over the offset is Eq. 16 when K divides N. Memory: K network
    graphs (or their inputs, with ``checkpoint``).

    For latent targets (x_T, x_t) no network Jacobian is ever used, whatever K: the gradient is
    the skip path alone, ``(d x_0 / d x_k with every network output held constant)^T dJ/dx_0``.
    For DDIM with eta 0 that is ``prod_i sqrt(abar_{i+1} / abar_i) * dJ/dx_0``, a rescaled copy
    of the gradient at x_0 (``sqrt(1 / abar_T)`` from pure noise); for a rectified flow with
    Euler steps it is dJ/dx_0 itself. It is offered for latents to measure that skip term (what
    SDO adds to it is its one call's Jacobian), not as a recommended latent optimizer.

    Args:
        k: number of kept calls (clipped to the trajectory length).
        random_offset: draw the first kept call uniformly from ``0..N // K - 1`` once per
            optimizer step; False keeps calls ``0, N // K, 2 N // K, ...`` every step.
        checkpoint: recompute the kept calls' activations in backward (activation checkpointing).
    """

    def __init__(self, k: int = 5, random_offset: bool = True, checkpoint: bool = False) -> None:
        if k < 1:
            raise ValueError(f"DRTune k must be >= 1 (the number of kept calls), got {k}.")
        self.k = k
        self.random_offset = random_offset
        self.checkpoint = checkpoint

    def kept_calls(self, num_calls: int, offset: int = 0) -> list[int]:
        """The kept call indices for a trajectory of ``num_calls`` calls starting at ``offset``."""
        k = min(self.k, num_calls)
        stride = num_calls // k
        return [offset + i * stride for i in range(k)]

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        k = min(self.k, num_calls)
        stride = num_calls // k
        offset = int(torch.randint(0, stride, (1,), generator=generator)) if self.random_offset and stride > 1 else 0
        kept = set(self.kept_calls(num_calls, offset))
        keep = tuple(i in kept for i in range(num_calls))
        return GradientPlan(keep=keep, detach_kept_inputs=True, checkpoint=self.checkpoint)
