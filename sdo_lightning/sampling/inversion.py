"""Inversion: from a clean latent back to the noisy latent a trajectory starts from.

:func:`invert` picks the inversion that matches the solver: the Euler step of a rectified flow
run backwards for a solver of a rectified flow (``predicts == "velocity"``, e.g.
:class:`~sdo_lightning.solvers.FlowMatchEuler`), DDIM inversion otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from sdo_lightning.contracts import Solver
from sdo_lightning.sampling import Denoiser

#: the network outputs ``ddim_invert`` understands: the scheduler config's ``prediction_type``
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def invert(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Any,
    solver: Solver,
    scheduler_config: dict[str, Any] | None = None,
) -> Tensor:
    """The latent at the solver's first timestep whose trajectory ends at ``x0``, approximately:
    :func:`flow_invert` for a flow solver, :func:`ddim_invert` for the others."""
    solver = solver.unwrap()  # inversion walks a wrapped solver's schedule step by step
    inverse = flow_invert if solver.predicts == "velocity" else ddim_invert
    return inverse(denoiser, x0, cond, solver, scheduler_config)


@torch.no_grad()
def flow_invert(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Any,
    solver: Solver,
    scheduler_config: dict[str, Any] | None = None,
) -> Tensor:
    """Euler inversion of a rectified flow: walk the solver's sigmas from clean ``x0`` up to the
    first one.

    Sampling steps ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i)`` from the noisier level
    sigma_i to sigma_{i+1}. Its inverse needs v at the unknown x_i; as DDIM inversion does, the
    network is read at the known, cleaner latent instead:
    ``x_i = x_{i+1} + (sigma_i - sigma_{i+1}) v(x_{i+1}, t_i)``, in float64. It undoes sampling
    exactly when v does not depend on x (a constant velocity), and approximates it closely for
    trained models with enough steps.
    """
    state = solver.begin(scheduler_config, x0.device)
    sigmas = state.scheduler.sigmas.to(x0.device, torch.float64)
    first = len(sigmas) - 1 - len(state.timesteps)  # the index of the trajectory's first sigma
    x = x0.double()
    for i in reversed(range(len(state.timesteps))):
        t = state.timesteps[i]
        v = denoiser(x.to(x0.dtype), t, cond).double()
        x = x + (sigmas[first + i] - sigmas[first + i + 1]) * v
    return x.to(x0.dtype)


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x0: Tensor,
    cond: Any,
    solver: Solver,
    scheduler_config: dict[str, Any] | None = None,
) -> Tensor:
    """DDIM inversion: walk the trajectory ``solver`` would sample, backwards, from clean ``x0``
    to the latent at the solver's first timestep (its ``start_timestep``).

    The solver's timesteps are visited from the cleanest to the noisiest. The step to the noisier
    timestep t starts at ``x`` on the level s that DDIM's step at t lands on (``a`` the cumulative
    alphas): for ``DDIMScheduler`` ``s = t - num_train_timesteps // num_inference_steps``, and
    below 0 the scheduler's final alpha (``a_s = 1`` with ``set_alpha_to_one``, else ``a[0]``),
    which is where ``x0`` lies; for other solvers s is the next timestep of their schedule. The
    network output ``u = denoiser(x, t)`` is read at the current level, ``a_s``, as its
    ``prediction_type`` says (the conventions of diffusers' DDIM schedulers):

    - ``epsilon``:      ``eps = u``,                                  ``x0_hat = (x - sqrt(1 - a_s) * eps) / sqrt(a_s)``
    - ``v_prediction``: ``eps = sqrt(a_s) * u + sqrt(1 - a_s) * x``,  ``x0_hat = sqrt(a_s) * x - sqrt(1 - a_s) * u``
    - ``sample``:       ``x0_hat = u``,                               ``eps = (x - sqrt(a_s) * x0_hat) / sqrt(1 - a_s)``

    and the step is the DDIM update (eta = 0) run in reverse, in float64:
    ``x_t = sqrt(a_t) * x0_hat + sqrt(1 - a_t) * eps``.
    It undoes DDIM sampling exactly when ``(x0_hat, eps)`` does not change between neighbouring
    steps (e.g. a constant epsilon network), and is a close approximation for trained models with
    enough steps. With ``prediction_type: sample`` and ``a_s = 1`` eps is undefined: that is an error.
    """
    state = solver.begin(scheduler_config, x0.device)
    scheduler = state.scheduler
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"ddim_invert: unknown prediction_type {prediction_type!r} in the scheduler config; "
            f"accepted: {', '.join(map(repr, PREDICTION_TYPES))}."
        )
    alphas = scheduler.alphas_cumprod.to(x0.device, torch.float64)
    final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0)).to(x0.device, torch.float64)
    timesteps = [int(t) for t in state.timesteps]  # noisiest first
    if isinstance(scheduler, DDIMScheduler):  # where DDIMScheduler.step at t lands
        stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        landing = [t - stride for t in timesteps]
    else:  # the next timestep of the schedule, the final alpha after the last
        landing = timesteps[1:] + [-1]

    x = x0.double()
    for t, s, t_net in zip(reversed(timesteps), reversed(landing), reversed(state.timesteps)):
        a_s = alphas[s] if s >= 0 else final
        a_t = alphas[t]
        u = denoiser(x.to(x0.dtype), t_net, cond).double()
        if prediction_type == "epsilon":
            eps = u
            x0_hat = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        elif prediction_type == "v_prediction":
            eps = a_s.sqrt() * u + (1 - a_s).sqrt() * x
            x0_hat = a_s.sqrt() * x - (1 - a_s).sqrt() * u
        else:  # sample
            if a_s >= 1:
                raise ValueError(
                    "ddim_invert: with prediction_type 'sample' the first step starts at alpha_bar = 1 "
                    "(set_alpha_to_one=True), where the network's x0 carries no noise estimate; set "
                    "scheduler_kwargs: {set_alpha_to_one: false} to invert such a model."
                )
            x0_hat = u
            eps = (x - a_s.sqrt() * x0_hat) / (1 - a_s).sqrt()
        x = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps
    return x.to(x0.dtype)
