"""Plugin discovery: faked entry points, the off switch, and a real third-party package."""

import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch

from sdo_lightning import registry
from sdo_lightning.contracts import Objective

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "fake_plugin.py").write_text(textwrap.dedent('''
        from sdo_lightning import Objective

        class FakeObjective(Objective):
            def forward(self, images, batch):
                return images.flatten(1).mean(1)

        class NotAPlugin:
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fake_plugin"
    sys.modules.pop("fake_plugin", None)
    registry.unregister("objectives", "FakeObjective")


def fake_entry_points(monkeypatch, entries):
    def entry_points(group=None):
        return [metadata.EntryPoint(name, value, g) for g, name, value in entries if g == group]

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)


def test_discovers_entry_point_and_registers_by_class_name(plugin_module, monkeypatch):
    fake_entry_points(monkeypatch, [("sdo_lightning.objectives", "FakeObjective", f"{plugin_module}:FakeObjective")])
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    loaded = registry.load_plugins(force=True)
    assert [(p.kind, p.name) for p in loaded] == [("objectives", "FakeObjective")]
    assert issubclass(registry.classes("objectives")["FakeObjective"], Objective)
    table = registry.format_table(registry.registered())
    assert "FakeObjective" in table and "fake_plugin.FakeObjective" in table


def test_rejects_non_subclass(plugin_module, monkeypatch):
    fake_entry_points(monkeypatch, [("sdo_lightning.solvers", "NotAPlugin", f"{plugin_module}:NotAPlugin")])
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    with pytest.warns(UserWarning, match="not a subclass of sdo_lightning.Solver; it is skipped.*"
                                         f"{registry.DISABLE_ENV}=1"):
        assert registry.load_plugins(force=True) == []


def test_rejects_name_that_is_not_the_class_name(plugin_module, monkeypatch):
    fake_entry_points(monkeypatch, [("sdo_lightning.objectives", "Alias", f"{plugin_module}:FakeObjective")])
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    with pytest.warns(UserWarning, match="must equal the class name; it is skipped"):
        assert registry.load_plugins(force=True) == []


def test_off_switch_skips_entry_points(plugin_module, monkeypatch):
    fake_entry_points(monkeypatch, [("sdo_lightning.objectives", "FakeObjective", f"{plugin_module}:FakeObjective")])
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    assert registry.load_plugins(force=True) == []
    assert plugin_module not in sys.modules
    # built-ins are part of the package and stay available
    assert {"DDIM", "DPMSolverPlusPlus", "LCMMultistep"} <= set(registry.names("solvers"))


def test_builtins_are_declared_as_entry_points():
    """The installed distribution declares every built-in the same way a third party would."""
    declared = {(ep.group, ep.name) for group in registry.GROUPS for ep in metadata.entry_points(group=group)
                if ep.dist is not None and ep.dist.name == registry.BUILTIN_DIST}
    builtins = {(f"sdo_lightning.{kind}", name) for kind in registry.PLUGIN_KINDS
                for name, cls in registry.classes(kind).items() if cls.__module__.startswith("sdo_lightning.")}
    assert {kind for _, kind in ((g, g.split(".")[1]) for g, _ in builtins)} == set(registry.PLUGIN_KINDS)
    assert builtins <= declared


def test_third_party_objective_and_backbone_from_yaml(tmp_path):
    """Install examples/sdo-example-plugin into a target dir and run `sdo fit` with its objective
    and its backbone named by class name only, in a fresh process that finds both by entry point."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(ROOT / "examples" / "sdo-example-plugin")],
        check=True, capture_output=True,
    )
    config = tmp_path / "brightness.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          max_steps: 3
          accelerator: cpu
          enable_checkpointing: false
          default_root_dir: {tmp_path}
          logger:
            class_path: lightning.pytorch.loggers.TensorBoardLogger
            init_args: {{save_dir: {tmp_path / 'runs'}}}
        model:
          class_path: LatentOptimization
          init_args:
            objective:
              class_path: Brightness
            backbone:
              class_path: GaussianBackbone
              init_args: {{size: 6}}
            solver:
              class_path: DDIM
              init_args: {{num_inference_steps: 4}}
            lr: 0.5
        data:
          class_path: SampleSet
          init_args: {{num_samples: 2}}
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    env.pop(registry.DISABLE_ENV, None)
    listing = subprocess.run([sys.executable, "-m", "sdo_lightning.cli", "plugins"], env=env,
                             capture_output=True, text=True, check=True).stdout
    rows = {tuple(line.split()[:2]) for line in listing.splitlines() if "sdo-example-plugin" in line}
    assert rows == {("objectives", "Brightness"), ("backbones", "GaussianBackbone")}
    fit = subprocess.run([sys.executable, "-m", "sdo_lightning.cli", "fit", "--config", str(config)], env=env,
                         capture_output=True, text=True)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (summary,) = (tmp_path / "runs").rglob("summary.json")
    result = json.loads(summary.read_text())
    assert result["after"]["brightness"] > result["before"]["brightness"]


def test_example_backbone_samples_its_gaussian(monkeypatch):
    """The example backbone's closed-form denoiser is the ideal one for N(mean, std^2) pixels, so
    deterministic DDIM sampling from it, with steps fine enough to follow the ODE (1000; at 50 the
    discretization gives std 0.273), must produce pixels with that mean and std (4096 pixels:
    standard errors 0.005 and 0.003)."""
    from sdo_lightning import sample
    from sdo_lightning.solvers import DDIM

    monkeypatch.syspath_prepend(str(ROOT / "examples" / "sdo-example-plugin"))
    from sdo_example_plugin.backbone import GaussianBackbone

    backbone = GaussianBackbone(mean=0.2, std=0.3, size=16)
    x = torch.randn(16, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = backbone.encode_condition({"index": torch.arange(16)})
    x0 = sample(backbone.denoise, DDIM(1000), x, cond, scheduler_config=backbone.scheduler_config)
    assert abs(x0.mean().item() - 0.2) < 0.02
    assert abs(x0.std().item() - 0.3) < 0.02


def test_classes_defined_in_tests_stay_out_of_the_table():
    """Every test module is imported by now (collection): none of their helper classes may show
    up where users look (sdo plugins, the CLI's 'known: ...' lists)."""
    tests_dir = Path(__file__).resolve().parent

    def defined_in_tests(cls: type) -> bool:
        # judged by where the class's module lives, so a third-party plugin installed in the same
        # environment (any module name) is not taken for a leaked test helper
        module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
        return module_file is not None and tests_dir in Path(module_file).resolve().parents

    for kind in (*registry.PLUGIN_KINDS, *registry.OTHER_KINDS):
        leaked = [f"{cls.__module__}.{name}" for name, cls in registry.classes(kind).items() if defined_in_tests(cls)]
        assert not leaked, f"{kind}: {leaked} (define test helpers with register=False)"


def test_a_plugin_that_raises_on_import_does_not_take_the_command_down(tmp_path):
    """A real installed package whose entry point raises when imported: `sdo plugins` still lists
    every built-in, and the warning names the package and the off switch."""
    src = tmp_path / "broken"
    (src / "broken_plugin").mkdir(parents=True)
    (src / "broken_plugin" / "__init__.py").write_text("raise ImportError('needs libfoo 2.0')\n")
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "broken-plugin"
        version = "0.1"
        [project.entry-points."sdo_lightning.objectives"]
        Broken = "broken_plugin:Broken"
        [tool.setuptools]
        packages = ["broken_plugin"]
    """))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    env.pop(registry.DISABLE_ENV, None)
    run = subprocess.run([sys.executable, "-m", "sdo_lightning.cli", "plugins"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ShortcutGradient" in run.stdout and "Broken" not in run.stdout
    assert "'broken-plugin'" in run.stderr and "needs libfoo 2.0" in run.stderr and registry.DISABLE_ENV in run.stderr
