"""Finding plugins: Python entry points, imported before the CLI parser is built.

A package makes a plugin available by declaring, in its ``pyproject.toml``::

    [project.entry-points."sdo_lightning.objectives"]
    MyObjective = "my_package.module:MyObjective"

The entry-point name must equal the class name (YAML refers to plugins by class name). Loading
only imports the class; importing registers it (see :mod:`sdo_lightning.contracts`).
Set ``SDO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD=1`` to skip third-party entry points.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import NamedTuple

from sdo_lightning.contracts import REGISTRY, GradientMode, Objective, Solver

log = logging.getLogger(__name__)

GROUPS: dict[str, type] = {
    "sdo_lightning.objectives": Objective,
    "sdo_lightning.solvers": Solver,
    "sdo_lightning.gradient_modes": GradientMode,
}
DISABLE_ENV = "SDO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DIST = "sdo-lightning"


class PluginInfo(NamedTuple):
    kind: str
    name: str
    cls: type
    distribution: str


#: class -> distribution that declared it, for ``sdo plugins``
_ORIGIN: dict[type, str] = {}
_LOADED = False


def _import_builtins() -> None:
    import sdo_lightning.gradient_modes  # noqa: F401
    import sdo_lightning.objectives  # noqa: F401
    import sdo_lightning.solvers  # noqa: F401


def load_plugins(force: bool = False) -> list[PluginInfo]:
    """Import the built-in plugins and every entry point of the three groups; return what came.

    Raises:
        TypeError: an entry point names something that is not a subclass of its group's contract.
        ValueError: an entry point's name differs from its class name.
    """
    global _LOADED
    _import_builtins()
    loaded: list[PluginInfo] = []
    if _LOADED and not force:
        return loaded
    if os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes"):
        log.info("%s is set: third-party plugins are not loaded.", DISABLE_ENV)
        _LOADED = True
        return loaded
    for group, base in GROUPS.items():
        for ep in metadata.entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "?"
            obj = ep.load()
            if not (isinstance(obj, type) and issubclass(obj, base)):
                raise TypeError(
                    f"entry point {ep.name!r} = {ep.value!r} of {dist!r} in group {group!r} is not a "
                    f"subclass of sdo_lightning.{base.__name__}; make it one or remove the entry point."
                )
            if obj.__name__ != ep.name:
                raise ValueError(
                    f"entry point {ep.name!r} of {dist!r} points to class {obj.__name__!r}; in group "
                    f"{group!r} the entry-point name must equal the class name."
                )
            _ORIGIN[obj] = dist
            kind = group.split(".", 1)[1]
            loaded.append(PluginInfo(kind, obj.__name__, obj, dist))
            log.debug("loaded %s %s from %s", kind, obj.__name__, dist)
    _LOADED = True
    return loaded


def registered() -> list[PluginInfo]:
    """Every registered plugin (built-in, from entry points, or defined in imported code)."""
    out = []
    for kind, classes in REGISTRY.items():
        for name, cls in sorted(classes.items()):
            if cls.__module__.startswith("sdo_lightning."):
                dist = _ORIGIN.get(cls, BUILTIN_DIST)
            else:
                dist = _ORIGIN.get(cls, f"(imported from {cls.__module__})")
            out.append(PluginInfo(kind, name, cls, dist))
    return out


def format_table(plugins: list[PluginInfo]) -> str:
    rows = [("kind", "name", "class path", "distribution")]
    rows += [(p.kind, p.name, f"{p.cls.__module__}.{p.cls.__qualname__}", p.distribution) for p in plugins]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
