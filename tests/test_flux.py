"""FLUX.1 backbone on tiny random schnell-like and dev-like pipelines loaded from disk as users load
theirs; every expected number comes from diffusers' FluxPipeline run on the same model (its own
prompt encoding, packing, schedule and loop) or from a loop written here over its pieces."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import FluxPipeline

from sdo_lightning import sample
from sdo_lightning.backbones.flux import FluxBackbone, latent_image_ids, pack_latents, unpack_latents
from sdo_lightning.contracts import Target
from sdo_lightning.gradient_modes import FullBackprop, ShortcutGradient
from sdo_lightning.lora import add_lora, lora_layers
from sdo_lightning.solvers import FlowMatchEuler
from sdo_lightning.testing.tiny_flux import build_tiny_flux, tiny_flux_pipeline
from sdo_lightning.testing.tiny_models import build_tiny_clip
from sdo_lightning.testing.tiny_objective_models import TinyOpenCLIP, install_fake_open_clip, save

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a dog on a hill"]
SIZE = 16  # pixels: latents (16, 8, 8), 16 packed tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flux")
    return {"schnell": build_tiny_flux(root / "schnell"), "dev": build_tiny_flux(root / "dev", guidance_embeds=True)}


def backbone(root, **kw):
    return FluxBackbone(str(root), height=SIZE, width=SIZE, local_files_only=True, **kw)


def pipeline_sample(pipe, latents, steps, **kw):
    """FluxPipeline's own trajectory from our (unpacked) latents, unpacked again."""
    b, c, h, w = latents.shape
    packed = pipe._pack_latents(latents, b, c, h, w)
    out = pipe(prompt=PROMPTS[:b], latents=packed, height=SIZE, width=SIZE, num_inference_steps=steps,
               output_type="latent", **kw).images
    return pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)


CASES = {  # variant, backbone options, the same options in FluxPipeline's words
    "schnell": ("schnell", {}, {"guidance_scale": 0.0}),
    "dev-guidance-embedding": ("dev", {"guidance_scale": 4.0}, {"guidance_scale": 4.0}),
    "dev-true-cfg": ("dev", {"guidance_scale": 2.0, "true_cfg_scale": 3.0, "negative_prompt": "blurry"},
                     {"guidance_scale": 2.0, "true_cfg_scale": 3.0, "negative_prompt": "blurry"}),
    "schnell-true-cfg": ("schnell", {"true_cfg_scale": 2.5}, {"true_cfg_scale": 2.5, "negative_prompt": ""}),
}


@pytest.mark.parametrize("case", CASES)
def test_trajectory_equals_flux_pipeline(tiny, case):
    """The no-grad trajectory of sample() equals FluxPipeline(output_type='latent') from the same
    latents: prompt encoding, packing, position ids, timestep / 1000, guidance embedding, true
    CFG, and the schedule (sigmas linspace(1, 1/N, N), mu of dynamic shifting on dev)."""
    variant, options, pipe_options = CASES[case]
    flux = backbone(tiny[variant], **options)
    pipe = FluxPipeline.from_pretrained(tiny[variant])
    x = torch.randn(2, *flux.latent_shape, generator=torch.Generator().manual_seed(0))
    steps = 3
    with torch.no_grad():
        got = sample(flux.denoise, FlowMatchEuler(steps), x, flux.encode_condition({"prompt": PROMPTS}),
                     scheduler_config=flux.scheduler_config)
    expected = pipeline_sample(pipe, x, steps, max_sequence_length=flux.max_sequence_length, **pipe_options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - x).abs().max() > 0.1  # the trajectory went somewhere
    # the pipeline's scheduler holds the schedule it set: the solver's is the same
    ours = FlowMatchEuler(steps).begin(flux.scheduler_config).timesteps
    torch.testing.assert_close(ours, pipe.scheduler.timesteps, rtol=0, atol=0)
    if variant == "dev":  # dynamic shifting moved the schedule off the plain linspace
        assert (ours - torch.tensor(np.linspace(1, 1 / steps, steps) * 1000, dtype=ours.dtype)).abs().max() > 1


def test_defaults_sequence_length_and_latent_shape(tiny, tmp_path):
    schnell, dev = backbone(tiny["schnell"]), backbone(tiny["dev"])
    assert (schnell.max_sequence_length, dev.max_sequence_length) == (256, 512)
    assert not schnell.guidance_embedding and dev.guidance_embedding
    assert schnell.flow_matching and not schnell.lcm_distilled and not dev.lcm_distilled
    assert dev.encode_condition({"prompt": PROMPTS}).embeds.shape == (2, 512, 32)
    # the pipeline's default size: 128 x its VAE factor (1024 px for FLUX's factor 8; 2 here)
    assert FluxBackbone(str(tiny["schnell"])).latent_shape == (16, 128, 128)
    assert backbone(tiny["schnell"], max_sequence_length=6).encode_condition({"prompt": PROMPTS}).embeds.shape[1] == 6
    with pytest.raises(ValueError, match="multiples of 4"):
        FluxBackbone(str(tiny["schnell"]), height=18, width=16)
    with pytest.raises(ValueError, match="between 1 and 512"):
        backbone(tiny["dev"], max_sequence_length=600)
    # from_pipeline around a pipeline object denoises as loading the same directory
    wrapped = FluxBackbone.from_pipeline(FluxPipeline.from_pretrained(tiny["dev"]), height=SIZE, width=SIZE)
    assert wrapped.max_sequence_length == 512 and wrapped.fused_lora is None
    # one built in memory has not recorded its scheduler's class: the backbone still knows it is a flow
    assert FluxBackbone.from_pipeline(tiny_flux_pipeline(tmp_path, guidance_embeds=True)).flow_matching
    x, batch = torch.randn(1, *dev.latent_shape), {"prompt": PROMPTS[:1]}
    with torch.no_grad():
        torch.testing.assert_close(wrapped.denoise(x, torch.tensor(300), wrapped.encode_condition(batch)),
                                   dev.denoise(x, torch.tensor(300), dev.encode_condition(batch)), rtol=0, atol=0)


def test_packing_round_trips_and_ids_match_pipeline():
    x = torch.randn(2, 16, 8, 12)  # not square: rows and columns must not swap
    tokens = pack_latents(x)
    assert tokens.shape == (2, 4 * 6, 64)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 16, 8, 12), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 8, 12), x, rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 8, 12), FluxPipeline._unpack_latents(tokens, 16, 24, 2),
                               rtol=0, atol=0)
    expected = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(4, 6, "cpu", torch.float32), expected, rtol=0, atol=0)


def test_lora_export_round_trips_and_fuses_at_load(tiny, tmp_path):
    """save_lora writes diffusers' FLUX format: a fresh pipeline's load_lora_weights gives the
    backbone's transformer outputs (alpha != rank, read from the metadata); lora= fuses it."""
    flux = backbone(tiny["dev"])
    params = add_lora(flux.transformer, rank=2, alpha=6.0, target_modules=flux.lora_target_modules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapted = {n.split(".", 2)[-1] for n, m in flux.transformer.named_modules() if m in set(lora_layers(flux.transformer))}
    assert {"attn.to_q", "attn.to_out.0", "attn.add_k_proj", "attn.to_add_out"} <= adapted
    flux.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    pipe = FluxPipeline.from_pretrained(tiny["dev"])
    args = dict(hidden_states=torch.randn(1, 16, 64), timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 5, 32),
                txt_ids=torch.zeros(5, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                return_dict=False)
    with torch.no_grad():
        before = pipe.transformer(**args)[0]
        pipe.load_lora_weights(tmp_path / "lora")
        loaded, own = pipe.transformer(**args)[0], flux.transformer(**args)[0]
        fused = backbone(tiny["dev"], lora=str(tmp_path / "lora"))
        from_fused = fused.transformer(**args)[0]
    assert len(list(lora_layers(pipe.transformer))) == len(list(lora_layers(flux.transformer)))
    torch.testing.assert_close(loaded, own, rtol=1e-5, atol=1e-5)
    assert (loaded - before).abs().max() > 1e-3  # the adapter did load and change the output
    torch.testing.assert_close(from_fused, own, rtol=1e-4, atol=1e-5)
    assert fused.fused_lora == str(tmp_path / "lora") and not any("lora_" in n for n, _ in fused.transformer.named_parameters())


def test_decode_matches_pipeline_and_encode(tiny):
    """decode of the pipeline's latents equals the pipeline's own images (its 1/0.3611 and +0.1159,
    VAE decode and postprocessing); encode is the posterior mean, shifted and scaled back."""
    flux = backbone(tiny["schnell"])
    pipe = FluxPipeline.from_pretrained(tiny["schnell"])
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    x = torch.randn(2, *flux.latent_shape, generator=torch.Generator().manual_seed(1))
    latents = pipeline_sample(pipe, x, 2, max_sequence_length=256)
    b, c, h, w = x.shape
    images = pipe(prompt=PROMPTS, latents=pipe._pack_latents(x, b, c, h, w), height=SIZE, width=SIZE,
                  num_inference_steps=2, max_sequence_length=256, output_type="pt").images
    got = flux.decode(latents.requires_grad_())
    assert got.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(got, images, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got.sum(), latents)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        mean = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        torch.testing.assert_close(flux.encode(images), (mean - 0.1159) * 0.3611, rtol=1e-5, atol=1e-5)


def test_missing_model_is_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as info:
        FluxBackbone(str(tmp_path / "nowhere"), local_files_only=True)
    message = str(info.value)
    assert message.startswith(f"could not load the FLUX pipeline from '{tmp_path / 'nowhere'}'")
    assert "hf download" in message and message.count(". ") == 0 and "\n" not in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "black-forest-labs/FLUX.1-schnell"
    with pytest.raises(FileNotFoundError, match=rf"'{hub_id}'.*`hf download {hub_id}`"):
        FluxBackbone(hub_id)


def test_condition_embedding_round_trip(tiny):
    """One row per sample holding T5's sequence and CLIP's pooled vector; with_embedding splits it
    back, and each part reaches the transformer."""
    flux = backbone(tiny["schnell"], max_sequence_length=8, true_cfg_scale=2.0)
    cond = flux.encode_condition({"prompt": PROMPTS})
    emb = flux.condition_embedding(cond)
    assert emb.shape == (2, 8 * 32 + 32) and emb.requires_grad is False
    back = flux.with_embedding(cond, emb)
    assert torch.equal(back.embeds, cond.embeds) and torch.equal(back.pooled, cond.pooled)
    assert back.negative_embeds is cond.negative_embeds
    x, t = torch.randn(2, *flux.latent_shape), torch.tensor(700.0)
    with torch.no_grad():
        out = flux.denoise(x, t, cond)
        torch.testing.assert_close(flux.denoise(x, t, back), out, rtol=0, atol=0)
        for part in (slice(0, 8 * 32), slice(8 * 32, None)):  # sequence, pooled
            moved = emb.clone()
            moved[:, part] += 1.0
            assert (flux.denoise(x, t, flux.with_embedding(cond, moved)) - out).abs().max() > 1e-4
        # rows of the condition are samples
        torch.testing.assert_close(flux.denoise(x[1:], t, cond[torch.tensor([1])]), out[1:], rtol=1e-5, atol=1e-5)


def test_sdo_latent_gradient_equals_hand_written_euler_loop(tiny):
    """The SDO gradient w.r.t. x_T through 2 dev-like steps equals autograd through an Euler loop
    written here over the pipeline's own sigmas, prompt encoding and packing, keeping the first
    call's graph only; full backprop differs from it (so the comparison can fail)."""
    flux = backbone(tiny["dev"], guidance_scale=3.0)
    pipe = FluxPipeline.from_pretrained(tiny["dev"])
    x = torch.randn(2, *flux.latent_shape, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    pipeline_sample(pipe, x, 2, guidance_scale=3.0)  # sets the pipeline's schedule
    sigmas, timesteps = pipe.scheduler.sigmas, pipe.scheduler.timesteps
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=512)
    img_ids = pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)

    def velocity(z, t):
        out = pipe.transformer(hidden_states=pipe._pack_latents(z, 2, 16, 8, 8), timestep=t.expand(2) / 1000,
                               guidance=torch.full((2,), 3.0), pooled_projections=pooled, encoder_hidden_states=embeds,
                               txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
        return pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)

    def reference(kept):
        z = x0 = x.clone().requires_grad_()
        for i, t in enumerate(timesteps):
            with torch.set_grad_enabled(i in kept):
                v = velocity(z, t)
            z = z + (sigmas[i + 1] - sigmas[i]) * v
        return torch.autograd.grad((z * weights).sum(), x0)[0]

    def ours(mode):
        start = x.clone().requires_grad_()
        out = sample(flux.denoise, FlowMatchEuler(2), start, flux.encode_condition({"prompt": PROMPTS}),
                     gradient_mode=mode, target=Target.latent(), scheduler_config=flux.scheduler_config)
        return torch.autograd.grad((out * weights).sum(), start)[0]

    sdo = ours(ShortcutGradient())
    assert torch.isfinite(sdo).all() and sdo.abs().max() > 0
    torch.testing.assert_close(sdo, reference(kept={0}), rtol=1e-4, atol=1e-6)
    full = ours(FullBackprop())
    torch.testing.assert_close(full, reference(kept={0, 1}), rtol=1e-4, atol=1e-6)
    assert (full - sdo).abs().max() > 1e-4 * full.abs().max()


@pytest.mark.parametrize("precision,target", [("bf16-true", "embedding"), ("bf16-mixed", "x_T")])
def test_fits_under_trainer_precision(tiny, tmp_path, precision, target):
    """The Trainer converts the module (bf16-true) or autocasts (bf16-mixed); the float32 prompt
    embeddings made before the conversion, and true CFG's negative ones, must follow."""
    from lightning.pytorch import Trainer

    from sdo_lightning import Objective
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.latent_optimization import LatentOptimization

    class Redness(Objective, register=False):
        def forward(self, images, batch):
            return -(images[:, 0] - images[:, 1:].mean(1)).flatten(1).mean(1)

    module = LatentOptimization(objective=Redness(), backbone=backbone(tiny["dev"], true_cfg_scale=2.0),
                                solver=FlowMatchEuler(2), target=target, lr=0.1)
    Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=tmp_path, precision=precision).fit(
        module, datamodule=SampleSet(num_samples=2, prompt=PROMPTS))
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.backbone.transformer.dtype == expected and module.variable.dtype == expected
    start = module.start_latent if target == "x_T" else module.backbone.condition_embedding(module.start_cond)
    assert torch.isfinite(module.variable).all() and not torch.equal(module.variable, start.to(expected))


# -- configs/models/flux_*.yaml ------------------------------------------------------------------

CONFIGS = {"flux_schnell_noise": "schnell", "flux_dev_reward_lora": "dev"}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_takes_one_step_on_tiny_flux(name, tiny, tmp_path, monkeypatch):
    """Each FLUX config, read as users run it, takes one optimizer step with the tiny FLUX swapped
    in (and tiny CLIP/HPSv2 stand-ins, 2 steps, batch 2, one CPU step in fp32)."""
    from sdo_lightning.cli import main
    from sdo_lightning.modules.latent_optimization import LatentOptimization

    path = ROOT / "configs" / "models" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith(f"# Run: sdo fit --config configs/models/{name}.yaml") and "bf16" in text
    config = copy.deepcopy(yaml.safe_load(text))
    model = config["model"]["init_args"]
    backbone_args = model["backbone"]["init_args"]
    assert backbone_args["dtype"] == "bfloat16" and config["trainer"]["precision"] == "bf16-true"
    assert backbone_args["model"] == {"schnell": "black-forest-labs/FLUX.1-schnell",
                                      "dev": "black-forest-labs/FLUX.1-dev"}[CONFIGS[name]]
    backbone_args.update(model=str(tiny[CONFIGS[name]]), height=SIZE, width=SIZE)
    model["solver"]["init_args"]["num_inference_steps"] = 2
    objective = model["objective"]
    if objective["class_path"] == "CLIPScore":
        objective["init_args"]["model"] = str(build_tiny_clip(tmp_path / "clip"))
    else:
        install_fake_open_clip(monkeypatch)
        objective["init_args"]["checkpoint"] = str(save({"state_dict": TinyOpenCLIP(seed=3).state_dict()},
                                                        tmp_path / "HPS_v2_compressed.pt"))
    data = config["data"]["init_args"]
    data.update({"num_samples": 2} if config["data"]["class_path"] == "SampleSet"
                else {"batch_size": 2, "prompts_file": str(ROOT / data["prompts_file"])})
    config["trainer"].update(max_steps=1, accelerator="cpu", devices=1, precision="32-true", accumulate_grad_batches=1,
                             default_root_dir=str(tmp_path), logger={
                                 "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": str(tmp_path)}})
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)

    cli = main(["--config", str(file)], run=False)
    module = cli.model
    assert isinstance(module.backbone, FluxBackbone)
    torch.manual_seed(0)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    if isinstance(module, LatentOptimization):
        assert torch.isfinite(module.variable).all()
        assert (module.variable.detach() - module.start_latent).abs().max() > 0
    else:
        b = [p for n, p in module.named_parameters() if "lora_B" in n]
        assert b and all(torch.isfinite(p).all() for p in b) and max(p.abs().max().item() for p in b) > 0
        assert (Path(cli.trainer.log_dir) / "lora" / "pytorch_lora_weights.safetensors").is_file()
