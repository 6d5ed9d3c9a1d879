"""RewardFineTuning: align a diffusion model to a differentiable reward with LoRA (paper Sec. 5.2)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import Callback
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sdo_lightning import lora, progress
from sdo_lightning.backbones import Backbone, DigitsBackbone
from sdo_lightning.contracts import GradientMode, Objective, Target
from sdo_lightning.contracts import Solver
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.training.callbacks import SampleImages
from sdo_lightning.evaluation.metrics import Evaluation
from sdo_lightning.modules.adapter_export import AdapterExport, _is_fsdp
from sdo_lightning.modules.anchoring import OWN_TRAIN_METRICS, Anchoring, KeptWindow  # noqa: F401 (also imported from here)
from sdo_lightning.modules.base import OptimizationModule, check_solver_fits_backbone
from sdo_lightning.sampling import sample
from sdo_lightning.solvers import DDIM


class RewardFineTuning(Anchoring, AdapterExport, OptimizationModule):
    """Fine-tune LoRA adapters on the denoiser so its samples lower an objective (raise a reward).

    Each training step draws fresh starting noise for every sample of the batch, samples through
    the solver while the gradient mode keeps the graph of the calls it chooses (SDO: one call
    drawn uniformly per step), decodes, scores and steps the optimizer on the adapters only. The
    base weights stay frozen, in the precision the Trainer gives them; adapters are kept in fp32.
    At the end of fit (and with every checkpoint) the adapter is written to ``<log dir>/lora``.

    The starting noise of a sample is a function of the seed, the optimizer step, the micro-batch
    within the step (gradient accumulation) and the sample's ``batch["index"]`` alone, so a run on
    several processes (DDP: each process gets its own samples, see :class:`~sdo_lightning.training.data.SampleSet`
    and :class:`~sdo_lightning.training.data.PromptSet`) draws exactly what one process would draw for the
    combined batch, and a resumed run draws what an uninterrupted one would. DDP averages the
    per-process mean losses' gradients: the gradient of the mean over the combined batch.

    Args:
        objective: the per-sample loss (a negated reward); lower is better.
        backbone: the diffusion model; default: the embedded digits model.
        solver: the sampler used during fine-tuning; default DDIM with 50 steps.
        gradient_mode: which network calls keep their graph; default SDO.
        lora_rank: rank of the LoRA adapters.
        lora_alpha: LoRA alpha (scale alpha / rank); None means equal to the rank.
        lora_target_modules: names of the layers to adapt; None for the backbone's default.
        lr: learning rate of the default optimizer (AdamW).
        weight_decay: weight decay of the default optimizer.
        optimizer: an optimizer factory overriding the default (``class_path`` in YAML).
        adapter_l2: weight of an L2 penalty on the adapter weights, keeping the fine-tuned model
            near the base one (a control against reward hacking).
        held_out_objective: an objective not optimized, only logged (``train/held_out``), to
            see reward hacking: a trained reward that rises while this one falls.
        fold_adapters: run the network calls that keep no graph with the adapters folded into
            copies of the base weights (same outputs, no per-call LoRA overhead).
        seed: seed of the starting noise and of the gradient mode's draws.
        on_nonfinite: a NaN or infinite loss or gradient ``skip``s the optimizer step with a
            warning, or ``stop``s the fit with an error.
        evaluation: what validation (during fit: ``trainer.val_check_interval``), ``sdo
            validate`` / ``sdo test`` and ``sdo predict`` compute on the data module's evaluation
            rows (``data.eval_samples``): reward, held-out reward, diversity, fidelity (SSIM,
            PSNR, LPIPS) and FID/KID to the base model's samples of the same seeds, and a grid.
        adapter: an exported LoRA directory (``<log dir>/lora`` of a fit) to start from, e.g. to
            predict with it: ``sdo predict --config ... --model.adapter runs/.../lora``.
        kl_weight: weight of the anchor to the base model (0: none), added to the loss at every
            call that keeps its graph: the base model's output for the same input comes from one
            more no-grad call with the adapters off, and the anchor is the KL divergence between
            the two transition kernels of the step, ``||mu(u) - mu(u_base)||^2 / (2 sigma_t^2)``,
            for a stochastic DDIM step (eta > 0; see ``Solver.transition_kl``). A deterministic step
            (eta 0, DPM-Solver++, flow Euler, LCM, DDIM's last step) has no KL: there it is
            ``||u - u_base||^2 / 2`` over the output's elements, the KL between unit-variance
            Gaussians centred on the two outputs, a plain output penalty. Summed over the kept
            calls (one for SDO), averaged over the samples, logged as ``train/anchor_kl``. Its
            gradient flows back like the reward's through the kept calls (scaled as the gradient
            mode scales them), with the base output held constant.
        kept_timesteps: ``[t_min, t_max]``: only the calls whose timestep (the scheduler's, e.g.
            0..999) lies in this window may keep their graph (SRPO's practice of training a
            middle window); the gradient mode then plans over those calls alone, as if the
            trajectory were just them (SDO draws one of them, DRTune spaces K over them,
            truncation keeps the window's last K, full backprop all of them). None: every call.
        kept_fraction: the same window as fractions of the chain, ``[start, end)``: call ``i`` of
            ``N`` (0 = pure noise) is in it when ``start <= i / N < end``; e.g. ``[0.25, 0.75]``
            for the middle half. At most one of ``kept_timesteps`` and ``kept_fraction``.

    Checkpoint selection: with a ``ModelCheckpoint(monitor=...)`` among the trainer's callbacks
    (e.g. ``monitor: val/held_out, mode: min``; Lightning's ``EarlyStopping`` may stop the fit
    on the same metric), the adapter written to ``<log dir>/lora`` at the end of fit is that of
    the checkpoint it selected, and its model card names the step (``steps``), the metric and its
    value, and the run's last step (``final_step``). A monitor that names a metric this fit never
    logs is refused before any sampling (metrics of the objective's own terms, ``train/<term>``,
    are named only when it first runs, and pass unchecked).
    """

    def __init__(
        self,
        objective: Objective,
        backbone: Backbone = lazy_instance(DigitsBackbone),
        solver: Solver = lazy_instance(DDIM, num_inference_steps=50),
        gradient_mode: GradientMode = lazy_instance(ShortcutGradient),
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        adapter_l2: float = 0.0,
        held_out_objective: Objective | None = None,
        fold_adapters: bool = True,
        seed: int = 0,
        on_nonfinite: Literal["skip", "stop"] = "skip",
        evaluation: Evaluation | None = lazy_instance(Evaluation),
        adapter: str | None = None,
        kl_weight: float = 0.0,
        kept_timesteps: tuple[float, float] | None = None,
        kept_fraction: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(seed, on_nonfinite)
        from sdo_lightning.searches import Search

        if isinstance(gradient_mode, Search):  # given in Python (a parsed config refuses it by type already)
            raise ValueError(gradient_mode.refusal())
        if not (math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0 (0: no anchor to the base model), got {kl_weight}.")
        self.kl_weight = float(kl_weight)
        self.kept_timesteps = None if kept_timesteps is None else tuple(kept_timesteps)
        self.kept_fraction = None if kept_fraction is None else tuple(kept_fraction)
        #: per-sample anchor (``(B,)``, with its graph) of the last ``generate(grad=True)``, or None
        self.anchor_kl: Tensor | None = None
        self.objective = objective
        self.backbone = backbone
        self.solver = solver
        self.gradient_mode = gradient_mode
        self.held_out_objective = held_out_objective
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_factory = optimizer
        self.adapter_l2 = adapter_l2
        self.seed = seed
        targets = lora_target_modules or backbone.lora_target_modules
        self.lora_params = lora.add_lora(backbone.network, lora_rank, lora_alpha or lora_rank, targets)
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha or lora_rank
        self._folding = lora.AdapterFolding(backbone.network) if fold_adapters else None
        self.evaluation = evaluation
        self.base_model = lora.base_signature(backbone.network)  # before a Trainer casts the weights
        self.adapter = adapter
        if adapter is not None:
            self.load_adapter(adapter)
        self.kept_window = self._kept_window()  # (first, stop, N) of the calls that may keep a graph
        self._validation_history: dict[int, dict[str, float]] = {}
        self._card_selection: dict[str, Any] | None = None  # of the exported adapter, when selected

    base_model_settings = OptimizationModule.base_model_settings + (
        "model.init_args.lora_rank", "model.init_args.lora_alpha", "model.init_args.lora_target_modules")

    def run_fingerprint(self) -> dict[str, Any]:
        return {**super().run_fingerprint(), "base": self.base_model}

    def load_adapter(self, directory: str | Path) -> None:
        """Load an exported adapter (``export_adapter``'s directory) into this module's adapters,
        refusing one written for another base model (its model card's ``base_model_signature``)
        or with other LoRA shapes."""
        card = lora.read_model_card(directory)
        theirs = card.get("base_model_signature")
        if theirs is not None and theirs != self.base_model:
            raise ValueError(f"adapter {directory} was trained on another base model ({card.get('base_model')!r}, "
                             f"signature {theirs}; this {type(self.backbone).__name__} has {self.base_model}); use "
                             "the backbone the adapter was trained on.")
        lora.load_adapter_weights(self.backbone.network, directory)
        for p in self.lora_params:
            p.requires_grad_(True)

    # -- precision: adapters stay fp32 whatever the Trainer does to the base weights ------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_solver_fits_backbone(self.solver, self.backbone)
        if stage == "fit":
            self._check_monitors()
        if self._folding is not None and _is_fsdp(self.trainer.strategy):
            raise ValueError(
                "fold_adapters reads the base weights outside the network's forward, where FSDP holds only a "
                "shard of them; set fold_adapters: false under the FSDP strategy."
            )

    def on_fit_start(self) -> None:
        for p in self.lora_params:
            if p.dtype != torch.float32:
                p.data = p.data.float()

    def _sample_seeds(self, index: Tensor) -> list[int]:
        # one seed per (seed, optimizer step, micro-batch, sample): independent of the batch's
        # split over processes and micro-batches of other steps
        micro = progress.micro_batch(self._trainer)
        return [progress.finetune_sample_seed(self.seed, self.global_step, micro, i) for i in index.tolist()]

    def _noise(self, index: Tensor) -> Tensor:
        return progress.normal(self.backbone.latent_shape, self._sample_seeds(index)).to(self.device)

    def _denoise(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        # Calls that keep no graph run under no_grad (see sample()): fold the adapters for them.
        self._folding.fold(not torch.is_grad_enabled())
        return self.backbone.denoise(x, t, cond)

    @contextmanager
    def _sampling_denoiser(self, fold: bool = True) -> Iterator[Any]:
        """The denoiser to sample with: with adapter folding (and ``fold``), the calls that keep no
        graph run on weights with the adapters folded in, recomputed first (the adapters changed at
        the last optimizer step) and unfolded afterwards."""
        if not fold or self._folding is None:
            yield self.backbone.denoise
            return
        self._folding.refresh()
        try:
            yield self._denoise
        finally:
            self._folding.fold(False)

    def generate(self, batch: dict[str, Tensor], grad: bool) -> Tensor:
        """Images for ``batch`` from fresh noise; differentiable in the adapters when ``grad``."""
        cond = self.backbone.encode_condition(batch)
        index = batch["index"]
        x = self._noise(index)
        with self._sampling_denoiser() as denoiser:
            return self._sample(denoiser, x, cond, grad, index)

    def _sample(self, denoiser: Any, x: Tensor, cond: Any, grad: bool, index: Tensor) -> Tensor:
        # stochastic solvers: one generator per sample, seeded like its starting noise
        generators = progress.generators([s + 1 for s in self._sample_seeds(index)], self.device)
        callback, terms = None, None
        if grad and self.kl_weight > 0:
            denoiser, callback, terms = self._anchoring(denoiser)
        with torch.set_grad_enabled(grad):
            x0 = sample(
                denoiser, self.solver, x, cond,
                gradient_mode=self.planner(), target=self.gradient_target(),
                generator=generators,
                plan_generator=self._plan_generator, scheduler_config=self.backbone.scheduler_config,
                callback=callback,
            )
            if terms is not None:
                self.anchor_kl = torch.stack(terms).sum(0) if terms else x.new_zeros(len(x))
            return self.backbone.decode(x0)

    # -- evaluation rows: fixed seeds, no graph ---------------------------------------------------
    def _eval_sample(self, batch: dict[str, Any], fold: bool) -> Tensor:
        from sdo_lightning.backbones.base import TextConditionedBackbone

        if isinstance(self.backbone, TextConditionedBackbone) and not batch.get("prompt"):
            raise ValueError(f"{type(self.backbone).__name__} generates from prompts, and the evaluation rows have none: "
                             "give --data.eval_prompts (PromptSet) or --data.eval_prompt (SampleSet).")
        seeds = [int(s) for s in batch["seed"].tolist()]
        x = progress.normal(self.backbone.latent_shape, seeds).to(self.device)
        cond = self.backbone.encode_condition(batch)
        generators = progress.generators([s + 1 for s in seeds], self.device)
        # no gradient mode, nothing drawn from the plan generator
        with self._sampling_denoiser(fold) as denoiser, torch.no_grad():
            x0 = sample(denoiser, self.solver, x, cond, generator=generators, scheduler_config=self.backbone.scheduler_config)
            return self.backbone.decode(x0).float()

    def generate_for_eval(self, batch: dict[str, Any]) -> Tensor:
        """Images of the evaluation rows with the fine-tuned adapters: row ``i`` starts from
        ``torch.randn`` seeded with ``batch["seed"][i]`` (a stochastic solver's noise: that seed + 1)."""
        return self._eval_sample(batch, fold=True)

    def generate_reference(self, batch: dict[str, Any]) -> Tensor:
        """The base model's images of the same rows and seeds (adapters off), drawn with the rows'
        ``reference_class_label`` where the data module gives one."""
        if "reference_class_label" in batch:
            batch = {**batch, "class_label": batch["reference_class_label"]}
        with lora.adapters_disabled(self.backbone.network):
            return self._eval_sample(batch, fold=False)

    def optimized_tensors(self) -> list[Tensor]:
        return list(self.lora_params)

    def gradient_target(self) -> Target:
        return Target.parameters()

    def compute_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        images = self.generate(batch, grad=True)
        return images, self.objective(images, batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, losses = self.compute_losses(batch)
        self.check_losses(losses, len(images))
        loss = losses.mean()
        self.log_terms(losses, self.objective)
        self.log("train/reward", -loss, sync_dist=True)
        anchor, self.anchor_kl = self.anchor_kl, None
        mean = lambda values: values.mean()  # noqa: E731
        if self.trainer.world_size > 1:
            # DDP averages the processes' losses; with shards of unequal size (e.g. 3 samples on 2
            # processes) the mean of their means over-weights the smaller shard. Scaled like
            # this, the averaged gradient is that of the mean over all samples.
            total = self.trainer.strategy.reduce(torch.tensor(float(len(losses)), device=losses.device), reduce_op="sum")
            mean = lambda values: values.sum() * self.trainer.world_size / total  # noqa: E731
            loss = mean(losses)
        if anchor is not None and self.kl_weight:
            self.log("train/anchor_kl", anchor.detach().mean(), sync_dist=True)
            loss = loss + self.kl_weight * mean(anchor)
        if self.adapter_l2:
            penalty = sum(p.float().pow(2).sum() for p in self.lora_params)
            self.log("train/adapter_l2", penalty)
            loss = loss + self.adapter_l2 * penalty
        with torch.no_grad():
            flat = images.detach().flatten(1).float()
            if len(flat) > 1:
                self.log("train/diversity", torch.pdist(flat).mean())  # mean pairwise L2 distance
            if self.held_out_objective is not None:
                with progress.global_rng_unchanged():  # its draws must not shift the optimized objective's
                    held_out = self.held_out_objective(images.detach(), batch).mean()
                self.log("train/held_out", held_out, sync_dist=True)
        return {"loss": loss, "images": images.detach()}  # the images for SampleImages

    def on_validation_epoch_end(self) -> None:
        values = self.evaluator.finish(self, "val")
        # every validation of a fit, by step: the model card of a selected checkpoint shows its own
        if values is not None and self.trainer.state.fn == "fit":
            self._validation_history[int(self.global_step)] = dict(values)

    def configure_callbacks(self) -> list[Callback]:
        # sample grids in TensorBoard every 50 steps, unless the trainer was given its own
        extra = self.evaluation_callbacks()
        if any(isinstance(cb, SampleImages) for cb in self.trainer.callbacks):
            return extra
        return [SampleImages(every_n_steps=50), *extra]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(self.lora_params)
        return torch.optim.AdamW(self.lora_params, lr=self.lr, weight_decay=self.weight_decay)

    # -- checkpoints and export: adapters only --------------------------------------------------
    def is_trainable_key(self, key: str) -> bool:
        return "lora_" in key

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.export_adapter()

    def on_fit_end(self) -> None:
        selected = self.selected_checkpoint()
        if selected is not None:
            path = self.export_selected(selected)
            if path is not None and self._card_selection is not None:
                rank_zero_info(f"LoRA adapter of step {self._card_selection['steps']} (selected by "
                               f"{self._card_selection['selected_by']}) written to {path}")
        else:
            path = self.export_adapter()
            if path is not None:
                rank_zero_info(f"LoRA adapter written to {path}")
        self.log_hparams_with_metrics({**self.card_fields(), **(self._card_selection or {})})

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # every step draws new samples: a Picard solver's stored trajectories would never start
        # one warm again, and would hold one trajectory per sample on the device
        self.solver.forget()
