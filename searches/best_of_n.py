"""Gradient-free baselines of :class:`~sdo_lightning.LatentOptimization`: best-of-N and a zero-order search.

They are chosen with the same key as the gradient modes, so one config flips between SDO, full
backprop, truncation and a search::

    sdo fit --config configs/quickstart.yaml --model.gradient_mode BestOfN
    sdo fit --config configs/quickstart.yaml --model.gradient_mode ZeroOrder

A search step proposes ``candidates`` values of each sample's optimized variable, samples and
scores every one without gradient (no network graph is kept), and moves the variable to the
candidate with the lowest loss when that loss is below the lowest seen so far (the current
point's). Both searches therefore hold, per sample, the lowest-loss point they found: best-of-N
keeps the best of all its draws, the zero-order search is a hill climb. ``max_steps`` counts
search steps; checkpoints, resume, ``summary.json`` and the before/after images work as for
gradient steps (the first step also scores the unoptimized samples, whose images exist already).

Cost of one step, in network calls: ``candidates x N`` forward passes without graph for an
N-step solver (plus as many decodes and objective calls), against N forwards and one backward
through one call and the decoder for an SDO step (about ``N + 2`` forward-pass equivalents). At
equal wall-clock a search step with ``candidates = c`` costs about ``c`` SDO steps; compare
methods by the reward reached against seconds (``benchmarks/equal_time.py``) rather than steps.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sdo_lightning import progress
from sdo_lightning.contracts import GradientMode, GradientPlan, Target

if TYPE_CHECKING:
    from sdo_lightning.modules.latent_optimization import LatentOptimization
    from sdo_lightning.modules.targets import OptimizationTarget


def candidate_seed(seed: int, index: int, step: int, candidate: int) -> int:
    """The seed of candidate ``candidate`` of sample ``index`` at search step ``step`` (a stream of
    its own, apart from the start noise's :func:`~sdo_lightning.progress.latent_noise_seed`)."""
    key = ((seed * 1_000_003 + step) * 7919 + candidate) * 101 + 31
    return (key * 100_003 + int(index)) % (2**63 - 1)


def candidate_noise(shape: tuple[int, ...], seed: int, index: Tensor, step: int, candidate: int,
                    like: Tensor) -> Tensor:
    """``(len(index), *shape)`` standard normal rows, row ``i`` drawn on the CPU from
    :func:`candidate_seed` of sample ``index[i]``, as ``like``'s device and dtype."""
    seeds = [candidate_seed(seed, i, step, candidate) for i in index.tolist()]
    return progress.normal(shape, seeds).to(device=like.device, dtype=like.dtype)


class SearchMode(GradientMode):
    """Base of the searches: proposes candidate values of the optimized variable; keeps no graph.

    A search is given where a gradient mode goes (``gradient_mode:``) and only
    :class:`~sdo_lightning.LatentOptimization` runs it (its steps sample without gradient);
    :meth:`plan` refuses, so a module that wants gradients from it ends in one sentence.

    Args:
        candidates: candidates proposed (sampled and scored) per step and sample.
    """

    def __init__(self, candidates: int = 4) -> None:
        if int(candidates) != candidates or candidates < 1:
            raise ValueError(f"{type(self).__name__} candidates must be an integer >= 1, got {candidates!r}.")
        self.candidates = int(candidates)

    def refusal(self) -> str:
        """The sentence a module that needs gradients refuses this search with."""
        return (f"{type(self).__name__} searches without gradients, so it plans no network graph: use it as the "
                "gradient_mode of LatentOptimization only (RewardFineTuning needs a gradient mode: ShortcutGradient, "
                "FullBackprop, TruncatedBackprop or DRTune).")

    def plan(self, num_calls: int, target: Target, generator: torch.Generator | None = None) -> GradientPlan:
        raise ValueError(self.refusal())

    def check_target(self, target: "OptimizationTarget") -> None:
        """Raise ValueError when this search cannot move ``target`` (called by LatentOptimization)."""

    @abc.abstractmethod
    def propose(self, variable: Tensor, index: Tensor, step: int, module: "LatentOptimization") -> list[Tensor]:
        """``candidates`` tensors shaped like ``variable`` (the rows of samples ``index``), each
        already on the target's constraint set; drawn reproducibly from the module's seed, the
        samples' indices and ``step``."""


class BestOfN(SearchMode):
    """Best-of-N: draw fresh start noises, keep each sample's best by the objective.

    Every step draws ``candidates`` new start noises per sample (seeded by the module's seed, the
    sample and the step, so a resumed run draws the same ones), put on the start noise's norm
    shell as ``StartNoise(project_to_shell: true)`` does (left as drawn with
    ``project_to_shell: false``), samples and scores them; the sample's image and start noise
    become those of the lowest loss of all draws so far, the unoptimized sample included. After
    ``max_steps`` steps a sample has seen ``N = 1 + candidates x max_steps`` draws.

    A step costs ``candidates x num_inference_steps`` network calls without graph (about
    ``candidates`` SDO steps). To spend the seconds of an SDO run, compare the reward reached
    against wall-clock time (``benchmarks/equal_time.py``), or set ``max_steps`` to the SDO steps
    divided by ``candidates``.

    Args:
        candidates: fresh start noises drawn per step and sample.
    """

    def check_target(self, target: "OptimizationTarget") -> None:
        from sdo_lightning.modules.targets import StartNoise

        if type(target) is not StartNoise or target.linf_radius is not None:
            raise ValueError(
                f"BestOfN draws fresh start noises, so it needs target StartNoise (x_T) without linf_radius, got "
                f"{target!r}; use ZeroOrder to search around another target."
            )

    def propose(self, variable: Tensor, index: Tensor, step: int, module: "LatentOptimization") -> list[Tensor]:
        out = []
        for c in range(self.candidates):
            noise = candidate_noise(tuple(variable.shape[1:]), module.seed, index, step, c, variable)
            module.target.project(noise, module.shell_norm[index.to(module.shell_norm.device)])
            out.append(noise)
        return out


class ZeroOrder(SearchMode):
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

    def propose(self, variable: Tensor, index: Tensor, step: int, module: "LatentOptimization") -> list[Tensor]:
        out = []
        for c in range(self.candidates):
            noise = candidate_noise(tuple(variable.shape[1:]), module.seed, index, step, c, variable)
            candidate = variable + self.sigma * noise
            module.target.project(candidate, module.shell_norm[index.to(module.shell_norm.device)])
            out.append(candidate)
        return out
