"""DPM-Solver++ multistep (Lu et al., 2022), wrapping ``diffusers.DPMSolverMultistepScheduler``.

Notation (diffusers -> paper): ``model_outputs`` the history of data predictions x0_hat at the
last ``solver_order`` steps, ``lambda_t`` log(alpha_t / sigma_t). The scheduler keeps that history
and a step index; both live in the fresh scheduler of each trajectory's ``SolverState``. The
kept network call's output legitimately reaches later steps through the history: that is
still one network graph.
"""

from __future__ import annotations

from typing import Any

from diffusers import DPMSolverMultistepScheduler
from torch import Tensor

from sdo_lightning.contracts import Solver, SolverState


class DPMSolverPlusPlus(Solver):
    """DPM-Solver++ multistep sampler (default: 2M, i.e. second order).

    Args:
        num_inference_steps: number of network calls of a full trajectory.
        order: solver order, 1 (equivalent to DDIM), 2 (2M, default) or 3.
        start_timestep: start sampling at this training timestep instead of from pure noise.
        scheduler_kwargs: overrides of the ``DPMSolverMultistepScheduler`` config.
    """

    scheduler_cls = DPMSolverMultistepScheduler
    default_overrides = {"algorithm_type": "dpmsolver++", "thresholding": False}

    def __init__(
        self,
        num_inference_steps: int = 20,
        order: int = 2,
        start_timestep: int | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"DPMSolverPlusPlus order must be 1, 2 or 3, got {order}.")
        super().__init__(num_inference_steps, start_timestep, {"solver_order": order, **(scheduler_kwargs or {})})
        self.order = order

    def step(self, model_output: Tensor, t: Tensor, x: Tensor, state: SolverState) -> Tensor:
        return state.scheduler.step(model_output, t, x, generator=state.generator, return_dict=True).prev_sample
