"""The `sdo` command: help, print_config, every shipped config, plugins; README snippets."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdo_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_opens_with_run_line(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: sdo fit --config configs/"), first
    assert str(path.relative_to(ROOT)) in first


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_instantiates(path, tiny_weights, tmp_path, monkeypatch):
    if path.parent.name in ("paper", "models", "released") or "accelerator: gpu" in path.read_text():
        # their real models cannot be loaded here: tests/test_paper_configs.py runs configs/paper
        # on tiny models, tests/test_released_configs.py configs/released, each family's test runs
        # its configs/models files, tests/test_ddp.py parses configs/multi_gpu
        pytest.skip("needs real model weights (and a GPU); tested on tiny models elsewhere")
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(path), "--trainer.logger", "false"], run=False)
    assert cli.model is not None and cli.datamodule is not None


def test_fit_help_shows_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--trainer.max_steps" in out


def test_print_config_has_full_class_paths(capsys, tiny_weights):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "sdo_lightning.modules.latent_optimization.LatentOptimization" in out
    assert "class_path: sdo_lightning.objectives.ClassifierObjective" in out
    assert "class_path: sdo_lightning.gradient_modes.ShortcutGradient" in out
    assert "class_path: sdo_lightning.backbones.DigitsBackbone" in out


def test_gradient_mode_override_by_class_name(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.gradient_mode", "FullBackprop",
                "--trainer.logger", "false"], run=False)
    assert type(cli.model.gradient_mode).__name__ == "FullBackprop"


def test_unknown_plugin_name_is_a_clear_error(tiny_weights, capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.gradient_mode", "NoSuchMode"], run=False)
    assert "NoSuchMode" in capsys.readouterr().err


def test_plugins_subcommand(capsys):
    main(["plugins"])
    out = capsys.readouterr().out
    for name in ("ShortcutGradient", "FullBackprop", "TruncatedBackprop", "DDIM", "DPMSolverPlusPlus", "LCMMultistep",
                 "ClassifierObjective", "L2Fidelity", "WeightedSum"):
        assert re.search(rf"\b{name}\b", out), name


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    runnable = [b for b in blocks if "import" in b]
    assert runnable
    for block in runnable:
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("option, value, new_place", [
    ("project_to_shell", "false", "target: {class_path: StartNoise (or IntermediateLatent), init_args: {project_to_shell"),
    ("invert_images", "true", "target: {class_path: IntermediateLatent, init_args: {invert_images"),
])
def test_an_option_that_moved_names_its_new_place(option, value, new_place, tiny_weights, tmp_path, capsys):
    """A config of the release before targets became types (LatentOptimization(project_to_shell: false))."""
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  class_path: LatentOptimization\n  init_args:\n"
                   f"    {option}: {value}\n    objective: {{class_path: ClassifierObjective, init_args: {{target_class: 7}}}}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(old)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"LatentOptimization's option '{option}' moved" in err and new_place in err, err


def test_a_demo_shortened_below_its_validation_interval_validates_at_its_end(tiny_weights, tmp_path, monkeypatch):
    """configs/digits/finetune_lora.yaml validates every 50 steps; run for 2 it validates once, at step 2,
    instead of Lightning refusing val_check_interval > number of training batches."""
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(ROOT / "configs" / "digits" / "finetune_lora.yaml"), "--trainer.max_steps", "2",
                "--model.solver.num_inference_steps", "2", "--data.num_samples", "2", "--data.eval_samples", "2",
                "--data.eval_batch_size", "2", "--model.evaluation.kid_subset_size", "2",
                "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2 and cli.trainer.val_check_interval == 2
    assert "val/reward" in cli.trainer.callback_metrics  # (2 rows: too few for FID)
