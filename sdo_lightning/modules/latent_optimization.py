"""LatentOptimization: steer single samples by optimizing what enters their sampling chain."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import Callback
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from sdo_lightning import progress
from sdo_lightning.backbones import Backbone, DigitsBackbone
from sdo_lightning.training.callbacks import LatentResults
from sdo_lightning.contracts import GradientMode, Objective, RunContext, Solver, Target
from sdo_lightning.training.rows import batch_rows, condition_rows, gather_rows, shard
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.evaluation.metrics import Evaluation
from sdo_lightning.modules.base import OptimizationModule, check_solver_fits_backbone
from sdo_lightning.modules.latent_search import SearchSteps
from sdo_lightning.sampling import sample
from sdo_lightning.searches import Search
from sdo_lightning.solvers import DDIM
from sdo_lightning.modules.targets import OptimizationTarget, as_target


class LatentOptimization(SearchSteps, OptimizationModule):
    """Optimize each sample's starting latent (or conditioning) so its image lowers an objective.

    Every training step samples the whole chain with the solver, keeps the autograd graph of
    the network calls the gradient mode chooses, decodes, scores with the objective and takes
    one optimizer step. The objective sees the data module's batch plus ``initial_images`` (the
    unoptimized samples) and ``latent``: each trajectory's start latent as the optimized variable
    makes it, differentiable (what :class:`~sdo_lightning.objectives.NoiseNormPrior` scores; with
    ``target: embedding`` it is the fixed noise). Each sample's best image (lowest loss seen) is
    kept; at the end of fit the :class:`~sdo_lightning.training.callbacks.LatentResults` callback (added
    unless the trainer has one) writes the before/after grid ``before_after.png``, the images
    ``samples.npz`` (``before``, ``after``: ``(B, C, H, W)`` in [0, 1]) and ``summary.json`` to the
    log directory.

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
        gradient_mode: which network calls keep their graph; default SDO. A search
            (:mod:`sdo_lightning.searches`: ``BestOfN``, ``ZeroOrder``; a plugin kind of its own) instead proposes candidates of
            the variable every step, scores them without gradient and keeps each sample's best
            (manual optimization; ``max_steps`` counts search steps).
        target: what is optimized (see :mod:`sdo_lightning.modules.targets`): ``x_T`` (``StartNoise``: the
            starting noise, kept on its norm shell), ``x_t`` (``IntermediateLatent``: the latent at
            ``solver.start_timestep``, reached by sampling without gradient or, with
            ``invert_images``, by DDIM inversion of real images) or ``embedding``
            (``ConditionEmbedding``: each sample's conditioning embedding); a class with
            ``init_args`` for the options (``linf_radius`` bounds a perturbation of the latent).
        lr: learning rate of the default optimizer (Adam).
        optimizer: an optimizer factory overriding the default (``class_path`` in YAML).
        seed: seed of the starting noise (see :func:`sdo_lightning.progress.latent_noise_seed`)
            and of the gradient mode's random draws.
        on_nonfinite: a NaN or infinite loss or gradient ``skip``s the optimizer step with a
            warning, or ``stop``s the fit with an error.
        held_out_objective: a "gold" objective that is scored but never optimized: logged every
            step as ``train/held_out`` (its mean loss; computed without gradient, its random draws
            undone, so it changes nothing of the optimization) and reported in ``summary.json``
            under ``held_out``, to see reward hacking (the optimized objective improving while
            this one does not).
        evaluation: what validation (during fit: ``trainer.val_check_interval``), ``sdo validate``
            / ``sdo test`` and ``sdo predict`` compute on the data module's evaluation rows
            (``data.eval_samples``); here row ``i`` is optimized sample ``i`` as the variable makes
            it now, its reference the unoptimized sample.
        decode_clamp: how decoded images are clamped to [0, 1]: ``straight_through`` (the
            gradient passes as if unclamped, so saturated pixels can still move back) or
            ``hard`` (``torch.clamp``: saturated pixels give no gradient, as the authors' released
            scripts do). Sets the backbone's ``decode_clamp``.
    """

    def __init__(
        self,
        objective: Objective,
        backbone: Backbone = lazy_instance(DigitsBackbone),
        solver: Solver = lazy_instance(DDIM, num_inference_steps=50),
        gradient_mode: GradientMode | Search = lazy_instance(ShortcutGradient),
        target: OptimizationTarget | Literal["x_T", "x_t", "embedding"] = "x_T",
        lr: float = 0.05,
        optimizer: OptimizerCallable | None = None,
        seed: int = 0,
        on_nonfinite: Literal["skip", "stop"] = "skip",
        held_out_objective: Objective | None = None,
        evaluation: Evaluation | None = lazy_instance(Evaluation),
        decode_clamp: Literal["straight_through", "hard"] = "straight_through",
    ) -> None:
        super().__init__(seed, on_nonfinite)
        if decode_clamp not in ("straight_through", "hard"):
            raise ValueError(f"decode_clamp must be 'straight_through' or 'hard', got {decode_clamp!r}.")
        backbone.decode_clamp = decode_clamp
        # the module's own copy: the target keeps per-run state (the start latents' norms)
        self.target = copy.copy(as_target(target))
        self.target.check(solver)
        if isinstance(gradient_mode, Search):  # the contract, not a concrete class
            gradient_mode.check_target(self.target)
            # no gradient to step with: the search moves the variable itself (see _search_step)
            self.automatic_optimization = False
            # Lightning warns that a manual-optimization checkpoint holds the state after the step;
            # that is the state a search checkpoint must hold (a resumed run continues from it)
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        self.objective = objective
        self.held_out_objective = held_out_objective
        self.evaluation = evaluation
        self.backbone = backbone
        self.solver = solver
        self.gradient_mode = gradient_mode
        self.lr = lr
        self.optimizer_factory = optimizer
        self.seed = seed
        self.variable: nn.Parameter | None = None

    @property
    def search(self) -> Search | None:
        """The search given as ``gradient_mode``, or None for a gradient mode."""
        return self.gradient_mode if isinstance(self.gradient_mode, Search) else None

    def active_gradient_mode(self) -> GradientMode | None:
        """The gradient mode of the current optimizer step: ``gradient_mode``, or for a search None
        (no graph) unless it hands this step to a gradient mode (:class:`~sdo_lightning.searches.SearchThenGradient`)."""
        if self.search is None:
            return self.gradient_mode
        if self._trainer is None:
            return None
        return self.search.gradient_mode_at(self.global_step, self.trainer.max_steps)

    @property
    def context(self) -> RunContext:
        """What the target and a search read of this module."""
        return RunContext(self.backbone, self.solver, self.seed)

    # -- set-up -----------------------------------------------------------------------------
    def _trajectory_generator(self, index: Tensor, device: torch.device | None = None) -> list[torch.Generator]:
        # Stochastic solvers draw the same noise every step, so the objective is a fixed function
        # of the optimized variable; one generator per sample, so a sample's noise does not
        # depend on which others share its batch (or process).
        seeds = [progress.latent_trajectory_seed(self.seed, i) for i in index.tolist()]
        return progress.generators(seeds, device or self.device)

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
        self.solver.forget()  # a Picard solver's trajectories of another run in this process must not warm-start this one
        self._prepare(datamodule.full_batch(device), device)

    def _gather_rows(self, index: Tensor, rows: Tensor, n: int) -> Tensor:
        """Every process's ``rows`` (of samples ``index``, its shard) assembled into ``(n, ...)``."""
        return gather_rows(index, rows, n, self.world[1])

    @torch.no_grad()
    def _prepare(self, batch: dict[str, Any], device: torch.device) -> None:
        n = len(batch["index"])
        rank, world_size = self.world
        mine = shard(n, rank, world_size).to(device)  # this process's samples
        cond = self.backbone.encode_condition(batch)
        seeds = [progress.latent_noise_seed(self.seed, i) for i in batch["index"].tolist()]
        noise = progress.normal(self.backbone.latent_shape, seeds).to(device)
        part = self.target.start_latent(noise[mine], condition_rows(cond, mine), batch_rows(batch, mine), self.context)
        start = self._gather_rows(mine, part, n)
        self.register_buffer("start_latent", start)
        if isinstance(cond, Tensor):
            self.register_buffer("start_cond", cond)
        else:  # e.g. TextCondition: not a tensor, kept as it is
            self.start_cond = cond
        self.variable = nn.Parameter(self.target.initial_variable(start, cond, self.context))
        images = self._gather_rows(mine, self._generate(mine, grad=False, device=device), n)
        if not bool(torch.isfinite(images).all()):
            raise ValueError(
                f"the unoptimized samples are not finite (NaN or inf): {type(self.backbone).__name__} with "
                f"{self.solver!r} produces no valid image; check the solver's settings and the model's precision."
            )
        self.register_buffer("initial_images", images)
        self.register_buffer("best_images", images.clone())
        self.register_buffer("best_loss", torch.full((len(images),), float("inf"), device=device))

    # -- the optimized quantity ---------------------------------------------------------------
    def trajectory_inputs(self, index: Tensor) -> tuple[Tensor, Any]:
        """``(start latent, conditioning)`` of the trajectories of samples ``index``, as the
        optimized variable now makes them."""
        return self.target.trajectory_inputs(self.variable[index], self.start_latent[index], self.start_cond[index], self.context)

    def optimized_tensors(self) -> list[Tensor]:
        return [self.variable]

    def gradient_target(self) -> Target:
        return self.target.gradient_target()

    def _generate(self, index: Tensor, grad: bool, device: torch.device | None = None,
                  inputs: tuple[Tensor, Any] | None = None) -> Tensor:
        x, cond = self.trajectory_inputs(index) if inputs is None else inputs
        with torch.set_grad_enabled(grad):
            x0 = sample(
                self.backbone.denoise, self.solver, x, cond,
                gradient_mode=self.active_gradient_mode(), target=self.gradient_target(),
                generator=self._trajectory_generator(index, device), plan_generator=self._plan_generator,
                scheduler_config=self.backbone.scheduler_config,
            )
            return self.backbone.decode(x0)

    def objective_batch(self, batch: dict[str, Any], index: Tensor, latent: Tensor) -> dict[str, Any]:
        """What the objectives see for samples ``index``: the data module's ``batch``, the unoptimized
        samples (``initial_images``), the trajectories' start latents (``latent``) and the number of
        optimizer steps taken (``step``; during fit, else ``max_steps`` when known: evaluation
        scores as the last step did)."""
        return {**batch, "initial_images": self.initial_images[index], "latent": latent, "step": self._objective_step()}

    def _objective_step(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 0
        if trainer.training:
            return int(trainer.global_step)
        return max(int(trainer.global_step), int(trainer.max_steps or 0))

    # -- training ----------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        index = batch["index"]
        inputs = self.trajectory_inputs(index)
        images = self._generate(index, grad=True, inputs=inputs)
        return images, self.objective(images, self.objective_batch(batch, index, inputs[0]))

    def held_out_losses(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        """The held-out objective's per-sample losses of ``images`` (samples ``batch["index"]``):
        without gradient, and with the global random generators put back afterwards, so a held-out
        objective that draws (augmented copies) leaves the optimized objective's draws as they were."""
        index = batch["index"]
        with progress.global_rng_unchanged(), torch.no_grad():
            latent = self.trajectory_inputs(index)[0]
            return self.held_out_objective(images.detach(), self.objective_batch(batch, index, latent))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if self.search is not None:
            if self.active_gradient_mode() is None:
                return self._search_step(batch)
            return self._manual_gradient_step(batch)
        return self._gradient_loss(batch)

    def _gradient_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The loss of one gradient step (its images kept and its terms logged)."""
        index = batch["index"]
        images, losses = self.compute_losses(batch)
        self.check_losses(losses, len(images))
        self._keep_best(index, losses, images)
        self.log_terms(losses, self.objective)
        if self.held_out_objective is not None:
            self.log("train/held_out", self.held_out_losses(images, batch).mean(), sync_dist=True)
        # Sum, not mean: each sample's gradient is its own loss's gradient, whatever the batch size.
        # Times the number of processes: DDP averages gradients, and each sample lives on one process.
        return losses.sum() * self.world[1]

    def _manual_gradient_step(self, batch: dict[str, Tensor]) -> None:
        """A gradient step of a run in manual optimization (a search that hands steps to a gradient
        mode): what Lightning does for the other runs, then the target's projection."""
        loss = self._gradient_loss(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # the non-finite check runs inside (on_before_optimizer_step)
        with torch.no_grad():
            self.target.project(self.variable)

    @torch.no_grad()
    def _keep_best(self, index: Tensor, losses: Tensor, images: Tensor, variable: Tensor | None = None) -> None:
        """Where samples ``index`` (this process's shard) beat their lowest loss so far, keep their
        loss, image and (a search's) ``variable`` rows. Every process updates every sample's best
        from the gathered shards: the buffers stay identical across processes (DDP broadcasts
        process 0's buffers) and in checkpoints."""
        n = len(self.best_loss)
        losses = losses.detach().to(self.best_loss.dtype)
        seen = self._gather_rows(index, torch.ones_like(losses), n) > 0
        all_losses = self._gather_rows(index, losses, n)
        better = seen & (all_losses < self.best_loss)
        self.best_loss[better] = all_losses[better]
        self.best_images[better] = self._gather_rows(index, images.detach().to(self.best_images.dtype), n)[better]
        if variable is not None:
            self.variable[better] = self._gather_rows(index, variable.to(self.variable.dtype), n)[better]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the update (before any callback, e.g. a checkpoint, sees the variable):
        # project the variable back onto its constraint set.
        with torch.no_grad():
            self.target.project(self.variable)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory([self.variable])
        return torch.optim.Adam([self.variable], lr=self.lr)

    def configure_callbacks(self) -> list[Callback]:
        # Lightning calls this before it checks the trainer against manual optimization: the
        # search's own refusal comes first
        if self.search is not None:
            self._check_search_trainer()
        # the results writer, unless the trainer was given one (with its own options)
        extra = self.evaluation_callbacks()
        if any(isinstance(cb, LatentResults) for cb in self.trainer.callbacks):
            return extra
        return [LatentResults(), *extra]

    # -- evaluation rows: the optimized samples themselves ------------------------------------------
    #: what a checkpoint read by validate/test/predict must share: the optimized variable is made of
    #: the samples (their number, conditions, images), the target and the seed, besides the model
    base_model_settings = ("model.class_path", "model.init_args.backbone", "model.init_args.target",
                           "model.init_args.seed", "data.class_path", "data.init_args.num_samples",
                           "data.init_args.class_label", "data.init_args.prompt", "data.init_args.images",
                           "data.init_args.null_class")
    base_model_entries = ("module", "backbone", "base", "seed")

    def _eval_index(self, batch: dict[str, Any]) -> Tensor:
        index = batch["index"].to(self.variable.device)
        n = len(self.variable)
        if len(index) and int(index.max()) >= n:
            raise ValueError(f"the evaluation rows are the optimized samples, and there are {n}: set data.eval_samples "
                             f"to at most {n} (data.num_samples).")
        return index

    def generate_for_eval(self, batch: dict[str, Any]) -> Tensor:
        """The optimized samples ``batch["index"]`` as the variable makes them now (no graph)."""
        return self._generate(self._eval_index(batch), grad=False).float()

    def generate_reference(self, batch: dict[str, Any]) -> Tensor:
        """The unoptimized samples of the same rows."""
        return self.initial_images[self._eval_index(batch)].float()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """As the base class, but the rows' seeds and classes are the optimized samples' own: ``seed`` is
        the seed of each sample's starting noise (``torch.randn`` from it gives the unoptimized x_T)."""
        out = super().predict_step(batch, batch_idx)
        index = self._eval_index(batch).cpu()
        out["seed"] = torch.tensor([progress.latent_noise_seed(self.seed, i) for i in index.tolist()])
        out.pop("reference_class_label", None)
        samples = self.trainer.datamodule.full_batch("cpu")
        if "class_label" in samples:
            out["class_label"] = samples["class_label"][index]
        return out

    def eval_batch(self, batch: dict[str, Any], images: Tensor, reference: Tensor | None) -> dict[str, Any]:
        index = self._eval_index(batch)
        return self.objective_batch(batch, index, self.trajectory_inputs(index)[0])

    def on_fit_end(self) -> None:
        self.log_hparams_with_metrics({"lr": self.optimizer_lr(), "objective": type(self.objective).__name__,
                                       "target": type(self.target).__name__,
                                       "gradient_mode": type(self.gradient_mode).__name__,
                                       "solver": self.solver_name(), "seed": self.seed})

    def is_trainable_key(self, key: str) -> bool:
        return not key.startswith(("backbone.", "objective.", "held_out_objective."))

    # -- results -----------------------------------------------------------------------------
    @torch.no_grad()
    def summary(self) -> dict[str, Any]:
        """Each objective term before and after (mean over samples; the best image of each sample
        counts as "after"), the held-out objective's mean loss (``held_out``) if there is one, and
        the distance of the results to the unoptimized samples.

        The objectives' ``batch["latent"]`` is, "before", the prepared start latent the unoptimized
        samples were drawn from and, "after", the start latent the variable makes now, after the last
        optimizer step (not necessarily the latent of a sample's best image, which "after" scores)."""
        batch = self.trainer.datamodule.full_batch(self.device)
        every = torch.arange(len(self.best_images), device=self.variable.device)
        latents = {"before": self.start_latent, "after": self.trajectory_inputs(every)[0]}
        summary: dict[str, Any] = {}
        # an objective that draws random numbers (augmented copies) scores both with the same draws
        start = progress.global_rng_states()
        for label, images in (("before", self.initial_images), ("after", self.best_images)):
            scored = self.objective_batch(batch, every, latents[label])
            progress.set_global_rng_states(start)
            loss = self.objective(images, scored)
            summary[label] = {"loss": loss.mean().item(), **{k: v.float().mean().item() for k, v in self.objective.terms.items()}}
            if self.held_out_objective is not None:
                progress.set_global_rng_states(start)
                summary[label]["held_out"] = self.held_out_objective(images, scored).mean().item()
        diff = (self.best_images - self.initial_images).flatten(1)
        summary["l2_to_unoptimized"] = diff.norm(dim=1).mean().item()
        summary["rms_to_unoptimized"] = diff.pow(2).mean(1).sqrt().mean().item()
        return summary
