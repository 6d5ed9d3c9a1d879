"""sdo-lightning: Shortcut Diffusion Optimization on PyTorch Lightning.

The public plugin contracts are :class:`Objective`, :class:`Solver`, :class:`GradientMode` and
:class:`Search`; :func:`sample` is the one sampling loop that composes them.

The names below are imported on first use (PEP 562), so ``import sdo_lightning`` does not import
torch: the ``sdo`` command sets the OpenMP wait policy before torch loads (see
:mod:`sdo_lightning.console`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdo_lightning import _moved

_moved.install()  # the old module paths (sdo_lightning.latent_optimization, ...) for one release

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "BestOfN": "sdo_lightning.searches",
    "Denoiser": "sdo_lightning.sampling.loop",
    "GradientMode": "sdo_lightning.contracts",
    "GradientPlan": "sdo_lightning.contracts",
    "Objective": "sdo_lightning.contracts",
    "Picard": "sdo_lightning.sampling.picard",
    "PicardStats": "sdo_lightning.sampling.picard",
    "Search": "sdo_lightning.searches",
    "SearchMode": "sdo_lightning.searches",
    "Solver": "sdo_lightning.contracts",
    "SolverState": "sdo_lightning.contracts",
    "Step": "sdo_lightning.sampling.loop",
    "StepCallback": "sdo_lightning.sampling.loop",
    "Target": "sdo_lightning.contracts",
    "ZeroOrder": "sdo_lightning.searches",
    "sample": "sdo_lightning.sampling.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdo_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from sdo_lightning.contracts import GradientMode, GradientPlan, Objective, Solver, SolverState, Target
    from sdo_lightning.sampling.loop import Denoiser, Step, StepCallback, sample
    from sdo_lightning.sampling.picard import Picard, PicardStats
    from sdo_lightning.searches import BestOfN, Search, SearchMode, ZeroOrder
