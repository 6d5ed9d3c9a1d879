"""Combining objectives."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sdo_lightning.contracts import Objective


class WeightedSum(Objective):
    """A weighted sum of objectives: ``sum_i weights[i] * objectives[i](images, batch)``.

    Each term is logged under its class name (with an index when a class appears twice).

    Args:
        objectives: the objectives to combine.
        weights: one weight per objective (default: all 1).
        warmup_steps: for the first this many optimizer steps, use ``warmup_weights`` instead
            (the step is read from ``batch["step"]``, which ``LatentOptimization`` adds). The
            authors' released text-editing script fits the face with the fidelity term alone
            for 150 steps (weights ``[0, 1]``) and then edits with ``[0.5, 0.5]``. Evaluation
            after fit scores with ``weights``.
        warmup_weights: one weight per objective during the warm-up.
    """

    def __init__(
        self,
        objectives: list[Objective],
        weights: list[float] | None = None,
        warmup_steps: int = 0,
        warmup_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        if not objectives:
            raise ValueError("WeightedSum needs at least one objective.")
        weights = [1.0] * len(objectives) if weights is None else list(weights)
        if len(weights) != len(objectives):
            raise ValueError(f"WeightedSum got {len(objectives)} objectives but {len(weights)} weights; give one weight each.")
        if warmup_steps < 0 or (warmup_steps > 0) != (warmup_weights is not None):
            raise ValueError(f"WeightedSum got warmup_steps={warmup_steps} and warmup_weights={warmup_weights}; give both "
                             "(steps > 0 and one weight per objective) or neither.")
        if warmup_weights is not None and len(warmup_weights) != len(objectives):
            raise ValueError(f"WeightedSum got {len(objectives)} objectives but {len(warmup_weights)} warmup_weights; "
                             "give one weight each.")
        self.objectives = nn.ModuleList(objectives)
        self.weights = weights
        self.warmup_steps = warmup_steps
        self.warmup_weights = None if warmup_weights is None else list(warmup_weights)
        names = [type(o).__name__ for o in objectives]
        self.names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]

    def weights_at(self, batch: dict[str, Any]) -> list[float]:
        """The weights for this batch: ``warmup_weights`` while ``batch["step"]`` is below
        ``warmup_steps``, else ``weights``."""
        if not self.warmup_steps:
            return self.weights
        if "step" not in batch:
            raise KeyError("WeightedSum with warmup_steps needs batch['step'] (the optimizer step, which "
                           "LatentOptimization adds); the batch has " f"{sorted(batch)}.")
        return self.warmup_weights if int(batch["step"]) < self.warmup_steps else self.weights

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        total = 0
        self.terms = {}
        for name, w, objective in zip(self.names, self.weights_at(batch), self.objectives):
            loss = objective(images, batch)
            self.terms[name] = loss.detach()
            for key, value in objective.terms.items():
                self.terms[key if key not in self.terms else f"{name}/{key}"] = value
            total = total + w * loss
        return total
