"""Stable Diffusion XL backbone on tiny random pipelines loaded from disk as users load theirs;
every expected number comes from diffusers' own StableDiffusionXLPipeline (or its networks) run on
the same tiny model with the same latents."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

from sdo_lightning import sample
from sdo_lightning.backbones import StableDiffusionBackbone
from sdo_lightning.backbones.sdxl import StableDiffusionXLBackbone
from sdo_lightning.lora import add_lora
from sdo_lightning.solvers import DDIM
from sdo_lightning.testing.tiny_models import build_tiny_clip, build_tiny_sd
from sdo_lightning.testing.tiny_sdxl import HIDDEN_1, HIDDEN_2, PROJECTION, build_tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a dog on a hill"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sdxl")
    return {"base": build_tiny_sdxl(root / "base"), "turbo": build_tiny_sdxl(root / "turbo", turbo=True)}


def pipeline(root, scheduler=None):
    pipe = StableDiffusionXLPipeline.from_pretrained(root, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return pipe


def noise(backbone, n=2, seed=0):
    return torch.randn(n, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))


def trajectory(backbone, solver, x, generator=None):
    with torch.no_grad():
        cond = backbone.encode_condition({"prompt": PROMPTS})
        return sample(backbone.denoise, solver, x, cond, scheduler_config=backbone.scheduler_config, generator=generator)


# -- loading ---------------------------------------------------------------------------------

def test_missing_model_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        StableDiffusionXLBackbone(str(tmp_path / "nowhere"), local_files_only=True)
    message = str(info.value)
    assert message.startswith(f"could not load the Stable Diffusion XL pipeline from '{tmp_path / 'nowhere'}'")
    assert "hf download" in message and message.count(". ") == 0 and "\n" not in message


def test_a_plain_sd_pipeline_points_to_stable_diffusion_backbone(tmp_path):
    # StableDiffusionXLPipeline.from_pretrained loads an SD 1.x directory with text_encoder_2=None
    with pytest.raises(ValueError, match=r"not a Stable Diffusion XL .*StableDiffusionBackbone\.$"):
        StableDiffusionXLBackbone(str(build_tiny_sd(tmp_path / "sd")))


def test_from_pipeline_denoises_like_loading(models):
    loaded = StableDiffusionXLBackbone(str(models["base"]), guidance_scale=3.0, height=16, width=24)
    wrapped = StableDiffusionXLBackbone.from_pipeline(pipeline(models["base"]), guidance_scale=3.0, height=16, width=24)
    assert wrapped.negative_prompt is None and wrapped.fused_lora is None
    x = noise(loaded)
    with torch.no_grad():
        expected = loaded.denoise(x, torch.tensor(300), loaded.encode_condition({"prompt": PROMPTS}))
        got = wrapped.denoise(x, torch.tensor(300), wrapped.encode_condition({"prompt": PROMPTS}))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="unknown options \\['lora'\\]"):
        StableDiffusionXLBackbone.from_pipeline(pipeline(models["base"]), lora="x")


def test_native_size_and_chosen_size(models):
    assert StableDiffusionXLBackbone(str(models["base"])).latent_shape == (4, 8, 8)  # UNet sample_size 8
    assert StableDiffusionXLBackbone(str(models["base"]), height=16, width=24).latent_shape == (4, 8, 12)
    with pytest.raises(ValueError, match="multiples of 2"):
        StableDiffusionXLBackbone(str(models["base"]), height=15)


# -- sampling against the pipeline ----------------------------------------------------------

@pytest.mark.parametrize("guidance, negative, size", [
    (5.0, "blurry", (16, 24)),   # CFG against a negative prompt, non-square micro-conditioning
    (5.0, None, None),           # CFG, no negative prompt: force_zeros_for_empty_prompt
    (5.0, "", None),             # CFG against the encoded empty prompt
    (1.0, None, None),           # no CFG
], ids=["cfg-negative-16x24", "cfg-zeros", "cfg-empty", "no-cfg"])
def test_ddim_trajectory_matches_the_pipeline(models, guidance, negative, size):
    height, width = size or (None, None)
    backbone = StableDiffusionXLBackbone(str(models["base"]), guidance_scale=guidance, negative_prompt=negative,
                                         height=height, width=width)
    x = noise(backbone)
    got = trajectory(backbone, DDIM(4), x)
    pipe = pipeline(models["base"], DDIMScheduler)  # the DDIM config the solver builds: clip_sample off
    run = dict(negative_prompt=negative, guidance_scale=guidance, num_inference_steps=4, latents=x, height=height,
               width=width, output_type="latent")
    expected = pipe(PROMPTS, **run).images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if size is not None:  # the size micro-conditioning enters the output
        other = pipe(PROMPTS, **run, original_size=(32, 32)).images
        assert (other - expected).abs().max() > 1e-3


def test_zero_and_empty_negative_prompts_differ(models):
    """The comparison above tells force_zeros_for_empty_prompt from encoding "" apart."""
    zeros = StableDiffusionXLBackbone(str(models["base"]), negative_prompt=None).encode_condition({"prompt": PROMPTS})
    empty = StableDiffusionXLBackbone(str(models["base"]), negative_prompt="").encode_condition({"prompt": PROMPTS})
    assert zeros.negative_embeds.abs().max() == 0 and zeros.negative_pooled.abs().max() == 0
    assert empty.negative_embeds.abs().max() > 0.1
    assert zeros.embeds.shape == (2, 77, HIDDEN_1 + HIDDEN_2) and zeros.pooled.shape == (2, PROJECTION)


def test_lcm_distilled_unet_takes_guidance_through_its_embedding(tmp_path):
    root = build_tiny_sdxl(tmp_path / "lcm", time_cond_proj_dim=8)
    backbone = StableDiffusionXLBackbone(str(root), guidance_scale=6.0)
    assert backbone.lcm_distilled and not backbone.guided
    x = noise(backbone)
    got = trajectory(backbone, DDIM(2), x)
    expected = pipeline(root, DDIMScheduler)(PROMPTS, guidance_scale=6.0, num_inference_steps=2, latents=x,
                                             output_type="latent").images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    backbone.guidance_scale = 2.0
    assert (trajectory(backbone, DDIM(2), x) - got).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_ddim_reproduces_the_turbo_pipelines_euler_samplers(models, steps):
    """SDXL-Turbo's own scheduler (EulerAncestral, trailing spacing) equals DDIM(eta=1) with
    set_alpha_to_one (x_0 exactly at the end), noise for noise from the same generator; Euler
    equals DDIM(eta=0). diffusers' Euler with trailing spacing scales the given latents by
    sigma_max, not sqrt(sigma_max^2 + 1): the pipeline gets x_T / sqrt(1 - alpha_bar_T) to start
    from the same x_T."""
    backbone = StableDiffusionXLBackbone(str(models["turbo"]), guidance_scale=0.0)
    assert backbone.scheduler_config["timestep_spacing"] == "trailing" and not backbone.guided
    x = noise(backbone)
    start = x / (1 - DDIMScheduler.from_config(backbone.scheduler_config).alphas_cumprod[-1]) ** 0.5
    to_one = {"set_alpha_to_one": True}
    for solver, scheduler, seed in ((DDIM(steps, eta=1.0, scheduler_kwargs=to_one), None, 3),
                                    (DDIM(steps, scheduler_kwargs=to_one), EulerDiscreteScheduler, None)):
        pipe = pipeline(models["turbo"], scheduler)
        assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler if scheduler is None else scheduler)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        expected = pipe(PROMPTS, guidance_scale=0.0, num_inference_steps=steps, latents=start, generator=generator,
                        output_type="latent").images
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        got = trajectory(backbone, solver, x, generator)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # |x_0| ~ 70 on this random UNet


def sd_turbo(root: Path) -> Path:
    """A tiny SD pipeline with SD-Turbo's scheduler (EulerAncestral, trailing spacing)."""
    pipe = StableDiffusionPipeline.from_pretrained(build_tiny_sd(root / "src"), safety_checker=None)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.save_pretrained(root / "turbo")
    return root / "turbo"


@pytest.fixture(scope="module")
def tiny_sd_turbo(tmp_path_factory):
    return sd_turbo(tmp_path_factory.mktemp("sd_turbo"))


def _sd_turbo_check(root, backbone_guidance):
    """One step of SD-Turbo's pipeline at guidance 0 (no CFG) vs StableDiffusionBackbone + DDIM."""
    backbone = StableDiffusionBackbone(str(root), guidance_scale=backbone_guidance)
    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    x = noise(backbone)
    start = x / (1 - DDIMScheduler.from_config(backbone.scheduler_config).alphas_cumprod[-1]) ** 0.5
    expected = pipe(PROMPTS, guidance_scale=0.0, num_inference_steps=1, latents=start, output_type="latent").images
    got = trajectory(backbone, DDIM(1, scheduler_kwargs={"set_alpha_to_one": True}), x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 0.0])  # 0: SD-Turbo's model-card value, no guidance as in the pipeline
def test_sd_turbo_works_through_stable_diffusion_backbone(tiny_sd_turbo, guidance):
    _sd_turbo_check(tiny_sd_turbo, backbone_guidance=guidance)


# -- conditioning embedding ------------------------------------------------------------------

def test_condition_embedding_round_trip(models):
    backbone = StableDiffusionXLBackbone(str(models["base"]), guidance_scale=3.0, negative_prompt="blurry")
    cond = backbone.encode_condition({"prompt": PROMPTS})
    emb = backbone.condition_embedding(cond)
    assert emb.shape == (2, 77 * (HIDDEN_1 + HIDDEN_2) + PROJECTION) and not emb.requires_grad
    x, t = noise(backbone), torch.tensor(500)
    with torch.no_grad():
        out = backbone.denoise(x, t, cond)
        torch.testing.assert_close(backbone.denoise(x, t, backbone.with_embedding(cond, emb)), out, rtol=0, atol=0)
        # rows of the condition are samples
        torch.testing.assert_close(backbone.denoise(x[:1], t, cond[torch.tensor([0])]), out[:1], rtol=1e-5, atol=1e-5)
        for part in (slice(None, 77 * (HIDDEN_1 + HIDDEN_2)), slice(-PROJECTION, None)):  # sequence, pooled
            moved = emb.clone()
            moved[:, part] += 0.5
            assert (backbone.denoise(x, t, backbone.with_embedding(cond, moved)) - out).abs().max() > 1e-4


# -- LoRA export -----------------------------------------------------------------------------

def test_saved_lora_loads_into_a_fresh_pipeline(models, tmp_path):
    """Random nonzero adapters (alpha != rank) saved with save_lora load with
    pipe.load_lora_weights(dir) and give the adapted UNet's outputs; the ``lora:`` option fuses
    the same file at load."""
    backbone = StableDiffusionXLBackbone(str(models["base"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in add_lora(backbone.unet, rank=2, alpha=6.0, target_modules=backbone.lora_target_modules):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    directory = backbone.save_lora(tmp_path / "lora")
    assert (directory / "pytorch_lora_weights.safetensors").is_file()

    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor(400)
    inputs = dict(encoder_hidden_states=torch.randn(2, 77, HIDDEN_1 + HIDDEN_2, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(2, PROJECTION, generator=g),
                                     "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)})
    pipe = pipeline(models["base"])
    with torch.no_grad():
        before = pipe.unet(x, t, **inputs).sample
        pipe.load_lora_weights(directory)
        loaded = pipe.unet(x, t, **inputs).sample
        own = backbone.unet(x, t, **inputs).sample
        fused = StableDiffusionXLBackbone(str(models["base"]), lora=str(directory))
        from_option = fused.unet(x, t, **inputs).sample
    assert (loaded - before).abs().max() > 1e-3  # the adapter did load and change the output
    torch.testing.assert_close(loaded, own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_option, own, rtol=1e-4, atol=1e-5)
    assert fused.fused_lora == str(directory) and not any("lora_" in n for n, _ in fused.unet.named_parameters())


# -- VAE -------------------------------------------------------------------------------------

def test_decode_and_encode_use_the_vae_scaling_factor(models):
    backbone = StableDiffusionXLBackbone(str(models["base"]))
    vae = pipeline(models["base"]).vae
    assert vae.config.scaling_factor == 0.13025
    latents = noise(backbone)
    with torch.no_grad():
        expected = ((vae.decode(latents / 0.13025).sample + 1) / 2).clamp(0, 1)
        torch.testing.assert_close(backbone.decode(latents), expected, rtol=1e-5, atol=1e-6)
        images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        mean = vae.encode(images * 2 - 1).latent_dist.mean
        torch.testing.assert_close(backbone.encode(images), mean * 0.13025, rtol=1e-5, atol=1e-6)


def test_float16_keeps_the_force_upcast_vae_in_float32(models):
    """Loaded in float16, the UNet is float16 and the VAE (force_upcast) float32, and decoding
    under float16 autocast runs the VAE in float32 all the same."""
    backbone = StableDiffusionXLBackbone(str(models["base"]), dtype="float16")
    assert backbone.unet.dtype == torch.float16 and backbone.vae.dtype == torch.float32
    latents = noise(backbone)
    with torch.no_grad():
        plain = backbone.decode(latents)
        with torch.autocast("cpu", dtype=torch.float16):
            under_autocast = backbone.decode(latents)
            raw = backbone.vae.decode(latents / 0.13025).sample  # what autocast alone would give
    assert raw.dtype == torch.float16
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)


# -- config ----------------------------------------------------------------------------------

def test_sdxl_turbo_noise_config_takes_one_step(models, tmp_path, monkeypatch):
    from sdo_lightning.cli import main

    path = ROOT / "configs" / "models" / "sdxl_turbo_noise.yaml"
    assert path.read_text().startswith("# Run: sdo fit --config configs/models/sdxl_turbo_noise.yaml\n")
    config = copy.deepcopy(yaml.safe_load(path.read_text()))
    model = config["model"]["init_args"]
    backbone = model["backbone"]["init_args"]
    assert backbone["model"] == "stabilityai/sdxl-turbo" and 1 <= model["solver"]["init_args"]["num_inference_steps"] <= 4
    backbone["model"] = str(models["turbo"])
    del backbone["variant"]  # the tiny model has no fp16 weight files; dtype stays as the config says
    backbone.update(height=16, width=16)  # the tiny model's size
    model["objective"]["init_args"]["model"] = str(build_tiny_clip(tmp_path / "clip"))
    config["trainer"].update(max_steps=1, accelerator="cpu", devices=1, default_root_dir=str(tmp_path),
                             logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(tmp_path)}})
    file = tmp_path / path.name
    file.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)

    cli = main(["--config", str(file)], run=False)
    module = cli.model
    assert isinstance(module.backbone, StableDiffusionXLBackbone) and module.backbone.unet.dtype == torch.bfloat16
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert torch.isfinite(module.variable).all()
    assert (module.variable.detach() - module.start_latent).abs().amax() > 0
    assert (Path(cli.trainer.log_dir) / "summary.json").is_file()
