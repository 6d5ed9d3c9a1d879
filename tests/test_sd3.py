"""Stable Diffusion 3 backbone on tiny random pipelines loaded from disk as users load theirs; every
expected number comes from diffusers' StableDiffusion3Pipeline run on the same model and latents,
its networks called on their own, or a closed form."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from sdo_lightning import sample
from sdo_lightning.backbones.sd3 import StableDiffusion3Backbone
from sdo_lightning.lora import add_lora, lora_layers
from sdo_lightning.solvers import FlowMatchEuler
from sdo_lightning.testing.tiny_models import build_tiny_clip
from sdo_lightning.testing.tiny_objective_models import aesthetic_state, save
from sdo_lightning.testing.tiny_sd3 import SCALING_FACTOR, SHIFT_FACTOR, build_tiny_sd3

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a dog on a hill"]
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd3")
    return {"t5": build_tiny_sd3(root / "t5"), "no_t5_dynamic": build_tiny_sd3(root / "no_t5", t5=False,
                                                                                dynamic_shifting=True)}


def pipeline(root, **kw):
    return StableDiffusion3Pipeline.from_pretrained(root, **kw)


def direct(transformer, x, t, embeds, pooled):
    """One call of the transformer, as the pipeline makes it."""
    return transformer(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=embeds,
                       pooled_projections=pooled, return_dict=False)[0]


# -- (a) sampling equals the pipeline's own denoising ------------------------------------------------

@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("variant", ["t5", "no_t5_dynamic"])
def test_trajectory_equals_pipeline_denoising(tiny, variant, guidance):
    """sample(denoise, FlowMatchEuler) from the pipeline's latents gives its output_type='latent'
    result: prompt encoding (T5 or its zeros), CFG against the negative prompt, the raw timestep,
    the shifted schedule; with dynamic shifting at a non-native size, the mu of (H/2)(W/2) tokens."""
    size = {"height": 16, "width": 24} if variant == "no_t5_dynamic" else {}
    backbone = StableDiffusion3Backbone(str(tiny[variant]), guidance_scale=guidance, negative_prompt="blurry", **size)
    pipe = pipeline(tiny[variant], **(NO_T5 if variant == "no_t5_dynamic" else {}))
    x = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    run = dict(negative_prompt="blurry", guidance_scale=guidance, num_inference_steps=4, latents=x.clone(),
               output_type="latent", **size)
    with torch.no_grad():
        expected = pipe(PROMPTS, **run).images
        got = sample(backbone.denoise, FlowMatchEuler(4), x, backbone.encode_condition({"prompt": PROMPTS}),
                     scheduler_config=backbone.scheduler_config)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - x).abs().max() > 0.1
    if variant == "no_t5_dynamic":
        assert backbone.latent_shape == (4, 16, 24)
        tokens = (16 // 2) * (24 // 2)  # patch size 2
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)  # the scheduler config's base/max shift and lengths
        assert backbone.scheduler_config["sdo_set_timesteps"] == {"mu": pytest.approx(mu, abs=1e-12)}
        with torch.no_grad():  # mu matters: the base mu (256 tokens) gives another trajectory
            assert (pipe(PROMPTS, mu=0.5, **run).images - got).abs().max() > 1e-3
    else:
        assert "sdo_set_timesteps" not in backbone.scheduler_config and backbone.scheduler_config["shift"] == 3.0


def test_prompt_encoding_equals_pipeline_encode_prompt(tiny):
    """Sequence (CLIP-L + CLIP-G penultimate states padded to T5's width, then T5) and pooled
    embeddings, also with T5 dropped from a pipeline that has it (zeros in its place)."""
    for drop in (False, True):
        backbone = StableDiffusion3Backbone(str(tiny["t5"]), guidance_scale=2.0, negative_prompt="blurry",
                                            max_sequence_length=40, text_encoder_3=not drop)
        pipe = pipeline(tiny["t5"], **(NO_T5 if drop else {}))
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                PROMPTS, None, None, negative_prompt="blurry", max_sequence_length=40)
        cond = backbone.encode_condition({"prompt": PROMPTS})
        assert cond.embeds.shape == (2, 77 + 40, 32) and cond.pooled.shape == (2, 64)
        for got, expected in zip((cond.embeds, cond.negative_embeds, cond.pooled, cond.negative_pooled),
                                 (embeds, negative, pooled, negative_pooled)):
            torch.testing.assert_close(got, expected)
        assert (cond.embeds[:, :77, 24:] == 0).all()  # CLIP's 8 + 16 features padded to 32
        assert (backbone.text_encoder_3 is None) == drop and ((cond.embeds[:, 77:] == 0).all().item() == drop)
    unguided = StableDiffusion3Backbone(str(tiny["t5"]), guidance_scale=1.0).encode_condition({"prompt": PROMPTS})
    assert unguided.negative_embeds is None and unguided.negative_pooled is None


def test_condition_rows_and_options(tiny):
    backbone = StableDiffusion3Backbone(str(tiny["t5"]), guidance_scale=2.5)
    cond = backbone.encode_condition({"prompt": PROMPTS})
    x, t = torch.randn(2, 4, 32, 32), torch.tensor(700.0)
    with torch.no_grad():  # a row of the conditioning conditions that row of the batch alone
        torch.testing.assert_close(backbone.denoise(x[1:], t, cond[torch.tensor([1])]), backbone.denoise(x, t, cond)[1:],
                                   rtol=1e-4, atol=1e-5)
        wrapped = StableDiffusion3Backbone.from_pipeline(pipeline(tiny["t5"]), guidance_scale=2.5)
        torch.testing.assert_close(wrapped.denoise(x, t, cond), backbone.denoise(x, t, cond))
    assert backbone.flow_matching and wrapped.scheduler_config == backbone.scheduler_config
    assert StableDiffusion3Backbone(str(tiny["t5"]), dtype="bfloat16").transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiples of 2"):
        StableDiffusion3Backbone(str(tiny["t5"]), height=17)
    with pytest.raises(ValueError, match="at most 512"):
        StableDiffusion3Backbone(str(tiny["t5"]), max_sequence_length=600)


# -- (b) LoRA export in diffusers' SD3 format ------------------------------------------------------

def test_lora_round_trips_through_load_lora_weights_and_the_lora_option(tiny, tmp_path):
    """save_lora writes what StableDiffusion3Pipeline.load_lora_weights reads (alpha 4 != rank 2
    from the metadata); the lora: option fuses the same adapter into the transformer."""
    backbone = StableDiffusion3Backbone(str(tiny["t5"]), guidance_scale=1.0)
    params = add_lora(backbone.network, rank=2, alpha=4.0, target_modules=backbone.lora_target_modules)
    adapted = {n for n, m in backbone.transformer.named_modules() if m in set(lora_layers(backbone.transformer))}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.attn2.to_v", "transformer_blocks.1.attn.to_out.0"} <= adapted
    assert not any(".ff." in n or "norm" in n or "embed" in n for n in adapted)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out_dir = backbone.save_lora(tmp_path / "lora")
    pipe = pipeline(tiny["t5"])
    x, t = torch.randn(1, 4, 32, 32), torch.tensor(600.0)
    embeds, pooled = torch.randn(1, 77 + 256, 32), torch.randn(1, 64)
    with torch.no_grad():
        before = direct(pipe.transformer, x, t, embeds, pooled)
        pipe.load_lora_weights(out_dir)
        loaded = direct(pipe.transformer, x, t, embeds, pooled)
        own = direct(backbone.transformer, x, t, embeds, pooled)
        fused = StableDiffusion3Backbone(str(tiny["t5"]), lora=str(out_dir))
        from_option = direct(fused.transformer, x, t, embeds, pooled)
    torch.testing.assert_close(loaded, own, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_option, own, rtol=1e-4, atol=1e-5)
    assert (loaded - before).abs().max() > 1e-3  # the adapter did load and change the output
    assert fused.fused_lora == str(out_dir) and not any("lora_" in n for n, _ in fused.transformer.named_parameters())


# -- (c) VAE decode and encode ----------------------------------------------------------------------

def test_decode_encode_use_sd3_scaling_and_shift(tiny):
    backbone = StableDiffusion3Backbone(str(tiny["t5"]), guidance_scale=1.0)
    config = json.loads((tiny["t5"] / "vae" / "config.json").read_text())
    assert (config["scaling_factor"], config["shift_factor"]) == (SCALING_FACTOR, SHIFT_FACTOR) == (1.5305, 0.0609)
    vae = AutoencoderKL.from_pretrained(tiny["t5"] / "vae")
    latents = torch.randn(2, 4, 32, 32) * 2
    with torch.no_grad():
        images = backbone.decode(latents)
        raw = vae.decode(latents / SCALING_FACTOR + SHIFT_FACTOR).sample  # as the pipeline decodes
        torch.testing.assert_close(images, ((raw + 1) / 2).clamp(0, 1), rtol=1e-5, atol=1e-6)
        assert images.shape == (2, 3, 32, 32)
        encoded = backbone.encode(images)
        mean = vae.encode(images * 2 - 1).latent_dist.mean
        # encode inverts the decoder's input map on the posterior mean
        torch.testing.assert_close(encoded / SCALING_FACTOR + SHIFT_FACTOR, mean, rtol=1e-5, atol=1e-5)
        assert (mean - encoded / SCALING_FACTOR).abs().min() > 0.05  # the shift is applied


# -- (d) errors -------------------------------------------------------------------------------------

def test_missing_model_is_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        StableDiffusion3Backbone(str(tmp_path / "nowhere"), local_files_only=True)
    message = str(info.value)
    assert message.startswith(f"could not load the Stable Diffusion 3 pipeline from '{tmp_path / 'nowhere'}'")
    assert "hf download" in message and message.count(". ") == 0 and "\n" not in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(FileNotFoundError, match=rf"'{hub_id}'.*`hf download {hub_id}`"):
        StableDiffusion3Backbone(hub_id)


# -- (e) the optimizable embedding ------------------------------------------------------------------

def test_condition_embedding_round_trip(tiny):
    """One flat tensor per sample (sequence then pooled); with_embedding puts a new one where the
    transformer reads it, checked against a direct call with the test's own sequence and pooled."""
    backbone = StableDiffusion3Backbone(str(tiny["no_t5_dynamic"]), guidance_scale=2.0, max_sequence_length=20)
    cond = backbone.encode_condition({"prompt": PROMPTS})
    emb = backbone.condition_embedding(cond)
    assert emb.shape == (2, (77 + 20) * 32 + 64) and not emb.requires_grad
    x, t = torch.randn(2, 4, 32, 32), torch.tensor(400.0)
    seq, pooled = torch.randn(2, 97, 32), torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.denoise(x, t, backbone.with_embedding(cond, emb)), backbone.denoise(x, t, cond))
        got = backbone.denoise(x, t, backbone.with_embedding(cond, torch.cat([seq.flatten(1), pooled], 1)))
        out = direct(backbone.transformer, torch.cat([x, x]), t, torch.cat([cond.negative_embeds, seq]),
                     torch.cat([cond.negative_pooled, pooled]))
        uncond, text = out.chunk(2)
        torch.testing.assert_close(got, uncond + 2.0 * (text - uncond), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sequence 97x32 then pooled"):
        backbone.with_embedding(cond, emb[:, :-1])


# -- (f) the shipped configs, one optimizer step on the tiny SD3 --------------------------------------

CONFIGS = [ROOT / "configs" / "models" / name for name in ("sd35_text_editing.yaml", "sd35_reward_lora.yaml")]


@pytest.fixture(scope="module")
def config_files(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("sd3_config_models")
    np.savez(root / "photos.npz", images=np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32))
    return {"sd3": str(tiny["t5"]), "clip": str(build_tiny_clip(root / "clip")), "photos": str(root / "photos.npz"),
            "mlp": str(save(aesthetic_state("improved", dim=8), root / "aesthetic.pth"))}


def _swap(node, files):
    """Real model ids and files -> tiny ones, 2 sampling steps, full precision."""
    name = node["class_path"].rsplit(".", 1)[-1]
    args = node.setdefault("init_args", {})
    if name == "StableDiffusion3Backbone":
        args.update(model=files["sd3"], dtype=None, height=None, width=None)
    elif name in ("CLIPScore", "AestheticScore"):
        args["model"] = files["clip"]
        if "mlp" in args:
            args["mlp"] = files["mlp"]
    elif name == "FlowMatchEuler":
        args["num_inference_steps"] = 2
    for value in args.values():
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, dict) and "class_path" in child:
                _swap(child, files)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_takes_one_step_on_tiny_sd3(path, config_files, tmp_path, monkeypatch):
    from sdo_lightning.cli import main
    from sdo_lightning.modules.latent_optimization import LatentOptimization

    text = path.read_text()
    assert text.startswith(f"# Run: sdo fit --config configs/models/{path.name}") and "Needs" in text
    config = copy.deepcopy(yaml.safe_load(text))
    _swap(config["model"], config_files)
    data = config["data"]["init_args"]
    if "images" in data:
        data.update(images=config_files["photos"], num_samples=2)
    if "prompts_file" in data:
        data.update(prompts_file=str(ROOT / data["prompts_file"]), batch_size=2)
    config["trainer"].update(max_steps=1, accelerator="cpu", devices=1, precision="32-true", accumulate_grad_batches=1,
                             default_root_dir=str(tmp_path), logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                                     "init_args": {"save_dir": str(tmp_path)}})
    (tmp_path / path.name).write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cli = main(["--config", str(tmp_path / path.name)], run=False)
    module = cli.model
    assert isinstance(module.backbone, StableDiffusion3Backbone)
    torch.manual_seed(0)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    log_dir = Path(cli.trainer.log_dir)
    if isinstance(module, LatentOptimization):
        assert module.target.invert_images
        assert torch.isfinite(module.variable).all() and (module.variable.detach() - module.start_latent).abs().max() > 0
        assert (log_dir / "before_after.png").is_file()
    else:
        b = [p for n, p in module.named_parameters() if "lora_B" in n]
        assert b and max(p.abs().max().item() for p in b) > 0
        assert (log_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
