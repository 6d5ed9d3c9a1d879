"""When two runs are the same run: how a checkpoint's recorded settings compare with a config's
(class paths of moved modules as their current paths; an option added since the checkpoint was
written, left at its default, as the earlier behaviour). Used by
:meth:`~sdo_lightning.modules.base.OptimizationModule.fingerprint_difference`."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from sdo_lightning._moved import current_path


def _is_default(config: dict[str, Any], key: str) -> bool:
    """True when the flat setting ``key`` of ``config`` (``...init_args.NAME``) holds its class's
    default: an option added after a checkpoint was written, left at the default, which keeps the
    earlier behaviour (so the checkpoint, which cannot record it, is still of this run)."""
    owner, sep, name = key.rpartition(".init_args.")
    class_path = config.get(f"{owner}.class_path") if sep else None
    if not isinstance(class_path, str) or not name.isidentifier():
        return False
    module_name, _, class_name = current_path(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        default = inspect.signature(cls).parameters[name].default
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return False
    return default is not inspect.Parameter.empty and _same(default, config[key])


def _same(default: Any, value: Any) -> bool:
    """The recorded ``value`` (plain, as ``sdo fit`` flattens a config) equals the ``default``."""
    if isinstance(default, tuple):
        default = list(default)
    try:
        return bool(default == value)
    except Exception:  # a default that does not compare with a plain value (a lazy instance, a tensor)
        return False


def _current(value: Any) -> Any:
    """A recorded setting as this release names it: a class path of a moved module mapped to its new one."""
    return current_path(value) if isinstance(value, str) else value
