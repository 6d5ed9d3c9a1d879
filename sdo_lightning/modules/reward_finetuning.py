"""RewardFineTuning: align a diffusion model to a differentiable reward with LoRA (paper Sec. 5.2)."""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from jsonargparse import lazy_instance
from lightning.pytorch import Callback
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sdo_lightning import lora, progress
from sdo_lightning.backbones import Backbone, DigitsBackbone
from sdo_lightning.contracts import GradientMode, GradientPlan, Objective, Target
from sdo_lightning.contracts import Solver
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.training.callbacks import SampleImages
from sdo_lightning.evaluation.metrics import Evaluation
from sdo_lightning.modules.base import OptimizationModule, check_solver_fits_backbone
from sdo_lightning.sampling import Step, sample
from sdo_lightning.solvers import DDIM


#: the ``train/`` metrics the module logs itself (the objective's terms come on top)
OWN_TRAIN_METRICS = frozenset({"train/loss", "train/reward", "train/diversity", "train/grad_norm", "train/skipped_steps",
                               "train/adapter_l2", "train/anchor_kl", "train/held_out"})


class RewardFineTuning(OptimizationModule):
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

    # -- anchoring: which calls may keep a graph, and the KL to the base model at those ----------
    def _kept_window(self) -> tuple[int, int, int] | None:
        """``(first, stop, N)``: the calls ``first .. stop - 1`` of the ``N`` the solver makes lie in
        ``kept_timesteps`` / ``kept_fraction``; None without a window. Refuses an empty window."""
        if self.kept_timesteps is not None and self.kept_fraction is not None:
            raise ValueError("kept_timesteps and kept_fraction both set a window of kept calls; give one of them.")
        if self.kept_timesteps is None and self.kept_fraction is None:
            return None
        timesteps = [float(t) for t in self.solver.unwrap().begin(self.backbone.scheduler_config, "cpu").timesteps]
        n = len(timesteps)
        if self.kept_timesteps is not None:
            if len(self.kept_timesteps) != 2:
                raise ValueError(f"kept_timesteps must be two numbers [t_min, t_max], got {list(self.kept_timesteps)}.")
            low, high = (float(v) for v in self.kept_timesteps)
            inside = [i for i, t in enumerate(timesteps) if low <= t <= high]
            if not inside:
                span = f"{min(timesteps):g}..{max(timesteps):g}"
                what = ("is empty (t_min > t_max)" if low > high else f"lies outside the schedule (timesteps {span})"
                        if high < min(timesteps) or low > max(timesteps) else
                        f"holds none of the {n} timesteps the solver samples ({', '.join(f'{t:g}' for t in timesteps)})")
                raise ValueError(f"kept_timesteps [{low:g}, {high:g}] {what}; give a window [t_min, t_max] that "
                                 f"contains at least one of them.")
        else:
            if len(self.kept_fraction) != 2:
                raise ValueError(f"kept_fraction must be two numbers [start, end], got {list(self.kept_fraction)}.")
            start, end = (float(v) for v in self.kept_fraction)
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"kept_fraction [{start:g}, {end:g}] is not a window of the chain; give 0 <= start < "
                                 "end <= 1 (e.g. [0.25, 0.75] for the middle half).")
            inside = [i for i in range(n) if start <= i / n < end]
            if not inside:
                raise ValueError(f"kept_fraction [{start:g}, {end:g}] holds none of the chain's {n} calls (call i "
                                 f"sits at i / {n}); widen it to at least 1 / {n}.")
        if inside != list(range(inside[0], inside[-1] + 1)):  # a schedule whose timesteps are not monotone
            raise ValueError(f"the calls in the window are not consecutive ({inside}); give kept_fraction instead.")
        return inside[0], inside[-1] + 1, n

    def planner(self) -> GradientMode:
        """The gradient mode the training trajectories use: ``gradient_mode``, restricted to the
        window of kept calls when there is one."""
        if self.kept_window is None:
            return self.gradient_mode
        return KeptWindow(self.gradient_mode, *self.kept_window)

    def _anchoring(self, denoiser: Any) -> tuple[Any, Callable[[Step], None], list[Tensor]]:
        """``(denoiser, callback, terms)`` for a trajectory whose kept calls are compared with the
        base model: the denoiser notes the input of each call that keeps its graph, the callback
        (right after that call's solver step) runs the base model on it (no grad, adapters off)
        and appends the call's per-sample KL to ``terms``."""
        solver = self.solver.unwrap()  # a wrapper's (Picard's) loop steps with the solver it wraps
        noted: list[tuple[Tensor, Tensor, Any]] = []
        terms: list[Tensor] = []

        def noting(x: Tensor, t: Tensor, cond: Any) -> Tensor:
            if torch.is_grad_enabled():  # a kept call (or its recomputation in backward: overwritten, unused)
                noted[:] = [(x.detach(), t, cond)]
            return denoiser(x, t, cond)

        def compare(step: Step) -> None:
            if not noted or not step.model_output.requires_grad:
                return None
            x, t, cond = noted.pop()
            if self._folding is not None:
                self._folding.fold(False)  # the base weights themselves, not the adapters folded into them
            with torch.no_grad(), lora.adapters_disabled(self.backbone.network):
                base = self.backbone.denoise(x, t, cond)
            kl = solver.transition_kl(step.model_output, base, step.timestep, step.x, step.state)
            if kl is None:  # a deterministic step: the KL of unit-variance Gaussians around the outputs
                kl = 0.5 * (step.model_output.float() - base.float()).pow(2).flatten(1).sum(1)
            terms.append(kl)
            return None

        return noting, compare, terms

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

    def logged_metrics(self) -> tuple[set[str], bool]:
        """The names this fit can log (``train/...`` and, when it validates, ``val/...``) and
        whether it validates; the objective's own terms (``train/<term>``) are not among them."""
        names = set(OWN_TRAIN_METRICS) - {"train/adapter_l2", "train/anchor_kl", "train/held_out"}
        names |= {"train/adapter_l2"} if self.adapter_l2 else set()
        names |= {"train/anchor_kl"} if self.kl_weight else set()
        names |= {"train/held_out"} if self.held_out_objective is not None else set()
        datamodule = getattr(self.trainer, "datamodule", None)
        validates = self.trainer.limit_val_batches != 0 and getattr(datamodule, "eval_rows", True) is not None
        if validates:
            val = {"reward", "diversity", "base_diversity", "psnr", "ssim", "pixel_fid"}
            val |= {"held_out"} if self.held_out_objective is not None else set()
            evaluation = self.evaluation
            if isinstance(evaluation, Evaluation):
                val |= {"fid", "kid", "class_entropy"} if _setting(evaluation, "features") is not None else set()
                val |= {"lpips"} if _setting(evaluation, "lpips") is not None else set()
                val |= {"clip_score"} if _setting(evaluation, "clip_model") is not None else set()
            names |= {f"val/{name}" for name in val}
        return names, validates

    def _check_monitors(self) -> None:
        """Refuse, before any sampling, a ModelCheckpoint or EarlyStopping whose monitor names a
        metric this fit never logs (Lightning would say so only at the first validation)."""
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        names, validates = self.logged_metrics()
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None) if isinstance(callback, (ModelCheckpoint, EarlyStopping)) else None
            objective_term = monitor is not None and monitor.startswith("train/") and monitor not in OWN_TRAIN_METRICS
            if not monitor or monitor in names or objective_term:
                continue
            kind = type(callback).__name__
            if monitor.startswith("val/") and not validates:
                raise ValueError(f"{kind} monitors {monitor!r}, which only validation logs, and this fit does not "
                                 "validate; set data.eval_samples (and trainer.val_check_interval) or monitor a train/ "
                                 "metric.")
            raise ValueError(f"{kind} monitors {monitor!r}, which this fit never logs; monitor one of "
                             f"{', '.join(sorted(names))}.")

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

    def selected_checkpoint(self) -> Any:
        """The trainer's first ``ModelCheckpoint`` with a ``monitor`` that saved a best checkpoint
        file, or None."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        if self._trainer is None:
            return None
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path \
                    and Path(callback.best_model_path).is_file():
                return callback
        return None

    def export_selected(self, callback: Any, directory: str | Path | None = None) -> Path | None:
        """Write the adapter of ``callback``'s best checkpoint (not the last step's) to
        ``<log dir>/lora``, its model card naming the step, the metric and its value. The module
        keeps the last step's adapters (as Lightning leaves a fitted module)."""
        from lightning.pytorch.utilities import rank_zero_warn

        from sdo_lightning.checkpoint_io import read_checkpoint

        if self._trainer is not None and _is_fsdp(self.trainer.strategy):
            rank_zero_warn("checkpoint selection is not supported under FSDP (sharded checkpoints): the adapter of the "
                           "last step is exported; load the selected checkpoint with --ckpt_path to export it.")
            return self.export_adapter(directory)
        if self.global_rank != 0:
            return None
        if directory is None:
            if self.log_dir is None:
                return None
            directory = self.log_dir / "lora"
        checkpoint = read_checkpoint(callback.best_model_path)
        params = dict(self.named_parameters())
        state = {k: v for k, v in checkpoint["state_dict"].items() if self.is_trainable_key(k) and k in params}
        if not state:
            raise ValueError(f"the selected checkpoint {callback.best_model_path} holds no adapter weights of this model; "
                             "select on checkpoints this fit wrote.")
        step = int(checkpoint["global_step"])
        score = callback.best_model_score
        self._card_selection = {
            "steps": step,
            "selected_by": f"{callback.monitor} ({callback.mode})",
            "selected_score": None if score is None else float(score),
            "final_step": int(self.global_step),
        }
        kept = {k: params[k].detach().clone() for k in state}
        try:
            with torch.no_grad():
                for k, value in state.items():
                    params[k].copy_(value)
            path = self.backbone.save_lora(directory)
            lora.write_model_card(path, {**self.card_fields(), **self._card_selection},
                                  self._validation_history.get(step, getattr(self, "last_eval_metrics", None)))
            return path
        finally:
            with torch.no_grad():
                for k, value in kept.items():
                    params[k].copy_(value)

    def card_fields(self) -> dict[str, Any]:
        """What the model card and TensorBoard's HParams tab record of this fine-tuning."""
        solver = self.solver
        base = type(self.backbone).__name__
        source = next((v for k, v in sorted((self.run_config or {}).items())
                       if k.startswith("model.init_args.backbone.init_args.") and k.rsplit(".", 1)[-1] in ("model", "path")
                       and v is not None), None)
        return {
            "base_model": f"{base}({source})" if source else base,
            "base_model_signature": self.base_model,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "reward": type(self.objective).__name__,
            "held_out_reward": type(self.held_out_objective).__name__ if self.held_out_objective is not None else None,
            "steps": int(self.global_step) if self._trainer is not None else 0,
            "gradient_mode": type(self.gradient_mode).__name__,
            "solver": self.solver_name(),
            "solver_steps": getattr(solver, "num_inference_steps", None),
            "lr": self.optimizer_lr(),
            "seed": self.seed,
        }

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # every step draws new samples: a Picard solver's stored trajectories would never start
        # one warm again, and would hold one trajectory per sample on the device
        self.solver.forget()

    def export_adapter(self, directory: str | Path | None = None) -> Path | None:
        """Write the adapter (``<log dir>/lora`` by default) in the backbone's LoRA format.

        Under DDP process 0 writes.
        """
        if directory is None:
            if self.log_dir is None:
                return None
            directory = self.log_dir / "lora"
        if self._trainer is not None and _is_fsdp(self.trainer.strategy):
            # outside forward FSDP keeps a shard of each weight: gather them (every process takes part)
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, writeback=False):
                return self._save_with_card(directory) if self.global_rank == 0 else None
        if self.global_rank != 0:
            return None
        return self._save_with_card(directory)

    def _save_with_card(self, directory: str | Path) -> Path:
        from sdo_lightning import atomic

        # written beside, then each file renamed over its namesake: a kill or a full disk
        # mid-export leaves the previous adapter files whole
        with atomic.replacing_files(directory) as tmp:
            self.backbone.save_lora(tmp)
            lora.write_model_card(tmp, self.card_fields(), getattr(self, "last_eval_metrics", None))
        return Path(directory)


class KeptWindow(GradientMode, register=False):
    """A gradient mode restricted to a window of consecutive calls: ``mode`` plans a trajectory
    of the window's ``stop - first`` calls, and its plan is placed at calls ``first .. stop - 1``
    of the ``num_calls``; no call outside the window keeps its graph.

    It lives here rather than in each mode's ``plan`` because the window is the same rule for
    every mode, and only the solver's timesteps (which ``plan`` never sees) say where it lies.
    """

    def __init__(self, mode: GradientMode, first: int, stop: int, num_calls: int) -> None:
        if not 0 <= first < stop <= num_calls:
            raise ValueError(f"a window of kept calls must satisfy 0 <= first < stop <= {num_calls}, got {first}, {stop}.")
        self.mode, self.first, self.stop, self.num_calls = mode, first, stop, num_calls

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        if num_calls != self.num_calls:
            raise ValueError(f"the window of kept calls was set for trajectories of {self.num_calls} calls, and this one "
                             f"has {num_calls}; build the module again for the new solver.")
        inner = self.mode.plan(self.stop - self.first, target, generator)
        keep = (False,) * self.first + tuple(inner.keep) + (False,) * (num_calls - self.stop)
        detach = None if inner.detach_before is None else self.first + inner.detach_before
        return dataclasses.replace(inner, keep=keep, detach_before=detach)


def _setting(obj: Any, name: str) -> Any:
    """Constructor argument ``name`` of ``obj``, also of a jsonargparse ``lazy_instance`` not built yet
    (its attributes appear only at the first method call)."""
    if name in vars(obj):
        return vars(obj)[name]
    lazy = getattr(obj, "_lazy_kwargs", {})
    if name in lazy:
        return lazy[name]
    import inspect

    return inspect.signature(getattr(obj, "_lazy_class_type", type(obj)).__init__).parameters[name].default


def _is_fsdp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)
