"""SDXL, SD3 and FLUX.1 for benchmarks/gradient_cost.py, built in memory with random weights.

The denoisers and VAEs take the published configs (the model repos' ``unet/``, ``transformer/``
and ``vae/config.json``; see BENCHMARKS.md for which values the installed diffusers confirms);
the text encoders are small random ones whose output widths are what the denoiser reads (their
cost is outside the sampling loop), with tokenizers from sdo_lightning/testing/tiny_models.py. ``small`` builds
each family at test size (same code path, tens of thousands of weights). The configs live in
:func:`denoiser_config` so that ``--count-params`` counts exactly what the benchmark builds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _models import (ATTENTION, NATIVE_LATENT, PROMPT, Case, _to, _tokenizers, _weighted_mean, build_embedded,
                     build_pixart, build_sd15, build_tiny)

FAMILIES = ("sdxl", "sd3", "flux")
#: published sizes of the denoisers (model cards / release notes), for --count-params
PUBLISHED = {"sdxl": "2.6B (UNet)", "sd3": "2B (SD3-medium) / 2.5B (SD3.5-medium)", "flux": "12B"}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json ("attention_head_dim" is diffusers'
# legacy name for the number of heads per block)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# sdo_lightning/testing/tiny_sdxl.py's shape: two encoders of widths 8 and 16, pooled projection 12, time ids 6 x 4
SDXL_UNET_SMALL = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=2, use_linear_projection=True, cross_attention_dim=24,
    addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 12,
    norm_num_groups=4,
)
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
# stabilityai/stable-diffusion-3.5-medium: MMDiT-X (a second image self-attention in blocks 0-12), RMS q/k norm
SD35_MEDIUM = {**SD3_MEDIUM, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
               "pos_embed_max_size": 384}
SD3_SMALL = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
)
# black-forest-labs/FLUX.1-dev (schnell: guidance_embeds False), transformer/config.json
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)
# diffusers' own FLUX tests' config (as sdo_lightning/testing/tiny_flux.py)
FLUX_SMALL = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
)
#: VAE latent normalization: (latent channels, scaling_factor, shift_factor) of each repo's vae/config.json
VAE_FACTORS = {"sdxl": (4, 0.13025, None), "sd3": (16, 1.5305, 0.0609), "flux": (16, 0.3611, 0.1159)}


def denoiser_config(name: str, small: bool, sd3_variant: str = "3-medium", flux_variant: str = "dev") -> tuple[Any, dict]:
    """(diffusers class, constructor kwargs) of the family's denoiser."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    if name == "sdxl":
        return UNet2DConditionModel, dict(SDXL_UNET_SMALL if small else SDXL_UNET)
    if name == "sd3":
        config = dict(SD3_SMALL if small else SD35_MEDIUM if sd3_variant == "3.5-medium" else SD3_MEDIUM)
        if small and sd3_variant == "3.5-medium":  # the first block with the second attention, as sdo_lightning/testing/tiny_sd3.py
            config.update(dual_attention_layers=(0,), qk_norm="rms_norm")
        return SD3Transformer2DModel, config
    if name == "flux":
        return FluxTransformer2DModel, {**(FLUX_SMALL if small else FLUX_TRANSFORMER),
                                        "guidance_embeds": flux_variant == "dev"}
    raise ValueError(f"unknown family {name!r}")


def vae(name: str, small: bool) -> nn.Module:
    """The family's AutoencoderKL: SD's 4-level encoder/decoder (128-512 channels; SD3 and FLUX with
    16 latent channels and no quant convs), or a 2-level test-sized one (VAE factor 2)."""
    from diffusers import AutoencoderKL

    channels, scaling, shift = VAE_FACTORS[name]
    blocks = (8, 8) if small else (128, 256, 512, 512)
    quant = name == "sdxl"
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=blocks,
        layers_per_block=1 if small else 2, norm_num_groups=4 if small else 32,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        sample_size=1024, scaling_factor=scaling, shift_factor=shift, force_upcast=True,
        use_quant_conv=quant, use_post_quant_conv=quant,
    )


def count_parameters(name: str, small: bool, sd3_variant: str, flux_variant: str) -> dict[str, int]:
    """Parameter counts of the family's denoiser (and its buffers) and VAE, built on the meta device."""
    cls, config = denoiser_config(name, small, sd3_variant, flux_variant)
    with torch.device("meta"):
        network, autoencoder = cls(**config), vae(name, small)
    return {"denoiser": sum(p.numel() for p in network.parameters()),
            # SD3's fixed sin-cos position table is a buffer, saved with the weights (3.5-medium: 226M)
            "buffers": sum(b.numel() for b in network.buffers()),
            "vae": sum(p.numel() for p in autoencoder.parameters())}


def _clip(width: int, vocab: int, small: bool, projection: int | None = None) -> nn.Module:
    """A 2-layer random CLIP text encoder of hidden width ``width`` (with a ``projection``: pooled output
    projected, CLIPTextModelWithProjection); MLP width 64 (37 small)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=width, intermediate_size=37 if small else 64, num_attention_heads=2 if small else width // 64,
        num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, projection_dim=projection or width,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(width: int, vocab: int, small: bool) -> nn.Module:
    """A 1-layer random T5 encoder of width ``width`` (T5-XXL's 4096 for the full models)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=width, d_kv=8 if small else 64, d_ff=37 if small else 64, num_layers=1,
        num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _projection_weights(network: nn.Module, modules: list[str]) -> list[nn.Parameter]:
    """The weight matrices of the layers named ``modules`` (the attention projections)."""
    return [p for name, p in network.named_parameters() if name.endswith(tuple(f".{m}.weight" for m in modules))]


def build_family(name: str, device: torch.device, seed: int, latent_size: int, small: bool = False,
                 sd3_variant: str = "3-medium", flux_variant: str = "dev", **speed: Any) -> Case:
    """The project's backbone for ``name`` around a pipeline built from the published configs.

    sdxl: ``StableDiffusionXLBackbone`` (guidance 5.0, the pipeline's default; SDXL-base's Euler
    scheduler config, whose betas DDIM reads); sd3: ``StableDiffusion3Backbone`` (guidance 7.0,
    the pipeline's default; flow-matching scheduler with shift 3.0); flux: ``FluxBackbone`` (dev:
    embedded guidance 3.5, one call per step, dynamic shifting; schnell: shift 1). bf16 on CUDA,
    fp32 elsewhere. LoRA / ``parameters`` targets: the backbone's ``lora_target_modules`` (SDXL: the
    attention projections to_q/k/v/out.0; SD3 and FLUX add the text stream's add_*_proj, to_add_out).
    """
    from diffusers import (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           StableDiffusion3Pipeline, StableDiffusionXLPipeline)
    from transformers import CLIPTokenizer

    from sdo_lightning.backbones import FluxBackbone, StableDiffusion3Backbone, StableDiffusionXLBackbone

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    cls, config = denoiser_config(name, small, sd3_variant, flux_variant)
    network = _to(cls(**config), device, dtype)
    autoencoder = _to(vae(name, small), device, dtype)
    tiny = _tokenizers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer, vocab = tiny.build_tiny_tokenizer(root / "clip")
        if name == "sdxl":
            # SDXL's second tokenizer pads with "!" instead of the end token
            tokenizer_2 = CLIPTokenizer(str(root / "clip" / "vocab.json"), str(root / "clip" / "merges.txt"),
                                        model_max_length=77, pad_token="!")
        elif name == "sd3":
            tokenizer_2, _ = tiny.build_tiny_tokenizer(root / "clip2")
        t5_tokenizer, t5_vocab = tiny.build_tiny_t5_tokenizer(root / "t5", max_length=512)
    enc = lambda module: _to(module, device, dtype)
    if name == "sdxl":
        # CLIP-L (768) and OpenCLIP-G (1280, projected pooled 1280): 768 + 1280 = cross_attention_dim,
        # 6 x 256 + 1280 = 2816
        w1, w2, proj = (8, 16, 12) if small else (768, 1280, 1280)
        schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                        timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(
            vae=autoencoder, text_encoder=enc(_clip(w1, vocab, small)), tokenizer=tokenizer,
            text_encoder_2=enc(_clip(w2, vocab, small, projection=proj)), tokenizer_2=tokenizer_2, unet=network,
            scheduler=EulerDiscreteScheduler(**schedule), add_watermarker=False,
        )
        side = latent_size * pipe.vae_scale_factor
        backbone = StableDiffusionXLBackbone.from_pipeline(pipe, guidance_scale=5.0, height=side, width=side, **speed)
        # keys SDXL-base's scheduler_config.json also carries (Euler ignores them; DDIM reads them)
        backbone.scheduler_config.update(set_alpha_to_one=False, clip_sample=False)
        modules = list(ATTENTION)
    elif name == "sd3":
        # CLIP-L (768, pooled 768) + OpenCLIP-G (1280, pooled 1280): pooled 2048; both padded to T5's 4096
        w1, w2, t5_width = (8, 16, 32) if small else (768, 1280, 4096)
        pipe = StableDiffusion3Pipeline(
            transformer=network, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=autoencoder,
            text_encoder=enc(_clip(w1, vocab, small, projection=32 if small else w1)), tokenizer=tokenizer,
            text_encoder_2=enc(_clip(w2, vocab, small, projection=32 if small else w2)), tokenizer_2=tokenizer_2,
            text_encoder_3=enc(_t5(t5_width, t5_vocab, small)), tokenizer_3=t5_tokenizer,
        )
        side = latent_size * pipe.vae_scale_factor
        backbone = StableDiffusion3Backbone.from_pipeline(pipe, height=side, width=side, **speed)
        modules = list(StableDiffusion3Backbone.lora_target_modules)
    else:
        # CLIP-L's pooled output (768) and T5-XXL's sequence (4096)
        clip_width, t5_width = (32, 32) if small else (768, 4096)
        dev = flux_variant == "dev"
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0 if dev else 1.0, use_dynamic_shifting=dev, base_shift=0.5,
            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        )
        pipe = FluxPipeline(
            scheduler=scheduler, vae=autoencoder, text_encoder=enc(_clip(clip_width, vocab, small)),
            tokenizer=tokenizer, text_encoder_2=enc(_t5(t5_width, t5_vocab, small)), tokenizer_2=t5_tokenizer,
            transformer=network,
        )
        side = latent_size * pipe.vae_scale_factor
        backbone = FluxBackbone.from_pipeline(pipe, height=side, width=side, **speed)
        modules = list(FluxBackbone.lora_target_modules)
    return Case(name, backbone, backbone.encode_condition({"prompt": [PROMPT]}), (1, *backbone.latent_shape),
                _weighted_mean((1, 3, side, side), device, seed + 1), _projection_weights(network, modules), modules)


def build(name: str, device: torch.device, args: Any) -> Case:
    """The case ``name`` for gradient_cost.py's arguments."""
    speed = {"compile": args.compile, "channels_last": args.channels_last}
    latent = args.sd_latent_size or NATIVE_LATENT.get(name)
    if name in ("sdxl", "sd3", "flux"):
        case = build_family(name, device, args.seed, latent, small=args.tiny_sd, sd3_variant=args.sd3_variant,
                            flux_variant=args.flux_variant, **speed)
    elif name == "tiny":
        case = build_tiny(device, args.seed, **speed)
    elif name == "embedded":
        case = build_embedded(device, args.seed, **speed)
    elif name == "pixart":
        case = build_pixart(device, args.seed, latent, 4.5, small=args.tiny_sd, **speed)
    else:
        case = build_sd15(device, args.seed, latent, args.guidance, small=args.tiny_sd, **speed)
    if args.lora_modules:
        case.lora_modules = list(args.lora_modules)
    return case
