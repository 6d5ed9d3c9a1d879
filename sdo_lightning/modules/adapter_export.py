"""RewardFineTuning's adapter export: ``<log dir>/lora`` written atomically in the backbone's
LoRA format with a model card, the adapter of a monitored ``ModelCheckpoint``'s best step when
there is one. A mixin of :class:`~sdo_lightning.modules.reward_finetuning.RewardFineTuning`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdo_lightning import atomic, lora


class AdapterExport:
    """The export half of :class:`~sdo_lightning.modules.reward_finetuning.RewardFineTuning`."""

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

        from sdo_lightning.training.checkpoint_io import read_checkpoint

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
            # written beside, then each file renamed over its namesake (as export_adapter does)
            with atomic.replacing_files(directory) as tmp:
                self.backbone.save_lora(tmp)
                lora.write_model_card(tmp, {**self.card_fields(), **self._card_selection},
                                      self._validation_history.get(step, getattr(self, "last_eval_metrics", None)))
            return Path(directory)
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
        # written beside, then each file renamed over its namesake: a kill or a full disk
        # mid-export leaves the previous adapter files whole
        with atomic.replacing_files(directory) as tmp:
            self.backbone.save_lora(tmp)
            lora.write_model_card(tmp, self.card_fields(), getattr(self, "last_eval_metrics", None))
        return Path(directory)


def _is_fsdp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)
