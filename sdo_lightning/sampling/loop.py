"""The one sampling loop of the project: solver x gradient mode x denoiser.

Written out whole, in one place (paper Fig. 4-5, Eq. 18-20)::

    for i, t in enumerate(timesteps):
        model_in = solver.scale_model_input(x, t, state)
        with torch.set_grad_enabled(plan.keep[i]):      # ONLY the network call
            out = network(model_in, t, cond)
        x = solver.step(out, t, x, state)               # outside: stays differentiable

The solver step must stay outside the no-grad block (paper Sec. 4.3): inside it, x_0 no longer
depends on the start latent through the skip path and the gradient is zero past step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from sdo_lightning.contracts import GradientMode, GradientPlan, Solver, SolverState, Target

#: ``denoiser(x, t, cond) -> model_output``; guidance (CFG) lives inside the denoiser.
Denoiser = Callable[[Tensor, Tensor, Any], Tensor]


@dataclass(frozen=True)
class Step:
    """One network call of a trajectory, as :func:`sample` hands it to its ``callback``.

    Attributes:
        index: the call's position in the trajectory (0 = the first call).
        timestep: the timestep of the call.
        x: the latent the network read (before ``scale_model_input``).
        model_output: the network output (guidance included).
        next: the latent the solver stepped to.
        state: the trajectory's solver state (its scheduler), e.g. for
            :meth:`~sdo_lightning.contracts.Solver.transition_kl`.
    """

    index: int
    timestep: Tensor
    x: Tensor
    model_output: Tensor
    next: Tensor
    state: SolverState | None = None


#: ``callback(step) -> None``, or a latent the trajectory continues from instead of ``step.next``
StepCallback = Callable[[Step], "Tensor | None"]


def sample(
    denoiser: Denoiser,
    solver: Solver,
    x: Tensor,
    cond: Any = None,
    *,
    gradient_mode: GradientMode | None = None,
    target: Target = Target.latent(),
    generator: torch.Generator | list[torch.Generator] | None = None,
    plan_generator: torch.Generator | None = None,
    scheduler_config: dict[str, Any] | None = None,
    num_calls: int | None = None,
    progress: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run one trajectory from the start latent ``x`` and return x_0.

    Args:
        denoiser: ``denoiser(x, t, cond)`` returns the network output (epsilon, v or x_0, as the
            scheduler config's ``prediction_type`` says), guidance included.
        solver: the :class:`Solver`; a fresh scheduler is built for this trajectory. A wrapper
            prepares the trajectory first (:meth:`Solver.prepare`): a
            :class:`~sdo_lightning.sampling.picard.Picard` solver computes the calls that keep no graph
            in parallel sweeps (see :mod:`sdo_lightning.sampling.picard`).
        x: the start latent: noise at the solver's first timestep (x_T, or x_t when the solver
            has a ``start_timestep``).
        cond: conditioning handed to ``denoiser`` unchanged.
        gradient_mode: which calls keep their graph. None, or grad mode disabled, samples
            without any graph (and without drawing from ``plan_generator``).
        target: what the caller differentiates with respect to (see :class:`Target`).
        generator: the trajectory's generator, for stochastic solvers (DDIM eta>0, LCM); a list
            of one generator per sample makes each sample's noise independent of its batch.
        plan_generator: the generator of the gradient mode's random draws.
        scheduler_config: the model's scheduler config (betas, prediction type, ...).
        num_calls: stop after this many network calls and return the latent reached (used to
            reach an intermediate x_t); None runs the whole trajectory to x_0.
        progress: show a progress bar over the network calls.
        callback: called after every solver step with the :class:`Step`; what it returns, if
            not None, replaces the next latent (a trajectory recorder returns None; a Picard
            sweep continues each call from its guess of the trajectory). Replacing the latent
            of a multistep solver (DPM-Solver++) leaves its history as it was.
    """
    # a plain solver: the two unchanged. A wrapper such as Picard (ParaDiGMS): the calls that keep no
    # graph come from parallel sweeps; this loop then runs the wrapped solver at the converged
    # trajectory, the kept calls real, the others their converged outputs
    denoiser, solver = solver.prepare(denoiser, x, cond, generator=generator, scheduler_config=scheduler_config,
                                      num_calls=num_calls, progress=progress)
    state = solver.begin(scheduler_config, x.device, generator)
    timesteps = state.timesteps if num_calls is None else state.timesteps[:num_calls]
    if gradient_mode is not None and torch.is_grad_enabled():
        plan = gradient_mode.plan(len(timesteps), target, plan_generator)
    else:  # sampling without gradient: no call keeps a graph, nothing is drawn
        plan = GradientPlan(keep=(False,) * len(timesteps))
    # kept calls of a checkpointing plan recompute their activations in backward
    checkpointed = partial(activation_checkpoint, denoiser, use_reentrant=False)

    steps = enumerate(timesteps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=len(timesteps), desc="sampling", leave=False)
    for i, t in steps:
        if plan.detach_before == i:
            x = x.detach()  # truncated backprop: no gradient flows to earlier steps
        model_in = solver.scale_model_input(x, t, state)
        if plan.keep[i] and plan.detach_kept_inputs:
            model_in = model_in.detach()
        network = checkpointed if plan.checkpoint and plan.keep[i] else denoiser
        with torch.set_grad_enabled(plan.keep[i]):      # ONLY the network call
            out = network(model_in, t, cond)
        if plan.keep[i] and plan.grad_scale != 1.0 and out.requires_grad:
            out = _scale_gradient(out, plan.grad_scale)
        x_next = solver.step(out, t, x, state)          # outside: stays differentiable
        if callback is not None:
            replaced = callback(Step(i, t, x, out, x_next, state))
            x_next = x_next if replaced is None else replaced
        x = x_next
    return x


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def _scale_gradient(x: Tensor, scale: float) -> Tensor:
    return _ScaleGradient.apply(x, scale)
