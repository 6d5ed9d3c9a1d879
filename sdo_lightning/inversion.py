"""DDIM inversion: from a clean latent back to the noisy latent a trajectory starts from."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdo_lightning.contracts import Solver
from sdo_lightning.sampling import Denoiser


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

    Each step is the DDIM update run in reverse (eta = 0): with ``eps`` the network output at the
    next, noisier timestep t and ``a`` the cumulative alphas,
    ``x_t = sqrt(a_t) * (x - sqrt(1 - a_s) * eps) / sqrt(a_s) + sqrt(1 - a_t) * eps``.
    It is exact when the network output does not change between neighbouring steps, and a
    close approximation for trained models with enough steps.
    """
    state = solver.begin(scheduler_config, x0.device)
    alphas = state.scheduler.alphas_cumprod.to(x0.device, torch.float64)
    x = x0.double()
    a_cur = torch.tensor(1.0, dtype=torch.float64, device=x0.device)  # clean data
    for t in reversed(state.timesteps):
        eps = denoiser(x.to(x0.dtype), t, cond).double()
        a_next = alphas[int(t)]
        x0_hat = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
        a_cur = a_next
    return x.to(x0.dtype)
