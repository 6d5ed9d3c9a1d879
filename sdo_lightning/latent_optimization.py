"""LatentOptimization: steer single samples by optimizing what enters their sampling chain."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

from sdo_lightning.backbones import Backbone, DigitsBackbone
from sdo_lightning.contracts import GradientMode, Objective, Solver, Target
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.images import save_before_after
from sdo_lightning.data import shard
from sdo_lightning.module_base import OptimizationModule, check_solver_fits_backbone
from sdo_lightning.inversion import ddim_invert
from sdo_lightning.sampling import sample
from sdo_lightning.solvers import DDIM


class LatentOptimization(OptimizationModule):
    """Optimize each sample's starting latent (or conditioning) so its image lowers an objective.

    Every training step samples the whole chain with the solver, keeps the autograd graph of
    the network calls the gradient mode chooses, decodes, scores with the objective and takes
    one optimizer step. Each sample's best image (lowest loss seen) is kept; at the end of fit
    the before/after grid is written as ``before_after.png`` and the images as ``samples.npz``
    (``before``, ``after``: ``(B, C, H, W)`` in [0, 1]) in the log directory.

    With several processes (DDP) the samples are sharded: process ``r`` of ``W`` samples and
    scores samples ``r, r + W, ...`` only. Every process holds the whole (small) variable so
    DDP's all-reduce keeps it identical everywhere; the loss is scaled by ``W`` so the averaged
    gradient of each sample is its own loss's gradient, as in a single process. Images and
    losses are gathered every step, so every process holds every sample's best image and
    process 0 writes the results.

    Args:
        objective: the per-sample loss on decoded images (lower is better).
        backbone: the diffusion model; default: the embedded digits model.
        solver: the sampler; default DDIM with 50 steps.
        gradient_mode: which network calls keep their graph; default SDO.
        target: what is optimized: ``x_T`` (the starting noise), ``x_t`` (an intermediate latent
            reached by sampling without gradient down to ``solver.start_timestep``) or
            ``embedding`` (each sample's conditioning embedding).
        linf_radius: if set, optimize a perturbation of the latent bounded by this radius in
            the L-infinity norm (projected after every optimizer step).
        invert_images: for target ``x_t``: reach x_t by DDIM inversion of the data module's real
            images (``batch["image"]``) instead of by sampling from noise.
        project_to_shell: after every step, rescale each latent to its initial norm (the shell
            where Gaussian noise lives). Keeps x_T a plausible noise sample, which stops the
            optimization from drifting into images that only fool the objective.
        lr: learning rate of the default optimizer (Adam).
        optimizer: an optimizer factory overriding the default (``class_path`` in YAML).
        seed: seed of the starting noise (sample ``i`` uses ``seed * 100003 + i``) and of the
            gradient mode's random draws.
        on_nonfinite: a NaN or infinite loss or gradient ``skip``s the optimizer step with a
            warning, or ``stop``s the fit with an error.
    """

    def __init__(
        self,
        objective: Objective,
        backbone: Backbone = lazy_instance(DigitsBackbone),
        solver: Solver = lazy_instance(DDIM, num_inference_steps=50),
        gradient_mode: GradientMode = lazy_instance(ShortcutGradient),
        target: Literal["x_T", "x_t", "embedding"] = "x_T",
        linf_radius: float | None = None,
        invert_images: bool = False,
        project_to_shell: bool = True,
        lr: float = 0.05,
        optimizer: OptimizerCallable | None = None,
        seed: int = 0,
        on_nonfinite: Literal["skip", "stop"] = "skip",
    ) -> None:
        super().__init__(seed, on_nonfinite)
        if target == "x_T" and solver.start_timestep is not None:
            raise ValueError(
                f"target 'x_T' starts from pure noise but the solver starts at t={solver.start_timestep}; "
                "use target: x_t for an intermediate latent, or drop the solver's start_timestep."
            )
        if target == "x_t" and solver.start_timestep is None:
            raise ValueError("target 'x_t' needs the solver's start_timestep (e.g. 600) to say which latent.")
        if invert_images and target != "x_t":
            raise ValueError("invert_images inverts real images to an intermediate latent: use it with target 'x_t'.")
        if target == "embedding" and linf_radius is not None:
            raise ValueError("linf_radius bounds a latent perturbation; it does not apply to target 'embedding'.")
        self.objective = objective
        self.backbone = backbone
        self.solver = solver
        self.gradient_mode = gradient_mode
        self.target = target
        self.linf_radius = linf_radius
        self.invert_images = invert_images
        self.project_to_shell = project_to_shell and target != "embedding"
        self.lr = lr
        self.optimizer_factory = optimizer
        self.seed = seed
        self.variable: nn.Parameter | None = None

    # -- set-up -----------------------------------------------------------------------------
    def _noise(self, index: Tensor) -> Tensor:
        rows = []
        for i in index.tolist():
            g = torch.Generator().manual_seed(self.seed * 100003 + i)
            rows.append(torch.randn(self.backbone.latent_shape, generator=g))
        return torch.stack(rows)

    def _trajectory_generator(self, index: Tensor, device: torch.device | None = None) -> list[torch.Generator]:
        # Stochastic solvers draw the same noise every step, so the objective is a fixed function
        # of the optimized variable; one generator per sample, so a sample's noise does not
        # depend on which others share its batch (or process).
        device = device or self.device
        return [torch.Generator(device).manual_seed(self.seed * 100003 + 17 + 7919 * i) for i in index.tolist()]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.variable is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "full_batch"):
            raise ValueError("LatentOptimization needs a data module with full_batch(), such as SampleSet.")
        # setup runs before Lightning moves the module: sample the start on the target device.
        device = self.trainer.strategy.root_device
        self.backbone.to(device)
        check_solver_fits_backbone(self.solver, self.backbone)
        self._prepare(datamodule.full_batch(device), device)

    def _gather_rows(self, index: Tensor, rows: Tensor, n: int) -> Tensor:
        """Every process's ``rows`` (of samples ``index``, its shard) assembled into ``(n, ...)``."""
        rank, world_size = self.world
        if world_size == 1:
            out = rows.new_zeros((n, *rows.shape[1:]))
            out[index.to(rows.device)] = rows
            return out
        # shards differ in size by at most one: pad to the largest, gather, drop the padding
        size = -(-n // world_size)
        padded = rows.new_zeros((size, *rows.shape[1:]))
        padded[: len(rows)] = rows
        where = torch.full((size,), -1, dtype=torch.long, device=rows.device)
        where[: len(index)] = index.to(rows.device)
        all_rows = _all_gather(padded).reshape(world_size * size, *rows.shape[1:])
        all_where = _all_gather(where).reshape(-1)
        keep = all_where >= 0
        out = rows.new_zeros((n, *rows.shape[1:]))
        out[all_where[keep]] = all_rows[keep]
        return out

    @torch.no_grad()
    def _prepare(self, batch: dict[str, Tensor], device: torch.device) -> None:
        n = len(batch["index"])
        rank, world_size = self.world
        mine = shard(n, rank, world_size).to(device)  # this process's samples
        cond = self.backbone.encode_condition(batch)
        start = self._noise(batch["index"]).to(device)
        if self.invert_images:
            if "image" not in batch:
                raise KeyError("invert_images needs real images in the batch: give the data module images (e.g. SampleSet(images='digits')).")
            clean = self.backbone.encode(batch["image"][mine.to(batch["image"].device)].to(device))
            if tuple(clean.shape[1:]) != tuple(self.backbone.latent_shape):
                size = tuple(batch["image"].shape[1:])
                raise ValueError(
                    f"invert_images: images of shape {size} encode to latents {tuple(clean.shape[1:])}, but "
                    f"{type(self.backbone).__name__} samples latents {tuple(self.backbone.latent_shape)}; resize the "
                    "images to the model's image size (and channels) first."
                )
            part = ddim_invert(self.backbone.denoise, clean, _rows(cond, mine), self.solver, self.backbone.scheduler_config)
            start = self._gather_rows(mine, part, n)
        elif self.target == "x_t":
            prefix_solver = copy.copy(self.solver)
            prefix_solver.start_timestep = None
            timesteps = prefix_solver.begin(self.backbone.scheduler_config).timesteps
            calls = int((timesteps > self.solver.start_timestep).sum())
            part = sample(self.backbone.denoise, prefix_solver, start[mine], _rows(cond, mine), num_calls=calls,
                          generator=self._trajectory_generator(mine, device), scheduler_config=self.backbone.scheduler_config)
            start = self._gather_rows(mine, part, n)
        self.register_buffer("start_latent", start)
        if isinstance(cond, Tensor):
            self.register_buffer("start_cond", cond)
        else:  # e.g. TextCondition: not a tensor, kept as it is
            self.start_cond = cond
        self.register_buffer("shell_norm", start.flatten(1).norm(dim=1))
        if self.target == "embedding":
            emb = self.backbone.condition_embedding(cond)
            if emb is None:
                raise ValueError(f"{type(self.backbone).__name__} has no conditioning embedding to optimize.")
            self.variable = nn.Parameter(emb)
        elif self.linf_radius is not None:
            self.variable = nn.Parameter(torch.zeros_like(start))
        else:
            self.variable = nn.Parameter(start.clone())
        images = self._gather_rows(mine, self._generate(mine, grad=False, device=device), n)
        self.register_buffer("initial_images", images)
        self.register_buffer("best_images", images.clone())
        self.register_buffer("best_loss", torch.full((len(images),), float("inf"), device=device))

    # -- the optimized quantity ---------------------------------------------------------------
    def _inputs(self, index: Tensor) -> tuple[Tensor, Any]:
        if self.target == "embedding":
            return self.start_latent[index], self.backbone.with_embedding(self.start_cond[index], self.variable[index])
        if self.linf_radius is not None:
            return self.start_latent[index] + self.variable[index], self.start_cond[index]
        return self.variable[index], self.start_cond[index]

    def optimized_tensors(self) -> list[Tensor]:
        return [self.variable]

    def gradient_target(self) -> Target:
        # An embedding is read by every network call, like parameters; a latent by the first.
        return Target.parameters() if self.target == "embedding" else Target.latent()

    def _generate(self, index: Tensor, grad: bool, device: torch.device | None = None) -> Tensor:
        x, cond = self._inputs(index)
        with torch.set_grad_enabled(grad):
            x0 = sample(
                self.backbone.denoise, self.solver, x, cond,
                gradient_mode=self.gradient_mode, target=self.gradient_target(),
                generator=self._trajectory_generator(index, device), plan_generator=self._plan_generator,
                scheduler_config=self.backbone.scheduler_config,
            )
            return self.backbone.decode(x0)

    # -- training ----------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        index = batch["index"]
        images = self._generate(index, grad=True)
        return images, self.objective(images, {**batch, "initial_images": self.initial_images[index]})

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        index = batch["index"]
        images, losses = self.compute_losses(batch)
        self.check_losses(losses, len(images))
        with torch.no_grad():
            # every process updates every sample's best from the gathered shards: the buffers stay
            # identical across processes (DDP broadcasts process 0's buffers) and in checkpoints
            n = len(self.best_loss)
            seen = self._gather_rows(index, torch.ones_like(losses.detach()), n) > 0
            all_losses = self._gather_rows(index, losses.detach(), n)
            all_images = self._gather_rows(index, images.detach(), n)
            better = seen & (all_losses < self.best_loss)
            self.best_loss[better] = all_losses[better]
            self.best_images[better] = all_images[better]
        self.log_terms(losses, self.objective)
        # Sum, not mean: each sample's gradient is its own loss's gradient, whatever the batch size.
        # Times the number of processes: DDP averages gradients, and each sample lives on one process.
        return losses.sum() * self.world[1]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the update (before any callback, e.g. a checkpoint, sees the variable):
        # project the variable back onto its constraint set.
        with torch.no_grad():
            if self.linf_radius is not None:
                self.variable.clamp_(-self.linf_radius, self.linf_radius)
            elif self.project_to_shell:
                norms = self.variable.flatten(1).norm(dim=1).clamp_min(1e-12)
                self.variable.mul_((self.shell_norm / norms).view(-1, *[1] * (self.variable.dim() - 1)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory([self.variable])
        return torch.optim.Adam([self.variable], lr=self.lr)

    def is_trainable_key(self, key: str) -> bool:
        return not key.startswith(("backbone.", "objective."))

    # -- results -----------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if self.variable is None:  # the fit failed before setup finished
            return
        with torch.no_grad():
            batch = self.trainer.datamodule.full_batch(self.device)
            batch["initial_images"] = self.initial_images
            summary: dict[str, Any] = {}
            for label, images in (("before", self.initial_images), ("after", self.best_images)):
                loss = self.objective(images, batch)
                summary[label] = {"loss": loss.mean().item(), **{k: v.float().mean().item() for k, v in self.objective.terms.items()}}
            diff = (self.best_images - self.initial_images).flatten(1)
            summary["l2_to_unoptimized"] = diff.norm(dim=1).mean().item()
            summary["rms_to_unoptimized"] = diff.pow(2).mean(1).sqrt().mean().item()
        self._write_results(summary, self.log_dir)

    @rank_zero_only
    def _write_results(self, summary: dict[str, Any], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        before, after = self.initial_images.float().cpu(), self.best_images.float().cpu()
        np.savez(log_dir / "samples.npz", before=before.numpy(), after=after.numpy())
        png = save_before_after(before, after, log_dir / "before_after.png")
        (log_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_images"):
            experiment.add_images("before", before, self.global_step)
            experiment.add_images("after", after, self.global_step)
        lines = [f"{k}: {summary['before'][k]:.4g} -> {summary['after'][k]:.4g}" for k in summary["before"]]
        lines.append(f"mean L2 distance to the unoptimized samples: {summary['l2_to_unoptimized']:.4g}")
        rank_zero_info(
            "\n".join(["", "Results (before -> after, mean over samples):", *("  " + l for l in lines),
                       f"Logs: {log_dir}  (tensorboard --logdir {log_dir.parent})",
                       f"Images: {png}  and  {log_dir / 'samples.npz'}"])
        )


def _rows(cond: Any, index: Tensor) -> Any:
    """The conditioning of samples ``index`` (a tensor, or an indexable condition object)."""
    return cond[index.to(cond.device)] if isinstance(cond, Tensor) else cond[index]


def _all_gather(tensor: Tensor) -> Tensor:
    """``(world_size, *tensor.shape)``: every process's ``tensor`` (no autograd: results only)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)
