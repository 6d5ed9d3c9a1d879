"""The one plugin table, and finding plugins through Python entry points.

Defining (importing) a concrete subclass of a plugin contract registers it under its class name
in the table here; :func:`names` and :func:`classes` answer "which classes of kind K exist" for
the CLI, its error messages, ``sdo plugins`` and the tests.

A package makes a plugin available by declaring, in its ``pyproject.toml``::

    [project.entry-points."sdo_lightning.objectives"]
    MyObjective = "my_package.module:MyObjective"

The groups are ``sdo_lightning.objectives``, ``sdo_lightning.solvers``,
``sdo_lightning.gradient_modes``, ``sdo_lightning.searches`` and ``sdo_lightning.backbones``. The entry-point name must equal
the class name (YAML refers to plugins by class name). Loading only imports the class; importing
registers it. Set ``SDO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD=1`` to skip third-party entry points.

A subclass that is not meant for users (a helper in a test) opts out with
``class Helper(Objective, register=False)``; abstract classes, names starting with ``_`` and
jsonargparse's ``LazyInstance_`` classes are never registered.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import warnings
from importlib import metadata
from typing import NamedTuple

log = logging.getLogger(__name__)

#: the plugin kinds, each with its entry-point group and contract (``module:Class``)
PLUGIN_KINDS: dict[str, tuple[str, str]] = {
    "objectives": ("sdo_lightning.objectives", "sdo_lightning.contracts:Objective"),
    "solvers": ("sdo_lightning.solvers", "sdo_lightning.contracts:Solver"),
    "gradient_modes": ("sdo_lightning.gradient_modes", "sdo_lightning.contracts:GradientMode"),
    "searches": ("sdo_lightning.searches", "sdo_lightning.searches.base:Search"),
    "backbones": ("sdo_lightning.backbones", "sdo_lightning.backbones.base:Backbone"),
}
#: kinds that are not plugins but are chosen by class name in YAML all the same
OTHER_KINDS = ("modules", "data", "targets")
GROUPS: dict[str, str] = {group: kind for kind, (group, _) in PLUGIN_KINDS.items()}
DISABLE_ENV = "SDO_LIGHTNING_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_DIST = "sdo-lightning"

# kind -> {class name -> class}
_TABLE: dict[str, dict[str, type]] = {kind: {} for kind in (*PLUGIN_KINDS, *OTHER_KINDS)}
#: class -> distribution that declared it, for ``sdo plugins``
_ORIGIN: dict[type, str] = {}
_LOADED = False


class PluginInfo(NamedTuple):
    kind: str
    name: str
    cls: type
    distribution: str


def register(kind: str, cls: type) -> None:
    """Put ``cls`` in the table under its class name (called by the contracts' ``__init_subclass__``)."""
    if inspect.isabstract(cls) or cls.__name__.startswith(("_", "LazyInstance_")):
        return
    known = _TABLE[kind].get(cls.__name__)
    if known is not None and known is not cls and known.__module__ != cls.__module__:
        warnings.warn(
            f"{kind[:-1]} {cls.__name__!r} from {cls.__module__} shadows the one from "
            f"{known.__module__}; rename one of them, since YAML refers to plugins by class name.",
            stacklevel=4,
        )
    _TABLE[kind][cls.__name__] = cls


def unregister(kind: str, name: str) -> None:
    """Remove a class from the table (tests that register a fake plugin clean up with it)."""
    _TABLE[kind].pop(name, None)


#: kind -> the built-in modules whose import registers that kind's classes
_BUILTINS: dict[str, tuple[str, ...]] = {
    "objectives": ("sdo_lightning.objectives", "sdo_lightning.digits.judge"),
    "solvers": ("sdo_lightning.solvers",),
    "gradient_modes": ("sdo_lightning.gradient_modes",),
    "searches": ("sdo_lightning.searches",),
    "backbones": ("sdo_lightning.backbones",),
    "modules": ("sdo_lightning.modules.latent_optimization", "sdo_lightning.modules.reward_finetuning"),
    "data": ("sdo_lightning.training.data",),
    "targets": ("sdo_lightning.modules.targets",),
}


def _import_builtins(kinds: tuple[str, ...] = tuple(PLUGIN_KINDS)) -> None:
    for kind in kinds:
        for module in _BUILTINS[kind]:
            importlib.import_module(module)


def classes(kind: str) -> dict[str, type]:
    """``{class name: class}`` of every registered class of ``kind`` (built-ins imported first)."""
    if kind not in _TABLE:
        raise KeyError(f"unknown kind {kind!r}; known: {', '.join(_TABLE)}.")
    _import_builtins((kind,))
    return dict(sorted(_TABLE[kind].items()))


def names(kind: str) -> list[str]:
    """The class names of ``kind``, sorted."""
    return list(classes(kind))


def _contract(kind: str) -> type:
    module, _, name = PLUGIN_KINDS[kind][1].partition(":")
    return getattr(importlib.import_module(module), name)


def load_plugins(force: bool = False) -> list[PluginInfo]:
    """Import the built-in plugins and every entry point of the plugin groups; return what came.

    An entry point that fails to import, names something that is not a subclass of its group's
    contract, or whose name differs from its class name is skipped with a warning that says so
    and names the off switch; the other plugins load.
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
    for group, kind in GROUPS.items():
        base = _contract(kind)
        for ep in metadata.entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "?"
            problem = None
            try:
                obj = ep.load()
            except Exception as err:  # a broken third-party package must not take every command down
                problem = f"failed to import ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})"
            else:
                if not (isinstance(obj, type) and issubclass(obj, base)):
                    problem = f"is not a subclass of sdo_lightning.{base.__name__}"
                elif obj.__name__ != ep.name:
                    problem = f"points to class {obj.__name__!r}, but the entry-point name must equal the class name"
            if problem is not None:
                warnings.warn(
                    f"plugin {ep.name!r} = {ep.value!r} of {dist!r} (group {group!r}) {problem}; it is skipped. "
                    f"Fix or uninstall {dist!r}, or set {DISABLE_ENV}=1 to skip all third-party plugins.",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            _ORIGIN[obj] = dist
            loaded.append(PluginInfo(kind, obj.__name__, obj, dist))
            log.debug("loaded %s %s from %s", kind, obj.__name__, dist)
    _LOADED = True
    return loaded


def registered() -> list[PluginInfo]:
    """Every registered plugin (built-in, from entry points, or defined in imported code)."""
    out = []
    for kind in PLUGIN_KINDS:
        for name, cls in classes(kind).items():
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
