"""sdo-lightning: Shortcut Diffusion Optimization on PyTorch Lightning.

The public plugin contracts are :class:`Objective`, :class:`Solver` and :class:`GradientMode`;
:func:`sample` is the one sampling loop that composes them.

The names below are imported on first use (PEP 562), so ``import sdo_lightning`` does not import
torch: the ``sdo`` command sets the OpenMP wait policy before torch loads (see
:mod:`sdo_lightning.console`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "BestOfN": "sdo_lightning.search",
    "Denoiser": "sdo_lightning.sampling",
    "GradientMode": "sdo_lightning.contracts",
    "GradientPlan": "sdo_lightning.contracts",
    "Objective": "sdo_lightning.contracts",
    "Picard": "sdo_lightning.picard",
    "PicardStats": "sdo_lightning.picard",
    "SearchMode": "sdo_lightning.search",
    "Solver": "sdo_lightning.contracts",
    "SolverState": "sdo_lightning.contracts",
    "Step": "sdo_lightning.sampling",
    "StepCallback": "sdo_lightning.sampling",
    "Target": "sdo_lightning.contracts",
    "ZeroOrder": "sdo_lightning.search",
    "sample": "sdo_lightning.sampling",
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
    from sdo_lightning.picard import Picard, PicardStats
    from sdo_lightning.sampling import Denoiser, Step, StepCallback, sample
    from sdo_lightning.search import BestOfN, SearchMode, ZeroOrder
