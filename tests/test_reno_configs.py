"""configs/reno/*.yaml: ReNO's setting as written, and one optimizer step of each on tiny models.

The real pipelines and reward models are swapped for tiny ones built in code (tests/tiny_*.py;
open_clip faked for HPSv2.1; ImageReward saved in its released key layout); everything else is
read from the file as a user runs it.
"""

import copy
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import ROOT
from sdo_lightning.testing.tiny_flux import build_tiny_flux
from sdo_lightning.testing.tiny_models import build_tiny_clip, build_tiny_sd
from sdo_lightning.testing.tiny_objective_models import TinyOpenCLIP, install_fake_open_clip, save
from sdo_lightning.testing.tiny_sdxl import build_tiny_sdxl
from tiny_image_reward import save_tiny_image_reward

HUB = {"sd_turbo": "stabilityai/sd-turbo", "sdxl_turbo": "stabilityai/sdxl-turbo",
       "flux_schnell": "black-forest-labs/FLUX.1-schnell"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reno")
    return {"sd_turbo": build_tiny_sd(root / "sd"), "sdxl_turbo": build_tiny_sdxl(root / "sdxl", turbo=True),
            "flux_schnell": build_tiny_flux(root / "flux"), "clip": build_tiny_clip(root / "clip"),
            "hps": save({"state_dict": TinyOpenCLIP(seed=3).state_dict()}, root / "HPS_v2.1_compressed.pt"),
            "image_reward": save_tiny_image_reward(root / "image_reward")}


def test_there_is_a_reno_config_per_one_step_model():
    assert sorted(p.stem for p in (ROOT / "configs" / "reno").glob("*.yaml")) == sorted(HUB)


@pytest.mark.parametrize("name", sorted(HUB))
def test_reno_config_is_renos_setting(name):
    """The numbers of ReNO's released code (arguments.py: lr 5, SGD Nesterov momentum 0.9, grad clip
    0.1, 50 iterations, 1 step; weights HPS 5, ImageReward 1, PickScore 0.05, CLIP 0.01 x 100, reg 0.01)."""
    text = (ROOT / "configs" / "reno" / f"{name}.yaml").read_text()
    assert text.startswith(f"# Run: sdo fit --config configs/reno/{name}.yaml\n") and "ImageReward" in text
    config = yaml.safe_load(text)
    model = config["model"]["init_args"]
    assert config["trainer"]["max_steps"] == 50
    assert config["trainer"]["gradient_clip_val"] == 0.1 and config["trainer"]["gradient_clip_algorithm"] == "norm"
    assert model["backbone"]["init_args"]["model"] == HUB[name]
    assert model["solver"]["init_args"]["num_inference_steps"] == 1
    assert model["optimizer"] == {"class_path": "torch.optim.SGD", "init_args": {"lr": 5.0, "momentum": 0.9, "nesterov": True}}
    objective = model["objective"]["init_args"]
    names = [o["class_path"] for o in objective["objectives"]]
    assert dict(zip(names, objective["weights"])) == {"HPSv2Score": 5.0, "ImageRewardScore": 1.0, "PickScore": 0.05,
                                                      "CLIPScore": 1.0, "NoiseNormPrior": 0.01}
    assert model["target"]["init_args"]["project_to_shell"] is False
    assert config["data"]["init_args"]["num_samples"] == 1


@pytest.mark.parametrize("name", sorted(HUB))
def test_reno_config_takes_one_step_on_tiny_models(name, tiny, tmp_path, monkeypatch):
    from sdo_lightning.cli import main

    path = ROOT / "configs" / "reno" / f"{name}.yaml"
    config = copy.deepcopy(yaml.safe_load(path.read_text()))
    model = config["model"]["init_args"]
    backbone = model["backbone"]["init_args"]
    backbone["model"] = str(tiny[name])
    backbone.pop("variant", None)  # the tiny models have no fp16 weight files
    if "height" in backbone:
        backbone.update(height=16, width=16)  # the tiny models' size
    install_fake_open_clip(monkeypatch)
    for entry in model["objective"]["init_args"]["objectives"]:
        args = entry.setdefault("init_args", {})
        if entry["class_path"] == "HPSv2Score":
            args["checkpoint"] = str(tiny["hps"])
        elif entry["class_path"] == "ImageRewardScore":
            args["checkpoint"], args["tokenizer"] = map(str, tiny["image_reward"])
        elif "model" in args:
            args["model"] = str(tiny["clip"])
    config["trainer"].update(max_steps=1, accelerator="cpu", devices=1, precision="32-true", default_root_dir=str(tmp_path),
                             logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(tmp_path)}}, enable_progress_bar=False)
    file = tmp_path / path.name
    file.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)

    cli = main(["--config", str(file)], run=False)
    module = cli.model
    torch.manual_seed(0)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    step = (module.variable.detach().float() - module.start_latent.float()).flatten().norm().item()
    # SGD with Nesterov momentum 0.9, first step: lr * (1 + 0.9) * g, with g's norm clipped to 0.1
    # (train/grad_norm is logged before clipping)
    raw = cli.trainer.callback_metrics["train/grad_norm"].item()
    assert step == pytest.approx(5.0 * 1.9 * min(raw, 0.1), rel=1e-4) and step > 0
    assert torch.isfinite(module.best_loss).all()
    assert (Path(cli.trainer.log_dir) / "summary.json").is_file()
