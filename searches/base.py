"""The search contract: gradient-free optimizers of :class:`~sdo_lightning.LatentOptimization`'s variable.

The built-ins are best-of-N and a zero-order search. They are chosen with the same key as the
gradient modes, so one config flips between SDO, full backprop, truncation and a search::

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
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from sdo_lightning import progress, registry
from sdo_lightning.contracts import RunContext


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


@dataclass
class Scored:
    """The best of some candidate values of the optimized variable, row by row (one row per sample).

    Attributes:
        variable: each sample's best candidate.
        loss: its loss ``(B,)`` (inf where every candidate's loss was not finite).
        images: the images it gave ``(B, C, H, W)``.
        terms: the objective's named per-sample terms of it.
    """

    variable: Tensor
    loss: Tensor
    images: Tensor
    terms: dict[str, Tensor]


#: ``score(candidate) -> (loss (B,), images, terms)``: sample and score one candidate without gradient
ScoreFn = Callable[[Tensor], "tuple[Tensor, Tensor, dict[str, Tensor]]"]


class Search(abc.ABC):
    """A gradient-free optimizer of a latent: proposes candidate values, keeps the best.

    Each step :meth:`propose` gives ``candidates`` values of every sample's variable, the module
    puts them on its target's constraint set, and :meth:`best` samples and scores each (no network
    graph) and returns every sample's lowest-loss candidate as :class:`Scored`. The module moves a
    sample there when it beats the lowest loss seen so far. Given where a gradient mode goes
    (``gradient_mode:`` of :class:`~sdo_lightning.LatentOptimization`); a method that searches
    first and then takes gradient steps starts those from :attr:`Scored.variable`.

    Args:
        candidates: candidates proposed (sampled and scored) per step and sample.
    """

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:
            registry.register("searches", cls)

    def __init__(self, candidates: int = 4) -> None:
        if int(candidates) != candidates or candidates < 1:
            raise ValueError(f"{type(self).__name__} candidates must be an integer >= 1, got {candidates!r}.")
        self.candidates = int(candidates)

    def refusal(self) -> str:
        """The sentence a module that needs gradients refuses this search with."""
        return (f"{type(self).__name__} searches without gradients, so it plans no network graph: use it as the "
                "gradient_mode of LatentOptimization only (RewardFineTuning needs a gradient mode: ShortcutGradient, "
                "FullBackprop, TruncatedBackprop or DRTune).")

    def gradient_mode_at(self, step: int, max_steps: int) -> Any:
        """The gradient mode that takes optimizer step ``step`` (of ``max_steps``) instead of this
        search, or None: a plain search searches at every step (see :class:`SearchThenGradient`)."""
        return None

    def check_target(self, target: Any) -> None:
        """Raise ValueError when this search cannot move ``target`` (an optimization target of
        LatentOptimization; called at construction)."""

    @abc.abstractmethod
    def propose(self, variable: Tensor, index: Tensor, step: int, context: RunContext) -> list[Tensor]:
        """``candidates`` tensors shaped like ``variable`` (the rows of samples ``index``), drawn
        reproducibly from ``context.seed``, the samples' indices and ``step``; the caller puts them
        on the target's constraint set."""

    def best(self, candidates: Iterable[Tensor], score: ScoreFn) -> Scored:
        """Score every candidate in turn with ``score``; each sample's lowest-loss candidate (a
        candidate with a non-finite loss is never chosen over a finite one)."""
        best: Scored | None = None
        for candidate in candidates:
            losses, images, terms = score(candidate)
            # a non-finite candidate is never chosen
            losses = torch.where(torch.isfinite(losses), losses, torch.full_like(losses, float("inf")))
            if best is None:
                best = Scored(candidate, losses, images, terms)
                continue
            better = losses < best.loss
            best = Scored(
                variable=_pick(better, candidate, best.variable),
                loss=torch.where(better, losses, best.loss),
                images=_pick(better, images, best.images),
                terms={k: _pick(better, v, best.terms[k]) if k in best.terms else v for k, v in terms.items()},
            )
        if best is None:
            raise ValueError(f"{type(self).__name__} proposed no candidates; candidates must be >= 1.")
        return best

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _pick(better: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Row ``i`` of ``new`` where ``better[i]``, else of ``old``."""
    return torch.where(better.view(-1, *[1] * (new.dim() - 1)), new, old)
