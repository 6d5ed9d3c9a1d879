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
    """

    def __init__(self, objectives: list[Objective], weights: list[float] | None = None) -> None:
        super().__init__()
        if not objectives:
            raise ValueError("WeightedSum needs at least one objective.")
        weights = [1.0] * len(objectives) if weights is None else list(weights)
        if len(weights) != len(objectives):
            raise ValueError(f"WeightedSum got {len(objectives)} objectives but {len(weights)} weights; give one weight each.")
        self.objectives = nn.ModuleList(objectives)
        self.weights = weights
        names = [type(o).__name__ for o in objectives]
        self.names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]

    def forward(self, images: Tensor, batch: dict[str, Any]) -> Tensor:
        total = 0
        self.terms = {}
        for name, w, objective in zip(self.names, self.weights, self.objectives):
            loss = objective(images, batch)
            self.terms[name] = loss.detach()
            for key, value in objective.terms.items():
                self.terms[key if key not in self.terms else f"{name}/{key}"] = value
            total = total + w * loss
        return total
