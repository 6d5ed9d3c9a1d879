"""What the two LightningModules share: checkpoints of trainable state only, and logging."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sdo_lightning import progress, registry
from sdo_lightning.modules.fingerprint import _current, _is_default
from sdo_lightning.backbones import Backbone
from sdo_lightning.training.checkpoint_io import SafeCheckpointIO
from sdo_lightning.contracts import Solver, Target
from sdo_lightning.evaluation.evaluator import Evaluator
from sdo_lightning.errors import NonFiniteError  # noqa: F401 (raised here; also imported from here)


def check_solver_fits_backbone(solver: Solver, backbone: Backbone) -> None:
    """Refuse a flow solver on a diffusion model and the other way round; warn when an LCM solver
    meets a model that is not LCM-distilled, or the other way round."""
    solver = solver.unwrap()  # a wrapper (Picard) samples with the solver it wraps
    flow_solver = solver.predicts == "velocity"
    if flow_solver != backbone.flow_matching:
        model = "a rectified-flow model (velocity)" if backbone.flow_matching else "a diffusion model (noise prediction)"
        fix = _solvers_for(backbone.flow_matching)
        raise ValueError(f"{type(backbone).__name__} holds {model}, which solver {type(solver).__name__} cannot "
                         f"sample; use solver {fix}.")

    scheduler_name = str(backbone.scheduler_config.get("_class_name", ""))
    lcm_model = backbone.lcm_distilled
    lcm_lora = backbone.fused_lora is not None  # e.g. an LCM-LoRA fused at load time
    name = type(backbone).__name__
    if solver.for_lcm_models and not (lcm_model or lcm_lora):
        rank_zero_warn(
            f"solver LCMMultistep on {name}, which does not look LCM-distilled (no guidance embedding, scheduler "
            f"{scheduler_name or 'unknown'}, no LCM-LoRA recorded): its samples will be poor; use DDIM or "
            "DPMSolverPlusPlus, or load an LCM model or LCM-LoRA (StableDiffusionBackbone lora: ...)."
        )
    elif lcm_model and not solver.for_lcm_models:
        lcm = " or ".join(n for n, c in registry.classes("solvers").items() if c.for_lcm_models)
        rank_zero_warn(
            f"{name} holds an LCM-distilled model but the solver is {type(solver).__name__}: use solver "
            f"{lcm} with 1-8 steps, since LCMs are not trained for other samplers."
        )


def _solvers_for(flow_matching: bool) -> str:
    """The registered solvers of a rectified flow (``flow_matching``) or of a diffusion model, in words
    (wrappers such as Picard left out)."""
    names = [n for n, c in registry.classes("solvers").items()
             if (c.predicts == "velocity") == flow_matching and c.unwrap is Solver.unwrap]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


class OptimizationModule(LightningModule):
    """Base of LatentOptimization and RewardFineTuning.

    Checkpoints hold only the keys :meth:`is_trainable_key` accepts (frozen base weights are the
    user's files) plus the state of the gradient mode's random draws, so a resumed run draws
    the same kept calls as an uninterrupted one.

    A non-finite loss or gradient (NaN or inf) either skips the optimizer step, with a warning
    that says which step and what was non-finite (``on_nonfinite: skip``: the optimized tensors
    and the optimizer state stay as they were), or stops the fit with :class:`NonFiniteError`
    before the step (``on_nonfinite: stop``).
    """

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("modules", cls)

    def __init__(self, seed: int, on_nonfinite: Literal["skip", "stop"] = "skip") -> None:
        super().__init__()
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
        self._plan_generator = torch.Generator().manual_seed(seed)
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self._nonfinite_loss = False
        self.strict_loading = False  # checkpoints hold the trainable state only
        #: validation, test and predict (its state stays out of checkpoints)
        self.evaluator = Evaluator()

    # -- the log directory ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # trainer.log_dir is a collective under DDP: ask on every process, once
        self._log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        # atomic checkpoint writes, code-free reads (setup runs before a checkpoint is restored);
        # strategies with their own format (FSDP's sharded one) keep theirs
        if self.trainer.accumulate_grad_batches < 1:
            raise ValueError(f"trainer.accumulate_grad_batches must be >= 1 (micro-batches per optimizer step), got "
                             f"{self.trainer.accumulate_grad_batches}.")
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = SafeCheckpointIO()

    @property
    def log_dir(self) -> Path | None:
        """The run's log directory (where results, adapters and interrupted checkpoints go)."""
        if getattr(self, "_log_dir", None) is not None:
            return self._log_dir
        if self._trainer is None:
            return None
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    # -- processes -----------------------------------------------------------------------------
    @property
    def world(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process (``(0, 1)`` outside a distributed fit)."""
        trainer = self._trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def check_losses(self, losses: Tensor, batch_size: int) -> None:
        if losses.shape != (batch_size,):
            raise ValueError(
                f"{type(self.objective).__name__} returned shape {tuple(losses.shape)}; an objective must "
                f"return one loss per sample, shape ({batch_size},)."
            )
        self._nonfinite_loss = self._nonfinite_loss or not bool(torch.isfinite(losses.detach()).all())

    def is_trainable_key(self, key: str) -> bool:
        raise NotImplementedError

    def optimized_tensors(self) -> list[Tensor]:
        """The tensors the optimizer updates (a latent, an embedding, LoRA adapters)."""
        raise NotImplementedError

    def gradient_target(self) -> Target:
        """What the gradient mode differentiates with respect to."""
        raise NotImplementedError

    def compute_losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Images generated for ``batch`` (differentiable) and their per-sample losses ``(B,)``."""
        raise NotImplementedError

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After backward (and DDP's all-reduce), before the update.
        params = [p for p in self.optimized_tensors() if p.grad is not None]
        grads = [p.grad.norm() for p in params]
        norm = torch.stack(grads).norm() if grads else None
        bad_loss = self._nonfinite_loss
        self._nonfinite_loss = False
        # fp16 mixed precision: an overflowing gradient is the GradScaler's routine signal to skip
        # the step and lower its scale; it is not this check's business.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        bad_grad = norm is not None and not scaled and not bool(torch.isfinite(norm))
        if self.trainer.world_size > 1:  # every process must take the same decision
            # (under FSDP each process sees only its shard of the gradient)
            bad_loss = self.trainer.strategy.reduce_boolean_decision(bad_loss, all=False)
            bad_grad = self.trainer.strategy.reduce_boolean_decision(bad_grad, all=False)
        if bad_loss or bad_grad:
            what = "loss and gradient are" if bad_loss and bad_grad else "loss is" if bad_loss else "gradient is"
            step = self.trainer.global_step
            if self.on_nonfinite == "stop":
                raise NonFiniteError(
                    f"step {step}: the {what} not finite (NaN or inf), so the fit stops before this step "
                    f"(on_nonfinite: stop); lower the learning rate, check the objective, or use on_nonfinite: skip."
                )
            for p in params:
                p.grad = None  # optimizers leave tensors without a gradient (and their state) alone
            self.skipped_steps += 1
            rank_zero_warn(
                f"step {step}: the {what} not finite (NaN or inf); skipped this optimizer step, the optimized "
                f"tensors are unchanged ({self.skipped_steps} skipped so far; on_nonfinite: stop makes this an error)."
            )
            self.log("train/skipped_steps", float(self.skipped_steps))
            return
        if norm is not None:
            self.log("train/grad_norm", norm)

    def log_terms(self, losses: Tensor, objective: Any) -> None:
        """Log the mean loss and each of the objective's named per-sample terms (averaged over
        processes under DDP, so the numbers describe the whole batch)."""
        self.log("train/loss", losses.mean(), prog_bar=True, sync_dist=True)
        for name, value in objective.terms.items():
            self.log(f"train/{name}", value.float().mean(), prog_bar=name.endswith("prob"), sync_dist=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # A resumed run continues the global generators (objectives that draw random numbers, e.g.
        # augmented copies) where the checkpoint left them, right before its first step: after
        # Lightning's own draws at the start of the fit, as in the uninterrupted run.
        pending = getattr(self, "_rng_to_restore", None)
        if pending is not None:
            progress.set_global_rng_states(pending)
            self._rng_to_restore = None
        # The gradient mode and the objectives draw in every micro-batch; a checkpoint written
        # mid-step (Ctrl-C) must hold the states the step started from, since the step is redone.
        if progress.micro_batch(self.trainer) == 0:
            self._plan_state_at_step_start = self._plan_generator.get_state()
            self._rng_at_step_start = progress.global_rng_states()
            picard = self._picard()
            self._picard_at_step_start = picard.snapshot() if picard is not None else None

    def _picard(self) -> Any:
        """The module's solver when it keeps warm starts between trajectories (Picard's go into
        checkpoints), else None."""
        solver = getattr(self, "solver", None)
        return solver if hasattr(solver, "restore_trajectories") else None

    def _states_to_save(self) -> tuple[Tensor, dict[str, Any]]:
        """The plan generator's and the global generators' states a checkpoint written now holds."""
        plan, rng = getattr(self, "_plan_state_at_step_start", None), getattr(self, "_rng_at_step_start", None)
        if self._trainer is None or plan is None or not progress.inside_step(self.trainer):
            return self._plan_generator.get_state(), progress.global_rng_states()
        return plan, rng

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if not self.is_trainable_key(k)]:
            del state[key]
        checkpoint["plan_generator_state"], checkpoint["global_rng_states"] = self._states_to_save()
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["sdo_run"] = self.run_fingerprint()
        picard = self._picard()
        if picard is not None:  # its warm starts: those the step (redone on resume) started from
            inside = self._trainer is not None and progress.inside_step(self.trainer)
            start = getattr(self, "_picard_at_step_start", None) if inside else None
            checkpoint["picard_trajectories"] = picard.trajectories(start)

    #: the run's model and data settings as flat ``{dotted key: value}`` (set by ``sdo fit``)
    run_config: dict[str, Any] | None = None

    def run_fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with this module to be resumed by it: the module, its
        seed, objective, backbone and solver, and under ``sdo fit`` every model and data setting
        (a checkpoint of another run would silently continue that run's latents or adapters)."""
        solver = getattr(self, "solver", None)
        out: dict[str, Any] = {
            "module": type(self).__name__,
            "seed": getattr(self, "seed", None),
            "objective": type(getattr(self, "objective", None)).__name__,
            "backbone": type(getattr(self, "backbone", None)).__name__,
            "solver": type(solver).__name__,
            "steps": getattr(solver, "num_inference_steps", None),
        }
        if self.run_config is not None:
            out["config"] = dict(self.run_config)
        return out

    #: ``--model`` settings that define the model an evaluation must share with the checkpoint it
    #: reads (the base weights); other settings (solver, data) may change for validate/predict
    base_model_settings: tuple[str, ...] = ("model.class_path", "model.init_args.backbone")
    #: fingerprint entries an evaluation compares (the rest may change for validate/predict)
    base_model_entries: tuple[str, ...] = ("module", "backbone", "base")

    def fingerprint_difference(self, saved: dict[str, Any] | None, evaluation: bool = False) -> str | None:
        """How the fingerprint ``saved`` in a checkpoint differs from this module's, in words; None
        when it matches (or the checkpoint has none). A setting one side does not record is not
        compared (checkpoints written outside ``sdo fit`` record no config). With ``evaluation``
        (validate, test, predict) only what defines the model is compared: the module, the base
        model and :attr:`base_model_settings`. Class paths of modules that moved since (see
        :mod:`sdo_lightning._moved`) compare as their current paths, so runs of earlier releases resume."""
        if saved is None:
            return None
        mine = self.run_fingerprint()
        diffs = [f"{k} {saved.get(k)!r} there, {mine[k]!r} here" for k in mine
                 if k != "config" and k in saved and saved[k] != mine[k]
                 and (not evaluation or k in self.base_model_entries)]
        if "config" in mine and "config" in saved:
            theirs, ours = saved["config"], mine["config"]
            keys = sorted(k for k in set(theirs) | set(ours) if _current(theirs.get(k)) != _current(ours.get(k))
                          and (not evaluation or k.startswith(self.base_model_settings))
                          and not (k not in theirs and _is_default(ours, k)))
            diffs += [f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in keys[:3]]
            if len(keys) > 3:
                diffs.append(f"{len(keys) - 3} more settings")
        return ", ".join(diffs) or None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        own = self.state_dict().keys()
        if state and not any(self.is_trainable_key(k) and k in own for k in state):
            raise ValueError(
                f"the checkpoint holds no state of this {type(self).__name__} (keys like {sorted(state)[:3]}); "
                "is it from another run or module? Give --ckpt_path the checkpoint of this run."
            )
        evaluation = self._trainer is not None and self.trainer.state.fn not in (None, "fit")
        diff = self.fingerprint_difference(checkpoint.get("sdo_run"), evaluation=evaluation)
        if diff is not None:
            if evaluation:
                raise ValueError(f"the checkpoint is of another model ({diff}); give --ckpt_path a checkpoint of a run "
                                 "with this backbone and these settings, or use that run's config.")
            raise ValueError(
                f"the checkpoint is from another run ({diff}); give --ckpt_path the checkpoint of this run, "
                "or start without --ckpt_path."
            )
        shapes = {k: v.shape for k, v in self.state_dict().items()}
        wrong = [k for k, v in state.items() if k in shapes and hasattr(v, "shape") and tuple(v.shape) != tuple(shapes[k])]
        if wrong:
            raise ValueError(f"the checkpoint's {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                             f"{tuple(shapes[wrong[0]])} here: it is of another base model or other LoRA / variable "
                             "settings; use the config of the run that wrote it.")
        if "plan_generator_state" in checkpoint:
            self._plan_generator.set_state(checkpoint["plan_generator_state"])
        self._rng_to_restore = checkpoint.get("global_rng_states")
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        picard = self._picard()
        if picard is not None and "picard_trajectories" in checkpoint:
            picard.restore_trajectories(checkpoint["picard_trajectories"])


    # -- evaluation: sdo validate / test / predict, and validation during fit ---------------------
    #: what validation, test and predict compute (a :class:`~sdo_lightning.evaluation.metrics.Evaluation`);
    #: None: validation and test log nothing but the reward
    evaluation: Any = None

    def generate_for_eval(self, batch: dict[str, Any]) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] for the evaluation rows ``batch`` (``index``, ``seed``,
        ``class_label``, maybe ``prompt``) with what was optimized, without a graph."""
        raise ValueError(f"{type(self).__name__} does not implement generate_for_eval, so it cannot validate, test or "
                         "predict; set data.eval_samples: 0 to fit without validation.")

    def generate_reference(self, batch: dict[str, Any]) -> Tensor | None:
        """The unoptimized model's images for the same rows and seeds (the fidelity and FID
        reference); None when there are none. Called once per row: the results are cached."""
        return None

    def eval_batch(self, batch: dict[str, Any], images: Tensor, reference: Tensor | None) -> dict[str, Any]:
        """The batch the objectives see at evaluation (``initial_images``: the reference)."""
        return {**batch, "initial_images": reference} if reference is not None else dict(batch)

    def reference_images(self, batch: dict[str, Any]) -> Tensor | None:
        """:meth:`generate_reference` of ``batch``'s rows, each computed once (see :class:`Evaluator`)."""
        return self.evaluator.reference_images(self, batch)

    @property
    def last_eval_metrics(self) -> dict[str, float] | None:
        """The values of the last finished validation or test."""
        return self.evaluator.last_metrics

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.evaluate_batch(self, batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.evaluate_batch(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.finish(self, "val")

    def on_test_epoch_end(self) -> None:
        self.evaluator.finish(self, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The images of the evaluation rows (and the unoptimized model's, unless
        ``evaluation.predict_base`` is off), with the rows' seeds and conditions, for
        :class:`~sdo_lightning.training.callbacks.PredictionWriter`."""
        return self.evaluator.predict(self, batch)

    def evaluation_callbacks(self) -> list[Callback]:
        """The callbacks validation and predict need, unless the trainer has its own:
        :class:`~sdo_lightning.training.callbacks.PredictionWriter`."""
        return self.evaluator.callbacks(self.trainer)

    def solver_name(self) -> str:
        """The solver as the HParams tab and model cards record it: its class name, or for a wrapper
        such as :class:`~sdo_lightning.sampling.picard.Picard` its repr (which names the solver it wraps)."""
        solver = getattr(self, "solver", None)
        return repr(solver) if solver is not None and solver.unwrap() is not solver else type(solver).__name__

    def optimizer_lr(self) -> float | None:
        """The learning rate the optimizer runs with (an ``optimizer:`` factory may set its own),
        else the module's ``lr``."""
        trainer = self._trainer
        optimizers = trainer.optimizers if trainer is not None else []
        if optimizers and optimizers[0].param_groups:
            return float(optimizers[0].param_groups[0]["lr"])
        return getattr(self, "lr", None)

    def log_hparams_with_metrics(self, params: dict[str, Any]) -> None:
        """Put ``params`` in TensorBoard's HParams tab beside the last evaluation's numbers."""
        self.evaluator.log_hparams(self, params)
