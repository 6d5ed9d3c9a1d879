"""What the two LightningModules share: checkpoints of trainable state only, and logging."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from sdo_lightning.contracts import Target

# The backbone and objective networks are frozen and in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


class OptimizationModule(LightningModule):
    """Base of LatentOptimization and RewardFineTuning.

    Checkpoints hold only the keys :meth:`is_trainable_key` accepts (frozen base weights are the
    user's files) plus the state of the gradient mode's random draws, so a resumed run draws
    the same kept calls as an uninterrupted one.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._plan_generator = torch.Generator().manual_seed(seed)
        self.strict_loading = False  # checkpoints hold the trainable state only

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
        grads = [p.grad.norm() for p in self.optimized_tensors() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.stack(grads).norm())

    def log_terms(self, losses: Tensor, objective: Any) -> None:
        """Log the mean loss and each of the objective's named per-sample terms."""
        self.log("train/loss", losses.mean(), prog_bar=True)
        for name, value in objective.terms.items():
            self.log(f"train/{name}", value.float().mean(), prog_bar=name.endswith("prob"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if not self.is_trainable_key(k)]:
            del state[key]
        checkpoint["plan_generator_state"] = self._plan_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "plan_generator_state" in checkpoint:
            self._plan_generator.set_state(checkpoint["plan_generator_state"])
