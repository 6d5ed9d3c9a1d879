"""PixArt-alpha and pixel-space UNet backbones on tiny random pipelines loaded from disk as users
load theirs; every expected number comes from a hand-written call of the loaded diffusers networks."""

import json
import shutil
from importlib.util import find_spec

import pytest
import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DModel
from lightning.pytorch import Trainer
from transformers import AutoTokenizer, T5EncoderModel

from sdo_lightning import Objective
from sdo_lightning.backbones import PixArtAlphaBackbone, PixelUNetBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.lora import lora_layers
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.solvers import DDIM
from sdo_lightning.testing.tiny_models import build_tiny_ddpm, build_tiny_pixart

PROMPTS = ["a red cat", "a dog on a hill"]


class Redness(Objective, register=False):
    def forward(self, images, batch):
        return -(images[:, 0] - images[:, 1:].mean(1)).flatten(1).mean(1)


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    return build_tiny_pixart(tmp_path_factory.mktemp("tiny_pixart"))


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory):
    return build_tiny_ddpm(tmp_path_factory.mktemp("tiny_ddpm"))


def trainer(tmp_path, steps=1, **kw):
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw)


def t5_reference(root):
    """The tiny pipeline's T5 pieces, loaded on their own (not through the backbone)."""
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    encoder = T5EncoderModel.from_pretrained(root / "text_encoder")

    def embed(prompts):
        tokens = tokenizer(prompts, padding="max_length", max_length=120, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0], tokens.attention_mask

    return embed


# -- PixArt-alpha ------------------------------------------------------------------------------

def test_pixart_missing_model_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        PixArtAlphaBackbone(str(tmp_path / "nowhere"), local_files_only=True)
    message = str(info.value)
    assert message.startswith(f"could not load the PixArt-alpha pipeline from '{tmp_path / 'nowhere'}'")
    assert "hf download" in message and message.count(". ") == 0 and "\n" not in message


def test_pixart_hub_id_offline_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read by the backbone: local_files_only unset means offline
    hub_id = "PixArt-alpha/PixArt-XL-2-512x512"
    with pytest.raises(FileNotFoundError, match=rf"'{hub_id}'.*`hf download {hub_id}`"):
        PixArtAlphaBackbone(hub_id)


@pytest.mark.skipif(find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
def test_pixart_sentencepiece_tokenizer_asks_for_sentencepiece(tiny_pixart, tmp_path):
    """Real PixArt repos ship spiece.model (no tokenizer.json); without sentencepiece that must
    say what to install, not surface transformers' fallback error."""
    root = shutil.copytree(tiny_pixart, tmp_path / "spm")
    shutil.rmtree(root / "tokenizer")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "spiece.model").write_bytes(b"\x0a\x00")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(ImportError, match=r"`pip install sentencepiece`"):
        PixArtAlphaBackbone(str(root))


def test_pixart_legacy_transformer2dmodel_config_loads(tiny_pixart, tmp_path):
    """PixArt-alpha's hub repos name the transformer ``Transformer2DModel``; diffusers maps it to
    PixArtTransformer2DModel, and the backbone must accept that layout."""
    root = shutil.copytree(tiny_pixart, tmp_path / "legacy")
    for path, edit in ((root / "model_index.json", lambda c: c.update(transformer=["diffusers", "Transformer2DModel"])),
                       (root / "transformer" / "config.json", lambda c: c.update(_class_name="Transformer2DModel"))):
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    legacy = PixArtAlphaBackbone(str(root), guidance_scale=2.0)
    assert isinstance(legacy.transformer, PixArtTransformer2DModel)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(100)
    with torch.no_grad():
        cond = legacy.encode_condition({"prompt": ["a cat"]})
        torch.testing.assert_close(legacy.denoise(x, t, cond),
                                   PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=2.0).denoise(x, t, cond))


def test_pixart_cfg_denoise_matches_hand_written_call(tiny_pixart):
    """Guidance, the T5 attention mask and the epsilon half of the learned-sigma output, each
    checked against separate calls of the transformer loaded on its own."""
    backbone = PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=3.0, negative_prompt="blurry")
    transformer = PixArtTransformer2DModel.from_pretrained(tiny_pixart / "transformer")
    embed = t5_reference(tiny_pixart)
    text, text_mask = embed(PROMPTS)
    neg, neg_mask = embed(["blurry"] * 2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    none = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        def eps(h, mask):
            out = transformer(x, encoder_hidden_states=h, encoder_attention_mask=mask, timestep=t.repeat(2),
                              added_cond_kwargs=none).sample
            assert out.shape[1] == 8  # epsilon and variance
            return out[:, :4]

        e_text, e_neg = eps(text, text_mask), eps(neg, neg_mask)
        got = backbone.denoise(x, t, backbone.encode_condition({"prompt": PROMPTS}))
        torch.testing.assert_close(got, e_neg + 3.0 * (e_text - e_neg), rtol=1e-4, atol=1e-5)
        # the mask matters here, so the comparison above would catch a backbone that dropped it
        assert (eps(text, None) - e_text).abs().max() > 1e-3


def test_pixart_size_conditions_of_1024_models(tmp_path):
    """Models trained with resolution / aspect-ratio conditioning get the decoded image size."""
    root = build_tiny_pixart(tmp_path / "px1024", additional_conditions=True)
    backbone = PixArtAlphaBackbone(str(root), guidance_scale=1.0, height=16, width=24)
    assert backbone.latent_shape == (4, 8, 12)  # VAE factor 2
    transformer = PixArtTransformer2DModel.from_pretrained(root / "transformer")
    text, mask = t5_reference(root)(["a cat"])
    x, t = torch.randn(1, 4, 8, 12), torch.tensor(300)
    with torch.no_grad():
        def eps(height, width):
            sizes = {"resolution": torch.tensor([[float(height), float(width)]]),
                     "aspect_ratio": torch.tensor([[height / width]])}
            return transformer(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t[None],
                               added_cond_kwargs=sizes).sample[:, :4]

        got = backbone.denoise(x, t, backbone.encode_condition({"prompt": ["a cat"]}))
        torch.testing.assert_close(got, eps(16, 24), rtol=1e-4, atol=1e-5)
        assert (eps(24, 16) - eps(16, 24)).abs().max() > 1e-4  # the sizes do enter the output


def test_pixart_options_max_length_dtype_channels_last(tiny_pixart):
    short = PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=1.0, max_sequence_length=6)
    cond = short.encode_condition({"prompt": PROMPTS})
    tokenizer = AutoTokenizer.from_pretrained(tiny_pixart / "tokenizer")
    encoder = T5EncoderModel.from_pretrained(tiny_pixart / "text_encoder")
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=6, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    assert cond.embeds.shape == (2, 6, 24) and cond.negative_embeds is None
    torch.testing.assert_close(cond.embeds, reference)
    assert PixArtAlphaBackbone(str(tiny_pixart), dtype="bfloat16").transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a torch dtype"):
        PixArtAlphaBackbone(str(tiny_pixart), dtype="bf16")
    # (compile goes through the same _speed_up as DigitsBackbone, tested there)
    fast = PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=2.0, channels_last=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(600)
    with torch.no_grad():
        cond = fast.encode_condition({"prompt": PROMPTS})
        expected = PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=2.0).denoise(x, t, cond)
        torch.testing.assert_close(fast.denoise(x, t, cond), expected, rtol=1e-4, atol=1e-5)


def test_pixart_scheduler_config_drops_learned_variance(tiny_pixart):
    saved = json.loads((tiny_pixart / "scheduler" / "scheduler_config.json").read_text())
    assert saved["variance_type"] == "learned_range"
    config = PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=1.0).scheduler_config
    assert "variance_type" not in config and config["beta_schedule"] == saved["beta_schedule"] == "linear"


def test_pixart_decode_encode(tiny_pixart):
    backbone = PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=1.0)
    vae = AutoencoderKL.from_pretrained(tiny_pixart / "vae")
    scale = json.loads((tiny_pixart / "vae" / "config.json").read_text())["scaling_factor"]
    latents = (torch.randn(2, 4, 8, 8) * 3).requires_grad_(True)
    images = backbone.decode(latents)
    raw = (vae.decode(latents / scale).sample + 1) / 2
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, raw.clamp(0, 1), rtol=1e-5, atol=1e-6)
    # straight-through clamp: the gradient is that of the unclamped decoder, also outside [0, 1]
    weights = torch.randn_like(images)
    (got,) = torch.autograd.grad((images * weights).sum(), latents)
    (expected,) = torch.autograd.grad((raw * weights).sum(), latents)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        encoded = backbone.encode(images)
        reference = vae.encode(images * 2 - 1).latent_dist.mean * scale
    assert encoded.shape == (2, 4, 8, 8)
    torch.testing.assert_close(encoded, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["x_T", "embedding"])
def test_pixart_latent_optimization_step(tiny_pixart, target, tmp_path):
    module = LatentOptimization(objective=Redness(), backbone=PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=2.0),
                                solver=DDIM(3), target=target, lr=0.1)
    trainer(tmp_path).fit(module, datamodule=SampleSet(num_samples=2, prompt=PROMPTS))
    assert module.initial_images.shape == (2, 3, 16, 16)
    assert torch.isfinite(module.variable).all()
    if target == "x_T":
        assert not torch.allclose(module.variable, module.start_latent)
    else:
        # cross-attention skips padding: exactly the prompt's tokens moved, the padding did not
        moved = (module.variable - module.start_cond.embeds).abs().amax(-1) > 0
        _, mask = t5_reference(tiny_pixart)(PROMPTS)
        assert torch.equal(moved, mask.bool())


@pytest.mark.parametrize("precision,target", [("bf16-true", "embedding"), ("bf16-mixed", "x_T")])
def test_pixart_fits_under_trainer_precision(tmp_path, precision, target):
    """The Trainer converts the module (bf16-true) or autocasts (bf16-mixed); prompt embeddings
    made in float32 before the conversion, and the size conditions of 1024px models, must follow."""
    root = build_tiny_pixart(tmp_path / "px1024", additional_conditions=True)
    module = LatentOptimization(objective=Redness(), backbone=PixArtAlphaBackbone(str(root), guidance_scale=2.0),
                                solver=DDIM(3), target=target, lr=0.1)
    trainer(tmp_path, precision=precision).fit(module, datamodule=SampleSet(num_samples=2, prompt=PROMPTS))
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.backbone.transformer.dtype == expected and module.variable.dtype == expected
    start = module.start_latent if target == "x_T" else module.start_cond.embeds
    assert torch.isfinite(module.variable).all() and not torch.equal(module.variable, start.to(expected))


def test_pixart_reward_finetuning_changes_adapters_only(tiny_pixart, tmp_path):
    backbone = PixArtAlphaBackbone(str(tiny_pixart), guidance_scale=2.0)
    module = RewardFineTuning(objective=Redness(), backbone=backbone, solver=DDIM(3), lr=0.05)
    adapted = {name.split(".", 2)[-1] for name, m in backbone.transformer.named_modules()
               if m in set(lora_layers(backbone.transformer))}
    assert {"attn1.to_q", "attn2.to_v", "ff.net.0.proj", "ff.net.2"} <= adapted
    before = {k: v.clone() for k, v in backbone.transformer.state_dict().items() if "lora_B" in k}
    assert all((v == 0).all() for v in before.values())
    trainer(tmp_path).fit(module, datamodule=SampleSet(num_samples=2, prompt="a cat"))
    state = backbone.transformer.state_dict()
    assert any((state[k] != 0).any() for k in before)  # the adapters took a step
    fresh = PixArtTransformer2DModel.from_pretrained(tiny_pixart / "transformer").state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() == fresh.keys()
    for key, value in fresh.items():
        assert torch.equal(base[key], value), key
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


# -- pixel-space UNet ------------------------------------------------------------------------

def test_pixel_unet_missing_model_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        PixelUNetBackbone(str(tmp_path / "nowhere"), local_files_only=True)
    message = str(info.value)
    assert message.startswith(f"could not load the pixel-space UNet pipeline from '{tmp_path / 'nowhere'}'")
    assert message.count(". ") == 0 and "\n" not in message


@pytest.mark.parametrize("flat", [False, True], ids=["pipeline-layout", "flat-layout"])
def test_pixel_unet_denoise_matches_unet(tmp_path, flat):
    root = build_tiny_ddpm(tmp_path / "ddpm", flat=flat)
    backbone = PixelUNetBackbone(str(root))
    unet = UNet2DModel.from_pretrained(root if flat else root / "unet")
    saved = json.loads((root / ("" if flat else "scheduler") / "scheduler_config.json").read_text())
    assert backbone.latent_shape == (3, 8, 8)
    assert backbone.scheduler_config["beta_schedule"] == saved["beta_schedule"] == "linear"
    batch = {"index": torch.arange(2)}
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(250)
    with torch.no_grad():
        torch.testing.assert_close(backbone.denoise(x, t, backbone.encode_condition(batch)), unet(x, t).sample)
    assert backbone.condition_embedding(backbone.encode_condition(batch)) is None


def test_pixel_unet_class_conditional_guidance(tmp_path):
    root = build_tiny_ddpm(tmp_path / "cond", num_class_embeds=11)
    backbone = PixelUNetBackbone(str(root), guidance_scale=2.5, null_class=10)
    unet = UNet2DModel.from_pretrained(root / "unet")
    labels = torch.tensor([3, 7])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(400)
    with torch.no_grad():
        e_cond = unet(x, t, class_labels=labels).sample
        e_null = unet(x, t, class_labels=torch.tensor([10, 10])).sample
        got = backbone.denoise(x, t, backbone.encode_condition({"index": torch.arange(2), "class_label": labels}))
        torch.testing.assert_close(got, e_null + 2.5 * (e_cond - e_null), rtol=1e-4, atol=1e-5)
        # an optimized class embedding in place of the label gives the same output
        cond = backbone.encode_condition({"index": torch.arange(2), "class_label": labels})
        torch.testing.assert_close(backbone.denoise(x, t, backbone.condition_embedding(cond)), got, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="null_class"):
        PixelUNetBackbone(str(root), guidance_scale=2.5)
    with pytest.raises(ValueError, match="not class-conditional"):
        PixelUNetBackbone(str(build_tiny_ddpm(tmp_path / "uncond")), null_class=10)


def test_pixel_unet_decode_encode(tiny_ddpm):
    backbone = PixelUNetBackbone(str(tiny_ddpm))
    x = (torch.randn(2, 3, 8, 8) * 2).requires_grad_(True)
    images = backbone.decode(x)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, ((x + 1) / 2).clamp(0, 1))
    (grad,) = torch.autograd.grad(images.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 0.5))  # straight through the clamp
    inside = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(backbone.encode(backbone.decode(inside)), inside)


def test_pixel_unet_latent_optimization_step(tiny_ddpm, tmp_path):
    module = LatentOptimization(objective=Redness(), backbone=PixelUNetBackbone(str(tiny_ddpm)), solver=DDIM(3), lr=0.1)
    trainer(tmp_path).fit(module, datamodule=SampleSet(num_samples=2))
    assert module.initial_images.shape == (2, 3, 8, 8)
    assert torch.isfinite(module.variable).all() and not torch.allclose(module.variable, module.start_latent)
    unconditional = LatentOptimization(objective=Redness(), backbone=PixelUNetBackbone(str(tiny_ddpm)), solver=DDIM(3),
                                       target="embedding")
    with pytest.raises(ValueError, match="has no conditioning embedding"):
        trainer(tmp_path).fit(unconditional, datamodule=SampleSet(num_samples=2))


def test_pixel_unet_fits_in_bf16(tiny_ddpm, tmp_path):
    module = LatentOptimization(objective=Redness(), backbone=PixelUNetBackbone(str(tiny_ddpm)), solver=DDIM(3), lr=0.1)
    trainer(tmp_path, precision="bf16-true").fit(module, datamodule=SampleSet(num_samples=2))
    assert module.backbone.unet.dtype == torch.bfloat16
    assert torch.isfinite(module.variable).all() and not torch.equal(module.variable, module.start_latent)
