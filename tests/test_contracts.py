"""One contract test per plugin kind, parametrized over the registry (timm-style): a plugin
registered tomorrow is tested the day it lands, and a built-in without a tiny factory here
fails the coverage tests below.

Solvers and gradient modes have theirs beside their math (test_solvers.py, test_gradients.py).
"""

import pytest
import torch
from torch import nn

from objective_fixtures import check_per_sample, style_png, tiny_clip  # noqa: F401
from sdo_lightning import registry, sample
from sdo_lightning.solvers import DDIM, FlowMatchEuler
from sdo_lightning.testing.tiny_flux import build_tiny_flux
from sdo_lightning.testing.tiny_models import build_tiny_ddpm, build_tiny_pixart, build_tiny_sd
from sdo_lightning.testing.tiny_sd3 import build_tiny_sd3
from sdo_lightning.testing.tiny_sdxl import build_tiny_sdxl
from sdo_lightning.testing.tiny_objective_models import (TinyOpenCLIP, aesthetic_state, install_fake_open_clip, install_fake_torchvision,
                                   lpips_lin_state, save, vgg16_state)
from tiny_image_reward import save_tiny_image_reward


def _builtin(kind):
    return [name for name, cls in registry.classes(kind).items() if cls.__module__.startswith("sdo_lightning.")]


# -- objectives ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def objective_files(tmp_path_factory, tiny_clip, style_png):
    root = tmp_path_factory.mktemp("objective_files")
    return {
        "clip": str(tiny_clip),
        "png": str(style_png[0]),
        "vgg": str(save(vgg16_state(), root / "vgg16-397923af.pth")),
        "lin": str(save(lpips_lin_state(), root / "weights/v0.1/vgg.pth")),
        "mlp": str(save(aesthetic_state("improved", dim=8), root / "mlp.pth")),  # tiny CLIP projects to 8
        "hps": str(save({"state_dict": TinyOpenCLIP().state_dict()}, root / "HPS_v2_compressed.pt")),
        "image_reward": tuple(map(str, save_tiny_image_reward(root / "image_reward"))),  # (ImageReward.pt, tokenizer)
    }


def _objectives():
    from sdo_lightning import objectives as o
    from sdo_lightning.digits.judge import DigitsJudge

    return {
        # whole images (cutouts 0): random crops differ between the calls check_per_sample compares
        "AestheticEnsemble": lambda f: o.AestheticEnsemble([f["mlp"], f["mlp"]], [f["clip"], f["clip"]], [0.5, 1.5],
                                                           cutouts=0),
        "AestheticScore": lambda f: o.AestheticScore(mlp=f["mlp"], model=f["clip"]),
        "CLIPScore": lambda f: o.CLIPScore(f["clip"], prompt="a cat"),
        "CLIPStyleLoss": lambda f: o.CLIPStyleLoss(f["clip"], reference=f["png"], layer=2),
        "ClassifierObjective": lambda f: o.ClassifierObjective(target_class=3),
        "Checkpointed": lambda f: o.Checkpointed(o.CLIPScore(f["clip"], prompt="a cat")),
        "DigitsJudge": lambda f: DigitsJudge(target_class=3),
        "HPSv2Score": lambda f: o.HPSv2Score(f["hps"], prompt="a cat"),
        "ImageClassifierObjective": lambda f: o.ImageClassifierObjective("torchvision/tinynet", weights="IMAGENET1K_V1",
                                                                         target_class=2),
        "ImageRewardScore": lambda f: o.ImageRewardScore(f["image_reward"][0], tokenizer=f["image_reward"][1],
                                                         prompt="a cat"),
        "L1Fidelity": lambda f: o.L1Fidelity(),
        "L2Fidelity": lambda f: o.L2Fidelity(),
        "LPIPSFidelity": lambda f: o.LPIPSFidelity(f["vgg"], f["lin"]),
        # it scores batch["latent"], which this test's batch lacks: the images stand in for the latent
        "NoiseNormPrior": lambda f: o.NoiseNormPrior(),
        # float64 model: its loss, exp(logit_scale) * cos (14.3 x here), carries float32's batch-size-dependent
        # rounding (6e-7 on losses near 1) past check_per_sample's rtol 1e-6; CLIPScore's 1 - cos stays inside
        "PickScore": lambda f: o.PickScore(f["clip"], prompt="a cat").double(),
        # an L2Fidelity served by a reward server in a thread of this process: the batch's reference
        # images travel with the request
        "RemoteObjective": lambda f: o.RemoteObjective(_serve(o.L2Fidelity())),
        "WeightedSum": lambda f: o.WeightedSum([o.L2Fidelity(), o.ClassifierObjective(target_class=3)], [1.0, 0.5]),
    }


def _serve(objective):
    import threading

    from sdo_lightning.reward_server import RewardServer

    server = RewardServer(objective, "127.0.0.1:0")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.address


#: objectives of the embedded digits model, which takes grey images only
GREY_ONLY = {"ClassifierObjective", "DigitsJudge", "WeightedSum"}


def test_every_builtin_objective_has_a_contract_factory():
    assert sorted(_objectives()) == _builtin("objectives")


@pytest.mark.parametrize("name", registry.names("objectives"))
def test_objective_contract(name, objective_files, monkeypatch):
    """A per-sample loss (B,), finite and differentiable in the images, sample i's loss
    depending on image i alone, for grey and (but for the digits objectives) RGB images."""
    factories = _objectives()
    if name not in factories:
        pytest.skip(f"{name} is not a built-in; its package tests it")
    install_fake_torchvision(monkeypatch)
    install_fake_open_clip(monkeypatch)
    objective = factories[name](objective_files)
    for channels in (1,) if name in GREY_ONLY else (1, 3):
        init = torch.rand(3, channels, 16, 16, generator=torch.Generator().manual_seed(1))
        x = torch.rand(3, channels, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        loss = objective(x, {"initial_images": init, "latent": x})  # NoiseNormPrior reads the latent
        assert loss.shape == (3,) and torch.isfinite(loss).all()
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert all(v.shape[0] == 3 for v in objective.terms.values())
        # the reference image of a sample is a function of that sample alone (its dimmed mirror image)
        check_per_sample(lambda y: objective(y, {"initial_images": 0.5 * y.flip(-1), "latent": y}), x.detach())


# -- backbones -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory):
    from conftest import build_tiny_digits

    root = tmp_path_factory.mktemp("backbones")
    return {"digits": build_tiny_digits(root / "digits"), "flow_digits": build_tiny_digits(root / "flow", flow=True),
            "ddpm": build_tiny_ddpm(root / "ddpm"), "sd3": build_tiny_sd3(root / "sd3"),
            "flux": build_tiny_flux(root / "flux", guidance_embeds=True), "sdxl": build_tiny_sdxl(root / "sdxl"),
            "sd": build_tiny_sd(root / "sd"), "pixart": build_tiny_pixart(root / "pixart")}


def _backbones():
    from sdo_lightning import backbones as b

    return {
        "DigitsBackbone": lambda d: b.DigitsBackbone(str(d["digits"]), guidance_scale=2.0),
        "FlowDigitsBackbone": lambda d: b.FlowDigitsBackbone(str(d["flow_digits"]), guidance_scale=2.0),
        "FluxBackbone": lambda d: b.FluxBackbone(str(d["flux"]), local_files_only=True, height=16, width=16),
        "StableDiffusion3Backbone": lambda d: b.StableDiffusion3Backbone(str(d["sd3"]), local_files_only=True),
        "StableDiffusionXLBackbone": lambda d: b.StableDiffusionXLBackbone(str(d["sdxl"]), local_files_only=True),
        "PixArtAlphaBackbone": lambda d: b.PixArtAlphaBackbone(str(d["pixart"]), local_files_only=True),
        "PixelUNetBackbone": lambda d: b.PixelUNetBackbone(str(d["ddpm"]), local_files_only=True),
        "StableDiffusionBackbone": lambda d: b.StableDiffusionBackbone(str(d["sd"]), local_files_only=True),
    }


def test_every_builtin_backbone_has_a_contract_factory():
    assert sorted(_backbones()) == _builtin("backbones")


@pytest.mark.parametrize("name", registry.names("backbones"))
def test_backbone_contract(name, backbone_dirs):
    """What the modules ask of a backbone: conditioning rows that index like the batch, a
    denoiser output of the latent's shape, a differentiable decode into [0, 1], an encode back
    to latents, LoRA target names that exist in the network, and one sampled trajectory."""
    factories = _backbones()
    if name not in factories:
        pytest.skip(f"{name} is not a built-in; its package tests it")
    backbone = factories[name](backbone_dirs)
    assert isinstance(backbone.network, nn.Module) and isinstance(backbone.scheduler_config, dict)
    assert len(backbone.latent_shape) == 3
    batch = {"index": torch.arange(2), "class_label": torch.tensor([3, 10]), "prompt": ["a cat", "a dog"]}
    cond = backbone.encode_condition(batch)
    x = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone.denoise(x, torch.tensor(500), cond)
        first = backbone.denoise(x[:1], torch.tensor(500), cond[torch.tensor([0])])
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(first, out[:1], rtol=1e-4, atol=1e-5)  # rows of cond are samples
    latents = x.clone().requires_grad_()
    images = backbone.decode(latents)
    assert images.shape[0] == 2 and images.min() >= 0 and images.max() <= 1
    (grad,) = torch.autograd.grad(images.sum(), latents)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert backbone.encode(images.detach()).shape == x.shape
    names = [n for n, _ in backbone.network.named_modules()]
    assert any(n.endswith(target) for target in backbone.lora_target_modules for n in names)
    solver = FlowMatchEuler(2) if backbone.flow_matching else DDIM(2)
    x0 = sample(backbone.denoise, solver, x, cond, scheduler_config=backbone.scheduler_config)
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert isinstance(backbone.lcm_distilled, bool)


def test_from_pipeline_wraps_an_in_memory_pipeline_like_loading_it(backbone_dirs):
    """Backbone.from_pipeline around a pipeline object denoises exactly as the backbone loaded
    from the same directory, with the constructor's defaults for the options not given."""
    from diffusers import StableDiffusionPipeline

    from sdo_lightning.backbones import StableDiffusionBackbone

    loaded = StableDiffusionBackbone(str(backbone_dirs["sd"]), local_files_only=True, guidance_scale=3.0)
    pipe = StableDiffusionPipeline.from_pretrained(str(backbone_dirs["sd"]), safety_checker=None,
                                                   requires_safety_checker=False)
    wrapped = StableDiffusionBackbone.from_pipeline(pipe, guidance_scale=3.0)
    assert wrapped.negative_prompt == "" and wrapped.fused_lora is None
    batch = {"prompt": ["a cat", "a dog"]}
    x = torch.randn(2, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.denoise(x, torch.tensor(300), loaded.encode_condition(batch))
        got = wrapped.denoise(x, torch.tensor(300), wrapped.encode_condition(batch))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="unknown options \\['lora'\\]"):
        StableDiffusionBackbone.from_pipeline(pipe, lora="x")


# -- optimization targets (LatentOptimization's target:) ----------------------------------------

def _targets():
    from sdo_lightning.modules.targets import ConditionEmbedding, IntermediateLatent, StartNoise

    # (target, the solver it fits)
    return {
        "StartNoise": lambda: (StartNoise(), DDIM(3)),
        "IntermediateLatent": lambda: (IntermediateLatent(), DDIM(3, start_timestep=500)),
        "ConditionEmbedding": lambda: (ConditionEmbedding(), DDIM(3)),
    }


def test_every_builtin_target_has_a_contract_factory():
    """docs/adding-a-target.md: a new built-in target adds its factory to _targets()."""
    assert sorted(_targets()) == _builtin("targets")


@pytest.mark.parametrize("name", registry.names("targets"))
def test_target_contract(name, backbone_dirs):
    """What LatentOptimization asks of a target, given only a RunContext: a start latent and a variable
    with one row per sample, trajectory inputs through which the sampled image depends on the variable
    (a finite, non-zero gradient), and a projection that is idempotent and row by row."""
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.contracts import RunContext
    from sdo_lightning.gradient_modes import ShortcutGradient

    factories = _targets()
    if name not in factories:
        pytest.skip(f"{name} is not a built-in; its package tests it")
    target, solver = factories[name]()
    target.check(solver)
    backbone = DigitsBackbone(str(backbone_dirs["digits"]))
    context = RunContext(backbone, solver, seed=0)
    batch = {"index": torch.arange(2), "class_label": torch.tensor([3, 10])}
    cond = backbone.encode_condition(batch)
    noise = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = target.start_latent(noise, cond, batch, context)
    assert start.shape == noise.shape and torch.isfinite(start).all()
    variable = target.initial_variable(start, cond, context).detach().clone().requires_grad_()
    assert len(variable) == 2
    x, c = target.trajectory_inputs(variable, start, cond, context)
    assert x.shape == noise.shape
    x0 = sample(backbone.denoise, solver, x, c, gradient_mode=ShortcutGradient(), target=target.gradient_target(),
                plan_generator=torch.Generator().manual_seed(0), scheduler_config=backbone.scheduler_config)
    (grad,) = torch.autograd.grad(backbone.decode(x0).square().sum(), variable)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    moved = variable.detach() + 0.3 * torch.randn(variable.shape, generator=torch.Generator().manual_seed(1))
    once = moved.clone()
    target.project(once)
    twice = once.clone()
    target.project(twice)
    torch.testing.assert_close(twice, once)
    row = moved[1:].clone()
    target.project(row, torch.tensor([1]))
    torch.testing.assert_close(row, once[1:])
