"""DDIM (Song et al., 2021), wrapping ``diffusers.DDIMScheduler``.

Notation (diffusers -> paper): ``sample`` x_t, ``model_output`` u_theta(x_t, t) (epsilon by
default), ``alpha_prod_t`` alpha_bar_t, ``prev_sample`` x_{t-1}. With eta = 0 one step is

    x_{t-1} = sqrt(alpha_bar_{t-1}) * x0_hat + sqrt(1 - alpha_bar_{t-1}) * eps,
    x0_hat  = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)

which is linear in x_t: the skip path that carries the SDO gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from sdo_lightning.contracts import Solver, SolverState


class DDIM(Solver):
    """DDIM sampler (deterministic with ``eta=0``, stochastic with ``eta>0``).

    Args:
        num_inference_steps: number of network calls of a full trajectory.
        eta: weight of the fresh noise added at each step (0 = deterministic DDIM, 1 = DDPM-like).
            The noise is drawn from the trajectory's generator.
        start_timestep: start sampling at this training timestep instead of from pure noise.
        scheduler_kwargs: overrides of the ``DDIMScheduler`` config. ``clip_sample`` and
            ``thresholding`` default to False here because a saturated clamp zeroes the SDO
            gradient; setting them True warns.
        use_clipped_model_output: with ``clip_sample``, recompute epsilon from the clamped x_0
            (diffusers' option of the same name, which the authors' released scripts pass):
            ``eps = (x_t - sqrt(alpha_bar_t) * clamp(x0_hat)) / sqrt(1 - alpha_bar_t)``. Where the
            clamp saturates the step then keeps a skip path ``x_t / sqrt(1 - alpha_bar_t)``, where
            without it no gradient passes. Without ``clip_sample`` it changes nothing but rounding.
    """

    scheduler_cls = DDIMScheduler
    default_overrides = {"clip_sample": False, "thresholding": False}
    first_order = True

    def __init__(
        self,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        start_timestep: int | None = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        use_clipped_model_output: bool = False,
    ) -> None:
        super().__init__(num_inference_steps, start_timestep, scheduler_kwargs)
        self.use_clipped_model_output = use_clipped_model_output
        if not 0.0 <= eta <= 1.0:  # past 1 the step takes the square root of a negative variance
            raise ValueError(f"DDIM eta must be in [0, 1] (0 deterministic, 1 DDPM-like), got {eta}.")
        self.eta = eta

    def nondeterminism(self) -> str | None:
        return f"has eta={self.eta}; set eta: 0" if self.eta > 0 else None

    def step(self, model_output: Tensor, t: Tensor, x: Tensor, state: SolverState) -> Tensor:
        out = state.scheduler.step(
            model_output, t, x, eta=self.eta, generator=state.generator, return_dict=True,
            use_clipped_model_output=self.use_clipped_model_output,
        )
        return out.prev_sample

    def transition_kl(self, model_output: Tensor, reference_output: Tensor, t: Tensor, x: Tensor,
                      state: SolverState) -> Tensor | None:
        """KL divergence ``(B,)`` between the two Gaussian kernels of a stochastic DDIM step (eta > 0).

        A step is ``x_{t-1} = mu(u, x_t) + sigma_t z`` with ``z ~ N(0, I)`` and a ``sigma_t`` that does
        not depend on the network output ``u``, so ``KL = ||mu(u) - mu(u_ref)||^2 / (2 sigma_t^2)``.
        ``mu`` and ``sigma_t`` are read off the scheduler's own step (zero noise gives ``mu``, unit
        noise ``mu + sigma_t``), in float64. None for eta 0, and for a step with ``sigma_t = 0``
        (the last one, where the schedule ends at alpha_bar = 1): deterministic, no KL exists.
        """
        if self.eta == 0:
            return None
        x64 = x.detach().double()

        def moved(output: Tensor, noise: float) -> Tensor:
            variance_noise = torch.full_like(x64, noise)
            return state.scheduler.step(output.double(), t, x64, eta=self.eta, variance_noise=variance_noise,
                                        return_dict=True).prev_sample

        with torch.no_grad():
            reference = moved(reference_output, 0.0)
            sigma = moved(reference_output, 1.0) - reference
        if not bool((sigma > 0).all()):
            return None
        kl = (moved(model_output, 0.0) - reference).pow(2) / (2 * sigma.pow(2))
        return kl.flatten(1).sum(1).float()
