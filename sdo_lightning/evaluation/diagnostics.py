"""Gradient diagnostics: how far the training gradient is from the exact one, and how the
gradient norm grows with backpropagation depth (paper Fig. 11a)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from sdo_lightning.contracts import GradientMode, GradientPlan, Target
from sdo_lightning.gradient_modes import FullBackprop, TruncatedBackprop
from sdo_lightning.sampling import Step, sample


class _FirstCalls(GradientMode):
    """Keep the graph of the first ``depth`` calls that read the latent; detach nothing.

    Private (leading underscore): not registered as a plugin. ``depth=1`` is SDO for a latent,
    ``depth=N`` is full backpropagation; in between the gradient also reaches the latent through
    the later calls' skip paths, as in SDO.
    """

    def __init__(self, depth: int, checkpoint: bool = True) -> None:
        self.depth = depth
        self.checkpoint = checkpoint

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        first = target.first_call
        keep = tuple(first <= i < first + self.depth for i in range(num_calls))
        return GradientPlan(keep=keep, checkpoint=self.checkpoint)


class GradientDiagnostics(Callback):
    """Compare the module's gradient with the exact one, and probe the gradient norm by depth.

    Off unless added (``trainer.callbacks`` in YAML). Every ``every_n_steps`` optimizer steps,
    after the step, on the current batch and the current (already updated) variable, it
    recomputes the gradient of the summed per-sample objective loss (no adapter penalty) with
    respect to the optimized tensors (LatentOptimization: its variable; RewardFineTuning: the
    LoRA adapters) and logs:

    * ``diagnostics/cosine_to_exact``: cosine between the gradient of the module's gradient mode
      and the exact gradient (``FullBackprop(checkpoint=True)``), on the same noise;
    * ``diagnostics/norm_ratio_to_exact``: mode gradient norm / exact gradient norm (for SDO on
      parameters with the default ``scale: paper`` the single-call estimate is not multiplied by
      N, so expect about 1/N; ``scale: unbiased`` multiplies it by N);
    * ``diagnostics/grad_norm_depth_{d}``: gradient norm with backprop depth ``d``. Parameter
      targets: ``TruncatedBackprop(k=d)`` (the last d calls). Latent targets: the first d calls
      that read the latent keep their graph, nothing is detached (d=1 is SDO, d=N is exact).
      Depths above the number of calls are skipped.
    * ``diagnostics/picard_lambda``: an estimate of the Picard contraction constant lambda of
      Theorem 4.1 (see :func:`picard_contraction`): one Picard sweep started from the trajectory
      stored at the previous diagnosis (DDIM with eta 0 only; from the second diagnosis on).
      Theorem 4.1 bounds SDO's error by lambda^2 / (1 - lambda) times the objective's gradient
      norm, which is vacuous above lambda ~0.62; on the digits models lambda did not track the
      cosine (0.69-0.95 trained, 0.37-0.92 random with cosine 0.99; see docs/science.md).
    * ``diagnostics/seconds``: wall time of the diagnosis.

    Cost: each diagnosis costs about one exact (checkpointed, so one more forward pass per call)
    gradient, plus one gradient of the module's mode, plus one gradient per probed depth; each
    is a full sampling trajectory forward and a backward. Use a large ``every_n_steps`` on big
    models. The gradients are taken with ``torch.autograd.grad``, so the ``.grad`` of the real
    step and the optimizer are untouched; the state of the module's random draws is restored,
    so training is unchanged by the callback. Random gradient modes (SDO on parameters, random
    truncation) make a fresh draw for the diagnosis.

    Args:
        every_n_steps: diagnose when the global step is a multiple of this.
        depths: backprop depths to probe; None for ``[1, 2, 5, 10, N]`` (N the number of calls);
            an empty list probes none.
    """

    def __init__(self, every_n_steps: int = 10, depths: list[int] | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if depths is not None and any(d < 1 for d in depths):
            raise ValueError(f"depths must be >= 1, got {depths}.")
        self.every_n_steps = every_n_steps
        self.depths = depths
        self.last: dict[str, float] = {}
        self._done_step: int | None = None
        self._trajectory: list[Tensor] | None = None  # stored at the last diagnosis, for Picard

    # -- what the module optimizes and how it generates ------------------------------------
    @staticmethod
    def _check(module: LightningModule) -> None:
        # what diagnose() calls: the two modules of sdo_lightning.modules have it (checked by what it
        # does, so this layer imports no module)
        needed = ("optimized_tensors", "compute_losses", "gradient_target", "_plan_generator")
        if not all(hasattr(module, name) for name in needed):
            raise TypeError(f"GradientDiagnostics supports LatentOptimization and RewardFineTuning, not {type(module).__name__}.")

    def _grad(self, module: LightningModule, batch: dict[str, Any], mode: GradientMode, params: list[Tensor]) -> Tensor:
        module.gradient_mode = mode
        loss = module.compute_losses(batch)[1].sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).detach().float().flatten()
                          for g, p in zip(grads, params)])

    def _num_calls(self, module: LightningModule) -> int:
        solver = module.solver
        return len(solver.begin(module.backbone.scheduler_config).timesteps)

    # -- the hook ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._done_step:
            return
        self._done_step = step  # once per optimizer step, also with gradient accumulation
        start = time.perf_counter()
        values = self.diagnose(pl_module, batch, trainer)
        values["seconds"] = time.perf_counter() - start
        self.last = values
        n = len(batch["index"])
        for name, value in values.items():
            pl_module.log(f"diagnostics/{name}", value, on_step=True, on_epoch=False, batch_size=n)

    def diagnose(self, module: LightningModule, batch: dict[str, Any], trainer: Trainer | None = None) -> dict[str, float]:
        """Compute the diagnostics on ``batch`` now; returns ``{name: value}`` (no logging)."""
        self._check(module)
        params = module.optimized_tensors()
        latent = module.gradient_target().kind == "latent"
        original = module.gradient_mode
        generator = module._plan_generator
        rng_state = generator.get_state()
        context = trainer.precision_plugin.train_step_context() if trainer is not None else contextlib.nullcontext()
        values: dict[str, float] = {}
        try:
            with torch.enable_grad(), context:
                mode_grad = self._grad(module, batch, original, params)
                exact = self._grad(module, batch, FullBackprop(checkpoint=True), params)
                exact_norm = exact.norm()
                values["cosine_to_exact"] = torch.nn.functional.cosine_similarity(mode_grad, exact, dim=0, eps=1e-30).item()
                values["norm_ratio_to_exact"] = (mode_grad.norm() / exact_norm.clamp_min(1e-30)).item()
                values["exact_grad_norm"] = exact_norm.item()
                num_calls = self._num_calls(module)
                depths = self.depths if self.depths is not None else [1, 2, 5, 10, num_calls]
                for d in sorted({d for d in depths if d <= num_calls}):
                    if d == num_calls:  # every call kept: the exact gradient, already computed
                        values[f"grad_norm_depth_{d}"] = values["exact_grad_norm"]
                        continue
                    probe = _FirstCalls(d) if latent else TruncatedBackprop(k=d, checkpoint=True)
                    values[f"grad_norm_depth_{d}"] = self._grad(module, batch, probe, params).norm().item()
        finally:
            module.gradient_mode = original
            generator.set_state(rng_state)
        self._picard(module, batch, values)
        return values

    def _picard(self, module: LightningModule, batch: dict[str, Any], values: dict[str, float]) -> None:
        if module.gradient_target().kind != "latent":
            return  # fine-tuning samples fresh noise, an embedding target keeps x_T: nothing to refine
        x, cond = module.trajectory_inputs(batch["index"])
        guess = self._trajectory if self._trajectory is not None else []
        lam, self._trajectory = picard_contraction(module.backbone.denoise, module.solver, x.detach(), cond, guess,
                                                   module.backbone.scheduler_config)
        if lam == lam:  # not nan
            values["picard_lambda"] = lam


@torch.no_grad()
def trajectory(denoiser: Any, solver: Any, x_start: Tensor, cond: Any, scheduler_config: dict | None = None,
               generator: Any = None) -> list[Tensor]:
    """The sequential trajectory ``[x_start, x_1, ..., x_0]`` sampled without gradient."""
    states = [x_start]
    sample(denoiser, solver, x_start, cond, scheduler_config=scheduler_config, generator=generator,
           callback=lambda step: states.append(step.next))
    return states


@torch.no_grad()
def picard_contraction(
    denoiser: Any, solver: Any, x_start: Tensor, cond: Any, guess: list[Tensor], scheduler_config: dict | None = None
) -> tuple[float, list[Tensor]]:
    """Estimate the contraction constant lambda of the Picard operator (paper Theorem 4.1).

    Picard iteration refines a whole trajectory at once (Eq. 7-9):
    ``x^{k+1}_i = x_start + sum_{j < i} (step_j(x^k_j) - x^k_j)``, whose fixed point is the
    sequential trajectory x*. Starting from ``guess`` (e.g. the trajectory stored at an earlier
    optimizer step), one sweep gives x^1 and the estimate is
    ``lambda ~= ||x^1 - x*|| / ||guess - x*||`` over all states after the start. Only for
    solvers whose step depends on the current state alone (DDIM); returns (nan, x*) otherwise.
    Costs two trajectories of network calls. Returns the estimate and x* (the next guess).
    """
    solver = solver.unwrap()  # the operator of a wrapped solver's steps
    fixed = trajectory(denoiser, solver, x_start, cond, scheduler_config)
    # DDIM with eta 0 among the built-ins: a deterministic one-step solver of a diffusion model
    deterministic_diffusion = solver.first_order and solver.nondeterminism() is None and solver.predicts == "noise"
    if not deterministic_diffusion or len(guess) != len(fixed):
        return float("nan"), fixed
    # The sweep: call j reads the guess x^k_j (the callback continues from it) and contributes
    # its increment step_j(x^k_j) - x^k_j.
    increments: list[Tensor] = []

    def sweep(step: Step) -> Tensor:
        increments.append(step.next - step.x)
        return guess[step.index + 1]

    sample(denoiser, solver, guess[0], cond, scheduler_config=scheduler_config, callback=sweep)
    swept = list(x_start + torch.cumsum(torch.stack(increments), 0))
    after = torch.sqrt(sum(((s - f).double() ** 2).sum() for s, f in zip(swept, fixed[1:])))
    before = torch.sqrt(sum(((g - f).double() ** 2).sum() for g, f in zip(guess[1:], fixed[1:])))
    return (after / before.clamp_min(1e-30)).item(), fixed
