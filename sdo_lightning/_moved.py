"""Modules that moved when the package was sorted into layers, importable at their old paths
for one release.

``import sdo_lightning.latent_optimization`` (and ``class_path:
sdo_lightning.latent_optimization.LatentOptimization`` in a ``config.yaml`` written before)
still works: it warns with a :class:`DeprecationWarning` that names the new path and gives a
module holding the new module's names (the same classes). There are no files at the old paths,
so git sees the moves as renames; delete an entry here to drop its old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

#: old module -> the module its contents live in now
MOVED: dict[str, str] = {
    "sdo_lightning.picard": "sdo_lightning.sampling.picard",
    "sdo_lightning.inversion": "sdo_lightning.sampling.inversion",
    "sdo_lightning.checkpoint_io": "sdo_lightning.training.checkpoint_io",
    "sdo_lightning.callbacks": "sdo_lightning.training.callbacks",
    "sdo_lightning.data": "sdo_lightning.training.data",
    "sdo_lightning.metrics": "sdo_lightning.evaluation.metrics",
    "sdo_lightning.diagnostics": "sdo_lightning.evaluation.diagnostics",
    "sdo_lightning.module_base": "sdo_lightning.modules.base",
    "sdo_lightning.latent_optimization": "sdo_lightning.modules.latent_optimization",
    "sdo_lightning.targets": "sdo_lightning.modules.targets",
    "sdo_lightning.reward_finetuning": "sdo_lightning.modules.reward_finetuning",
    "sdo_lightning.search": "sdo_lightning.searches",
}


def current_path(dotted: str) -> str:
    """``dotted`` (a module or ``module.Class`` path) with an old module replaced by its new one."""
    for old, new in MOVED.items():
        if dotted == old or dotted.startswith(old + "."):
            return new + dotted[len(old):]
    return dotted


class _OldPath(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: Any) -> None:
        return None  # a plain module, filled in by exec_module

    def exec_module(self, module: ModuleType) -> None:
        warnings.warn(f"{module.__name__} moved to {self.new}; import it from there (the old path is removed in the "
                      "next release).", DeprecationWarning, stacklevel=2)
        target = importlib.import_module(self.new)
        module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
        module.__getattr__ = lambda name: getattr(target, name)  # type: ignore[attr-defined]
        module.__doc__ = f"Moved to :mod:`{self.new}` (this path is kept for one release)."


class _OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _OldPath(new))


def install() -> None:
    """Make the old paths importable (called by ``sdo_lightning/__init__.py``; idempotent)."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
