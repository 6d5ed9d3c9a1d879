"""Latent-consistency multistep sampling (Luo et al., 2023), wrapping ``diffusers.LCMScheduler``.

Notation (diffusers -> paper): ``denoised`` = c_skip * x_t + c_out * x0_hat, the consistency
function's output. Every step but the last re-noises it to the next timestep with fresh noise,
drawn here from the trajectory's generator so samples and gradients are reproducible.
Use it with an LCM-distilled model (or LCM-LoRA); on other models it gives poor samples.
"""

from __future__ import annotations

from typing import Any

from diffusers import LCMScheduler
from torch import Tensor

from sdo_lightning.contracts import Solver, SolverState


class LCMMultistep(Solver):
    """LCM multistep sampler.

    Args:
        num_inference_steps: number of network calls (LCMs use 1-8).
        original_inference_steps: the distillation schedule LCM timesteps are taken from.
        start_timestep: start sampling at this training timestep instead of from pure noise.
        scheduler_kwargs: overrides of the ``LCMScheduler`` config.
    """

    scheduler_cls = LCMScheduler
    default_overrides = {"clip_sample": False, "thresholding": False}
    for_lcm_models = True

    def __init__(
        self,
        num_inference_steps: int = 4,
        original_inference_steps: int = 50,
        start_timestep: int | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            num_inference_steps,
            start_timestep,
            {"original_inference_steps": original_inference_steps, **(scheduler_kwargs or {})},
        )
        self.original_inference_steps = original_inference_steps

    def nondeterminism(self) -> str | None:
        return "re-noises with fresh noise at every step (how LCM samples)"

    def step(self, model_output: Tensor, t: Tensor, x: Tensor, state: SolverState) -> Tensor:
        return state.scheduler.step(model_output, t, x, generator=state.generator, return_dict=True).prev_sample
