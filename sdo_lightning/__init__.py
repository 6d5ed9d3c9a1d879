"""sdo-lightning: Shortcut Diffusion Optimization on PyTorch Lightning.

The public plugin contracts are :class:`Objective`, :class:`Solver`, :class:`GradientMode` and
:class:`Search`; :func:`sample` is the one sampling loop that composes them.
"""

from sdo_lightning import _moved

_moved.install()  # the old module paths (sdo_lightning.latent_optimization, ...) for one release

from sdo_lightning.contracts import GradientMode, GradientPlan, Objective, Solver, SolverState, Target
from sdo_lightning.sampling.picard import Picard, PicardStats
from sdo_lightning.sampling.loop import Denoiser, Step, StepCallback, sample
from sdo_lightning.searches import BestOfN, Search, SearchMode, ZeroOrder

__version__ = "0.1.0"

__all__ = [
    "BestOfN",
    "Denoiser",
    "GradientMode",
    "GradientPlan",
    "Objective",
    "Picard",
    "PicardStats",
    "Search",
    "SearchMode",
    "Solver",
    "SolverState",
    "Step",
    "StepCallback",
    "Target",
    "ZeroOrder",
    "sample",
]
