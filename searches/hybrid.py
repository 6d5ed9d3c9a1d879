"""Search, then gradient steps: a schedule of a search and a gradient mode in one run."""

from __future__ import annotations

from typing import Any

from jsonargparse import lazy_instance
from torch import Tensor

from sdo_lightning.contracts import GradientMode, RunContext
from sdo_lightning.gradient_modes import ShortcutGradient
from sdo_lightning.searches.base import Search
from sdo_lightning.searches.best_of_n import BestOfN


class SearchThenGradient(Search):
    """Search for the first part of the run, then take gradient steps from each sample's best.

    The first ``round(split x max_steps)`` optimizer steps are steps of ``search`` (e.g. best-of-N:
    fresh start noises, each sample keeping the lowest-loss one); the rest are steps of
    ``gradient_mode`` (e.g. SDO) that start from the variable the search left, the best candidate
    of each sample, with a fresh optimizer state. The search finds a sample the model draws well
    (a real digit, say); the gradient steps then move it a short way to lower the objective, where
    gradient steps from an arbitrary start move it far and drift off what the model draws.

    A search step costs about ``candidates`` gradient steps (``candidates x N`` network calls
    without graph), so at equal time the split of the seconds is not the split of the steps: with
    ``candidates: 4`` and ``split: 0.5`` about 80% of the time goes to the search.

    The Trainer settings a search refuses (gradient clipping, gradient accumulation, fp16's
    gradient scaler) are refused here too.

    Args:
        search: the search of the first part.
        gradient_mode: the gradient mode of the second part.
        split: the share of ``trainer.max_steps`` that are search steps, in (0, 1).
    """

    def __init__(
        self,
        search: Search = lazy_instance(BestOfN, candidates=4),
        gradient_mode: GradientMode = lazy_instance(ShortcutGradient),
        split: float = 0.5,
    ) -> None:
        if not 0.0 < split < 1.0:
            raise ValueError(f"SearchThenGradient split must lie in (0, 1) (the share of max_steps that search), got "
                             f"{split}; for a search alone or gradient steps alone give that as gradient_mode.")
        if isinstance(search, SearchThenGradient):
            raise ValueError("SearchThenGradient's search must be a plain search (BestOfN, ZeroOrder), not another "
                             "SearchThenGradient.")
        if isinstance(gradient_mode, Search):
            raise ValueError(f"SearchThenGradient's gradient_mode must be a gradient mode (ShortcutGradient, ...), got "
                             f"the search {type(gradient_mode).__name__}.")
        # no Search.__init__: the candidates are the inner search's (read when used, since a default
        # lazy_instance is built on first use)
        self.search = search
        self.gradient_mode = gradient_mode
        self.split = split

    @property
    def candidates(self) -> int:  # type: ignore[override]
        return self.search.candidates

    def search_steps(self, max_steps: int) -> int:
        """How many of ``max_steps`` optimizer steps search (at least one, and at least one left)."""
        if max_steps is None or max_steps < 2:
            raise ValueError(f"SearchThenGradient splits trainer.max_steps between a search and gradient steps: set "
                             f"trainer.max_steps to 2 or more, got {max_steps}.")
        return min(max(1, round(self.split * max_steps)), max_steps - 1)

    def gradient_mode_at(self, step: int, max_steps: int) -> GradientMode | None:
        return self.gradient_mode if step >= self.search_steps(max_steps) else None

    def check_target(self, target: Any) -> None:
        self.search.check_target(target)

    def propose(self, variable: Tensor, index: Tensor, step: int, context: RunContext) -> list[Tensor]:
        return self.search.propose(variable, index, step, context)
