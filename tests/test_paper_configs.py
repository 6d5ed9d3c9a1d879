"""Every config in configs/paper parses and takes one optimizer step with tiny models swapped in.

Each config is read as users run it; only what needs real weights or large compute is replaced:
model ids and weight files by tiny models built here and saved to disk (loaded through the same
``from_pretrained`` / file code the configs reach), sampling steps by 2, the sample or prompt
batch by 2, the Trainer by one CPU step in fp32. torchvision and open_clip are not installed
here: the fakes of tests/tiny_objective_models.py stand in for them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sdo_lightning.testing.tiny_models import build_tiny_clip, build_tiny_ddpm, build_tiny_pixart, build_tiny_sd
from sdo_lightning.testing.tiny_objective_models import TinyOpenCLIP, aesthetic_state, install_fake_open_clip, install_fake_torchvision, save

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny stand-ins for every model and file the paper configs name."""
    from PIL import Image

    root = tmp_path_factory.mktemp("paper_models")
    rng = np.random.default_rng(0)
    style = root / "style.png"
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(style)
    # sizes the backbones take: tiny DDPM 8x8 pixels; tiny SD latent 8 -> 16 px images
    np.savez(root / "faces.npz", images=rng.random((4, 3, 8, 8), dtype=np.float32))
    np.savez(root / "photos.npz", images=rng.random((4, 3, 16, 16), dtype=np.float32))
    clip = build_tiny_clip(root / "clip", vision_layers=4)  # the configs read layer 3
    return {
        "sd": str(build_tiny_sd(root / "sd")),
        "sd_lcm": str(build_tiny_sd(root / "sd_lcm", lcm=True)),
        "pixart": str(build_tiny_pixart(root / "pixart")),
        "ddpm": str(build_tiny_ddpm(root / "ddpm")),
        "clip": str(clip),
        "style": str(style),
        "faces": str(root / "faces.npz"),
        "photos": str(root / "photos.npz"),
        "aesthetic": str(save(aesthetic_state("improved", dim=8), root / "aesthetic.pth")),  # tiny CLIP projects to 8
        "hps": str(save({"state_dict": TinyOpenCLIP(seed=3).state_dict()}, root / "HPS_v2_compressed.pt")),
    }


def _swap(node: dict, tiny: dict, lcm: bool) -> None:
    """Replace, in place, the real model ids and files of one ``class_path``/``init_args`` node."""
    name = node["class_path"].rsplit(".", 1)[-1]
    args = node.setdefault("init_args", {})
    if name == "StableDiffusionBackbone":
        args["model"] = tiny["sd_lcm"] if lcm else tiny["sd"]
    elif name == "PixArtAlphaBackbone":
        args["model"] = tiny["pixart"]
    elif name == "PixelUNetBackbone":
        args["model"] = tiny["ddpm"]
    elif name in ("CLIPScore", "CLIPStyleLoss", "AestheticScore"):
        args["model"] = tiny["clip"]
        if "reference" in args:
            args["reference"] = tiny["style"]
        if "mlp" in args:
            args["mlp"] = tiny["aesthetic"]
    elif name == "ImageClassifierObjective":
        args.update(model="torchvision/tinynet", weights="IMAGENET1K_V1")  # the fake's one model
    elif name == "HPSv2Score":
        args["checkpoint"] = tiny["hps"]
    elif name in ("DDIM", "DPMSolverPlusPlus", "LCMMultistep"):
        args["num_inference_steps"] = 2
    for value in args.values():
        children = value if isinstance(value, list) else [value]
        for child in children:
            if isinstance(child, dict) and "class_path" in child:
                _swap(child, tiny, lcm)


def tiny_config(path: Path, tiny: dict, out: Path) -> tuple[dict, Path]:
    original = yaml.safe_load(path.read_text())
    config = copy.deepcopy(original)
    lcm = config["model"]["init_args"].get("solver", {}).get("class_path") == "LCMMultistep"
    _swap(config["model"], tiny, lcm)
    data = config["data"]["init_args"]
    if config["data"]["class_path"] == "SampleSet":
        data["num_samples"] = 2
        if "images" in data:
            data["images"] = tiny["faces"] if data["images"] == "faces.npz" else tiny["photos"]
        if isinstance(data.get("target"), list):
            data["target"] = [1, 3]  # the fake classifier has 5 classes
    else:
        data["batch_size"] = 2
        if "prompts_file" in data:
            data["prompts_file"] = str(ROOT / data["prompts_file"])
    config["trainer"].update(max_steps=1, accelerator="cpu", devices=1, precision="32-true",
                             accumulate_grad_batches=1, default_root_dir=str(out),
                             logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(out)}})
    file = out / path.name
    file.write_text(yaml.safe_dump(config))
    return original, file


def test_there_is_a_config_per_paper_experiment():
    names = {p.stem for p in CONFIGS}
    assert {"text_editing", "style_guided", "aesthetic", "aesthetic_real_images", "adversarial", "reward_lora_aesthetic",
            "reward_lora_hps", "style_pixart", "style_lcm", "text_editing_dpm"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_takes_one_step_on_tiny_models(path, tiny, tmp_path, monkeypatch):
    from sdo_lightning.cli import main
    from sdo_lightning.modules.latent_optimization import LatentOptimization
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning
    from sdo_lightning.modules.targets import IntermediateLatent, StartNoise

    install_fake_torchvision(monkeypatch)
    install_fake_open_clip(monkeypatch)
    monkeypatch.chdir(tmp_path)
    _, file = tiny_config(path, tiny, tmp_path)
    assert path.read_text().startswith(f"# Run: sdo fit --config configs/paper/{path.name}")

    cli = main(["--config", str(file)], run=False)
    module = cli.model
    torch.manual_seed(0)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    if isinstance(module, LatentOptimization):
        radius = getattr(module.target, "linf_radius", None)
        assert isinstance(module.target, (StartNoise, IntermediateLatent))
        start = torch.zeros_like(module.variable) if radius is not None else module.start_latent
        moved = (module.variable.detach() - start).abs().amax()
        assert torch.isfinite(module.variable).all() and moved > 0
        if radius is not None:
            assert module.variable.abs().max() <= radius + 1e-7
        log_dir = Path(cli.trainer.log_dir)
        assert (log_dir / "before_after.png").is_file() and (log_dir / "summary.json").is_file()
    else:
        assert isinstance(module, RewardFineTuning)
        # LoRA B starts at zero; one AdamW step moves it
        b = [p for n, p in module.named_parameters() if "lora_B" in n]
        assert b and all(torch.isfinite(p).all() for p in b)
        assert max(p.abs().max().item() for p in b) > 0
        assert (Path(cli.trainer.log_dir) / "lora").is_dir()
