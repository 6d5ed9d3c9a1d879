"""Picard's view of the solver it wraps: its step as the coefficients of an affine map, and
ParaDiGMS's noise magnitude of each latent (the scale of the tolerance). Used by
:mod:`sdo_lightning.sampling.picard`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdo_lightning.contracts import Solver, SolverState


def step_coefficients(solver: Solver, scheduler_config: dict[str, Any] | None, device: torch.device, generator: Any,
                      n: int) -> tuple[list[float], list[float]]:
    """``A_i, B_i`` of ``step(u, t_i, x) = A_i x + B_i u``, read off ``solver``'s own step
    on probe values in a fresh trajectory (so the schedule is exactly the solver's)."""
    state = solver.begin(scheduler_config, device, generator)
    probe_x = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64, device=device)
    probe_u = torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=torch.float64, device=device)
    a, b = [], []
    for t in state.timesteps[:n]:
        ai, bi, zero, mix = solver.step(probe_u, t, probe_x, state).double().tolist()
        if abs(zero) > 1e-9 or abs(mix - (2 * ai + 3 * bi)) > 1e-6 * (1 + abs(mix)):
            raise ValueError(
                f"Picard needs a solver step that is affine in the latent and the network output, but "
                f"{solver!r} at t={float(t)} is not (a clamp such as clip_sample, or stochastic sampling); "
                "turn those options off."
            )
        a.append(ai)
        b.append(bi)
    return a, b

def noise_variances(solver: Solver, state: SolverState, n: int) -> Tensor:
    """ParaDiGMS's noise magnitude of latents ``0..n``: the variance DDPM would add at the step
    that reads each latent (0 at the end of the schedule)."""
    scheduler, timesteps = state.scheduler, state.timesteps
    out = torch.zeros(n + 1, dtype=torch.float64)
    if solver.predicts == "velocity":  # a rectified flow's path
        sigmas = scheduler.sigmas.double().cpu()
        first = len(scheduler.timesteps) - len(timesteps)
        for i in range(n + 1):
            if first + i + 1 >= len(sigmas):
                break
            s, s_next = float(sigmas[first + i]), float(sigmas[first + i + 1])
            if s <= 0:
                break
            alpha = (1 - s) / (1 - s_next)  # x_s = alpha x_{s_next} + noise of variance beta2
            beta2 = max(s * s - alpha * alpha * s_next * s_next, 0.0)
            out[i] = beta2 * s_next * s_next / (s * s)
        return out
    alphas = scheduler.alphas_cumprod.double().cpu()
    final = float(scheduler.final_alpha_cumprod)
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for i in range(min(n + 1, len(timesteps))):
        t = int(timesteps[i])
        prev = t - ratio  # DDIM's own rule for the next timestep
        ab, ab_prev = float(alphas[t]), float(alphas[prev]) if prev >= 0 else final
        out[i] = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    return out
