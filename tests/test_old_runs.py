"""Runs written by the release before the package was sorted into layers still resume and predict.

tests/data/b611976 (see its README.md) holds a latent run and a LoRA run of that release: their
``config.yaml`` names the classes by the module paths of then (``sdo_lightning.latent_optimization``,
``sdo_lightning.targets``, ...), their ``last.ckpt`` records those paths in its ``sdo_run`` fingerprint.
Each run is resumed for one more step and predicted from, with its own config and with the same
config naming today's paths; the results are checked against code paths that do not go through the
module (a DDIM loop written here with diffusers' scheduler, an exported adapter loaded by path).
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdo_lightning._moved import current_path
from sdo_lightning.cli import main

from test_cli import ROOT

DATA = ROOT / "tests" / "data" / "b611976"


def _today(config: Path) -> Path:
    """A copy of ``config`` whose class paths are today's (no old path left in it)."""
    text = re.sub(r"(class_path: )(\S+)", lambda m: m.group(1) + current_path(m.group(2)), config.read_text())
    assert "sdo_lightning.latent_optimization" not in text and "sdo_lightning.targets." not in text
    out = config.with_name("config_today.yaml")
    out.write_text(text)
    return out


@pytest.fixture
def runs(tmp_path, monkeypatch):
    shutil.copytree(DATA, tmp_path / "runs")
    monkeypatch.chdir(tmp_path / "runs")  # the configs log to the relative folders latent/ and lora/
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path / "runs"


def _sdo(*args: str):
    return main([*args, "--trainer.enable_progress_bar", "false"])


def _predict(config: Path, ckpt: str | None, *extra: str) -> dict[str, np.ndarray]:
    cli = _sdo("predict", "--config", str(config), *(["--ckpt_path", ckpt] if ckpt else []), *extra)
    with np.load(Path(cli.trainer.log_dir) / "predictions.npz") as data:
        return {k: data[k] for k in data.files}


def _ddim(backbone, x: torch.Tensor, cond, steps: int) -> torch.Tensor:
    """DDIM (eta 0, no clamp) written out with diffusers' scheduler and the backbone's network."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config({**backbone.scheduler_config, "clip_sample": False, "thresholding": False})
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(backbone.denoise(x, t, cond), t, x, eta=0.0).prev_sample
    return backbone.decode(x)


@torch.no_grad()
def test_a_latent_run_of_the_earlier_release_resumes_and_predicts(runs):
    config, ckpt = runs / "latent" / "config.yaml", "latent/checkpoints/last.ckpt"
    saved = torch.load(runs / ckpt, weights_only=True)
    assert saved["sdo_run"]["config"]["model.class_path"] == "sdo_lightning.latent_optimization.LatentOptimization"

    for cfg in (config, _today(config)):
        cli = _sdo("fit", "--config", str(cfg), "--ckpt_path", ckpt, "--trainer.max_steps", "3")
        assert cli.trainer.global_step == 3
        assert not torch.equal(cli.model.variable.detach().cpu(), saved["state_dict"]["variable"])  # it stepped
        # the unoptimized samples of then are today's too: the resumed module drew the same start
        torch.testing.assert_close(cli.model.initial_images.cpu(), saved["state_dict"]["initial_images"], rtol=0, atol=0)

    old = _predict(config, ckpt, "--data.eval_samples", "2")
    today = _predict(_today(config), ckpt, "--data.eval_samples", "2")
    assert old.keys() == today.keys() and all(np.array_equal(old[k], today[k]) for k in old)

    # independent of the module: the checkpoint's variable (x_T) through a DDIM loop written here
    from sdo_lightning.backbones import DigitsBackbone

    backbone = DigitsBackbone()
    cond = backbone.encode_condition({"index": torch.arange(2), "class_label": torch.full((2,), 10)})
    want = _ddim(backbone, saved["state_dict"]["variable"], cond, steps=3)
    np.testing.assert_allclose(old["images"], want.numpy(), rtol=0, atol=1e-5)
    # and the release's own samples before optimizing (samples.npz) from its start latent
    with np.load(runs / "latent" / "samples.npz") as samples:
        before = samples["before"]
    np.testing.assert_allclose(before, _ddim(backbone, saved["state_dict"]["start_latent"], cond, 3).numpy(),
                               rtol=0, atol=1e-5)


def test_a_lora_run_of_the_earlier_release_resumes_and_predicts(runs):
    config, ckpt = runs / "lora" / "config.yaml", "lora/checkpoints/last.ckpt"
    saved = torch.load(runs / ckpt, weights_only=True)
    assert saved["sdo_run"]["config"]["model.class_path"] == "sdo_lightning.reward_finetuning.RewardFineTuning"

    for cfg in (config, _today(config)):
        cli = _sdo("fit", "--config", str(cfg), "--ckpt_path", ckpt, "--trainer.max_steps", "3")
        assert cli.trainer.global_step == 3
        assert (Path(cli.trainer.log_dir) / "lora" / "adapter_model.safetensors").is_file()

    old = _predict(config, ckpt)
    today = _predict(_today(config), ckpt)
    assert old.keys() == today.keys() and all(np.array_equal(old[k], today[k]) for k in old)
    # another code path to the same weights: the adapter that run exported, loaded by path
    exported = _predict(_today(config), None, "--model.adapter", "lora/lora")
    np.testing.assert_allclose(exported["images"], old["images"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(exported["base"], old["base"])


@pytest.mark.parametrize("old", sorted(__import__("sdo_lightning._moved", fromlist=["MOVED"]).MOVED))
def test_an_old_module_path_still_imports_with_a_deprecation_warning(old):
    import importlib
    import sys

    from sdo_lightning._moved import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} moved to {re.escape(MOVED[old])}"):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    public = [name for name in vars(new) if not name.startswith("_")]
    assert public and all(getattr(module, name) is getattr(new, name) for name in public)


def test_an_option_added_since_compares_equal_only_at_its_default():
    """A checkpoint of the earlier release cannot record options added since: left at their
    defaults (the earlier behaviour) they do not make it another run; set otherwise, they do."""
    from sdo_lightning.modules.fingerprint import _is_default

    config = {"model.class_path": "sdo_lightning.latent_optimization.LatentOptimization",  # an old path
              "model.init_args.decode_clamp": "straight_through",
              "model.init_args.solver.class_path": "sdo_lightning.solvers.DDIM",
              "model.init_args.solver.init_args.use_clipped_model_output": False}
    assert _is_default(config, "model.init_args.decode_clamp")
    assert _is_default(config, "model.init_args.solver.init_args.use_clipped_model_output")
    config["model.init_args.decode_clamp"] = "hard"
    config["model.init_args.solver.init_args.use_clipped_model_output"] = True
    assert not _is_default(config, "model.init_args.decode_clamp")
    assert not _is_default(config, "model.init_args.solver.init_args.use_clipped_model_output")
    assert not _is_default(config, "model.init_args.no_such_option")
