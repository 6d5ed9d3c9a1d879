"""Stable Diffusion backbone on a tiny random pipeline loaded from disk as users load theirs."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch import Trainer

from sdo_lightning import Objective
from sdo_lightning.backbones import StableDiffusionBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.solvers import DDIM
from sdo_lightning.testing.tiny_models import build_tiny_sd


class Redness(Objective, register=False):
    def forward(self, images, batch):
        return -(images[:, 0] - images[:, 1:].mean(1)).flatten(1).mean(1)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


def trainer(tmp_path, steps=1):
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)


def test_missing_model_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load the Stable Diffusion pipeline"):
        StableDiffusionBackbone(str(tmp_path / "nowhere"), local_files_only=True)


def test_cfg_denoise_matches_hand_written_guidance(tiny_sd):
    backbone = StableDiffusionBackbone(str(tiny_sd), guidance_scale=3.0, negative_prompt="blurry")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    cond = backbone.encode_condition({"prompt": ["a red cat", "a dog"]})
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        ids = pipe.tokenizer(["a red cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        neg = pipe.tokenizer(["blurry"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
        e_text = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        e_neg = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(neg)[0]).sample
        torch.testing.assert_close(backbone.denoise(x, t, cond), e_neg + 3.0 * (e_text - e_neg), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["x_T", "embedding"])
def test_latent_optimization_step(tiny_sd, target, tmp_path):
    module = LatentOptimization(objective=Redness(), backbone=StableDiffusionBackbone(str(tiny_sd), guidance_scale=2.0),
                                solver=DDIM(3), target=target, lr=0.1)
    trainer(tmp_path, steps=2).fit(module, datamodule=SampleSet(num_samples=2, prompt=["a red cat", "a dog"]))
    assert module.initial_images.shape == (2, 3, 16, 16)
    assert torch.isfinite(module.variable).all()
    assert not torch.allclose(module.variable, module.start_latent if target == "x_T" else module.start_cond.embeds)


@pytest.mark.parametrize("alpha", [None, 16.0])
def test_lora_export_loads_into_diffusers_pipeline(tiny_sd, tmp_path, alpha):
    """Adapters exported after fine-tuning load with pipeline.load_lora_weights(dir) and give
    the same denoiser output as the module's own UNet (also with lora_alpha != rank, which
    diffusers reads from the file's metadata)."""
    module = RewardFineTuning(objective=Redness(), backbone=StableDiffusionBackbone(str(tiny_sd), guidance_scale=1.0),
                              solver=DDIM(3), lr=0.05, lora_alpha=alpha)
    trainer(tmp_path, steps=2).fit(module, datamodule=SampleSet(num_samples=2, prompt="a cat"))
    out_dir = tmp_path / "lora"
    assert (out_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(700)
    emb = torch.randn(1, 77, 16)
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(out_dir)
        loaded = pipe.unet(x, t, encoder_hidden_states=emb).sample
        own = module.backbone.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(loaded, own, rtol=1e-5, atol=1e-6)
    assert (loaded - before).abs().max() > 1e-6  # the adapter did load and change the output


def test_lcm_unet_uses_guidance_embedding(tmp_path):
    root = build_tiny_sd(tmp_path / "lcm", lcm=True)
    backbone = StableDiffusionBackbone(str(root), guidance_scale=8.0)
    cond = backbone.encode_condition({"prompt": ["a cat"]})
    assert cond.negative_embeds is None
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        a = backbone.denoise(x, t, cond)
        backbone.guidance_scale = 2.0
        b = backbone.denoise(x, t, cond)
    assert (a - b).abs().max() > 1e-6
    from diffusers import LatentConsistencyModelPipeline

    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([2.0 - 1.0]), embedding_dim=8)
    torch.testing.assert_close(backbone._guidance_cond(1, torch.device("cpu"), torch.float32), reference)


def test_lora_option_fuses_the_adapter_into_the_unet(tiny_sd, tmp_path):
    """``lora:`` (e.g. LCM-LoRA) fuses W + (alpha / r) B A into every adapted layer, checked on
    the matrices read back from the file, and leaves no adapter layers behind."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    from sdo_lightning.lora import add_lora, lora_state_dict

    unet = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None).unet
    params = add_lora(unet, rank=2, alpha=4.0, target_modules=["to_q", "to_v"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict(unet)),
        unet_lora_adapter_metadata=unet._sdo_lora_config.to_dict())

    fused = StableDiffusionBackbone(str(tiny_sd), lora=str(tmp_path)).unet
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None).unet.state_dict()
    saved = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    # diffusers' file layout: <module>.lora.down.weight (A) and <module>.lora.up.weight (B)
    names = sorted({k[len("unet."):].rsplit(".lora.down", 1)[0] for k in saved if ".lora.down." in k})
    assert names and all(n.endswith(("to_q", "to_v")) for n in names)
    weights = dict(fused.named_parameters())
    for name in names:
        a, b = saved[f"unet.{name}.lora.down.weight"], saved[f"unet.{name}.lora.up.weight"]
        expected = base[f"{name}.weight"] + (4.0 / 2) * b @ a
        torch.testing.assert_close(weights[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not any("lora_" in n for n in weights)
