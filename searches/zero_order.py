"""A zero-order hill climb around the optimized variable."""

from __future__ import annotations

from torch import Tensor

from sdo_lightning.contracts import RunContext
from sdo_lightning.searches.base import Search, candidate_noise


class ZeroOrder(Search):
    """A zero-order hill climb around the start noise (or whatever the target optimizes).

    Every step proposes ``candidates`` perturbations ``v + sigma * e`` of each sample's current
    variable ``v`` (``e`` standard normal, seeded by the module's seed, the sample and the step),
    each projected back onto the target's constraint set as an optimizer step is (the norm shell
    of ``StartNoise``, the box of a ``linf_radius``), samples and scores them, and moves to the
    best one when its loss is below the current point's. The best loss never increases.

    A step costs ``candidates x num_inference_steps`` network calls without graph (about
    ``candidates`` SDO steps).

    Args:
        candidates: perturbations proposed per step and sample.
        sigma: standard deviation of each element's perturbation (the variable's elements are
            about standard normal for a start noise: 0.2 moves it by about a fifth of its norm
            before the projection).
    """

    def __init__(self, candidates: int = 4, sigma: float = 0.2) -> None:
        super().__init__(candidates)
        if not sigma > 0:
            raise ValueError(f"ZeroOrder sigma must be > 0 (the perturbation's standard deviation), got {sigma!r}.")
        self.sigma = float(sigma)

    def propose(self, variable: Tensor, index: Tensor, step: int, context: RunContext) -> list[Tensor]:
        return [variable + self.sigma * candidate_noise(tuple(variable.shape[1:]), context.seed, index, step, c, variable)
                for c in range(self.candidates)]
