"""Euler sampling of a rectified flow (SD3, FLUX.1), wrapping ``diffusers.FlowMatchEulerDiscreteScheduler``.

Notation (diffusers -> paper): ``sample`` x_t, ``model_output`` the velocity v_theta(x_t, t),
``sigmas`` the noise levels sigma_i (x_t = (1 - sigma) x_0 + sigma * noise), ``timesteps``
sigma_i * 1000. One step is

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_theta(x_i, t_i)

linear in x_i with coefficient 1: the skip path that carries the SDO gradient is the identity.
The schedule is diffusers': shifted sigmas (``shift``, or dynamic shifting with the ``mu`` the
backbone computes from the image sequence length), set as each model's pipeline sets them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from sdo_lightning.contracts import Solver, SolverState


class FlowMatchEuler(Solver):
    """Euler sampler of a flow-matching model.

    Args:
        num_inference_steps: number of network calls of a full trajectory (FLUX.1-schnell: 1-4;
            SD3 and FLUX.1-dev: 28-50).
        start_timestep: start sampling at this timestep (sigma * 1000) instead of from pure noise:
            the trajectory visits the timesteps ``<= start_timestep`` of the full schedule.
        shift: override the model's static shift (``shift`` of the scheduler config); with
            dynamic shifting the backbone's ``mu`` is used instead.
        scheduler_kwargs: overrides of the ``FlowMatchEulerDiscreteScheduler`` config.
    """

    scheduler_cls = FlowMatchEulerDiscreteScheduler
    predicts = "velocity"
    first_order = True

    def __init__(
        self,
        num_inference_steps: int = 28,
        start_timestep: float | None = None,
        shift: float | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        overrides = {**({"shift": shift} if shift is not None else {}), **(scheduler_kwargs or {})}
        super().__init__(num_inference_steps, start_timestep, overrides)
        self.shift = shift

    def set_timesteps(self, scheduler: Any, scheduler_config: dict[str, Any], device: torch.device | str | None) -> None:
        # what the model's pipeline passes: FLUX gives sigmas linspace(1, 1/N, N) and always mu;
        # SD3 gives no sigmas and mu only with dynamic shifting
        extra = dict(scheduler_config.get("sdo_set_timesteps") or {})
        kwargs: dict[str, Any] = {}
        n = self.num_inference_steps
        if extra.get("sigmas") == "linspace" and not scheduler.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / n, n)
        if scheduler.config.use_dynamic_shifting:
            if extra.get("mu") is None:
                raise ValueError(
                    "the scheduler uses dynamic shifting, which needs the mu its pipeline computes from the image "
                    "size; use a backbone that provides it (StableDiffusion3Backbone, FluxBackbone) or set "
                    "scheduler_kwargs: {use_dynamic_shifting: false}."
                )
            kwargs["mu"] = extra["mu"]
        scheduler.set_timesteps(n, device=device, **kwargs)

    def scale_model_input(self, x: Tensor, t: Tensor, state: SolverState) -> Tensor:
        return x  # the flow models read x_t as it is

    def step(self, model_output: Tensor, t: Tensor, x: Tensor, state: SolverState) -> Tensor:
        # diffusers computes the step in float32 and casts back to the model output's dtype
        return state.scheduler.step(model_output, t, x, generator=state.generator, return_dict=True).prev_sample
