"""Best-of-N: fresh start noises, each sample keeps its best."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sdo_lightning.contracts import RunContext
from sdo_lightning.searches.base import Search, candidate_noise


class BestOfN(Search):
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

    def check_target(self, target: Any) -> None:
        if not target.variable_is_noise:
            raise ValueError(
                f"BestOfN draws fresh start noises, so it needs target StartNoise (x_T) without linf_radius, got "
                f"{target!r}; use ZeroOrder to search around another target."
            )

    def propose(self, variable: Tensor, index: Tensor, step: int, context: RunContext) -> list[Tensor]:
        return [candidate_noise(tuple(variable.shape[1:]), context.seed, index, step, c, variable)
                for c in range(self.candidates)]
