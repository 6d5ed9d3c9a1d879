"""The package's layers, read from its source with ``ast``: every import counts, also those inside
functions and under ``if TYPE_CHECKING:``. Fails on an import cycle, and on an import of a higher
layer (the layers are listed below, lowest first; a module may import its own layer and those below)."""

import ast
import tomllib
from pathlib import Path

import pytest

from test_cli import ROOT

#: (layer, module prefixes): a module is in the layer of its longest matching prefix
LAYERS = [
    ("vocabulary", ["sdo_lightning._hub", "sdo_lightning._moved", "sdo_lightning.contracts", "sdo_lightning.registry",
                    "sdo_lightning.errors", "sdo_lightning.progress", "sdo_lightning.images", "sdo_lightning.lora",
                    "sdo_lightning.white_noise", "sdo_lightning.reward_protocol", "sdo_lightning.atomic"]),
    ("plugins", ["sdo_lightning.solvers", "sdo_lightning.gradient_modes", "sdo_lightning.searches",
                 "sdo_lightning.objectives", "sdo_lightning.digits", "sdo_lightning.backbones"]),
    ("sampling", ["sdo_lightning.sampling"]),
    ("training", ["sdo_lightning.training"]),
    ("evaluation", ["sdo_lightning.evaluation"]),
    ("modules", ["sdo_lightning.modules"]),
    # the package's front (sdo_lightning/__init__.py), the commands, the script that trains the embedded
    # digits model, and the tiny pipelines of tests and benchmarks: nothing in the library imports them
    ("top", ["sdo_lightning", "sdo_lightning.cli", "sdo_lightning.cli_messages", "sdo_lightning.console", "sdo_lightning.__main__",
             "sdo_lightning.reward_server", "sdo_lightning.mix", "sdo_lightning.digits.train",
             "sdo_lightning.testing"]),
]
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def package_modules() -> dict[str, Path]:
    """``{module name: file}`` of the installed package, with pyproject's package-dir mapping."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out: dict[str, Path] = {}
    for package, folder in package_dir.items():
        base = ROOT / folder
        for file in base.rglob("*.py"):
            parts = list(file.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "sdo_lightning" and len(parts) > 0 and parts[0] in package_dir_names(package_dir):
                continue  # a folder that is installed from elsewhere
            out[name] = file
    return out


def package_dir_names(package_dir: dict[str, str]) -> set[str]:
    return {name.split(".", 1)[1] for name in package_dir if "." in name}


def imports(file: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``file`` (module ``name``) imports anywhere in it."""
    tree = ast.parse(file.read_text(), str(file))
    is_package = file.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.C: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in RANK:
            return RANK[".".join(parts[:i])]
    raise AssertionError(f"{module} is in no layer; add it to LAYERS in tests/test_import_graph.py.")


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports(file, name, set(modules)) for name, file in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_whole(tmp_path):
    edges = graph()
    assert "sdo_lightning.modules.latent_optimization" in edges and "sdo_lightning.solvers.ddim" in edges
    assert "sdo_lightning.searches.best_of_n" in edges  # the plugin folders, installed under sdo_lightning
    assert "sdo_lightning.digits" in edges["sdo_lightning.objectives.classifier"]  # imported inside a function
    # a function-local import and a TYPE_CHECKING import are both edges
    file = tmp_path / "m.py"
    file.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a.b import C\n"
                    "def f():\n    import c\n    from . import d\n")
    assert imports(file, "pkg.m", {"a.b", "c", "pkg.d", "pkg.m"}) == {"a.b", "c", "pkg.d"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_import_of_a_higher_layer():
    upward = sorted(f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
                    for a, targets in graph().items() for b in targets if layer(b) > layer(a))
    assert upward == []


@pytest.mark.parametrize("folder", ["benchmarks"])
def test_no_import_cycles_among_scripts(folder):
    files = {f.stem: f for f in (ROOT / folder).glob("*.py")}
    assert cycles({name: imports(file, name, set(files)) for name, file in files.items()}) == []
